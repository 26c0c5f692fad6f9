//! P2PRC's node API, answered by a P2F node on `[p2prc] listen` (plain HTTP, as P2PRC speaks
//! it; no authentication): `GET /server_info`, `POST /IpTable` and, on the root with
//! `add_proxy`, `GET /AddProxy`. What arrives here is
//! believed about nothing but P2PRC peers ([`super::peers`]): it never changes membership,
//! placement or any `authorized_keys`.
//!
//! Bounds: a table is at most [`MAX_TABLE_BYTES`] (a larger `Content-Length` is answered 413
//! before anything is read; a chunked body is cut off there) and [`MAX_ENTRIES`] entries;
//! merges are rate-limited ([`MERGES_PER_SECOND`], bursts of [`MERGE_BURST`]); connections are
//! capped in all and per address. Malformed input gets a 4xx with a one-line JSON error.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::Router;
use std::collections::HashMap;

use axum::extract::{DefaultBodyLimit, Multipart, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{get, post};
use p2f_model::{IpTable, Node, NodeName, NodeRole, ServerInfo};

use tokio::sync::watch;

use crate::api_error::ApiError;
use crate::records::Records;
use crate::server::ConnectionInfo;
use crate::wire::DirectRoute;

use super::peers::Peers;

/// The largest table accepted, in bytes (P2PRC's tables are a few hundred bytes per entry).
pub const MAX_TABLE_BYTES: usize = 1 << 20;
/// The most entries a table may have.
pub const MAX_ENTRIES: usize = 2048;
/// Tables merged per second, on average.
pub const MERGES_PER_SECOND: f64 = 10.0;
/// Tables merged at once before the rate applies.
pub const MERGE_BURST: f64 = 20.0;

/// What the P2PRC endpoints answer from.
#[derive(Debug, Clone)]
pub struct P2prcApi {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    own: Node,
    records: Option<Records>,
    peers: Arc<Peers>,
    bucket: Mutex<(f64, Instant)>,
    /// `/AddProxy`'s routes, when this node answers it (the root, with `add_proxy`).
    proxies: Option<watch::Sender<Arc<Vec<DirectRoute>>>>,
}

/// The most domains `/AddProxy` maps.
pub const MAX_PROXIES: usize = 256;

impl P2prcApi {
    /// Answers for this node (`own`, its P2PRC entry), its network (`records`, on root and
    /// members), and its known peers.
    /// With `add_proxy`, `/AddProxy` is answered and its routes are in [`P2prcApi::proxies`].
    pub fn new(
        own: Node,
        records: Option<Records>,
        peers: Arc<Peers>,
        add_proxy: bool,
    ) -> P2prcApi {
        P2prcApi {
            inner: Arc::new(Inner {
                own,
                records,
                peers,
                bucket: Mutex::new((MERGE_BURST, Instant::now())),
                proxies: add_proxy.then(|| watch::channel(Arc::new(Vec::new())).0),
            }),
        }
    }

    /// `/AddProxy`'s routes as they change (`None` when this node does not answer it).
    pub fn proxies(&self) -> Option<watch::Receiver<Arc<Vec<DirectRoute>>>> {
        self.inner.proxies.as_ref().map(watch::Sender::subscribe)
    }

    /// Routes `domain` to `ip:port`, a known P2PRC peer's address (see [`add_proxy`]).
    pub fn add_proxy(&self, domain: &str, ip: &str, port: &str) -> Result<(), ApiError> {
        let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
        let Some(proxies) = &self.inner.proxies else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "this node maps no domains: /AddProxy is answered by the root with [p2prc] add_proxy = true",
            ));
        };
        let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
        p2f_model::validate::dns_name(&domain)
            .map_err(|e| bad(format!("domain_name {domain:?}: {e}")))?;
        let ip: std::net::IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| bad(format!("ip_address {ip:?} is not an IP address")))?;
        let port: u16 = port
            .trim()
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad(format!("port {port:?} is not a port number")))?;
        let peer = self
            .inner
            .peers
            .list()
            .into_iter()
            .find(|p| {
                p.node.ipv4.map(std::net::IpAddr::V4) == Some(ip)
                    || p.node.ipv6.map(std::net::IpAddr::V6) == Some(ip)
            })
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!("{ip} is not the address of a known P2PRC peer"),
                )
            })?;
        let taken = self
            .inner
            .records
            .as_ref()
            .and_then(|r| r.find(&p2f_model::ProcessKey::Domain(domain.clone())));
        if let Some(process) = taken {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("{domain} is the domain of P2F process {}", process.id),
            ));
        }
        let route = DirectRoute {
            domain: domain.clone(),
            address: (ip, port).into(),
            peer: peer.node.name,
        };
        let mut refused = None;
        proxies.send_if_modified(|routes| {
            let mut next: Vec<DirectRoute> = routes
                .iter()
                .filter(|r| r.domain != domain)
                .cloned()
                .collect();
            if next.len() >= MAX_PROXIES {
                refused = Some(next.len());
                return false;
            }
            next.push(route.clone());
            next.sort_by(|a, b| a.domain.cmp(&b.domain));
            let changed = **routes != next;
            *routes = Arc::new(next);
            changed
        });
        if let Some(count) = refused {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("{count} domains are mapped already: at most {MAX_PROXIES}"),
            ));
        }
        tracing::info!(%domain, peer = %route.peer, address = %route.address, "P2PRC /AddProxy: domain mapped");
        Ok(())
    }

    /// The known peers.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.inner.peers
    }

    /// This node and the members it knows, as P2PRC entries (the root marked `ProxyServer`).
    pub fn members(&self) -> Vec<Node> {
        let mut nodes = match &self.inner.records {
            Some(records) => records.nodes().into_iter().map(|s| s.node).collect(),
            None => vec![self.inner.own.clone()],
        };
        for node in &mut nodes {
            if node.p2f_info().and_then(|i| i.role) == Some(NodeRole::Root) {
                node.proxy_server = true;
            }
        }
        nodes
    }

    /// The whole table this node answers with: itself and the members, then the known peers.
    pub fn table(&self) -> IpTable {
        let mut table = IpTable {
            ip_address: self.members(),
            skipped: Vec::new(),
        };
        table
            .ip_address
            .extend(self.inner.peers.list().into_iter().map(|p| p.node));
        table
    }

    /// Takes one merge from the bucket, or says no.
    fn allow_merge(&self) -> bool {
        let mut bucket = self
            .inner
            .bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (tokens, at) = *bucket;
        let now = Instant::now();
        let tokens =
            (tokens + now.duration_since(at).as_secs_f64() * MERGES_PER_SECOND).min(MERGE_BURST);
        if tokens < 1.0 {
            *bucket = (tokens, now);
            return false;
        }
        *bucket = (tokens - 1.0, now);
        true
    }

    /// Merges a table that arrived `via` somewhere into the known peers, saying what was
    /// left out; the table is refused whole when it has too many entries.
    pub fn learn(&self, table: &IpTable, via: &str) -> Result<super::peers::Merged, ApiError> {
        let count = table.ip_address.len() + table.skipped.len();
        if count > MAX_ENTRIES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the table has {count} entries: at most {MAX_ENTRIES}"),
            ));
        }
        for skipped in &table.skipped {
            tracing::warn!(%via, "P2PRC table: left out {skipped}");
        }
        let members: std::collections::HashSet<NodeName> =
            self.members().into_iter().map(|n| n.name).collect();
        let merged = self
            .inner
            .peers
            .merge(&table.ip_address, &|name| members.contains(name), via)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        for (name, why) in &merged.refused {
            tracing::warn!(%via, "P2PRC table: entry {name:?} not taken: {why}");
        }
        if merged.changed() {
            tracing::info!(%via, added = ?merged.added, updated = ?merged.updated, "P2PRC peers learned");
        }
        Ok(merged)
    }
}

/// The routes of P2PRC's node API.
pub fn routes(api: P2prcApi) -> Router {
    Router::new()
        .route("/server_info", get(server_info))
        .route("/IpTable", post(ip_table))
        .route("/AddProxy", get(add_proxy))
        .layer(DefaultBodyLimit::max(MAX_TABLE_BYTES))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not a P2PRC endpoint this node answers: GET /server_info, POST /IpTable",
            )
        })
        .with_state(api)
}

/// `GET /AddProxy?domain_name=D&ip_address=IP&port=P`: the root's ingress sends `D` to
/// `http://IP:P`, with the certificates of P2F's own domains — only for the address of a known
/// P2PRC peer, never for a domain of a P2F process. Answers `Sucess` (P2PRC's spelling), as
/// P2PRC does; kept in memory only, as P2PRC keeps it.
async fn add_proxy(
    State(api): State<P2prcApi>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Result<&'static str, ApiError> {
    let Query(query) = query?;
    let get = |key: &str| {
        query
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, format!("`{key}` is missing")))
    };
    api.add_proxy(get("domain_name")?, get("ip_address")?, get("port")?)?;
    Ok("Sucess")
}

async fn server_info() -> axum::Json<ServerInfo> {
    axum::Json(
        tokio::task::spawn_blocking(this_machine)
            .await
            .unwrap_or_default(),
    )
}

/// This machine's facts in P2PRC's units.
pub fn this_machine() -> ServerInfo {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let hostname = read("/proc/sys/kernel/hostname").trim().to_owned();
    let platform = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("ID="))
        .map(|id| id.trim_matches('"').to_owned())
        .unwrap_or_else(|| std::env::consts::OS.to_owned());
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    let ram = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or(0);
    let disk = nix::sys::statvfs::statvfs("/")
        .map(|s| s.blocks().saturating_mul(s.fragment_size()) / (1024 * 1024))
        .unwrap_or(0);
    ServerInfo {
        hostname,
        platform,
        cpu,
        ram,
        disk,
        gpu: serde_json::Value::Null,
    }
}

async fn ip_table(
    State(api): State<P2prcApi>,
    axum::Extension(info): axum::Extension<ConnectionInfo>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<axum::Json<IpTable>, ApiError> {
    // Refused before a byte of the body is read.
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|n| n > MAX_TABLE_BYTES as u64) {
        return Err(too_large());
    }
    let mut multipart = multipart.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "expected a multipart form with a file part `json`: {}",
                e.body_text()
            ),
        )
    })?;
    let text = json_part(&mut multipart).await?;
    let table: IpTable = serde_json::from_slice(&text).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the part `json` is not an IP table: {e}"),
        )
    })?;
    if !api.allow_merge() {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many tables at once: try again in a moment",
        ));
    }
    api.learn(&table, &format!("posted by {}", info.peer.ip()))?;
    Ok(axum::Json(api.table()))
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the table is larger than {} KiB", MAX_TABLE_BYTES >> 10),
    )
}

/// The bytes of the file part `json` (P2PRC requires a file name), within the body limit.
async fn json_part(multipart: &mut Multipart) -> Result<Vec<u8>, ApiError> {
    let bad = |message: String| ApiError::new(StatusCode::BAD_REQUEST, message);
    let limited = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            bad(format!("malformed multipart form: {}", e.body_text()))
        }
    };
    // Bounded: the body is, and every field takes some of it.
    while let Some(field) = multipart.next_field().await.map_err(limited)? {
        if field.name() != Some("json") {
            continue;
        }
        if field.file_name().is_none() {
            return Err(bad(
                "the part `json` must be a file (a file name is required, as P2PRC sends it)"
                    .into(),
            ));
        }
        return Ok(field.bytes().await.map_err(limited)?.to_vec());
    }
    Err(bad("the form has no file part `json`".into()))
}
