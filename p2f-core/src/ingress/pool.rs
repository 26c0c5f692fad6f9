//! Kept-alive HTTP/1.1 connections to processes, for the proxy: one [`Pool`] per worker thread
//! (see [`crate::server::Workers`]), so a request, the connection it goes out on and the answer
//! stay on one thread. The connections are hyper's own (`hyper::client::conn::http1`), each
//! driven by a task of its own on the thread that made it, over a byte stream from the
//! [`Upstream`]. A connection goes back to its pool when its response's body has ended, and is
//! used again newest first; one left idle for [`IDLE`] is closed, and a target none is kept for
//! leaves the pool.
//!
//! hyper-util's pooled client did this before; measured with wrk, it cost the ingress a task
//! and a channel per request (to put a connection back once its body ended), a hashed string
//! key per request, and its lock; this pool costs a lookup by target under an uncontended lock.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::routes::Target;
use super::upstream::{Upstream, UpstreamError};

/// How long a connection may stay idle in the pool.
pub(crate) const IDLE: Duration = Duration::from_secs(30);
/// The most idle connections kept for one target (per pool).
const MAX_IDLE_PER_TARGET: usize = 256;

/// A request's body on its way to a process: the client's, or none (a request sent again).
pub(crate) type OutBody = Either<Incoming, Empty<Bytes>>;

/// Why a request got no answer from its process.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection to the process could be made.
    #[error(transparent)]
    Connect(UpstreamError),
    /// The connection failed or closed before the answer's head.
    #[error("the connection failed: {0}")]
    Http(#[from] hyper::Error),
}

/// Idle connections by target, for one worker thread (see the module).
pub(crate) struct Pool {
    upstream: Arc<dyn Upstream>,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    by_target: HashMap<Target, Slot>,
    /// Whether a task closes connections that were idle too long (while any are kept).
    reaping: bool,
}

/// One target's idle connections, oldest first.
struct Slot {
    target: Arc<Target>,
    senders: Vec<(SendRequest<OutBody>, Instant)>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("targets", &self.lock().by_target.len())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// An empty pool whose connections come from `upstream`.
    pub(crate) fn new(upstream: Arc<dyn Upstream>) -> Pool {
        Pool {
            upstream,
            idle: Mutex::default(),
        }
    }

    /// Sends `request` (origin-form, its headers as they go out) to `target` on an idle
    /// connection, or a new one, and gives the answer; the connection comes back to the pool
    /// when the answer's body ends. A request that an idle connection turns out too closed to
    /// take (it never went out) goes on the next, or on a new one.
    pub(crate) async fn send(
        self: &Arc<Self>,
        target: &Target,
        mut request: Request<OutBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        // Bounded: each turn takes an idle connection out of the pool, or ends.
        loop {
            let (mut sender, key, fresh) = match self.checkout(target) {
                Some((sender, key)) => (sender, key, false),
                None => {
                    let (sender, key) = self.connect(target).await?;
                    (sender, key, true)
                }
            };
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.pooled(response, sender, key)),
                Err(mut error) => match error.take_message() {
                    Some(back) if !fresh => request = back,
                    _ => return Err(SendError::Http(error.into_error())),
                },
            }
        }
    }

    /// The newest idle connection to `target` that can take a request; the closed ones on
    /// the way are dropped.
    fn checkout(&self, target: &Target) -> Option<(SendRequest<OutBody>, Arc<Target>)> {
        let mut idle = self.lock();
        let slot = idle.by_target.get_mut(target)?;
        while let Some((sender, _)) = slot.senders.pop() {
            if sender.is_ready() {
                return Some((sender, Arc::clone(&slot.target)));
            }
        }
        None
    }

    /// A new connection to `target`, its task spawned on this thread's runtime.
    async fn connect(
        &self,
        target: &Target,
    ) -> Result<(SendRequest<OutBody>, Arc<Target>), SendError> {
        let io = self
            .upstream
            .connect(target)
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        let key = match self.lock().by_target.get(target) {
            Some(slot) => Arc::clone(&slot.target),
            None => Arc::new(target.clone()),
        };
        Ok((sender, key))
    }

    /// `response`, whose body gives `sender` back to the pool when it ends (at once when
    /// it has none). A `101`'s connection is the upgraded stream's now: not kept.
    fn pooled(
        self: &Arc<Self>,
        response: Response<Incoming>,
        sender: SendRequest<OutBody>,
        target: Arc<Target>,
    ) -> Response<PooledBody> {
        let mut back = None;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            if response.body().is_end_stream() {
                self.checkin(target, sender);
            } else {
                back = Some(Back {
                    pool: Arc::clone(self),
                    target,
                    sender,
                });
            }
        }
        response.map(|body| PooledBody { body, back })
    }

    /// Puts `sender` back once its connection can take the next request: at once when it
    /// can (the usual case: hyper's connection task read the whole answer before its body
    /// reached the client), else when it can, from a task of its own; a closed one is dropped.
    fn checkin(self: &Arc<Self>, target: Arc<Target>, mut sender: SendRequest<OutBody>) {
        if sender.is_ready() {
            self.put(target, sender);
        } else if !sender.is_closed() {
            let pool = Arc::downgrade(self);
            tokio::spawn(async move {
                let ready = tokio::time::timeout(IDLE, sender.ready()).await;
                if let (Ok(Ok(())), Some(pool)) = (ready, pool.upgrade()) {
                    pool.put(target, sender);
                }
            });
        }
    }

    fn put(self: &Arc<Self>, target: Arc<Target>, sender: SendRequest<OutBody>) {
        let now = Instant::now();
        let mut idle = self.lock();
        match idle.by_target.get_mut(&*target) {
            Some(slot) if slot.senders.len() >= MAX_IDLE_PER_TARGET => return,
            Some(slot) => slot.senders.push((sender, now)),
            None => {
                let key = Target::clone(&target);
                let senders = vec![(sender, now)];
                idle.by_target.insert(key, Slot { target, senders });
            }
        }
        if !idle.reaping {
            idle.reaping = true;
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many idle connections the pool keeps, and for how many targets (for tests).
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let idle = self.lock();
        let connections = idle.by_target.values().map(|s| s.senders.len()).sum();
        (connections, idle.by_target.len())
    }
}

/// Every `IDLE / 2`, closes the connections idle for `IDLE` or closed by their process, and
/// forgets targets with none left; ends when the pool keeps none (the next `put` starts it
/// again) or is gone.
async fn reap(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(IDLE / 2).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut idle = pool.lock();
        idle.by_target.retain(|_, slot| {
            slot.senders
                .retain(|(sender, since)| !sender.is_closed() && now - *since < IDLE);
            !slot.senders.is_empty()
        });
        if idle.by_target.is_empty() {
            idle.reaping = false;
            return;
        }
    }
}

/// Where an answer's connection goes when its body ends.
struct Back {
    pool: Arc<Pool>,
    target: Arc<Target>,
    sender: SendRequest<OutBody>,
}

/// An answer's body from a pooled connection: the connection goes back to its pool when the
/// body ends; dropped before (the client went away), the connection is closed.
pub(crate) struct PooledBody {
    body: Incoming,
    back: Option<Back>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("pooled", &self.back.is_some())
            .finish_non_exhaustive()
    }
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(Back {
            pool,
            target,
            sender,
        }) = self.back.take()
        {
            pool.checkin(target, sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            // (hyper stops polling a body that says it has ended, and one after its trailers,
            // which are always its last frame.)
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() || self.body.is_end_stream() => {
                self.release()
            }
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::future::BoxFuture;
    use http_body_util::BodyExt as _;
    use p2f_model::{NodeName, ProcessId};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use crate::ingress::upstream::Io;
    use crate::reach::Protocol;

    /// A process that answers each request on a connection with `hello N` (N counts the
    /// requests of that connection), and counts its connections; with `trailers`, chunked with
    /// a trailer.
    #[derive(Default)]
    struct Counting {
        connects: AtomicUsize,
        trailers: bool,
    }

    impl Upstream for Counting {
        fn connect(&self, _: &Target) -> BoxFuture<'static, Result<Box<dyn Io>, UpstreamError>> {
            self.connects.fetch_add(1, Ordering::SeqCst);
            let trailers = self.trailers;
            let (ours, mut theirs) = tokio::io::duplex(4096);
            tokio::spawn(async move {
                let (mut head, mut buf, mut answered) = (Vec::new(), [0u8; 1024], 0);
                loop {
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        answered += 1;
                        let body = format!("hello {answered}");
                        let answer = match trailers {
                            false => format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            ),
                            true => format!(
                                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
                                 trailer: x-done\r\n\r\n{:x}\r\n{body}\r\n0\r\nx-done: yes\r\n\r\n",
                                body.len()
                            ),
                        };
                        if theirs.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match theirs.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            });
            Box::pin(std::future::ready(Ok(Box::new(ours) as Box<dyn Io>)))
        }

        fn describe(&self, _: &Target) -> String {
            "counting".to_owned()
        }
    }

    fn target(port: u16) -> Target {
        Target {
            id: ProcessId::new("wiki").expect("id"),
            generation: 1,
            node: NodeName::from_static("pi"),
            port,
            protocol: Protocol::Tcp,
            direct: None,
        }
    }

    fn get() -> Request<OutBody> {
        Request::builder()
            .uri("/")
            .header(hyper::header::HOST, "wiki.lan")
            .body(Either::Right(Empty::new()))
            .expect("request")
    }

    async fn text(response: Response<PooledBody>) -> String {
        let body = response.into_body().collect().await.expect("body");
        String::from_utf8_lossy(&body.to_bytes()).into_owned()
    }

    #[tokio::test]
    async fn a_connection_is_used_again_once_its_answer_has_ended() {
        let upstream = Arc::new(Counting::default());
        let pool = Arc::new(Pool::new(upstream.clone()));
        let wiki = target(8080);
        for n in 1..=3 {
            let response = pool.send(&wiki, get()).await.expect("answer");
            assert_eq!(text(response).await, format!("hello {n}"));
        }
        assert_eq!(upstream.connects.load(Ordering::SeqCst), 1);
        assert_eq!(pool.counts(), (1, 1));

        // While an answer's body is unread its connection is busy: a second request gets a
        // connection of its own, and both come back.
        let first = pool.send(&wiki, get()).await.expect("answer");
        let second = pool.send(&wiki, get()).await.expect("answer");
        assert_eq!(upstream.connects.load(Ordering::SeqCst), 2);
        assert_eq!(text(second).await, "hello 1");
        assert_eq!(text(first).await, "hello 4");
        assert_eq!(pool.counts(), (2, 1));

        // Another target (another port, or generation) never shares a connection.
        let response = pool.send(&target(8081), get()).await.expect("answer");
        assert_eq!(text(response).await, "hello 1");
        assert_eq!(pool.counts(), (3, 2));

        // A body dropped unread closes its connection.
        drop(pool.send(&wiki, get()).await.expect("answer"));
        assert_eq!(pool.counts(), (2, 2));
    }

    #[tokio::test]
    async fn a_connection_comes_back_after_its_answers_trailers() {
        // hyper stops polling a body after its trailers (never asking for the end after them).
        let upstream = Arc::new(Counting {
            trailers: true,
            ..Counting::default()
        });
        let pool = Arc::new(Pool::new(upstream.clone()));
        let wiki = target(8080);
        for n in 1..=2 {
            let mut body = pool.send(&wiki, get()).await.expect("answer").into_body();
            let data = body.frame().await.expect("a frame").expect("data");
            assert_eq!(
                data.into_data().ok(),
                Some(Bytes::from(format!("hello {n}")))
            );
            let trailers = body.frame().await.expect("a frame").expect("trailers");
            assert!(trailers.is_trailers());
            drop(body);
        }
        assert_eq!(upstream.connects.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed_and_their_targets_forgotten() {
        let upstream = Arc::new(Counting::default());
        let pool = Arc::new(Pool::new(upstream.clone()));
        for port in [8080, 8081] {
            let response = pool.send(&target(port), get()).await.expect("answer");
            text(response).await;
        }
        assert_eq!(pool.counts(), (2, 2));
        tokio::time::sleep(IDLE / 2 + Duration::from_secs(1)).await;
        let response = pool.send(&target(8080), get()).await.expect("answer");
        text(response).await;
        // 8081's connection has been idle for IDLE; 8080's was used since.
        tokio::time::sleep(IDLE / 2 + Duration::from_secs(1)).await;
        assert_eq!(pool.counts(), (1, 1));
        tokio::time::sleep(IDLE).await;
        assert_eq!(pool.counts(), (0, 0));
        // The pool starts reaping again when a connection comes back.
        let response = pool.send(&target(8080), get()).await.expect("answer");
        text(response).await;
        assert_eq!(pool.counts(), (1, 1));
        tokio::time::sleep(IDLE * 2).await;
        assert_eq!(pool.counts(), (0, 0));
        assert_eq!(upstream.connects.load(Ordering::SeqCst), 3);
    }
}
