//! The root's end of the links: which member is linked, streams to it, and the routes
//! `GET /v1/relay/link` (a member opens its link), `GET /v1/relay/probe?api=HOST:PORT`
//! (whether the root reaches a member directly) and `GET /v1/relay/nodes/{name}` (a
//! connection to a linked node's API through the root, for other nodes and operators).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use p2f_model::NodeName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::session::{Opener, Session, Side, Stream};
use super::{Answer, HEADER_TIMEOUT, LINK_PROTOCOL, Open, VIA_ROOT_PROTOCOL};
use crate::api_error::ApiError;
use crate::cluster::Credentials;
use crate::identity::{Caller, Role};
use crate::reach::{PortRequest, Refusal};
use crate::server::ConnectionInfo;
use crate::trust::revoked::Revoked;
use crate::wire::{LinkInfo, RelayProbe, RelayProbeAnswer};

/// How often the root pings each link (its round-trip time; a link that misses
/// [`PING_MISSES`] pings in a row is closed).
pub const PING_EVERY: Duration = Duration::from_secs(5);
/// Pings missed in a row before a link is closed.
const PING_MISSES: u32 = 3;
/// The longest the probe waits for a member's API.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a stream to a linked node was not opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The node has no link now.
    #[error("{0} is reached through the root, and its link is down")]
    NotLinked(NodeName),
    /// The link failed while opening the stream or reading the answer.
    #[error("the link of {node} failed: {detail}")]
    Link {
        /// The node.
        node: NodeName,
        /// What failed.
        detail: String,
    },
    /// The node refused (its answer).
    #[error("{node} refused: {refusal}")]
    Refused {
        /// The node.
        node: NodeName,
        /// Its answer.
        refusal: Refusal,
    },
}

/// The links to the root, by node. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

struct Inner {
    links: Mutex<HashMap<NodeName, Link>>,
    /// Loopback forwarders to linked nodes' APIs, by node (kept across reconnects).
    forwarders: Mutex<HashMap<NodeName, SocketAddr>>,
    /// The cluster's client: linked nodes are dialed through their forwarder.
    client: crate::Network,
    credentials: Credentials,
    revoked: Arc<Revoked>,
    /// Link numbers, so a replaced link's end does not remove its successor.
    next: std::sync::atomic::AtomicU64,
}

struct Link {
    number: u64,
    opener: Opener,
    since: Instant,
    caller: Arc<Caller>,
    rtt: Option<Duration>,
    /// Ends the session (the link's connection is dropped).
    session: tokio::task::AbortHandle,
}

impl Hub {
    /// A hub whose linked nodes the cluster's `client` (the records') reaches through it;
    /// links are made with `credentials` checks, and refused for `revoked` certificates.
    pub fn new(client: crate::Network, credentials: Credentials, revoked: Arc<Revoked>) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                links: Mutex::new(HashMap::new()),
                forwarders: Mutex::new(HashMap::new()),
                client,
                credentials,
                revoked,
                next: std::sync::atomic::AtomicU64::new(1),
            }),
        }
    }

    /// The linked nodes, their link's age and round-trip time.
    pub fn links(&self) -> HashMap<NodeName, LinkInfo> {
        lock(&self.inner.links)
            .iter()
            .map(|(node, link)| {
                let info = LinkInfo {
                    linked: true,
                    since_ms: u64::try_from(link.since.elapsed().as_millis()).unwrap_or(u64::MAX),
                    rtt_us: link
                        .rtt
                        .map(|rtt| u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX)),
                };
                (node.clone(), info)
            })
            .collect()
    }

    /// Follows the directory until aborted: every node that publishes `reach = root` is dialed
    /// at its forwarder from then on, linked yet or not (a call fails at once while its link is
    /// down, rather than waiting on an address nobody can reach).
    pub async fn follow(self, records: crate::records::Records) {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        loop {
            ticker.tick().await;
            for node in records.reached_via_root() {
                if lock(&self.inner.forwarders).contains_key(&node) {
                    continue;
                }
                match self.forwarder(&node).await {
                    Ok(address) => self
                        .inner
                        .client
                        .set_detour(&node, Some(address.to_string())),
                    Err(e) => tracing::warn!(%node, "cannot listen for its API's forwarder: {e}"),
                }
            }
        }
    }

    /// Whether `node` has a link now.
    pub fn is_linked(&self, node: &NodeName) -> bool {
        lock(&self.inner.links).contains_key(node)
    }

    /// A stream to `node` for `open`, answered yes by the node.
    pub async fn open(&self, node: &NodeName, open: &Open) -> Result<Stream, HubError> {
        let opener = lock(&self.inner.links)
            .get(node)
            .map(|link| link.opener.clone())
            .ok_or_else(|| HubError::NotLinked(node.clone()))?;
        let failed = |detail: String| HubError::Link {
            node: node.clone(),
            detail,
        };
        let mut stream = opener.open().await.map_err(|e| failed(e.to_string()))?;
        open.write(&mut stream)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let answer = tokio::time::timeout(HEADER_TIMEOUT, Answer::read(&mut stream))
            .await
            .map_err(|_| failed(format!("no answer within {HEADER_TIMEOUT:?}")))?
            .map_err(|e| failed(e.to_string()))?;
        match answer.0 {
            Ok(()) => Ok(stream),
            Err(refusal) => Err(HubError::Refused {
                node: node.clone(),
                refusal,
            }),
        }
    }

    /// A stream to a port of a process on linked `node`.
    pub async fn open_port(
        &self,
        node: &NodeName,
        request: PortRequest,
    ) -> Result<Stream, HubError> {
        self.open(node, &Open::Port(request)).await
    }

    /// Takes a link from `caller` over `io`: replaces the node's earlier link, points the
    /// cluster's client at the node's forwarder, pings it until it ends.
    async fn attach(&self, caller: Arc<Caller>, io: impl crate::reach::Io) {
        let Ok(node) = NodeName::new(caller.name.clone()) else {
            return;
        };
        // A member never opens streams to the root: any it opens is dropped at once.
        let Session { opener, closed } = Session::start(io, Side::Root, drop);
        let number = self
            .inner
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let session = opener.abort_handle();
        let replaced = lock(&self.inner.links).insert(
            node.clone(),
            Link {
                number,
                opener: opener.clone(),
                since: Instant::now(),
                caller: Arc::clone(&caller),
                rtt: None,
                session,
            },
        );
        if let Some(old) = replaced {
            old.session.abort();
        }
        match self.forwarder(&node).await {
            Ok(address) => self
                .inner
                .client
                .set_detour(&node, Some(address.to_string())),
            Err(e) => tracing::warn!(%node, "cannot listen for its API's forwarder: {e}"),
        }
        tracing::info!(%node, "linked: reached through its link to the root");
        let why = tokio::select! {
            why = closed => why.unwrap_or_else(|_| "ended".into()),
            why = self.ping(&node, number) => why,
        };
        let mut links = lock(&self.inner.links);
        if links.get(&node).is_some_and(|link| link.number == number) {
            if let Some(link) = links.remove(&node) {
                link.session.abort();
            }
            tracing::warn!(%node, "link down: {why}");
        }
    }

    /// Pings link `number` of `node` every [`PING_EVERY`]; returns why it must end (pings
    /// missed, the certificate revoked, the link replaced).
    async fn ping(&self, node: &NodeName, number: u64) -> String {
        let mut missed = 0;
        let mut ticker = tokio::time::interval(PING_EVERY);
        loop {
            ticker.tick().await;
            let caller = match lock(&self.inner.links).get(node) {
                Some(link) if link.number == number => Arc::clone(&link.caller),
                _ => return "replaced by a newer link".into(),
            };
            if self.inner.revoked.refuses(&caller) {
                return format!("the certificate of {caller} was revoked");
            }
            let started = Instant::now();
            let pinged = tokio::time::timeout(PING_EVERY, async {
                let mut stream = self.open(node, &Open::Ping).await.ok()?;
                let sent = rand::random::<u64>().to_be_bytes();
                stream.write_all(&sent).await.ok()?;
                stream.flush().await.ok()?;
                let mut back = [0u8; 8];
                stream.read_exact(&mut back).await.ok()?;
                (back == sent).then_some(())
            })
            .await;
            if let Ok(Some(())) = pinged {
                missed = 0;
                if let Some(link) = lock(&self.inner.links).get_mut(node)
                    && link.number == number
                {
                    link.rtt = Some(started.elapsed());
                }
            } else {
                missed += 1;
                if missed >= PING_MISSES {
                    return format!("{missed} pings unanswered");
                }
            }
        }
    }

    /// The loopback address that forwards to `node`'s API through its link (made on first
    /// use, kept while the hub lives).
    async fn forwarder(&self, node: &NodeName) -> std::io::Result<SocketAddr> {
        if let Some(address) = lock(&self.inner.forwarders).get(node) {
            return Ok(*address);
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let address = listener.local_addr()?;
        lock(&self.inner.forwarders).insert(node.clone(), address);
        let (hub, node) = (self.clone(), node.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    // Out of descriptors: give the others time to close.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let (hub, node) = (hub.clone(), node.clone());
                tokio::spawn(async move {
                    match hub.open(&node, &Open::Api).await {
                        Ok(mut stream) => {
                            let _ = tcp.set_nodelay(true);
                            let _ = crate::reach::splice(&mut tcp, &mut stream).await;
                        }
                        Err(e) => tracing::debug!(%node, "API through the link: {e}"),
                    }
                });
            }
        });
        Ok(address)
    }

    /// Whether the root reaches `node`'s API at `api` directly (TCP and TLS to a server whose
    /// certificate names the node, within 3 s).
    async fn probe(&self, node: &NodeName, api: &str) -> RelayProbeAnswer {
        let tried = async {
            let client =
                crate::Network::connect(api, &self.inner.credentials).map_err(|e| e.to_string())?;
            client
                .peer(node, api)
                .node()
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        let detail = match tokio::time::timeout(PROBE_TIMEOUT, tried).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("no answer within {PROBE_TIMEOUT:?}")),
        };
        RelayProbeAnswer {
            reachable: detail.is_none(),
            detail,
        }
    }
}

impl crate::reach::PortOpener for Hub {
    fn handles(&self, node: &NodeName) -> bool {
        self.is_linked(node) || lock(&self.inner.forwarders).contains_key(node)
    }

    fn open(
        &self,
        node: &NodeName,
        request: PortRequest,
    ) -> Option<
        futures_util::future::BoxFuture<
            'static,
            Result<Box<dyn crate::reach::Io>, crate::reach::OpenError>,
        >,
    > {
        if !self.handles(node) {
            return None;
        }
        let (hub, node) = (self.clone(), node.clone());
        Some(Box::pin(async move {
            match hub.open_port(&node, request).await {
                Ok(stream) => Ok(Box::new(stream) as Box<dyn crate::reach::Io>),
                Err(HubError::Refused { refusal, .. }) => {
                    Err(crate::reach::OpenError::Refused(refusal))
                }
                Err(e) => Err(crate::reach::OpenError::Unreachable(e.to_string())),
            }
        }))
    }
}

/// The hub's routes, on the root's API.
pub fn routes(hub: Hub) -> Router {
    Router::new()
        .route("/v1/relay/link", get(link))
        .route("/v1/relay/probe", get(probe))
        .route("/v1/relay/nodes/{name}", get(via_root))
        .with_state(hub)
}

/// The routes on every other node: 409.
pub fn elsewhere() -> Router {
    let refuse = || async {
        ApiError::new(
            StatusCode::CONFLICT,
            "links are kept by the root: call the root's API",
        )
    };
    Router::new()
        .route("/v1/relay/link", get(refuse))
        .route("/v1/relay/probe", get(refuse))
        .route("/v1/relay/nodes/{name}", get(refuse))
}

fn caller_of(request: &Request) -> Result<Arc<Caller>, ApiError> {
    request
        .extensions()
        .get::<ConnectionInfo>()
        .and_then(|info| info.caller.clone())
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "a node certificate is required"))
}

fn asked_upgrade(request: &Request, protocol: &str) -> Result<(), ApiError> {
    let asked = request
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(protocol.as_bytes()));
    if asked {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            format!("this route needs Connection: upgrade and Upgrade: {protocol}"),
        ))
    }
}

fn switching(protocol: &'static str) -> Response {
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, HeaderValue::from_static(protocol)),
        ],
    )
        .into_response()
}

/// `GET /v1/relay/link`, `Upgrade: p2f-link`: a member's link (only a member's own).
async fn link(State(hub): State<Hub>, mut request: Request) -> Result<Response, ApiError> {
    let caller = caller_of(&request)?;
    if caller.role != Role::Member {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{caller} may not link: only members keep links to the root"),
        ));
    }
    asked_upgrade(&request, LINK_PROTOCOL)?;
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => hub.attach(caller, TokioIo::new(upgraded)).await,
            Err(e) => tracing::debug!(%caller, "link upgrade failed: {e}"),
        }
    });
    Ok(switching(LINK_PROTOCOL))
}

/// `GET /v1/relay/probe?api=HOST:PORT`: whether the root reaches the calling member there.
async fn probe(
    State(hub): State<Hub>,
    query: Result<Query<RelayProbe>, QueryRejection>,
    request: Request,
) -> Result<axum::Json<RelayProbeAnswer>, ApiError> {
    let Query(query) = query?;
    let caller = caller_of(&request)?;
    let node = NodeName::new(caller.name.clone())
        .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, e.to_string()))?;
    if caller.role != Role::Member {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{caller} is no member"),
        ));
    }
    Ok(axum::Json(hub.probe(&node, &query.api).await))
}

/// `GET /v1/relay/nodes/{name}`, `Upgrade: p2f-via-root`: the upgraded connection is spliced
/// to linked node `name`'s API (the caller speaks TLS to that node inside it).
async fn via_root(
    State(hub): State<Hub>,
    Path(name): Path<String>,
    mut request: Request,
) -> Result<Response, ApiError> {
    caller_of(&request)?;
    asked_upgrade(&request, VIA_ROOT_PROTOCOL)?;
    let node =
        NodeName::new(name).map_err(|e| ApiError::new(StatusCode::NOT_FOUND, e.to_string()))?;
    if !hub.is_linked(&node) {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            HubError::NotLinked(node).to_string(),
        ));
    }
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        match hub.open(&node, &Open::Api).await {
            Ok(mut stream) => {
                let mut upgraded = TokioIo::new(upgraded);
                let _ = crate::reach::splice(&mut upgraded, &mut stream).await;
            }
            Err(e) => tracing::debug!(%node, "API via the root: {e}"),
        }
    });
    Ok(switching(VIA_ROOT_PROTOCOL))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
