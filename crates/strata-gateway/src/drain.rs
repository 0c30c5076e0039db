//! Reading what is left of a request body before the response goes out.
//!
//! A request answered before its body was read (a refused signature, a bad
//! bucket name, an invalid tag set, headers too large) ends its connection
//! with the body still arriving, and the kernel resets a TCP socket that is
//! closed with unread data: the client can lose the response it was sent
//! and see a bare status code or a broken connection instead of the S3
//! error. [`Tracked`] hands the body to the S3 layer while keeping a way to
//! reach what it did not read; [`finish`] reads that rest (bounded) before
//! the response is returned, or marks the response `Connection: close`.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// The most of an unread body read before answering; a client sending
/// more is answered at once and its connection closed.
const LIMIT: u64 = 8 << 20;
/// How long reading the rest may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A request body shared between the S3 layer and the connection.
#[derive(Clone)]
pub struct Tracked(Arc<Mutex<Option<Incoming>>>);

impl Tracked {
    pub fn new(body: Incoming) -> Self {
        Tracked(Arc::new(Mutex::new(Some(body))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Incoming>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.lock().as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.lock().as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.lock()
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// Reads and drops what the S3 layer left of `body`, unless the client
/// waits for `100 Continue` (it has sent nothing yet and will not) or has
/// declared more than [`LIMIT`] bytes. Returns whether the connection can
/// carry another request; when it cannot, the response must say
/// `Connection: close`, or the client may send its next request on a
/// connection the server is closing (and lose that request's response).
pub async fn finish(body: Tracked, expects_continue: bool) -> bool {
    let Some(mut rest) = body.lock().take() else {
        return true;
    };
    if rest.is_end_stream() {
        return true;
    }
    if expects_continue || rest.size_hint().lower() > LIMIT {
        return false;
    }
    let drained = tokio::time::timeout(TIMEOUT, async {
        let mut n = 0u64;
        loop {
            match std::future::poll_fn(|cx| Pin::new(&mut rest).poll_frame(cx)).await {
                None => return true,
                Some(Err(_)) => return false,
                Some(Ok(frame)) => {
                    n += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if n > LIMIT {
                        return false;
                    }
                }
            }
        }
    })
    .await;
    drained.unwrap_or(false)
}
