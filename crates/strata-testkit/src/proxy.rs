//! A TCP proxy that makes a loopback server look remote: every byte is
//! delayed by a fixed one-way latency (in both directions, pipelined, like a
//! long link), each connection may be capped to a bandwidth, and the bytes
//! that cross it are counted (so tests can check what a UFS really served).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, Default)]
pub struct ProxyOptions {
    /// Added to every byte, each way.
    pub latency: Duration,
    /// Bytes per second per connection and direction; `None`: unlimited.
    pub conn_bandwidth: Option<u64>,
}

/// What crossed the proxy.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Bytes from the upstream server to clients.
    pub bytes_down: AtomicU64,
    /// Bytes from clients to the upstream server.
    pub bytes_up: AtomicU64,
    pub connections: AtomicU64,
}

pub struct LatencyProxy {
    pub addr: SocketAddr,
    stats: Arc<ProxyStats>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Chunks in flight per direction: bounds memory at 256 × 64 KiB.
const QUEUE: usize = 256;
const CHUNK: usize = 64 << 10;

impl LatencyProxy {
    /// Listens on `bind` and forwards every connection to `upstream`.
    pub fn start(bind: &str, upstream: &str, opts: ProxyOptions) -> anyhow::Result<LatencyProxy> {
        let upstream: SocketAddr = upstream.parse()?;
        let std_listener = std::net::TcpListener::bind(bind)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let stats = Arc::new(ProxyStats::default());
        let (tx, mut rx) = oneshot::channel::<()>();
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("latency-proxy".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("proxy runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    loop {
                        tokio::select! {
                            res = listener.accept() => {
                                let Ok((client, _)) = res else { continue };
                                st.connections.fetch_add(1, Ordering::Relaxed);
                                let st = st.clone();
                                tokio::spawn(async move {
                                    if let Ok(server) = TcpStream::connect(upstream).await {
                                        relay(client, server, opts, st).await;
                                    }
                                });
                            }
                            _ = &mut rx => break,
                        }
                    }
                });
                rt.shutdown_background();
            })?;
        Ok(LatencyProxy {
            addr,
            stats,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }

    pub fn bytes_down(&self) -> u64 {
        self.stats.bytes_down.load(Ordering::Relaxed)
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn relay(client: TcpStream, server: TcpStream, opts: ProxyOptions, st: Arc<ProxyStats>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pipe(cr, sw, opts, st.clone(), true);
    let down = pipe(sr, cw, opts, st, false);
    let _ = tokio::join!(up, down);
}

/// Copies one direction: a reader stamps each chunk with the time it may be
/// delivered; a writer waits for that time (and for the bandwidth budget)
/// before writing it.
async fn pipe<R, W>(mut r: R, mut w: W, opts: ProxyOptions, st: Arc<ProxyStats>, up: bool)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    let reader = tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; CHUNK];
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send((Instant::now() + opts.latency, buf)).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut next_free = Instant::now();
    while let Some((due, chunk)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        if let Some(bw) = opts.conn_bandwidth.filter(|b| *b > 0) {
            // A token bucket with 5 ms of burst. Sleeps only once the debt
            // passes a millisecond: the timer cannot sleep for less, and
            // sleeping per small chunk would cap the rate far below `bw`.
            let now = Instant::now();
            let burst = Duration::from_millis(5);
            if next_free + burst < now {
                next_free = now - burst;
            }
            next_free += Duration::from_secs_f64(chunk.len() as f64 / bw as f64);
            if next_free > now + Duration::from_millis(1) {
                tokio::time::sleep_until(next_free).await;
            }
        }
        if w.write_all(&chunk).await.is_err() {
            break;
        }
        let c = if up { &st.bytes_up } else { &st.bytes_down };
        c.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    let _ = w.shutdown().await;
    reader.abort();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn delays_caps_and_counts() {
        // An echo-less upstream that sends 1 MiB and closes.
        let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = up.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut s, _) = up.accept().unwrap();
            let mut one = [0u8; 1];
            s.read_exact(&mut one).unwrap();
            s.write_all(&vec![7u8; 1 << 20]).unwrap();
        });
        let p = LatencyProxy::start(
            "127.0.0.1:0",
            &up_addr,
            ProxyOptions {
                latency: Duration::from_millis(50),
                conn_bandwidth: Some(4 << 20),
            },
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        let mut c = std::net::TcpStream::connect(p.addr).unwrap();
        c.write_all(b"x").unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        let took = t0.elapsed();
        server.join().unwrap();
        assert_eq!(got.len(), 1 << 20);
        // Two one-way delays plus 1 MiB at 4 MiB/s.
        assert!(took >= Duration::from_millis(340), "{took:?}");
        assert_eq!(p.bytes_down(), 1 << 20);
        assert_eq!(p.stats().bytes_up.load(Ordering::Relaxed), 1);
    }
}
