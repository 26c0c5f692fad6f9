//! HTTP/1.1 connections that hold no HTTP buffers while they wait for their next request.
//!
//! hyper keeps an HTTP/1 connection's read buffer (8–16 KiB) and its header write buffer
//! (8 KiB) for as long as it serves the connection, kept-alive waits included; it has no
//! setting to release them. So once a connection has answered its last request and
//! [`LINGER`] has passed without another, its hyper connection ends without closing the
//! socket ([`hyper::server::conn::http1::Connection::into_parts`] gives the stream back, with
//! any bytes of the next request hyper had already read); the socket then waits for the next
//! request's first bytes with nothing but itself, and a new hyper connection serves them.
//! Parsing and writing stay hyper's. A busy connection keeps its hyper connection: a new one
//! for every request would cost about a fifth more CPU per request (malloc and free of the
//! buffers, measured with wrk).
//!
//! Only a request that leaves the connection in a known state is followed this way: HTTP/1.1,
//! no body (nothing left to read), no `Connection: close` or upgrade, and an answer that is
//! not `101` and does not say `Connection: close`. Everything else stays with its hyper
//! connection to the end, as before (upgrades, requests with a body, HTTP/1.0).

use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderMap, UPGRADE};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// The most read at once while waiting for a request (on the stack; handed to hyper).
const FIRST_READ: usize = 2048;

/// How long a connection keeps its hyper connection (and buffers) after an answer, for a next
/// request: a client that is busy sends it within milliseconds.
pub(super) const LINGER: Duration = Duration::from_millis(20);

/// Serves HTTP/1.1 on `io` with `http`, a hyper connection at a time (see the module; `linger`
/// is [`LINGER`] but in tests), until the client closes, `idle` passes without a new request,
/// an error, or shutdown (`stopping`; a request in flight is answered first). `service` makes
/// each hyper connection's service.
pub(super) async fn serve<I, S, B>(
    http: &http1::Builder,
    io: I,
    mut service: impl FnMut() -> S,
    stopping: &mut watch::Receiver<bool>,
    idle: Duration,
    linger: Duration,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Unpin,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let turn = Arc::new(Turn::default());
    let mut io = Kept {
        io,
        prefix: Bytes::new(),
        turn: Arc::clone(&turn),
    };
    // The first request's bytes are there (or on their way, after a TLS handshake).
    let mut first = true;
    loop {
        if !first {
            let waited = tokio::select! {
                () = super::stopped(stopping) => return,
                waited = tokio::time::timeout(idle, io.wait_for_request()) => waited,
            };
            match waited {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "cannot read from connection");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "no request within {idle:?}; closing");
                    return;
                }
            }
        }
        first = false;
        turn.done.store(false, Ordering::SeqCst);
        let service = Watched {
            inner: service(),
            turn: Arc::clone(&turn),
        };
        let mut conn = Box::pin(
            http.serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        let mut ending = false;
        let mut stop = std::pin::pin!(super::stopped(stopping));
        let mut stop_seen = false;
        let mut lingering = std::pin::pin!(tokio::time::sleep(linger));
        let (mut answers, mut answered) = (0, tokio::time::Instant::now());
        let result = poll_fn(|cx| {
            loop {
                if !stop_seen && stop.as_mut().poll(cx).is_ready() {
                    // Finish the request in flight (if any), then close.
                    stop_seen = true;
                    turn.done.store(false, Ordering::SeqCst);
                    conn.as_mut().graceful_shutdown();
                }
                let polled = conn.as_mut().poll(cx);
                if polled.is_ready() {
                    return polled;
                }
                // The last answer is out (its head is written in the poll that finished it) and
                // no request came since: after `linger` more, the hyper connection ends after
                // it, its socket kept.
                // (The timer is moved on when it fires, not at every answer: a busy connection
                // costs a timer update per `linger`, not per request.)
                if !ending && !stop_seen && turn.done.load(Ordering::SeqCst) {
                    let now = turn.answers.load(Ordering::SeqCst);
                    if now != answers {
                        (answers, answered) = (now, tokio::time::Instant::now());
                    }
                    if lingering.as_mut().poll(cx).is_ready() {
                        let due = answered + linger;
                        if tokio::time::Instant::now() < due {
                            lingering.as_mut().reset(due);
                        } else {
                            ending = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        continue;
                    }
                }
                return Poll::Pending;
            }
        })
        .await;
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
            return;
        }
        if stop_seen || !turn.done.load(Ordering::SeqCst) {
            return;
        }
        // `None`: upgraded (not reached: upgrades are never followed this way).
        let Some(parts) = Pin::into_inner(conn).into_parts() else {
            return;
        };
        io = parts.io.into_inner();
        io.unread(parts.read_buf);
    }
}

/// Whether `request` leaves its connection ready for the next request once answered: HTTP/1.1,
/// no body, no `Connection: close`, no upgrade.
fn request_allows(request: &Request<Incoming>) -> bool {
    use hyper::body::Body as _;
    request.version() == Version::HTTP_11
        && request.method() != Method::CONNECT
        && request.body().is_end_stream()
        && !request.headers().contains_key(UPGRADE)
        && !says(request.headers(), &["close", "upgrade"])
}

/// Whether a response lets the connection go on: not `101`, no `Connection: close`.
fn response_allows(status: hyper::StatusCode, headers: &HeaderMap) -> bool {
    !status.is_informational() && !says(headers, &["close"])
}

/// Whether a `Connection` header lists one of `tokens`.
fn says(headers: &HeaderMap, tokens: &[&str]) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| tokens.iter().any(|t| token.trim().eq_ignore_ascii_case(t)))
}

/// Where a hyper connection's requests say whether it could end now.
#[derive(Debug, Default)]
struct Turn {
    /// The last request is answered, and leaves the connection ready for the next.
    done: AtomicBool,
    /// How many such answers so far (each restarts the wait before ending).
    answers: AtomicUsize,
}

/// A hyper connection's service, which says in `turn` when the connection could end after the
/// answer it just gave.
struct Watched<S> {
    inner: S,
    turn: Arc<Turn>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Watched<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Answer<S::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let allowed = request_allows(&request);
        self.turn.done.store(false, Ordering::SeqCst);
        Answer {
            answer: self.inner.call(request),
            turn: allowed.then(|| Arc::clone(&self.turn)),
        }
    }
}

pin_project_lite::pin_project! {
    /// A [`Watched`] service's answer: when it allows the connection to go on, `turn` is told
    /// (`turn` is `None` when the request does not allow it).
    struct Answer<F> {
        #[pin]
        answer: F,
        turn: Option<Arc<Turn>>,
    }
}

impl<F, B, E> Future for Answer<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let answer = ready!(this.answer.poll(cx));
        if let Ok(response) = &answer
            && let Some(turn) = this.turn.take()
            && response_allows(response.status(), response.headers())
        {
            turn.answers.fetch_add(1, Ordering::SeqCst);
            turn.done.store(true, Ordering::SeqCst);
        }
        Poll::Ready(answer)
    }
}

/// The connection's stream between hyper connections: bytes already read of the next request
/// (`prefix`) come first; while the connection can go on after its last answer (`turn`),
/// hyper's shutdown only flushes.
struct Kept<I> {
    io: I,
    prefix: Bytes,
    turn: Arc<Turn>,
}

impl<I: AsyncRead + Unpin> Kept<I> {
    /// Puts `bytes` (read by hyper, not yet parsed) back before anything left unread.
    fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.prefix = if self.prefix.is_empty() {
            bytes
        } else {
            let mut joined = BytesMut::with_capacity(bytes.len() + self.prefix.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.prefix);
            joined.freeze()
        };
    }

    /// Waits for the next request's first bytes and keeps them; `false` at end of stream.
    async fn wait_for_request(&mut self) -> io::Result<bool> {
        if !self.prefix.is_empty() {
            return Ok(true);
        }
        poll_fn(|cx| {
            let mut buf = [MaybeUninit::<u8>::uninit(); FIRST_READ];
            let mut read = ReadBuf::uninit(&mut buf);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
            self.prefix = Bytes::copy_from_slice(read.filled());
            Poll::Ready(Ok(!self.prefix.is_empty()))
        })
        .await
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Kept<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        if self.prefix.is_empty() {
            self.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Kept<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.turn.done.load(Ordering::SeqCst) {
            Pin::new(&mut self.io).poll_flush(cx)
        } else {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::Accept;
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    const WAIT: Duration = Duration::from_secs(10);

    fn app() -> axum::Router {
        axum::Router::new()
            .route("/ping", get(|| async { "pong" }))
            .route("/echo", post(|body: String| async move { body }))
            .route("/bye", get(|| async { ([(CONNECTION, "close")], "bye") }))
            .route(
                "/upgrade",
                get(|request: axum::extract::Request| async move {
                    let upgrade = hyper::upgrade::on(request);
                    tokio::spawn(async move {
                        if let Ok(upgraded) = upgrade.await {
                            let mut io = TokioIo::new(upgraded);
                            let mut got = [0u8; 4];
                            if io.read_exact(&mut got).await.is_ok() {
                                let _ = io.write_all(&got).await;
                            }
                        }
                    });
                    Response::builder()
                        .status(hyper::StatusCode::SWITCHING_PROTOCOLS)
                        .header(CONNECTION, "upgrade")
                        .header(UPGRADE, "echo")
                        .body(axum::body::Body::empty())
                        .expect("101")
                }),
            )
    }

    struct Running {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        server: JoinHandle<io::Result<()>>,
    }

    async fn start() -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(crate::server::serve(
            listener,
            Accept::Plain,
            app(),
            async {
                let _ = stopped.await;
            },
        ));
        Running { addr, stop, server }
    }

    /// Reads one response (headers, then `Content-Length` bytes of body): its head and body.
    async fn response(stream: &mut TcpStream) -> (String, String) {
        let read = async {
            let mut bytes = Vec::new();
            let mut byte = [0u8; 1];
            while !bytes.ends_with(b"\r\n\r\n") {
                assert_eq!(stream.read(&mut byte).await.expect("read"), 1, "{bytes:?}");
                bytes.push(byte[0]);
            }
            let head = String::from_utf8(bytes)
                .expect("utf-8")
                .to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |n| n.trim().parse::<usize>().expect("length"));
            let mut body = vec![0u8; length];
            stream.read_exact(&mut body).await.expect("body");
            (head, String::from_utf8(body).expect("utf-8"))
        };
        tokio::time::timeout(WAIT, read).await.expect("no response")
    }

    /// Whether the server closes `stream` (within `WAIT`) without sending anything more.
    async fn closed(stream: &mut TcpStream) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await,
            Ok(Ok(0))
        )
    }

    const PING: &[u8] = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test]
    async fn a_kept_alive_connection_serves_requests_after_waits_pipelined_and_split() {
        let running = start().await;
        let mut stream = TcpStream::connect(running.addr).await.expect("connect");
        for _ in 0..3 {
            stream.write_all(PING).await.expect("write");
            let (head, body) = response(&mut stream).await;
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(!head.contains("connection: close"), "{head}");
            assert_eq!(body, "pong");
            // Past `LINGER`: the next request gets a new hyper connection.
            tokio::time::sleep(LINGER + Duration::from_millis(50)).await;
        }
        // Three at once, and a request cut in the middle.
        stream
            .write_all(&[PING, PING, PING].concat())
            .await
            .expect("write");
        for _ in 0..3 {
            assert_eq!(response(&mut stream).await.1, "pong");
        }
        stream
            .write_all(&[PING, &PING[..12]].concat())
            .await
            .expect("write");
        assert_eq!(response(&mut stream).await.1, "pong");
        tokio::time::sleep(LINGER + Duration::from_millis(50)).await;
        stream.write_all(&PING[12..]).await.expect("write");
        assert_eq!(response(&mut stream).await.1, "pong");
        running.server.abort();
    }

    #[tokio::test]
    async fn bodies_close_and_upgrades_are_as_before() {
        let running = start().await;
        let mut stream = TcpStream::connect(running.addr).await.expect("connect");
        // A request with a body, then one without, on the same connection.
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            .await
            .expect("write");
        assert_eq!(response(&mut stream).await.1, "hello");
        stream.write_all(PING).await.expect("write");
        assert_eq!(response(&mut stream).await.1, "pong");
        // A chunked body after a request served alone.
        stream
            .write_all(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            )
            .await
            .expect("write");
        assert_eq!(response(&mut stream).await.1, "abc");

        // An upgrade after a request served alone.
        stream.write_all(PING).await.expect("write");
        assert_eq!(response(&mut stream).await.1, "pong");
        stream
            .write_all(
                b"GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
            )
            .await
            .expect("write");
        let (head, _) = response(&mut stream).await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        stream.write_all(b"abcd").await.expect("write");
        let mut echoed = [0u8; 4];
        tokio::time::timeout(WAIT, stream.read_exact(&mut echoed))
            .await
            .expect("echo")
            .expect("echo");
        assert_eq!(&echoed, b"abcd");

        // `Connection: close` from the client, and from the app, closes.
        for request in [
            &b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
            b"GET /bye HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            let mut stream = TcpStream::connect(running.addr).await.expect("connect");
            stream.write_all(PING).await.expect("write");
            assert_eq!(response(&mut stream).await.1, "pong");
            stream.write_all(request).await.expect("write");
            let (head, _) = response(&mut stream).await;
            assert!(head.contains("connection: close"), "{head}");
            assert!(closed(&mut stream).await);
        }
        // HTTP/1.0 without keep-alive too.
        let mut stream = TcpStream::connect(running.addr).await.expect("connect");
        stream
            .write_all(b"GET /ping HTTP/1.0\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(response(&mut stream).await.1, "pong");
        assert!(closed(&mut stream).await);
        running.server.abort();
    }

    #[tokio::test]
    async fn shutdown_closes_a_connection_waiting_for_its_next_request() {
        let running = start().await;
        let mut stream = TcpStream::connect(running.addr).await.expect("connect");
        stream.write_all(PING).await.expect("write");
        assert_eq!(response(&mut stream).await.1, "pong");
        running.stop.send(()).expect("stop");
        tokio::time::timeout(Duration::from_secs(2), running.server)
            .await
            .expect("serve returns at once")
            .expect("server task")
            .expect("serve");
        assert!(closed(&mut stream).await);
    }

    #[tokio::test]
    async fn each_request_gets_a_hyper_connection_of_its_own_and_idle_ends_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let rounds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&rounds);
        let served = tokio::spawn(async move {
            let (tcp, peer) = listener.accept().await.expect("accept");
            let (_tx, mut stopping) = watch::channel(false);
            let mut http = http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new());
            let service = || {
                counted.fetch_add(1, Ordering::SeqCst);
                hyper_util::service::TowerToHyperService::new(app())
            };
            // (A linger long enough for "quick succession" on a loaded machine.)
            let (idle, linger) = (Duration::from_millis(300), Duration::from_millis(200));
            super::serve(&http, tcp, service, &mut stopping, idle, linger, peer).await;
        });
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let pause = Duration::from_millis(400);
        stream.write_all(PING).await.expect("write");
        assert_eq!(response(&mut stream).await.1, "pong");
        tokio::time::sleep(pause).await;
        stream
            .write_all(&[PING, PING].concat())
            .await
            .expect("write");
        for _ in 0..2 {
            assert_eq!(response(&mut stream).await.1, "pong");
        }
        // Requests in quick succession share one.
        for _ in 0..3 {
            stream.write_all(PING).await.expect("write");
            assert_eq!(response(&mut stream).await.1, "pong");
        }
        tokio::time::sleep(pause).await;
        // A request with a body keeps its hyper connection for the next one.
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
            .await
            .expect("write");
        assert_eq!(response(&mut stream).await.1, "hi");
        stream.write_all(PING).await.expect("write");
        assert_eq!(response(&mut stream).await.1, "pong");
        let started = std::time::Instant::now();
        assert!(closed(&mut stream).await);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        served.await.expect("served");
        // The first alone; the two pipelined ones and the three after them together; the POST
        // and the GET after it together.
        assert_eq!(rounds.load(Ordering::SeqCst), 3);
    }
}
