//! Serves an [`App`] (an axum `Router`, or the ingress's proxy) on a TCP listener, over TLS or
//! plain HTTP, from one accept loop:
//! timeouts for silent clients and slow handshakes, a cap on open connections, and a graceful
//! shutdown that lets requests in flight finish. Also [`SniResolver`], which picks a TLS
//! certificate by the name the client asks for.
//!
//! A TLS listener tells plain-HTTP clients apart by their first byte; it can answer them with a
//! clear `400` ([`PlainHttp::CONTROL_API`]) instead of letting them read garbage.
//!
//! Each connection's service knows its [`ConnectionInfo`] (the peer's address, TLS or not; a
//! `Router`'s requests carry it as an extension), and connections support HTTP upgrades
//! (`hyper::upgrade::on`), for the agent's tunnel and the ingress's WebSockets.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::identity::Caller;

mod h1;
mod idle;

/// How long a new connection may stay silent before its first byte.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection may stay idle by default (see [`Limits::idle`]).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long open connections get to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (say, out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// How long to keep reading from a plain-HTTP client after answering it (see `answer_plain`).
const PLAIN_LINGER: Duration = Duration::from_secs(1);
/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How a listener's connections are accepted.
#[derive(Clone)]
pub enum Accept {
    /// TLS with `config` (its certificate resolver picks the certificate; HTTP/2 is served
    /// when its ALPN offers `h2`, see [`serve`]); `plain` says what to do with clients that
    /// speak plain HTTP instead.
    Tls {
        /// The rustls configuration, say from [`crate::cluster::resolving_server_config`].
        config: Arc<rustls::ServerConfig>,
        /// What a plain-HTTP client gets.
        plain: PlainHttp,
        /// The certificate for a client that sends no server name (SNI), by the address it
        /// connected to: clients send none for an IP address (`https://192.168.1.10/`, RFC
        /// 6066 §3). `None`: the configuration's resolver decides alone.
        without_sni: Option<WithoutSni>,
    },
    /// Plain HTTP (P2PRC's endpoints, the ingress's port 80).
    Plain,
}

impl fmt::Debug for Accept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Accept::Tls {
                plain, without_sni, ..
            } => f
                .debug_struct("Tls")
                .field("plain", plain)
                .field("without_sni", &without_sni.is_some())
                .finish_non_exhaustive(),
            Accept::Plain => f.write_str("Plain"),
        }
    }
}

/// The certificate for a TLS client that names no server, by the local address it connected to
/// (`None`: no certificate for that address; the handshake goes on with the configuration's own
/// resolver).
pub type WithoutSni = Arc<dyn Fn(std::net::IpAddr) -> Option<Arc<CertifiedKey>> + Send + Sync>;

/// How many connections a listener serves at once; more are closed at once, before anything is
/// read from them (unauthenticated peers must not exhaust tasks and descriptors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// In all.
    pub connections: usize,
    /// From one IP address, until the client has shown a certificate of the cluster (many
    /// half-open connections from one client, slowloris, cannot take the listener from
    /// everyone else; authenticated nodes, whose tunnels may be many, are not counted).
    pub per_peer: usize,
    /// How long a connection may wait for its next request (HTTP/1.1), or have no request in
    /// flight (HTTP/2), before it is closed.
    pub idle: Duration,
}

impl Limits {
    /// The control API's: 2048 in all, 32 unauthenticated ones from one address (members
    /// and tools show certificates; only joining comes without); idle for 30 s.
    pub const CONTROL_API: Limits = Limits {
        connections: 2048,
        per_peer: 32,
        idle: IDLE_TIMEOUT,
    };
    /// The ingress's: 8192 in all, 256 from one address; idle for 30 s.
    pub const INGRESS: Limits = Limits {
        connections: 8192,
        per_peer: 256,
        idle: IDLE_TIMEOUT,
    };
}

/// The open connections of each peer address.
#[derive(Debug, Default)]
struct Peers(std::sync::Mutex<HashMap<std::net::IpAddr, usize>>);

impl Peers {
    /// A slot for a connection from `ip`, unless it has `limit` open already.
    fn take(self: &Arc<Peers>, ip: std::net::IpAddr, limit: usize) -> Option<PeerSlot> {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            peers: Arc::clone(self),
            ip,
        })
    }
}

/// One open connection of a peer; given back when dropped.
struct PeerSlot {
    peers: Arc<Peers>,
    ip: std::net::IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// What a TLS listener does with a client whose first byte is not a TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainHttp {
    /// Answer `400 Bad Request` with this text as the body, then close.
    Reject(&'static str),
    /// Close the connection without answering.
    Close,
}

impl PlainHttp {
    /// The control API's answer: use HTTPS and the cluster CA.
    pub const CONTROL_API: PlainHttp = PlainHttp::Reject(
        "this port speaks HTTPS only: use https:// and the cluster CA (p2f's control API)\n",
    );
}

/// Serves `app` on `listener` over TLS until `shutdown` resolves, answering plain-HTTP clients
/// with [`PlainHttp::CONTROL_API`]: [`serve`] with [`Accept::Tls`].
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: impl App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let accept = Accept::Tls {
        config: tls,
        plain: PlainHttp::CONTROL_API,
        without_sni: None,
    };
    serve(listener, accept, app, shutdown).await
}

/// Serves `app` on `listener` as `accept` says until `shutdown` resolves, within
/// [`Limits::CONTROL_API`]: [`serve_limited`].
pub async fn serve(
    listener: TcpListener,
    accept: Accept,
    app: impl App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_limited(listener, accept, Limits::CONTROL_API, app, shutdown).await
}

/// Serves `app` on `listener` as `accept` says until `shutdown` resolves; then stops accepting
/// and gives open connections up to 5 s to finish their request in flight.
///
/// A connection is closed if it sends nothing for 10 s after connecting, takes over 10 s for
/// its TLS handshake or 30 s for a request's headers, or waits 30 s for its next request (as
/// hyper's header timeout did); beyond `limits` (open connections in all, and from one IP
/// address) new ones are closed at once.
///
/// HTTP/1.1 connections hold no HTTP buffers while they wait for their next request (see
/// `h1`).
///
/// Connections speak HTTP/1.1, and over TLS also HTTP/2 when the configuration's ALPN offers
/// `h2` (the client picks it in the handshake). Errors accepting or serving single
/// connections are logged and never end the server.
pub async fn serve_limited(
    listener: TcpListener,
    accept: Accept,
    limits: Limits,
    app: impl App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_on(listener, accept, limits, app, shutdown, None).await
}

/// [`serve_limited`], with each connection served on one of `workers`' threads (round robin)
/// instead of the caller's runtime; `None`: on the caller's runtime. Accepting, the limits and
/// the shutdown stay with the caller.
pub async fn serve_on(
    listener: TcpListener,
    accept: Accept,
    limits: Limits,
    app: impl App,
    shutdown: impl Future<Output = ()> + Send + 'static,
    workers: Option<Arc<Workers>>,
) -> io::Result<()> {
    let (handshake, what, h2) = match accept {
        Accept::Tls {
            config,
            plain,
            without_sni,
        } => {
            let h2 = config.alpn_protocols.iter().any(|p| p.as_slice() == b"h2");
            let acceptor = TlsAcceptor::from(Arc::clone(&config));
            let without_sni = without_sni.map(|by_address| NoSni { config, by_address });
            let handshake = Handshake::Tls {
                acceptor,
                plain,
                without_sni,
            };
            (handshake, "TLS", h2)
        }
        Accept::Plain => (Handshake::Plain, "plain HTTP", false),
    };
    let mut http = auto::Builder::new(TokioExecutor::new());
    if !h2 {
        http = http.http1_only();
    }
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    http.http2().timer(TokioTimer::new());
    let http = Arc::new(http);
    // HTTP/1.1 (plain, and TLS when ALPN says so): one hyper connection per request, so a
    // kept-alive connection holds no HTTP buffers between requests (see `h1`).
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let h1 = Arc::new(H1 { http: h1, h2 });
    // Shutdown flips `stopping`: connections serving HTTP then finish their request in flight
    // and close; those still before that (first byte, handshake) are dropped. (hyper-util's
    // `GracefulShutdown` needs its `server-graceful` feature; this is the same with a watch.)
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let peers = Arc::new(Peers::default());
    let mut shutdown = std::pin::pin!(shutdown);
    if let Ok(addr) = listener.local_addr() {
        tracing::debug!(%addr, "serving {what}");
    }

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "connection task panicked");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) if connections.len() >= limits.connections => {
                    tracing::warn!(%peer, "too many open connections ({}): refused", limits.connections);
                    drop(stream);
                }
                Ok((stream, peer)) => {
                    let Some(slot) = peers.take(peer.ip(), limits.per_peer) else {
                        tracing::debug!(%peer, "too many open connections from this address ({}): refused", limits.per_peer);
                        drop(stream);
                        continue;
                    };
                    let conn = Connection {
                        slot,
                        stream,
                        peer,
                        handshake: handshake.clone(),
                        http: Arc::clone(&http),
                        h1: Arc::clone(&h1),
                        app: app.clone(),
                        stopping: stopping_rx.clone(),
                        idle: limits.idle,
                    };
                    match &workers {
                        Some(workers) => {
                            connections.spawn_on(conn.run_moved(), &workers.next());
                        }
                        None => {
                            connections.spawn(conn.run());
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }

    drop(listener);
    tracing::debug!(
        open = connections.len(),
        "shutting down: no longer accepting connections"
    );
    let _ = stopping_tx.send(true);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::debug!(
            open = connections.len(),
            "connections still open after the grace period; closing them"
        );
    }
    connections.shutdown().await;
    Ok(())
}

/// What happens between accepting a connection and serving HTTP on it.
#[derive(Clone)]
enum Handshake {
    /// A TLS handshake; plain-HTTP clients are handled as `plain` says.
    Tls {
        acceptor: TlsAcceptor,
        plain: PlainHttp,
        without_sni: Option<NoSni>,
    },
    /// Nothing: HTTP starts at once.
    Plain,
}

/// The configuration and the per-address certificates for clients without SNI.
#[derive(Clone)]
struct NoSni {
    config: Arc<rustls::ServerConfig>,
    by_address: WithoutSni,
}

impl NoSni {
    /// Reads the client's hello; one without a server name gets the certificate of the address
    /// it connected to (when there is one), every other the listener's configuration.
    async fn accept(
        &self,
        stream: TcpStream,
    ) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        let local = stream.local_addr()?.ip();
        let acceptor = rustls::server::Acceptor::default();
        let start = tokio_rustls::LazyConfigAcceptor::new(acceptor, stream).await?;
        let hello = start.client_hello();
        let config = match hello.server_name() {
            Some(_) => Arc::clone(&self.config),
            None => match (self.by_address)(local) {
                Some(key) => {
                    let mut config = (*self.config).clone();
                    config.cert_resolver = Arc::new(rustls::sign::SingleCertAndKey::from(key));
                    Arc::new(config)
                }
                None => Arc::clone(&self.config),
            },
        };
        start.into_stream(config).await
    }
}

/// Who a request came from: in every request's extensions (`Extension<ConnectionInfo>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The holder of the client certificate the TLS handshake verified (mutual TLS, the
    /// control API), when there was one naming a role.
    pub caller: Option<Arc<Caller>>,
}

/// Any error a response body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a listener serves: for each connection, a hyper service that knows who the client is.
/// An [`axum::Router`] is one: each of its requests carries the [`ConnectionInfo`] as an
/// extension (`Extension<ConnectionInfo>`).
pub trait App: Clone + Send + Sync + 'static {
    /// The responses' body.
    type Body: hyper::body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + Send + 'static;
    /// One connection's service (cloned for each hyper connection on it, see `h1`).
    type Service: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<Self::Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Unpin
        + Send
        + 'static;

    /// The service of a connection from `info`.
    fn connection(&self, info: ConnectionInfo) -> Self::Service;
}

impl App for axum::Router {
    type Body = axum::body::Body;
    type Service = TowerToHyperService<WithInfo>;

    fn connection(&self, info: ConnectionInfo) -> Self::Service {
        TowerToHyperService::new(WithInfo {
            app: self.clone(),
            info,
        })
    }
}

/// A `Router` for one connection: every request gets the connection's [`ConnectionInfo`].
#[derive(Debug, Clone)]
pub struct WithInfo {
    app: axum::Router,
    info: ConnectionInfo,
}

impl<B> tower::Service<hyper::Request<B>> for WithInfo
where
    axum::Router: tower::Service<hyper::Request<B>>,
{
    type Response = <axum::Router as tower::Service<hyper::Request<B>>>::Response;
    type Error = <axum::Router as tower::Service<hyper::Request<B>>>::Error;
    type Future = <axum::Router as tower::Service<hyper::Request<B>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::<hyper::Request<B>>::poll_ready(&mut self.app, cx)
    }

    fn call(&mut self, mut request: hyper::Request<B>) -> Self::Future {
        request.extensions_mut().insert(self.info.clone());
        self.app.call(request)
    }
}

/// A connection ready for HTTP.
enum Ready {
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Plain(TcpStream),
}

/// HTTP/1.1 served one request at a time (see `h1`), and whether the listener also speaks
/// HTTP/2 (which, and a TLS client choosing no protocol there, get `auto::Builder`).
struct H1 {
    http: hyper::server::conn::http1::Builder,
    h2: bool,
}

impl H1 {
    /// Whether a TLS connection that agreed on `alpn` is served by [`h1::serve`].
    fn serves(&self, alpn: Option<&[u8]>) -> bool {
        match alpn {
            Some(protocol) => protocol == b"http/1.1",
            None => !self.h2,
        }
    }
}

/// One accepted connection, with everything needed to serve it.
struct Connection<A> {
    /// Held while the connection is open and its client unauthenticated.
    slot: PeerSlot,
    stream: TcpStream,
    peer: SocketAddr,
    handshake: Handshake,
    http: Arc<auto::Builder<TokioExecutor>>,
    h1: Arc<H1>,
    app: A,
    stopping: watch::Receiver<bool>,
    /// [`Limits::idle`].
    idle: Duration,
}

impl<A: App> Connection<A> {
    /// [`Connection::run`] on another runtime than the one that accepted it: the socket is
    /// registered with this runtime's reactor first, so its readiness wakes this thread.
    async fn run_moved(mut self) {
        let moved = self.stream.into_std().and_then(TcpStream::from_std);
        match moved {
            Ok(stream) => {
                self.stream = stream;
                self.run().await;
            }
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "cannot move a connection to a worker")
            }
        }
    }

    async fn run(self) {
        let Connection {
            slot,
            stream,
            peer,
            handshake,
            http,
            h1,
            app,
            mut stopping,
            idle,
        } = self;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }

        // Until HTTP serving starts, shutdown simply drops the connection. (Boxed, as the TLS
        // stream and the HTTP/2 path: the task's future is as large as its largest state, for
        // the connection's whole life; the handshake's is 4–5 KiB.)
        let ready = tokio::select! {
            () = stopped(&mut stopping) => return,
            ready = Box::pin(Self::start(stream, peer, handshake)) => ready,
        };
        let service = |tls, caller| {
            let service = app.connection(ConnectionInfo { peer, tls, caller });
            move || service.clone()
        };
        match ready {
            None => {}
            Some(Ready::Tls(tls)) => {
                let caller = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|cert| Caller::from_certificate(cert))
                    .map(Arc::new);
                // An authenticated client no longer counts against its address's limit.
                let _slot = if caller.is_some() {
                    drop(slot);
                    None
                } else {
                    Some(slot)
                };
                let service = service(true, caller);
                if h1.serves(tls.get_ref().1.alpn_protocol()) {
                    let linger = h1::LINGER;
                    h1::serve(&h1.http, tls, service, &mut stopping, idle, linger, peer).await
                } else {
                    Box::pin(serve_http(&http, *tls, service(), stopping, idle, peer)).await
                }
            }
            Some(Ready::Plain(tcp)) => {
                let _slot = slot;
                let linger = h1::LINGER;
                let service = service(false, None);
                h1::serve(&h1.http, tcp, service, &mut stopping, idle, linger, peer).await
            }
        }
    }

    /// Waits for the first byte; then a TLS client gets its handshake, and a plain-HTTP client
    /// is served (plain listener) or handled as [`PlainHttp`] says (TLS listener).
    async fn start(stream: TcpStream, peer: SocketAddr, handshake: Handshake) -> Option<Ready> {
        let mut first = [0u8; 1];
        match tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first)).await {
            Err(_) => {
                tracing::debug!(%peer, "no data within {FIRST_BYTE_TIMEOUT:?}; closing");
                return None;
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "cannot read from connection");
                return None;
            }
            Ok(Ok(0)) => return None,
            Ok(Ok(_)) => {}
        }
        let (acceptor, plain, without_sni) = match handshake {
            Handshake::Plain => return Some(Ready::Plain(stream)),
            Handshake::Tls {
                acceptor,
                plain,
                without_sni,
            } => (acceptor, plain, without_sni),
        };
        if first[0] != TLS_HANDSHAKE_RECORD {
            match plain {
                PlainHttp::Reject(body) => answer_plain(stream, peer, body).await,
                PlainHttp::Close => {
                    tracing::debug!(%peer, "plain-text client on the TLS port; closing");
                }
            }
            return None;
        }
        let handshake = async {
            match &without_sni {
                Some(no_sni) => no_sni.accept(stream).await,
                None => acceptor.accept(stream).await,
            }
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(tls)) => Some(Ready::Tls(Box::new(tls))),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                None
            }
        }
    }
}

/// Serves HTTP on `io` until the client closes, no request has been in flight for `idle`
/// (see `idle`), or, once shutdown begins, until the requests in flight (if any) are answered.
async fn serve_http<I, S, B>(
    http: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    mut stopping: watch::Receiver<bool>,
    idle: Duration,
    peer: SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + 'static,
    B: hyper::body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + Send + 'static,
{
    let activity = idle::Activity::new();
    let service = idle::Counted {
        inner: service,
        activity: Arc::clone(&activity),
    };
    let conn = http.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut check = std::pin::pin!(tokio::time::sleep(idle));
    // Bounded: each turn ends the connection or moves the check to a later time.
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            () = stopped(&mut stopping) => {
                // Finish the requests in flight (if any), then close.
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            () = check.as_mut() => match activity.idle_at(idle) {
                Some(at) if at <= tokio::time::Instant::now() => {
                    tracing::debug!(%peer, "no request for {idle:?}; closing");
                    conn.as_mut().graceful_shutdown();
                    // HTTP/2 closes once the peer answers the GOAWAY's PING: a peer gone
                    // silent is not waited for longer than a shutdown's grace.
                    match tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await {
                        Ok(result) => break result,
                        Err(_) => break Ok(()),
                    }
                }
                Some(at) => check.as_mut().reset(at),
                None => check.as_mut().reset(tokio::time::Instant::now() + idle),
            },
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Threads that serve connections, each with a single-threaded tokio runtime of its own (the
/// "thread per core" of nginx's workers): a connection, the tasks it spawns (hyper's, the
/// proxy's pooled upstream connections) and their sockets all live on one thread, so a request
/// and its answer never wake another thread. Give them to [`serve_on`].
///
/// The threads end when the last clone of the `Arc<Workers>` is dropped; tasks still on them are
/// then dropped too.
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
    /// Dropped with the pool: each thread's `block_on` then returns.
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl fmt::Debug for Workers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &self.handles.len())
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// The index of the worker this thread is, within its pool.
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

impl Workers {
    /// Starts `threads` worker threads (at least one) named `{name}-{i}`.
    ///
    /// Errors: a runtime or a thread the system cannot create.
    pub fn start(threads: usize, name: &str) -> io::Result<Workers> {
        let mut handles = Vec::new();
        let mut stop = Vec::new();
        for index in 0..threads.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            stop.push(stop_tx);
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    WORKER.set(Some(index));
                    let _ = runtime.block_on(stop_rx);
                })?;
        }
        Ok(Workers {
            handles,
            next: std::sync::atomic::AtomicUsize::new(0),
            _stop: stop,
        })
    }

    /// The runtime of the next thread, round robin.
    fn next(&self) -> tokio::runtime::Handle {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.handles[i % self.handles.len()].clone()
    }

    /// The index of the worker the calling thread is (`0..len`), `None` off the workers.
    pub fn current() -> Option<usize> {
        WORKER.get()
    }
}

/// Resolves once shutdown has begun (or the server is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// The complete HTTP/1.1 `400` response with `body`, for plain-text clients.
fn plain_http_response(body: &str) -> String {
    format!(
        "HTTP/1.1 400 Bad Request\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\
         \r\n\
         {body}",
        body.len()
    )
}

/// Answers a plain-HTTP client `400` with `body` (telling it to use HTTPS), then closes.
///
/// After writing, the socket is half-closed and whatever the client sent is read and discarded
/// for a moment: closing with unread data makes the kernel send a reset, which can destroy the
/// response before the client reads it.
async fn answer_plain(mut stream: TcpStream, peer: SocketAddr, body: &str) {
    tracing::debug!(%peer, "plain-text client on the TLS port; answering 400");
    let written = async {
        stream
            .write_all(plain_http_response(body).as_bytes())
            .await?;
        stream.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(PLAIN_LINGER, written)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
    {
        tracing::debug!(%peer, error = %e, "cannot answer plain-text client");
        return;
    }
    let drain = async {
        let mut sink = [0u8; 4096];
        while let Ok(n) = stream.read(&mut sink).await
            && n > 0
        {}
    };
    let _ = tokio::time::timeout(PLAIN_LINGER, drain).await;
}

/// Picks the certificate for each TLS handshake by the name the client asks for (SNI): one
/// certificate per domain, for the ingress. Give it to
/// [`crate::cluster::resolving_server_config`].
///
/// Names match exactly, ignoring ASCII case and a trailing dot; there are no wildcards, and a
/// certificate is not checked against the name it is stored under. A client asking for a name
/// without a certificate, or for no name at all (as clients connecting to an IP address do),
/// gets the default certificate if one is set; without one the handshake is refused (rustls
/// sends an `access_denied` alert).
///
/// Certificates can be added, replaced and removed while servers use it: keep an
/// `Arc<SniResolver>` and hand a clone to the configuration. Handshakes under way keep the
/// certificate they picked.
#[derive(Default)]
pub struct SniResolver {
    table: RwLock<SniTable>,
}

/// What [`SniResolver`] picks from.
#[derive(Default)]
struct SniTable {
    /// Certificates by normalised name (see [`normalise`]).
    by_name: HashMap<String, Arc<CertifiedKey>>,
    /// The certificate for every other client.
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    /// A resolver without certificates: it refuses every handshake until some are added.
    pub fn new() -> SniResolver {
        SniResolver::default()
    }

    /// Presents `key` to clients asking for `name`; returns the certificate it replaces.
    pub fn insert(&self, name: &str, key: Arc<CertifiedKey>) -> Option<Arc<CertifiedKey>> {
        self.write().by_name.insert(normalise(name), key)
    }

    /// Stops presenting a certificate for `name`; returns it.
    pub fn remove(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.write().by_name.remove(&normalise(name))
    }

    /// Sets (or with `None` removes) the certificate for clients asking for no name or an
    /// unknown one; returns the one it replaces.
    pub fn set_default(&self, key: Option<Arc<CertifiedKey>>) -> Option<Arc<CertifiedKey>> {
        std::mem::replace(&mut self.write().default, key)
    }

    /// The certificate a client asking for `server_name` (`None`: no SNI) gets; `None` refuses
    /// the handshake.
    pub fn find(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let table = self.read();
        server_name
            .and_then(|name| table.by_name.get(&normalise(name)))
            .or(table.default.as_ref())
            .cloned()
    }

    /// The names with a certificate, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read().by_name.keys().cloned().collect();
        names.sort();
        names
    }

    // Nothing panics while holding the lock, but a poisoned table is still a whole one.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, SniTable> {
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, SniTable> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = self.find(client_hello.server_name());
        if key.is_none() {
            tracing::debug!(
                server_name = client_hello.server_name().unwrap_or("(none)"),
                "no certificate for this name; refusing the handshake"
            );
        }
        key
    }
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = self.read();
        f.debug_struct("SniResolver")
            .field("names", &table.by_name.len())
            .field("default", &table.default.is_some())
            .finish()
    }
}

/// A host name as [`SniResolver`] stores it: ASCII lower case, without a trailing dot.
fn normalise(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{
        ALPN_HTTP1, ClusterCa, certified_key, client_config, resolving_server_config, server_config,
    };
    use std::time::Instant;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    const WAIT: Duration = Duration::from_secs(10);

    struct Running {
        addr: SocketAddr,
        ca: ClusterCa,
        stop: Option<oneshot::Sender<()>>,
        server: JoinHandle<io::Result<()>>,
    }

    /// The control API's way: `serve_tls` with a node certificate.
    async fn start() -> Running {
        let ca = ClusterCa::generate("test").expect("ca");
        let cert = ca.issue("n1", &[]).expect("issue");
        let tls = server_config(&cert).expect("server config");
        start_with(ca, |listener, app, stopped| {
            tokio::spawn(serve_tls(listener, tls, app, stopped))
        })
        .await
    }

    /// `serve` with `accept`.
    async fn start_serving(ca: ClusterCa, accept: Accept) -> Running {
        start_with(ca, |listener, app, stopped| {
            tokio::spawn(serve(listener, accept, app, stopped))
        })
        .await
    }

    async fn start_with(
        ca: ClusterCa,
        spawn: impl FnOnce(
            TcpListener,
            axum::Router,
            std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
        ) -> JoinHandle<io::Result<()>>,
    ) -> Running {
        let app = axum::Router::new()
            .route("/ping", axum::routing::get(|| async { "pong" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "slow pong"
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = spawn(
            listener,
            app,
            Box::pin(async {
                let _ = stopped.await;
            }),
        );
        Running {
            addr,
            ca,
            stop: Some(stop),
            server,
        }
    }

    fn client(ca_pem: &str, addr: SocketAddr) -> reqwest::Client {
        // Pin `localhost` to the listener's address: it may resolve to ::1 first.
        client_resolving(ca_pem, addr, &["localhost"])
    }

    /// A client trusting `ca_pem` that finds each of `names` at `addr`.
    fn client_resolving(ca_pem: &str, addr: SocketAddr, names: &[&str]) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(client_config(ca_pem).expect("client config"))
            .no_proxy()
            .timeout(WAIT);
        for name in names {
            builder = builder.resolve(name, addr);
        }
        builder.build().expect("client")
    }

    /// Sends `request` on a new plain TCP connection and reads until the server closes.
    async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> io::Result<Vec<u8>> {
        let exchange = async {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(request).await?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await?;
            Ok(answer)
        };
        tokio::time::timeout(WAIT, exchange)
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
    }

    async fn stop(mut running: Running) {
        let started = Instant::now();
        running
            .stop
            .take()
            .expect("stop")
            .send(())
            .expect("send stop");
        tokio::time::timeout(Duration::from_secs(6), running.server)
            .await
            .expect("serve did not return within 6 s")
            .expect("server task")
            .expect("serve result");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            TcpStream::connect(running.addr).await.is_err(),
            "listener still open"
        );
    }

    async fn get(client: &reqwest::Client, url: &str) -> reqwest::Result<(u16, String)> {
        let response = client.get(url).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }

    #[tokio::test]
    async fn serves_https_with_the_cluster_ca() {
        let running = start().await;
        let port = running.addr.port();
        let client = client(running.ca.cert_pem(), running.addr);
        for url in [
            format!("https://127.0.0.1:{port}/ping"),
            format!("https://localhost:{port}/ping"),
        ] {
            let answer = get(&client, &url).await.expect(&url);
            assert_eq!(answer, (200, "pong".to_owned()), "{url}");
        }
        // Keep-alive: a second round trip on the same client works too.
        let answer = get(&client, &format!("https://127.0.0.1:{port}/ping"))
            .await
            .expect("second request");
        assert_eq!(answer, (200, "pong".to_owned()));
        running.server.abort();
    }

    #[tokio::test]
    async fn answers_plain_http_with_a_clear_400() {
        let running = start().await;
        let exchange = async {
            let mut stream = TcpStream::connect(running.addr).await.expect("connect");
            stream
                .write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("write");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.expect("read");
            answer
        };
        let answer = tokio::time::timeout(WAIT, exchange)
            .await
            .expect("timed out");
        let body =
            "this port speaks HTTPS only: use https:// and the cluster CA (p2f's control API)\n";
        let expected = format!(
            "HTTP/1.1 400 Bad Request\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\n\
             Connection: close\r\n\
             \r\n\
             {body}",
            body.len()
        );
        assert_eq!(answer, expected);

        // The server is still there for TLS clients afterwards.
        let client = client(running.ca.cert_pem(), running.addr);
        let url = format!("https://127.0.0.1:{}/ping", running.addr.port());
        assert_eq!(
            get(&client, &url).await.expect("https after plain"),
            (200, "pong".to_owned())
        );
        running.server.abort();
    }

    #[tokio::test]
    async fn rejects_clients_trusting_another_ca() {
        let running = start().await;
        let other = ClusterCa::generate("other").expect("other ca");
        let client = client(other.cert_pem(), running.addr);
        let url = format!("https://127.0.0.1:{}/ping", running.addr.port());
        let err = get(&client, &url).await.expect_err("foreign CA must fail");
        assert!(err.is_connect(), "{err:?}");

        // A failed handshake does not hurt the server.
        let client = super::tests::client(running.ca.cert_pem(), running.addr);
        assert_eq!(
            get(&client, &url).await.expect("https after failure"),
            (200, "pong".to_owned())
        );
        running.server.abort();
    }

    #[tokio::test]
    async fn shutdown_returns_promptly_even_with_open_connections() {
        let mut running = start().await;
        let client = client(running.ca.cert_pem(), running.addr);
        let url = format!("https://127.0.0.1:{}/ping", running.addr.port());
        // An idle keep-alive connection and a connection that never says anything.
        get(&client, &url).await.expect("request");
        let _silent = TcpStream::connect(running.addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(50)).await;

        let started = Instant::now();
        running
            .stop
            .take()
            .expect("stop")
            .send(())
            .expect("send stop");
        let result = tokio::time::timeout(Duration::from_secs(6), running.server)
            .await
            .expect("serve_tls did not return within 6 s")
            .expect("server task");
        result.expect("serve_tls result");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );

        // Nothing listens any more.
        let refused = TcpStream::connect(running.addr).await;
        assert!(refused.is_err(), "listener still open");
    }

    #[tokio::test]
    async fn shutdown_lets_requests_in_flight_finish() {
        let mut running = start().await;
        let client = client(running.ca.cert_pem(), running.addr);
        let url = format!("https://127.0.0.1:{}/slow", running.addr.port());
        let in_flight = tokio::spawn(async move { get(&client, &url).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        running
            .stop
            .take()
            .expect("stop")
            .send(())
            .expect("send stop");
        let answer = tokio::time::timeout(WAIT, in_flight)
            .await
            .expect("request timed out")
            .expect("request task")
            .expect("request in flight must complete");
        assert_eq!(answer, (200, "slow pong".to_owned()));
        tokio::time::timeout(Duration::from_secs(6), running.server)
            .await
            .expect("serve_tls did not return within 6 s")
            .expect("server task")
            .expect("serve_tls result");
    }

    #[test]
    fn plain_response_has_the_right_length() {
        for text in ["use https://\n", "", "ünïcode\n"] {
            let response = plain_http_response(text);
            let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
            assert_eq!(body, text);
            assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
        }
    }

    /// Connections go to the workers in turn, every request of one is served on its worker's
    /// thread, and shutdown still drains and returns.
    #[tokio::test]
    async fn serves_each_connection_on_a_worker_thread() {
        // Two workers: the answers below name both, then the first again.
        let workers = Arc::new(Workers::start(2, "test-worker").expect("workers"));
        let app = axum::Router::new().route(
            "/thread",
            axum::routing::get(|| async {
                let name = std::thread::current().name().unwrap_or("?").to_owned();
                format!("{name} {:?}", Workers::current())
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve_on(
            listener,
            Accept::Plain,
            Limits::INGRESS,
            app,
            async {
                let _ = stopped.await;
            },
            Some(Arc::clone(&workers)),
        ));
        let request = b"GET /thread HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut seen = Vec::new();
        for _ in 0..4 {
            // One connection, two requests on it: both on the same worker.
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let mut answers = Vec::new();
            for _ in 0..2 {
                stream.write_all(request).await.expect("write");
                let mut buf = vec![0u8; 4096];
                let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
                    .await
                    .expect("answer in time")
                    .expect("read");
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let body = text
                    .rsplit("\r\n\r\n")
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                answers.push(body);
            }
            assert_eq!(answers[0], answers[1], "one connection, one worker");
            seen.push(answers.remove(0));
        }
        assert_eq!(
            seen,
            [
                "test-worker-0 Some(0)",
                "test-worker-1 Some(1)",
                "test-worker-0 Some(0)",
                "test-worker-1 Some(1)"
            ]
        );
        assert_eq!(
            Workers::current(),
            None,
            "the test's own thread is no worker"
        );
        let _ = stop_tx.send(());
        tokio::time::timeout(Duration::from_secs(6), server)
            .await
            .expect("serve returns")
            .expect("server task")
            .expect("serve result");
    }

    #[tokio::test]
    async fn serves_plain_http_and_shuts_down() {
        let ca = ClusterCa::generate("test").expect("ca");
        let running = start_serving(ca, Accept::Plain).await;
        // (reqwest wants a TLS backend even for plain URLs.)
        let client = client(running.ca.cert_pem(), running.addr);
        let url = format!("http://127.0.0.1:{}/ping", running.addr.port());
        for _ in 0..2 {
            assert_eq!(
                get(&client, &url).await.expect("plain http"),
                (200, "pong".to_owned())
            );
        }
        // A connection that never says anything does not hold up shutdown.
        let _silent = TcpStream::connect(running.addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop(running).await;
    }

    #[tokio::test]
    async fn a_tls_port_can_close_on_plain_http_without_a_word() {
        let ca = ClusterCa::generate("test").expect("ca");
        let cert = ca.issue("n1", &[]).expect("issue");
        let config = server_config(&cert).expect("server config");
        let accept = Accept::Tls {
            config,
            plain: PlainHttp::Close,
            without_sni: None,
        };
        let running = start_serving(ca, accept).await;
        // Closed with unread data, the socket may end in a reset: either way, no answer.
        let answer = raw_exchange(running.addr, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            matches!(&answer, Ok(bytes) if bytes.is_empty())
                || matches!(&answer, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{answer:?}"
        );
        let client = client(running.ca.cert_pem(), running.addr);
        let url = format!("https://127.0.0.1:{}/ping", running.addr.port());
        assert_eq!(
            get(&client, &url).await.expect("https after plain"),
            (200, "pong".to_owned())
        );
        stop(running).await;
    }

    /// A cluster CA, and a listener on 127.0.0.1 whose TLS (a certificate from that CA) offers
    /// HTTP/2 and HTTP/1.1.
    async fn h2_listener() -> (ClusterCa, TcpListener, SocketAddr, Accept) {
        let ca = ClusterCa::generate("test").expect("ca");
        let cert = ca.issue("n1", &[]).expect("issue");
        let key = certified_key(&cert.cert_pem, &cert.key_pem).expect("key");
        let resolver = Arc::new(rustls::sign::SingleCertAndKey::from(key));
        let config =
            resolving_server_config(resolver, &[b"h2", b"http/1.1"]).expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept = Accept::Tls {
            config,
            plain: PlainHttp::Close,
            without_sni: None,
        };
        (ca, listener, addr, accept)
    }

    /// An HTTP/2 client connection to `addr` (TLS trusting `ca`, ALPN `h2`, which the server
    /// must pick), and its task.
    async fn h2_client(
        ca: &ClusterCa,
        addr: SocketAddr,
    ) -> (
        hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
        JoinHandle<hyper::Result<()>>,
    ) {
        let mut client = client_config(ca.cert_pem()).expect("client config");
        client.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let tls = connector.connect(name, tcp).await.expect("handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await
        .expect("h2 handshake");
        (send, tokio::spawn(conn))
    }

    #[tokio::test]
    async fn serves_http2_when_alpn_offers_it_and_tells_who_asked() {
        let (ca, listener, addr, accept) = h2_listener().await;
        let app = axum::Router::new().route(
            "/who",
            axum::routing::get(
                |axum::Extension(info): axum::Extension<ConnectionInfo>,
                 request: axum::extract::Request| async move {
                    format!("{:?} {} {}", request.version(), info.tls, info.peer.ip())
                },
            ),
        );
        let server = tokio::spawn(serve(listener, accept, app, std::future::pending()));

        let exchange = async {
            let (mut send, _conn) = h2_client(&ca, addr).await;
            let request = hyper::Request::get(format!("https://localhost:{}/who", addr.port()))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request");
            let response = send.send_request(request).await.expect("response");
            assert_eq!(response.version(), hyper::Version::HTTP_2);
            use http_body_util::BodyExt as _;
            let body = response.into_body().collect().await.expect("body");
            String::from_utf8(body.to_bytes().to_vec()).expect("utf-8")
        };
        let answer = tokio::time::timeout(WAIT, exchange).await.expect("in time");
        assert_eq!(answer, "HTTP/2.0 true 127.0.0.1");
        server.abort();
    }

    #[tokio::test]
    async fn an_http2_connection_is_closed_once_idle_but_not_while_it_streams() {
        let idle = Duration::from_millis(400);
        let (ca, listener, addr, accept) = h2_listener().await;
        // Five chunks 200 ms apart: a body that takes longer than the idle time.
        let app = axum::Router::new().route(
            "/stream",
            axum::routing::get(|| async {
                let chunks = futures_util::stream::unfold(0, |n| async move {
                    if n == 5 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Some((
                        Ok::<_, io::Error>(bytes::Bytes::from(format!("{n}"))),
                        n + 1,
                    ))
                });
                axum::body::Body::from_stream(chunks)
            }),
        );
        let limits = Limits {
            idle,
            ..Limits::INGRESS
        };
        let server = tokio::spawn(serve_limited(
            listener,
            accept,
            limits,
            app,
            std::future::pending(),
        ));

        let (mut send, conn) = h2_client(&ca, addr).await;
        let request = hyper::Request::get(format!("https://localhost:{}/stream", addr.port()))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let streamed = async {
            let response = send.send_request(request).await.expect("response");
            use http_body_util::BodyExt as _;
            let body = response.into_body().collect().await.expect("body");
            String::from_utf8(body.to_bytes().to_vec()).expect("utf-8")
        };
        let body = tokio::time::timeout(WAIT, streamed).await.expect("in time");
        assert_eq!(
            body, "01234",
            "the whole body, though it took longer than the idle time"
        );
        assert!(!conn.is_finished(), "closed as soon as the body ended");
        // Then nothing: the server closes the connection (GOAWAY, then EOF).
        let ended = tokio::time::timeout(WAIT, conn).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
        server.abort();
    }

    #[tokio::test]
    async fn one_address_cannot_take_every_connection() {
        let ca = ClusterCa::generate("test").expect("ca");
        let limits = Limits {
            connections: 100,
            per_peer: 2,
            idle: IDLE_TIMEOUT,
        };
        let running = start_with(ca, |listener, app, stopped| {
            tokio::spawn(serve_limited(listener, Accept::Plain, limits, app, stopped))
        })
        .await;
        // Two silent connections from 127.0.0.1 take its share (they would wait 10 s).
        let _silent = [
            TcpStream::connect(running.addr).await.expect("connect"),
            TcpStream::connect(running.addr).await.expect("connect"),
        ];
        tokio::time::sleep(Duration::from_millis(50)).await;
        let request = b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        // A third from the same address is closed unanswered.
        let answer = raw_exchange(running.addr, request).await;
        assert!(
            matches!(&answer, Ok(bytes) if bytes.is_empty())
                || matches!(&answer, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{answer:?}"
        );
        // Another address is served.
        let other = async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind("127.0.0.2:0".parse().expect("addr"))?;
            let mut stream = socket.connect(running.addr).await?;
            stream.write_all(request).await?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await?;
            Ok::<_, io::Error>(answer)
        };
        let answer = tokio::time::timeout(WAIT, other)
            .await
            .expect("in time")
            .expect("served");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(answer.ends_with("pong"), "{answer:?}");
        stop(running).await;
    }

    /// Certificates from one CA for `a.lan`, `b.lan` and (the fallback) `fallback.lan` +
    /// `c.lan`; each also covers `localhost` and the loopback addresses.
    fn sni_keys(ca: &ClusterCa) -> [Arc<CertifiedKey>; 3] {
        let key = |node: &str, hosts: &[&str]| {
            let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
            let cert = ca.issue(node, &hosts).expect("issue");
            certified_key(&cert.cert_pem, &cert.key_pem).expect("key")
        };
        [
            key("a", &["a.lan"]),
            key("b", &["b.lan"]),
            key("fallback", &["fallback.lan", "c.lan"]),
        ]
    }

    #[test]
    fn sni_resolver_picks_by_name_then_the_default() {
        let ca = ClusterCa::generate("test").expect("ca");
        let [a, b, fallback] = sni_keys(&ca);
        let sni = SniResolver::new();
        let check = |name: Option<&str>, expected: Option<&Arc<CertifiedKey>>| {
            let found = sni.find(name);
            let same = match (&found, expected) {
                (Some(found), Some(expected)) => Arc::ptr_eq(found, expected),
                (None, None) => true,
                _ => false,
            };
            assert!(same, "{name:?}: found {:?}", found.map(|k| k.cert.len()));
        };
        check(Some("a.lan"), None);
        check(None, None);

        assert!(sni.insert("A.Lan.", Arc::clone(&a)).is_none());
        assert!(sni.insert("b.lan", Arc::clone(&a)).is_none());
        let replaced = sni.insert("b.lan", Arc::clone(&b)).expect("replaced");
        assert!(Arc::ptr_eq(&replaced, &a));
        assert_eq!(sni.names(), ["a.lan", "b.lan"]);
        check(Some("a.lan"), Some(&a));
        check(Some("A.LAN"), Some(&a));
        check(Some("a.lan."), Some(&a));
        check(Some("b.lan"), Some(&b));
        // Unknown names and clients without SNI are refused while there is no default.
        check(Some("c.lan"), None);
        check(Some("sub.a.lan"), None);
        check(None, None);

        assert!(sni.set_default(Some(Arc::clone(&fallback))).is_none());
        check(Some("c.lan"), Some(&fallback));
        check(None, Some(&fallback));
        check(Some("a.lan"), Some(&a));

        assert!(sni.remove("A.LAN").is_some());
        check(Some("a.lan"), Some(&fallback));
        assert!(sni.set_default(None).is_some());
        check(Some("a.lan"), None);
        assert_eq!(
            format!("{sni:?}"),
            "SniResolver { names: 1, default: false }"
        );
    }

    #[tokio::test]
    async fn serves_each_name_its_certificate() {
        let ca = ClusterCa::generate("test").expect("ca");
        let [a, b, fallback] = sni_keys(&ca);
        let sni = Arc::new(SniResolver::new());
        sni.insert("a.lan", a);
        sni.insert("b.lan", b);
        let config = resolving_server_config(Arc::clone(&sni) as _, ALPN_HTTP1).expect("config");
        let accept = Accept::Tls {
            config,
            plain: PlainHttp::Close,
            without_sni: None,
        };
        let running = start_serving(ca, accept).await;
        let port = running.addr.port();
        let client = client_resolving(
            running.ca.cert_pem(),
            running.addr,
            &["a.lan", "b.lan", "c.lan"],
        );
        // Each certificate is valid for its own name only: a wrong pick fails verification.
        for name in ["a.lan", "B.LAN"] {
            let url = format!("https://{name}:{port}/ping");
            assert_eq!(
                get(&client, &url).await.expect(&url),
                (200, "pong".to_owned())
            );
        }
        // No certificate for c.lan, nor for a client sending no name (an IP address): refused.
        let c = format!("https://c.lan:{port}/ping");
        let ip = format!("https://127.0.0.1:{port}/ping");
        for url in [&c, &ip] {
            let err = get(&client, url).await.expect_err(url);
            assert!(err.is_connect(), "{url}: {err:?}");
        }
        // A default set while serving answers both (it covers c.lan and 127.0.0.1).
        sni.set_default(Some(fallback));
        for url in [&c, &ip] {
            assert_eq!(
                get(&client, url).await.expect(url),
                (200, "pong".to_owned())
            );
        }
        stop(running).await;
    }
}
