//! Calls of concurrent callers that travel together: an item joins a
//! queue, and up to a fixed number of background tasks ("drivers") send
//! what is queued as one batch, then the next lot, until the queue is
//! empty; nothing waits for a batch to fill. Stats (`stat_batch.rs`) and
//! namespace mutations (`mutate_batch.rs`) go this way.

use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::{ClientError, Result};

/// An item with the channel its answer goes back on.
pub(crate) type Waiter<I, O> = (I, oneshot::Sender<Result<O>>);

pub(crate) struct Queue<I, O> {
    state: Mutex<State<I, O>>,
}

struct State<I, O> {
    pending: Vec<Waiter<I, O>>,
    /// Drivers running.
    drivers: usize,
}

impl<I, O> Default for Queue<I, O> {
    fn default() -> Self {
        Queue {
            state: Mutex::new(State {
                pending: Vec::new(),
                drivers: 0,
            }),
        }
    }
}

/// A driver's place in its queue's count: given back when the driver
/// finds the queue empty, or when its task ends some other way (a panic).
pub(crate) struct Driver<'a, I, O> {
    queue: &'a Queue<I, O>,
    active: bool,
}

impl<I, O> Drop for Driver<'_, I, O> {
    fn drop(&mut self) {
        if self.active {
            self.queue.lock().drivers -= 1;
        }
    }
}

impl<I, O> Driver<'_, I, O> {
    /// The next lot (at most `max` items), or `None` once the queue is
    /// empty: the driver stops, and the next item queued starts a new one.
    /// The emptiness check and the stop are one step, so an item queued
    /// meanwhile is never left without a driver.
    pub(crate) fn next(&mut self, max: usize) -> Option<Vec<Waiter<I, O>>> {
        if !self.active {
            return None;
        }
        let mut s = self.queue.lock();
        if s.pending.is_empty() {
            s.drivers -= 1;
            self.active = false;
            return None;
        }
        let n = s.pending.len().min(max);
        Some(s.pending.drain(..n).collect())
    }
}

impl<I, O> Queue<I, O> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<I, O>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item`. Returns the receiver of its answer and whether a
    /// new driver must start (fewer than `max_drivers` run): its place is
    /// taken, and the caller starts a task of its own (a caller that stops
    /// waiting must not strand the items of others) that begins with
    /// [`Queue::driver`].
    pub(crate) fn push(&self, item: I, max_drivers: usize) -> (oneshot::Receiver<Result<O>>, bool) {
        let (tx, rx) = oneshot::channel();
        let mut s = self.lock();
        s.pending.push((item, tx));
        let start = s.drivers < max_drivers;
        if start {
            s.drivers += 1;
        }
        (rx, start)
    }

    /// The place [`Queue::push`] took for a new driver.
    pub(crate) fn driver(&self) -> Driver<'_, I, O> {
        Driver {
            queue: self,
            active: true,
        }
    }
}

/// The answer to a queued item, or an error naming what dropped it.
pub(crate) async fn answer<O>(rx: oneshot::Receiver<Result<O>>, what: &str) -> Result<O> {
    rx.await
        .unwrap_or_else(|_| Err(ClientError::Other(format!("a batched {what} was dropped"))))
}
