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
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> Throttled<S> {
    pub fn new(inner: S, limits: Arc<Limits>) -> Self {
        let own = Bucket::new(limits.per_conn.load(Ordering::Relaxed));
        Throttled {
            inner,
            limits,
            own,
            granted: 0,
            sleep: None,
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Throttled<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        let per_conn = me.limits.per_conn.load(Ordering::Relaxed);
        if me.own.rate() != per_conn {
            me.own.set_rate(per_conn);
        }
        loop {
            if let Some(s) = me.sleep.as_mut() {
                ready!(s.as_mut().poll(cx));
                me.sleep = None;
            }
            if me.granted == 0 {
                let n = buf.len().min(CHUNK);
                let wait = me.limits.global.reserve(n).max(me.own.reserve(n));
                me.granted = n;
                if !wait.is_zero() {
                    me.sleep = Some(Box::pin(tokio::time::sleep(wait)));
                    continue;
                }
            }
            let k = buf.len().min(me.granted);
            let r = ready!(Pin::new(&mut me.inner).poll_write(cx, &buf[..k]));
            if let Ok(w) = &r {
                me.granted -= *w;
            }
            return Poll::Ready(r);
        }
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
}
