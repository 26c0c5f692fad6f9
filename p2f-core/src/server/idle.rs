//! The idle timeout of connections served by hyper-util's `auto::Builder` (HTTP/2, and TLS
//! clients that chose no protocol): hyper's HTTP/2 server has none (its keep-alive pings find
//! dead peers, not idle ones), so a connection's requests are counted here, from the request to
//! the end of its answer's body, and the connection is closed gracefully (HTTP/2 `GOAWAY`) once
//! none has been in flight for the idle time. HTTP/1.1 connections served by `h1` have their own.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use tokio::time::Instant;

/// What a connection is doing: requests in flight, and since when none has been.
#[derive(Debug)]
pub(super) struct Activity {
    in_flight: AtomicUsize,
    quiet_since: Mutex<Instant>,
}

impl Activity {
    /// A connection with nothing in flight, quiet from now.
    pub(super) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            quiet_since: Mutex::new(Instant::now()),
        })
    }

    /// When the connection will have been idle for `idle`; `None` while a request is in flight.
    pub(super) fn idle_at(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let quiet_since = *self
            .quiet_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Some(quiet_since + idle)
    }

    fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }
}

/// A request in flight, until dropped.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self
            .0
            .quiet_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection's service whose requests are counted in `activity`.
#[derive(Debug, Clone)]
pub(super) struct Counted<S> {
    pub(super) inner: S,
    pub(super) activity: Arc<Activity>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Counted<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<Counting<B>>;
    type Error = S::Error;
    type Future = Answering<S::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        Answering {
            answer: self.inner.call(request),
            in_flight: Some(self.activity.start()),
        }
    }
}

pin_project_lite::pin_project! {
    /// A counted request's answer on its way: its body carries the count on.
    pub(super) struct Answering<F> {
        #[pin]
        answer: F,
        in_flight: Option<InFlight>,
    }
}

impl<F, B, E> Future for Answering<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Counting<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answer = ready!(this.answer.poll(cx));
        let in_flight = this.in_flight.take();
        Poll::Ready(answer.map(|response| response.map(|body| Counting { body, in_flight })))
    }
}

pin_project_lite::pin_project! {
    /// An answer's body, which ends its request's count when it ends (or is dropped).
    pub(super) struct Counting<B> {
        #[pin]
        body: B,
        in_flight: Option<InFlight>,
    }
}

impl<B: Body> Body for Counting<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.body.poll_frame(cx));
        if frame.is_none() {
            this.in_flight.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
