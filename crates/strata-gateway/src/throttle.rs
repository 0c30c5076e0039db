//! Bandwidth limits: every connection's outgoing bytes pass through a
//! token bucket of its own and one shared by the whole gateway.
//!
//! The buckets work by reservation: a write takes its bytes from both
//! buckets at once (going into debt if need be) and waits until the debt is
//! repaid. Taking from two buckets this way never double-charges, which an
//! all-or-nothing check (as `governor`'s `check_n`) would when one bucket
//! has room and the other does not.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Most bytes one write takes from the buckets at a time.
const CHUNK: usize = 64 << 10;
/// Longest a waiting connection sleeps before looking at the limits again.
const NAP: Duration = Duration::from_millis(100);

/// A token bucket of `rate` bytes per second (0: unlimited); the rate can
/// change while it is in use.
pub struct Bucket {
    state: Mutex<BucketState>,
}

struct BucketState {
    rate: u64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

/// The burst of a rate: 50 ms of it, at least one chunk.
fn burst_of(rate: u64) -> f64 {
    (rate as f64 / 20.0).max(CHUNK as f64)
}

impl Bucket {
    pub fn new(rate: u64) -> Bucket {
        Bucket {
            state: Mutex::new(BucketState {
                rate,
                burst: burst_of(rate),
                tokens: burst_of(rate),
                at: Instant::now(),
            }),
        }
    }

    pub fn rate(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).rate
    }

    /// Changes the rate; bytes already owed are repaid at the new rate.
    pub fn set_rate(&self, rate: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.rate != rate {
            s.rate = rate;
            s.burst = burst_of(rate);
            s.tokens = s.tokens.min(s.burst);
        }
    }

    /// Takes `n` bytes now; returns how long to wait before sending them.
    pub fn reserve(&self, n: usize) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.rate == 0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let rate = s.rate as f64;
        let refill = now.duration_since(s.at).as_secs_f64() * rate;
        s.tokens = (s.tokens + refill).min(s.burst) - n as f64;
        s.at = now;
        if s.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.tokens / rate)
        }
    }
}

/// The gateway's limits, shared by every connection and changeable while it
/// runs (`strata gateway` re-reads them from its configuration on SIGHUP).
pub struct Limits {
    /// All connections together (bytes/s, 0: unlimited).
    pub global: Bucket,
    /// Each connection (bytes/s, 0: unlimited).
    pub per_conn: AtomicU64,
    /// Requests per second per access key (0: unlimited).
    pub requests_per_sec: AtomicU32,
}

impl Limits {
    pub fn new(global: u64, per_conn: u64, requests_per_sec: u32) -> Limits {
        Limits {
            global: Bucket::new(global),
            per_conn: AtomicU64::new(per_conn),
            requests_per_sec: AtomicU32::new(requests_per_sec),
        }
    }

    /// Applies new limits to every connection, open or new.
    pub fn set(&self, global: u64, per_conn: u64, requests_per_sec: u32) {
        self.global.set_rate(global);
        self.per_conn.store(per_conn, Ordering::Relaxed);
        self.requests_per_sec
            .store(requests_per_sec, Ordering::Relaxed);
    }
}

/// A connection whose writes are held to a per-connection and a global rate.
pub struct Throttled<S> {
    inner: S,
    limits: Arc<Limits>,
    own: Bucket,
    /// Bytes already reserved and not yet written.
    granted: usize,
    /// Until when the connection waits for its bytes, napping in `sleep`.
    until: Option<tokio::time::Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The (global, per-connection) rates `until` was computed at: a
    /// change while waiting recomputes it.
    sleep_rates: (u64, u64),
}

impl<S> Throttled<S> {
    pub fn new(inner: S, limits: Arc<Limits>) -> Self {
        let own = Bucket::new(limits.per_conn.load(Ordering::Relaxed));
        Throttled {
            inner,
            limits,
            own,
            granted: 0,
            until: None,
            sleep: None,
            sleep_rates: (0, 0),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Throttled<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> Throttled<S> {
    /// How many of the `len` bytes on offer may be written now: all of
    /// them when no limit is set; otherwise the bytes already reserved, or
    /// a fresh reservation of up to [`CHUNK`] once any wait for it is over.
    fn poll_grant(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<usize> {
        let per_conn = self.limits.per_conn.load(Ordering::Relaxed);
        if self.own.rate() != per_conn {
            self.own.set_rate(per_conn);
        }
        if self.granted == 0
            && self.until.is_none()
            && per_conn == 0
            && self.limits.global.rate() == 0
        {
            return Poll::Ready(len);
        }
        loop {
            let rates = (self.limits.global.rate(), per_conn);
            if let Some(until) = self.until {
                if self.sleep_rates != rates {
                    // The limits changed while waiting: the debt taken at
                    // the old rates is repaid at the new ones.
                    let wait = self.limits.global.reserve(0).max(self.own.reserve(0));
                    self.until = (!wait.is_zero()).then(|| tokio::time::Instant::now() + wait);
                    self.sleep_rates = rates;
                    self.sleep = None;
                    continue;
                }
                let now = tokio::time::Instant::now();
                if now < until {
                    // Short naps, so that a limit raised or lifted (SIGHUP)
                    // frees a waiting connection within one of them.
                    let s = self.sleep.get_or_insert_with(|| {
                        Box::pin(tokio::time::sleep_until(until.min(now + NAP)))
                    });
                    ready!(s.as_mut().poll(cx));
                    self.sleep = None;
                    continue;
                }
                self.until = None;
                self.sleep = None;
            }
            if self.granted == 0 {
                let n = len.min(CHUNK);
                let wait = self.limits.global.reserve(n).max(self.own.reserve(n));
                self.granted = n;
                if !wait.is_zero() {
                    self.until = Some(tokio::time::Instant::now() + wait);
                    self.sleep_rates = rates;
                    continue;
                }
            }
            return Poll::Ready(len.min(self.granted));
        }
    }

    fn written(&mut self, r: &io::Result<usize>) {
        if let Ok(w) = r {
            self.granted = self.granted.saturating_sub(*w);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Throttled<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        let k = ready!(me.poll_grant(cx, buf.len()));
        let r = ready!(Pin::new(&mut me.inner).poll_write(cx, &buf[..k]));
        me.written(&r);
        Poll::Ready(r)
    }

    /// Vectored writes pass through (clipped to what the limits allow), so
    /// the HTTP layer hands body chunks to the socket as they are instead
    /// of copying them into one buffer first.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        let k = ready!(me.poll_grant(cx, len));
        let r = if k == len {
            ready!(Pin::new(&mut me.inner).poll_write_vectored(cx, bufs))
        } else {
            let mut left = k;
            let mut clipped = Vec::with_capacity(bufs.len());
            for b in bufs.iter().filter(|b| !b.is_empty()) {
                if left == 0 {
                    break;
                }
                let n = b.len().min(left);
                clipped.push(io::IoSlice::new(&b[..n]));
                left -= n;
            }
            ready!(Pin::new(&mut me.inner).poll_write_vectored(cx, &clipped))
        };
        me.written(&r);
        Poll::Ready(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_add_up_to_the_rate() {
        let b = Bucket::new(1 << 20);
        // The burst (64 KiB here) is free; the rest is paid for in time.
        let mut wait = Duration::ZERO;
        for _ in 0..32 {
            wait = b.reserve(CHUNK);
        }
        // 2 MiB reserved at 1 MiB/s: ~2 s minus the burst, within timing slack.
        let w = wait.as_secs_f64();
        assert!((1.85..=2.0).contains(&w), "{w}");
        // At twice the rate the debt is repaid twice as fast; at 0 (no
        // limit) nothing waits.
        b.set_rate(2 << 20);
        let w = b.reserve(CHUNK).as_secs_f64();
        assert!((0.9..=1.05).contains(&w), "{w}");
        b.set_rate(0);
        assert!(b.reserve(1 << 30).is_zero());
    }

    /// Vectored writes keep their bytes in order and their limit, and
    /// go straight through when no limit is set.
    #[tokio::test]
    async fn vectored_writes_are_clipped_to_the_limit() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for rate in [0u64, 1 << 20] {
            let limits = Arc::new(Limits::new(rate, 0, 0));
            let (a, mut b) = tokio::io::duplex(1 << 20);
            let mut w = Throttled::new(a, limits);
            let bufs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 100 << 10]).collect();
            let want: Vec<u8> = bufs.concat();
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                b.read_to_end(&mut got).await.map(|_| got)
            });
            let started = Instant::now();
            let mut off = 0;
            while off < want.len() {
                // Whatever is left, as up to three slices.
                let (mut slices, mut at) = (Vec::new(), 0);
                for buf in &bufs {
                    let (s, e) = (at, at + buf.len());
                    at = e;
                    if e > off {
                        slices.push(io::IoSlice::new(&buf[off.max(s) - s..]));
                    }
                }
                let n = w.write_vectored(&slices).await.unwrap();
                assert!(n > 0);
                if rate > 0 {
                    assert!(n <= CHUNK, "{n} bytes in one limited write");
                }
                off += n;
            }
            w.shutdown().await.unwrap();
            drop(w);
            assert_eq!(reader.await.unwrap().unwrap(), want);
            if rate > 0 {
                // 300 KiB at 1 MiB/s with a 64 KiB burst: at least ~0.23 s.
                let secs = started.elapsed().as_secs_f64();
                assert!(secs >= 0.2, "limit beaten: {secs} s");
            }
        }
    }

    /// A connection waiting out a very low limit is freed when the limit
    /// is lifted, not after the wait computed at the old rate.
    #[tokio::test]
    async fn lifting_a_limit_frees_a_waiting_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // 256 KiB at 1 KiB/s would take minutes.
        let limits = Arc::new(Limits::new(0, 1 << 10, 0));
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Throttled::new(a, limits.clone());
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.map(|_| got.len())
        });
        let writer = tokio::spawn(async move {
            w.write_all(&vec![1u8; 256 << 10]).await?;
            w.shutdown().await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!writer.is_finished(), "the limit did not hold");
        limits.set(0, 0, 0);
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("still waiting after the limit was lifted")
            .unwrap()
            .unwrap();
        assert_eq!(reader.await.unwrap().unwrap(), 256 << 10);
    }
}
