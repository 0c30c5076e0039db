//! `strata-latency-proxy --upstream HOST:PORT [--listen 127.0.0.1:0]
//! [--latency-ms 20] [--bandwidth BYTES_PER_SEC]`: makes a loopback server
//! look remote for benchmarks (a fixed delay each way, an optional
//! per-connection bandwidth cap). Prints the address it listens on and, on
//! SIGINT/SIGTERM or when stdin closes, the bytes it carried.

use std::time::Duration;

use strata_testkit::proxy::{LatencyProxy, ProxyOptions};

fn main() -> anyhow::Result<()> {
    let usage = "usage: strata-latency-proxy --upstream HOST:PORT [--listen 127.0.0.1:0] \
                 [--latency-ms 20] [--bandwidth BYTES_PER_SEC]";
    let mut args = std::env::args().skip(1);
    let (mut upstream, mut listen) = (None, "127.0.0.1:0".to_string());
    let mut opts = ProxyOptions {
        latency: Duration::from_millis(20),
        conn_bandwidth: None,
    };
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value; {usage}"))
        };
        match a.as_str() {
            "--upstream" => upstream = Some(val()?),
            "--listen" => listen = val()?,
            "--latency-ms" => opts.latency = Duration::from_millis(val()?.parse()?),
            "--bandwidth" => opts.conn_bandwidth = Some(val()?.parse()?),
            "-h" | "--help" => {
                println!("{usage}");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}; {usage}"),
        }
    }
    let upstream = upstream.ok_or_else(|| anyhow::anyhow!("{usage}"))?;
    let p = LatencyProxy::start(&listen, &upstream, opts)?;
    println!(
        "proxy on {} -> {upstream} (latency {:?} each way, bandwidth {} per connection)",
        p.addr,
        opts.latency,
        opts.conn_bandwidth
            .map(|b| format!("{b} B/s"))
            .unwrap_or_else(|| "unlimited".into())
    );
    // Serve until stdin closes (or the process is killed).
    let mut sink = String::new();
    while std::io::stdin()
        .read_line(&mut sink)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        sink.clear();
    }
    println!(
        "carried {} bytes down, {} up, {} connections",
        p.bytes_down(),
        p.stats()
            .bytes_up
            .load(std::sync::atomic::Ordering::Relaxed),
        p.stats()
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
