//! P2PRC's node API, answered by a P2F node on `[p2prc] listen` (plain HTTP, as P2PRC speaks
//! it; no authentication): `GET /server_info` and `POST /IpTable`. What arrives here is
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
use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{get, post};
use p2f_model::{IpTable, Node, NodeName, NodeRole, ServerInfo};

use crate::api_error::ApiError;
use crate::records::Records;
use crate::server::ConnectionInfo;

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
}

impl P2prcApi {
    /// Answers for this node (`own`, its P2PRC entry), its network (`records`, on root and
    /// members), and its known peers.
    pub fn new(own: Node, records: Option<Records>, peers: Arc<Peers>) -> P2prcApi {
        P2prcApi {
            inner: Arc::new(Inner {
                own,
                records,
                peers,
                bucket: Mutex::new((MERGE_BURST, Instant::now())),
            }),
        }
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

    /// Whether `name` is this node or a member.
    pub fn is_member(&self, name: &NodeName) -> bool {
        *name == self.inner.own.name
            || self
                .inner
                .records
                .as_ref()
                .is_some_and(|r| r.nodes().iter().any(|s| s.node.name == *name))
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
        let merged = self
            .inner
            .peers
            .merge(&table.ip_address, &|name| self.is_member(name), via)
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
        .layer(DefaultBodyLimit::max(MAX_TABLE_BYTES))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not a P2PRC endpoint this node answers: GET /server_info, POST /IpTable",
            )
        })
        .with_state(api)
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
