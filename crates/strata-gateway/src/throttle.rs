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
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Most bytes one write takes from the buckets at a time.
const CHUNK: usize = 64 << 10;

/// A token bucket of `rate` bytes per second.
pub struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// A bucket whose burst is 50 ms of its rate (at least one chunk).
    pub fn new(rate: u64) -> Bucket {
        let rate = rate.max(1) as f64;
        let burst = (rate / 20.0).max(CHUNK as f64);
        Bucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes `n` bytes now; returns how long to wait before sending them.
    pub fn reserve(&self, n: usize) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
        s.0 = (s.0 + refill).min(self.burst) - n as f64;
        s.1 = now;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / self.rate)
        }
    }
}

/// A connection whose writes are held to a per-connection and a global rate.
pub struct Throttled<S> {
    inner: S,
    global: Option<Arc<Bucket>>,
    own: Option<Bucket>,
    /// Bytes already reserved and not yet written.
    granted: usize,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> Throttled<S> {
    pub fn new(inner: S, global: Option<Arc<Bucket>>, per_conn: Option<u64>) -> Self {
        Throttled {
            inner,
            global,
            own: per_conn.map(Bucket::new),
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
        if me.global.is_none() && me.own.is_none() {
            return Pin::new(&mut me.inner).poll_write(cx, buf);
        }
        loop {
            if let Some(s) = me.sleep.as_mut() {
                ready!(s.as_mut().poll(cx));
                me.sleep = None;
            }
            if me.granted == 0 {
                let n = buf.len().min(CHUNK);
                let wait = [me.global.as_deref(), me.own.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(|b| b.reserve(n))
                    .max()
                    .unwrap_or_default();
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
    }
}
