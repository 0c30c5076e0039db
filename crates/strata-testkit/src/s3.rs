//! An S3-compatible server (s3s-fs) on 127.0.0.1, on its own thread and
//! runtime so it outlives any one test runtime, stopped on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::sync::oneshot;

pub const ACCESS_KEY: &str = "strata-test-key";
pub const SECRET_KEY: &str = "strata-test-secret";

pub struct S3Server {
    pub addr: SocketAddr,
    /// GETs the server still answers with 503 SlowDown (see [`S3Server::throttle`]).
    throttle: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub root: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl S3Server {
    /// Starts a server with access key [`ACCESS_KEY`] / [`SECRET_KEY`] over a
    /// fresh temp directory.
    pub fn start() -> anyhow::Result<S3Server> {
        let dir = tempfile::tempdir()?;
        let mut s = Self::start_at(dir.path(), "127.0.0.1:0")?;
        s._dir = Some(dir);
        Ok(s)
    }

    /// Starts a server over `root` (each top-level directory is a bucket).
    pub fn start_at(root: &Path, bind: &str) -> anyhow::Result<S3Server> {
        Self::start_with_chunk(root, bind, crate::fast_fs::GET_CHUNK)
    }

    /// Like [`S3Server::start_at`], streaming GET bodies in `chunk`-byte
    /// pieces (4096 reproduces stock s3s-fs).
    pub fn start_with_chunk(root: &Path, bind: &str, chunk: usize) -> anyhow::Result<S3Server> {
        let root = root.to_path_buf();
        let fs = crate::fast_fs::FastFs::new(&root, chunk)?;
        let throttle = fs.throttle.clone();
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = b.build();
        let std_listener = std::net::TcpListener::bind(bind)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (tx, mut rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("s3-server".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("s3 server runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                        return;
                    };
                    let http = ConnBuilder::new(TokioExecutor::new());
                    loop {
                        tokio::select! {
                            res = listener.accept() => {
                                let Ok((sock, _)) = res else { continue };
                                let _ = sock.set_nodelay(true);
                                let conn = http.serve_connection(TokioIo::new(sock), service.clone()).into_owned();
                                tokio::spawn(async move { let _ = conn.await; });
                            }
                            _ = &mut rx => break,
                        }
                    }
                });
                rt.shutdown_background();
            })?;
        Ok(S3Server {
            addr,
            throttle,
            root,
            stop: Some(tx),
            thread: Some(thread),
            _dir: None,
        })
    }

    /// Answers the next `n` GETs with 503 SlowDown, as a throttling store does.
    pub fn throttle(&self, n: u64) {
        self.throttle.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// GETs still to be refused.
    pub fn throttled_left(&self) -> u64 {
        self.throttle.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates a bucket (a directory under the root).
    pub fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.root.join(name))?;
        Ok(())
    }

    /// A mount URI for `bucket` with this server's endpoint and credentials.
    pub fn uri(&self, bucket: &str) -> String {
        format!(
            "s3://{bucket}?endpoint={}&region=us-east-1&access_key_id={ACCESS_KEY}&secret_access_key={SECRET_KEY}",
            self.endpoint()
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
