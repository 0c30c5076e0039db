//! `strata-s3-server ROOT [--addr 127.0.0.1:9000] [--get-chunk BYTES]`: an
//! S3-compatible server
//! on loopback for trying Strata and running its benchmarks. Access key and
//! secret are printed at start.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut root: Option<PathBuf> = None;
    let mut addr = "127.0.0.1:9000".to_string();
    let mut chunk = 256 << 10;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--addr" => {
                addr = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--addr needs HOST:PORT"))?
            }
            "--get-chunk" => {
                chunk = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("--get-chunk needs a byte count"))?
            }
            "-h" | "--help" => {
                println!(
                    "usage: strata-s3-server ROOT [--addr 127.0.0.1:9000] [--get-chunk BYTES]"
                );
                return Ok(());
            }
            _ => root = Some(PathBuf::from(a)),
        }
    }
    let root = root
        .ok_or_else(|| anyhow::anyhow!("usage: strata-s3-server ROOT [--addr 127.0.0.1:9000]"))?;
    std::fs::create_dir_all(&root)?;
    let s = strata_testkit::S3Server::start_with_chunk(&root, &addr, chunk)?;
    println!("S3 server on {} over {}", s.endpoint(), root.display());
    println!(
        "access key: {}  secret key: {}",
        strata_testkit::s3::ACCESS_KEY,
        strata_testkit::s3::SECRET_KEY
    );
    println!("buckets are the directories under {}", root.display());
    // Serve until killed.
    loop {
        std::thread::park();
    }
}
