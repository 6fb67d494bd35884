//! Reads (and drops) what is left of a request body the server refused as too large, up to a bound,
//! before answering 413. Otherwise the server closes with bytes unread, the kernel resets the
//! connection, and a client still writing sees "connection reset" instead of its 413.

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as _, Frame, SizeHint};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// Most bytes read past a body limit to let a refused client see its answer: the largest body any
/// route takes (8 MiB images) twice over. A bigger upload is cut off (its client may see a reset).
pub const MAX_DRAIN_BYTES: u64 = 16 * 1024 * 1024;
/// Longest time spent draining: a client that stops sending does not hold the answer up.
pub const DRAIN_TIMEOUT_MS: u64 = 5_000;
const _: () = assert!(MAX_DRAIN_BYTES >= 2 * (stallmesh_inference::MAX_IMAGE_BYTES as u64));

/// The request body, shared: the handler reads it through this, and the middleware can take what
/// the handler left.
struct Shared(Arc<Mutex<Body>>);

impl http_body::Body for Shared {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut body = self.0.lock().expect("body lock");
        Pin::new(&mut *body).poll_frame(cx)
    }

    fn size_hint(&self) -> SizeHint {
        self.0.lock().expect("body lock").size_hint()
    }

    fn is_end_stream(&self) -> bool {
        self.0.lock().expect("body lock").is_end_stream()
    }
}

pub(super) async fn drain_refused_bodies(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let shared = Arc::new(Mutex::new(body));
    let response = next.run(Request::from_parts(parts, Body::new(Shared(shared.clone())))).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        let rest = std::mem::take(&mut *shared.lock().expect("body lock"));
        let drained = tokio::time::timeout(std::time::Duration::from_millis(DRAIN_TIMEOUT_MS), drain(rest)).await;
        if !matches!(drained, Ok(true)) {
            tracing::debug!("a refused oversized body was not read to its end (too big or too slow)");
        }
    }
    response
}

/// Reads `body` to its end unless it exceeds [`MAX_DRAIN_BYTES`]: true if it ended.
async fn drain(mut body: Body) -> bool {
    let mut read = 0u64;
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => return true,
            Some(Err(_)) => return false,
            Some(Ok(f)) => {
                read = read.saturating_add(f.data_ref().map_or(0, |d| d.len() as u64));
                if read > MAX_DRAIN_BYTES {
                    return false;
                }
            }
        }
    }
}
