//! The proxy: one handler behind both listeners (hyper does the HTTP; [`crate::server`] the
//! accepting, timeouts and draining). A request's host picks its route; plain HTTP is
//! redirected to HTTPS (but ACME's challenge path); a serving copy gets the request over a
//! pooled connection ([`super::pool`]) through the [`Upstream`] with the forwarding headers set
//! and hop-by-hop headers removed, bodies streamed both ways, and an `Upgrade` (WebSocket or
//! any other) spliced once both sides switched. No copy serving: an idempotent request waits up
//! to the hold for one, then `503` with `Retry-After` and the record's reason. An unknown host
//! gets a bare `404`.
//!
//! The proxy is a [`crate::server::App`] of its own, not an axum `Router`: it has one route,
//! and a request should cost no more than the proxying (measured: BENCHMARKS.md, "Ingress",
//! run V1).

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use p2f_model::Status;
use tokio::sync::watch;
use tokio::time::Instant;

use super::acme::Challenges;
use super::headers::{self, ClientForwarding};
use super::pool::{OutBody, Pool, PooledBody, SendError};
use super::routes::{self, Route, RouteTable};
use super::upstream::Upstream;
use crate::client::error_chain;
use crate::server::{App, ConnectionInfo};

/// ACME's HTTP-01 challenge path: never redirected.
pub(crate) const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";
/// The longest a process may take to answer a request's headers.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause before trying a copy again after it could not be reached (while holding).
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// The last error reaching each domain's process, for `GET /v1/routes`.
#[derive(Debug, Default)]
pub(crate) struct Errors {
    by_domain: Mutex<HashMap<String, String>>,
    /// Whether any domain has one (so that a request that succeeds takes no lock to clear
    /// its domain's when none has).
    any: AtomicBool,
}

impl Errors {
    pub(crate) fn get(&self, domain: &str) -> Option<String> {
        self.lock().get(domain).cloned()
    }

    fn set(&self, domain: &str, error: String) {
        let mut errors = self.lock();
        errors.insert(domain.to_owned(), error);
        self.any.store(true, Ordering::Relaxed);
    }

    fn clear(&self, domain: &str) {
        if !self.any.load(Ordering::Relaxed) {
            return;
        }
        let mut errors = self.lock();
        errors.remove(domain);
        self.any.store(!errors.is_empty(), Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.by_domain
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the proxy needs besides the routes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// How long an idempotent request waits for a copy.
    pub(crate) hold: Duration,
    /// Whether plain HTTP redirects to HTTPS.
    pub(crate) redirect: bool,
    /// The HTTPS listener's port (for redirects).
    pub(crate) https_port: u16,
}

/// The proxy's state, shared by both listeners: the [`App`] they serve.
#[derive(Clone)]
pub(crate) struct Proxy(Arc<Shared>);

struct Shared {
    routes: watch::Receiver<Arc<RouteTable>>,
    /// One pool of upstream connections per worker thread (see [`crate::server::Workers`]): a
    /// request goes out on a connection of its own thread. The first also serves requests off
    /// the workers.
    pools: Box<[Arc<Pool>]>,
    errors: Arc<Errors>,
    challenges: Arc<Challenges>,
    settings: Settings,
}

impl Proxy {
    pub(crate) fn new(
        routes: watch::Receiver<Arc<RouteTable>>,
        upstream: Arc<dyn Upstream>,
        errors: Arc<Errors>,
        challenges: Arc<Challenges>,
        settings: Settings,
        workers: usize,
    ) -> Proxy {
        let pools = (0..workers.max(1))
            .map(|_| Arc::new(Pool::new(Arc::clone(&upstream))))
            .collect();
        Proxy(Arc::new(Shared {
            routes,
            pools,
            errors,
            challenges,
            settings,
        }))
    }
}

impl App for Proxy {
    type Body = ProxyBody;
    type Service = Serving;

    fn connection(&self, info: ConnectionInfo) -> Serving {
        let proto = if info.tls { "https" } else { "http" };
        Serving(Arc::new(ClientConnection {
            proxy: Arc::clone(&self.0),
            forwarding: ClientForwarding::new(info.peer.ip(), proto),
            info,
        }))
    }
}

/// The proxy serving one client connection.
#[derive(Clone)]
pub(crate) struct Serving(Arc<ClientConnection>);

struct ClientConnection {
    proxy: Arc<Shared>,
    info: ConnectionInfo,
    /// The forwarding headers of this client's requests.
    forwarding: ClientForwarding,
}

impl hyper::service::Service<Request<Incoming>> for Serving {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<ProxyBody>, Infallible>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let connection = Arc::clone(&self.0);
        Box::pin(async move { Ok(connection.handle(request).await) })
    }
}

impl ClientConnection {
    async fn handle(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let proxy = &self.proxy;
        let host = match headers::host_of(request.uri(), request.headers()) {
            Ok(host) => host,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("400 bad request: {e}\n")),
        };
        if !self.info.tls
            && let Some(token) = request.uri().path().strip_prefix(ACME_CHALLENGE)
        {
            // HTTP-01: the key authorisation while that challenge is under way, for any host.
            return match proxy.challenges.http_response(token) {
                Some(body) => {
                    tracing::debug!(%host, "HTTP-01 challenge answered");
                    full(StatusCode::OK, "application/octet-stream", body)
                }
                None => not_found(),
            };
        }
        let table = Arc::clone(&proxy.routes.borrow());
        if table.find_normalised(&host).is_none() {
            return not_found();
        }
        if !self.info.tls && proxy.settings.redirect {
            return redirect(&host, proxy.settings.https_port, request.uri());
        }
        self.forward(request, &host, table).await
    }

    /// Sends `request` to the copy serving `host` (in `table`, then in the tables that follow
    /// it), holding an idempotent one while none does.
    async fn forward(
        &self,
        mut request: Request<Incoming>,
        host: &str,
        mut table: Arc<RouteTable>,
    ) -> Response<ProxyBody> {
        let proxy = &self.proxy;
        let idempotent = is_idempotent(request.method());
        let deadline = Instant::now()
            + if idempotent {
                proxy.settings.hold
            } else {
                Duration::ZERO
            };
        // A request without a body can be sent again when a copy could not be reached.
        let replayable = idempotent && request.body().is_end_stream();
        let upgrade = match request.version() {
            Version::HTTP_2 | Version::HTTP_3 => None,
            _ => headers::upgrade_of(request.headers()),
        };
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let wants_json = wants_json(request.headers());
        let (parts, body) = request.into_parts();
        let mut body = Some(body);
        // Followed only once a request has to wait (cloned then).
        let mut routes: Option<watch::Receiver<Arc<RouteTable>>> = None;
        let mut last_error: Option<String> = None;
        // Whether the request was sent again after a pooled connection broke under it.
        let mut resent = false;
        loop {
            let Some(route) = table.find_normalised(host) else {
                return not_found();
            };
            if let Some(target) = &route.target {
                let body = match body.take() {
                    Some(body) => Either::Left(body),
                    None => Either::Right(Empty::new()),
                };
                let outgoing = self.outgoing(&parts, body, upgrade.as_ref());
                let pool = proxy.pool();
                match tokio::time::timeout(RESPONSE_TIMEOUT, pool.send(target, outgoing)).await {
                    Ok(Ok(response)) => {
                        proxy.errors.clear(&route.domain);
                        return respond(response, client_upgrade);
                    }
                    Ok(Err(e)) => {
                        let error = error_chain(&e);
                        tracing::debug!(domain = %route.domain, "upstream: {error}");
                        proxy.errors.set(&route.domain, error.clone());
                        // A bodiless idempotent request is sent again: at once, once, when the
                        // connection it went out on broke before an answer (a pooled
                        // connection whose node just died, or whose process restarted);
                        // every 250 ms within the hold while its copy cannot be reached.
                        let broken = !matches!(e, SendError::Connect(_));
                        if !replayable || (broken && resent) {
                            let name = route.process.name();
                            let message = format!("502 bad gateway: {name} did not answer\n");
                            return text(StatusCode::BAD_GATEWAY, message);
                        }
                        if broken {
                            // At once, to the copy the routes name now (the broken
                            // connection's may just have been replaced).
                            resent = true;
                            table = Arc::clone(&proxy.routes.borrow());
                            continue;
                        }
                        last_error = Some(error);
                    }
                    Err(_) => {
                        let error = format!("no answer within {RESPONSE_TIMEOUT:?}");
                        proxy.errors.set(&route.domain, error);
                        let name = route.process.name();
                        let message =
                            format!("504 gateway timeout: {name} did not answer in time\n");
                        return text(StatusCode::GATEWAY_TIMEOUT, message);
                    }
                }
            }
            let hold = proxy.settings.hold;
            if Instant::now() >= deadline || !coming(&route.process.status) {
                return unavailable(route, last_error.is_some(), wants_json, hold);
            }
            // Wait for the routes to change (a new copy), or after a failed attempt a moment
            // before trying again.
            let routes = routes.get_or_insert_with(|| proxy.routes.clone());
            let latest = Arc::clone(&routes.borrow_and_update());
            if !Arc::ptr_eq(&latest, &table) {
                // They changed since this request looked.
                table = latest;
                continue;
            }
            let until = match last_error {
                Some(_) => deadline.min(Instant::now() + RETRY_PAUSE),
                None => deadline,
            };
            if let Ok(Err(_)) = tokio::time::timeout_at(until, routes.changed()).await {
                // The routes are no longer followed: the ingress is stopping.
                return unavailable(route, last_error.is_some(), wants_json, hold);
            }
            table = Arc::clone(&routes.borrow_and_update());
        }
    }

    /// The request for the process: HTTP/1.1, origin-form, hop-by-hop headers out (but an
    /// upgrade being asked for), forwarding headers in, `Host` as the client gave it.
    fn outgoing(
        &self,
        parts: &Parts,
        body: OutBody,
        upgrade: Option<&HeaderValue>,
    ) -> Request<OutBody> {
        let mut headers = parts.headers.clone();
        // HTTP/2's `:authority` (or an absolute-form request line) is the host asked for.
        if let Some(asked) = parts.uri.authority()
            && let Ok(value) = HeaderValue::from_str(asked.as_str())
        {
            headers.insert(header::HOST, value);
        }
        let host = headers.get(header::HOST).cloned();
        headers::remove_hop_by_hop(&mut headers, upgrade);
        self.forwarding.apply(&mut headers, host.as_ref());
        let mut outgoing = Request::new(body);
        *outgoing.method_mut() = parts.method.clone();
        *outgoing.version_mut() = Version::HTTP_11;
        *outgoing.headers_mut() = headers;
        if let Some(path) = parts.uri.path_and_query() {
            *outgoing.uri_mut() = Uri::from(path.clone());
        }
        outgoing
    }
}

impl Shared {
    /// The pool of upstream connections of the calling thread.
    fn pool(&self) -> &Arc<Pool> {
        let worker = crate::server::Workers::current().unwrap_or(0);
        &self.pools[worker % self.pools.len()]
    }
}

/// A response's body: the process's, streamed, or one the proxy made.
#[derive(Debug)]
pub(crate) struct ProxyBody(Inner);

#[derive(Debug)]
enum Inner {
    Upstream(PooledBody),
    /// `None` once sent (or empty).
    Full(Option<Bytes>),
}

impl ProxyBody {
    fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        let bytes = bytes.into();
        ProxyBody(Inner::Full((!bytes.is_empty()).then_some(bytes)))
    }

    fn empty() -> ProxyBody {
        ProxyBody(Inner::Full(None))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.0 {
            Inner::Upstream(body) => Pin::new(body).poll_frame(cx),
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Upstream(body) => body.is_end_stream(),
            Inner::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Upstream(body) => body.size_hint(),
            Inner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// The process's response, for the client: hop-by-hop headers out; a `101` is spliced to the
/// client's upgraded connection.
fn respond(
    mut response: Response<PooledBody>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<ProxyBody> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client) = client_upgrade else {
            return text(
                StatusCode::BAD_GATEWAY,
                "502 bad gateway: the process switched protocols unasked\n",
            );
        };
        let upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(splice(client, upstream));
        let protocol = response.headers().get(header::UPGRADE).cloned();
        let (mut parts, _) = response.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers, protocol.as_ref());
        return Response::from_parts(parts, ProxyBody::empty());
    }
    let (mut parts, body) = response.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers, None);
    Response::from_parts(parts, ProxyBody(Inner::Upstream(body)))
}

/// Copies bytes both ways between the client's and the process's upgraded connections
/// ([`crate::reach::splice`]: an idle WebSocket holds 8 KiB of buffers).
async fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = tokio::join!(client, upstream);
    match (client, upstream) {
        (Ok(client), Ok(upstream)) => {
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(e) = crate::reach::splice(&mut client, &mut upstream).await {
                tracing::debug!("upgraded connection ended: {e}");
            }
        }
        (Err(e), _) | (_, Err(e)) => tracing::debug!("upgrade failed: {e}"),
    }
}

/// Whether a copy may serve soon, so that holding a request is worth it: not for a process
/// stopped on request, or waiting for a node that can take it.
fn coming(status: &Status) -> bool {
    !matches!(
        status,
        Status::Stopped | Status::Stopping | Status::Unplaced
    )
}

/// GET, HEAD, OPTIONS, TRACE, PUT, DELETE (RFC 9110 §9.2.2): safe to hold and to send again.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/json"))
}

/// `308` to the same host and path over HTTPS.
fn redirect(host: &str, https_port: u16, uri: &Uri) -> Response<ProxyBody> {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let port = match https_port {
        443 => String::new(),
        port => format!(":{port}"),
    };
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let location = format!("https://{host}{port}{path}");
    match HeaderValue::from_str(&location) {
        Ok(location) => {
            let mut response = Response::new(ProxyBody::empty());
            *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
            response.headers_mut().insert(header::LOCATION, location);
            response
        }
        Err(_) => text(StatusCode::BAD_REQUEST, "400 bad request\n"),
    }
}

/// `503`: the route's process does not serve now, and why (its record's formal reason), as
/// JSON for `Accept: application/json`, else HTML; `Retry-After` in seconds.
fn unavailable(
    route: &Route,
    unreachable: bool,
    json: bool,
    hold: Duration,
) -> Response<ProxyBody> {
    let process = &route.process;
    let reason = if unreachable && route.target.is_some() {
        format!(
            "{} does not answer on {}",
            process.name(),
            process.node.name
        )
    } else {
        routes::reason(process)
    };
    let retry_after = hold.as_secs().clamp(1, 60);
    let mut response = if json {
        let body = serde_json::json!({
            "error": "service unavailable",
            "service": process.name(),
            "domain": route.domain,
            "status": process.status.name(),
            "reason": reason,
            "failure": process.last_failure,
            "retry_after": retry_after,
        });
        full(
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            body.to_string(),
        )
    } else {
        let name = html_escape(process.name());
        let html = format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{name} is unavailable</title></head>\n\
             <body><h1>{name} is unavailable right now</h1>\n<p>{}</p>\n\
             <p>Try again in {retry_after} s.</p></body></html>\n",
            html_escape(&reason)
        );
        full(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/html; charset=utf-8",
            html,
        )
    };
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `404` that says nothing about what is routed.
fn not_found() -> Response<ProxyBody> {
    text(StatusCode::NOT_FOUND, "404 page not found\n")
}

/// A plain-text answer.
fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    full(status, "text/plain; charset=utf-8", body)
}

/// An answer of the proxy's own, `body` of type `content_type`.
fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures_util::future::BoxFuture;
    use p2f_model::{EventKind, NodeName, NodeRef, Process, ProcessId, ProcessSpec, Timestamp};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use crate::ingress::routes::Target;
    use crate::ingress::upstream::{Io, UpstreamError};
    use crate::records::precedence::Origin;

    /// An upstream whose first `breaks` connections take a request and close without an answer
    /// (a pooled connection whose node just died); later ones answer `200 ok`. It notes the
    /// port of each target it is asked for; with `moves`, the first broken connection moves
    /// the process (port 8081, generation 2) before it closes.
    struct Flaky {
        breaks: usize,
        ports: Mutex<Vec<u16>>,
        moves: Option<watch::Sender<Arc<RouteTable>>>,
    }

    impl Flaky {
        fn new(breaks: usize, moves: Option<watch::Sender<Arc<RouteTable>>>) -> Arc<Flaky> {
            Arc::new(Flaky {
                breaks,
                ports: Mutex::default(),
                moves,
            })
        }

        fn ports(&self) -> Vec<u16> {
            self.ports.lock().expect("ports").clone()
        }
    }

    impl Upstream for Flaky {
        fn connect(
            &self,
            target: &Target,
        ) -> BoxFuture<'static, Result<Box<dyn Io>, UpstreamError>> {
            let mut ports = self.ports.lock().expect("ports");
            let broken = ports.len() < self.breaks;
            let moves = (broken && ports.is_empty())
                .then(|| self.moves.clone())
                .flatten();
            ports.push(target.port);
            let (ours, mut theirs) = tokio::io::duplex(4096);
            tokio::spawn(async move {
                let (mut head, mut buf) = (Vec::new(), [0u8; 1024]);
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match theirs.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if let Some(routes) = moves {
                    routes.send_replace(Arc::new(table(8081, 2)));
                }
                if broken {
                    return;
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if theirs.write_all(answer).await.is_ok() {
                    // Kept alive until the proxy lets go.
                    while matches!(theirs.read(&mut buf).await, Ok(n) if n > 0) {}
                }
            });
            Box::pin(std::future::ready(Ok(Box::new(ours) as Box<dyn Io>)))
        }

        fn describe(&self, _: &Target) -> String {
            "flaky".to_owned()
        }
    }

    /// Routes `wiki.lan` to a running, healthy copy of generation `generation` on `port`.
    fn table(port: u16, generation: u64) -> RouteTable {
        let spec = ProcessSpec::new("wiki", "exec true")
            .with_port(port)
            .with_domain("wiki.lan");
        let node = NodeRef {
            name: NodeName::from_static("pi"),
            address: "127.0.0.1".into(),
        };
        let id = ProcessId::new("wiki").expect("id");
        let mut process = Process::placed(id, generation, spec, node, Timestamp(1));
        process.status = Status::Running;
        process.record(Timestamp(2), EventKind::Started { pid: 7 });
        process.record(Timestamp(3), EventKind::Healthy);
        let process = Arc::new(process);
        RouteTable::from_copies([(&process, Origin::Local)])
    }

    /// The status the proxy answers `method` (with `body`) with, over a connection of its
    /// own, the routes (`wiki.lan` on port 8080) in `routes`.
    async fn answer(
        upstream: Arc<Flaky>,
        routes: watch::Receiver<Arc<RouteTable>>,
        method: Method,
        body: &'static str,
    ) -> StatusCode {
        let settings = Settings {
            hold: Duration::from_secs(2),
            redirect: false,
            https_port: 443,
        };
        let proxy = Proxy::new(
            routes,
            upstream,
            Arc::default(),
            Arc::default(),
            settings,
            0,
        );
        let info = ConnectionInfo {
            peer: ([127, 0, 0, 1], 4000).into(),
            tls: true,
            caller: None,
        };
        let service = proxy.connection(info);
        let (client, server) = tokio::io::duplex(4096);
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service)
                .with_upgrades(),
        );
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri("/")
            .header(header::HOST, "wiki.lan")
            .body(http_body_util::Full::new(Bytes::from_static(
                body.as_bytes(),
            )))
            .expect("request");
        let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
            .await
            .expect("answered in time")
            .expect("answer");
        response.status()
    }

    /// [`answer`] with routes that do not change, and the ports the upstream was asked for.
    async fn answer_fixed(
        breaks: usize,
        method: Method,
        body: &'static str,
    ) -> (StatusCode, usize) {
        let upstream = Flaky::new(breaks, None);
        // (The receiver keeps the table when the sender is gone.)
        let (_, routes) = watch::channel(Arc::new(table(8080, 1)));
        let status = answer(Arc::clone(&upstream), routes, method, body).await;
        (status, upstream.ports().len())
    }

    #[tokio::test]
    async fn a_bodiless_request_is_sent_again_once_when_its_connection_breaks() {
        // Broken once: sent again at once, answered.
        assert_eq!(answer_fixed(1, Method::GET, "").await, (StatusCode::OK, 2));
        // Broken twice: a 502, after exactly two tries.
        assert_eq!(
            answer_fixed(2, Method::GET, "").await,
            (StatusCode::BAD_GATEWAY, 2)
        );
        // Not idempotent, or with a body: never sent again.
        assert_eq!(
            answer_fixed(1, Method::POST, "").await,
            (StatusCode::BAD_GATEWAY, 1)
        );
        assert_eq!(
            answer_fixed(1, Method::PUT, "x").await,
            (StatusCode::BAD_GATEWAY, 1)
        );
    }

    #[tokio::test]
    async fn a_request_sent_again_goes_to_the_copy_the_routes_name_now() {
        // The connection breaks because its copy was just replaced: the request goes to the
        // new copy, not again to the old one.
        let (moves, routes) = watch::channel(Arc::new(table(8080, 1)));
        let upstream = Flaky::new(1, Some(moves));
        let status = answer(Arc::clone(&upstream), routes, Method::GET, "").await;
        assert_eq!(
            (status, upstream.ports()),
            (StatusCode::OK, vec![8080, 8081])
        );
    }

    #[test]
    fn idempotent_methods_are_held() {
        for (method, held) in [
            (Method::GET, true),
            (Method::HEAD, true),
            (Method::PUT, true),
            (Method::DELETE, true),
            (Method::OPTIONS, true),
            (Method::POST, false),
            (Method::PATCH, false),
        ] {
            assert_eq!(is_idempotent(&method), held, "{method}");
        }
    }

    #[test]
    fn requests_are_held_only_for_a_copy_that_may_come() {
        use p2f_model::Failure;
        for (status, held) in [
            (Status::Pending, true),
            (Status::Deploying, true),
            (Status::Running, true),
            (Status::Lost, true),
            (Status::Parked, true),
            (Status::Failed(Failure::Exited { code: 3 }), true),
            (Status::Stopping, false),
            (Status::Stopped, false),
            (Status::Unplaced, false),
        ] {
            assert_eq!(coming(&status), held, "{status}");
        }
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            html_escape("<b>\"x\" & 'y'</b>"),
            "&lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/b&gt;"
        );
    }
}
