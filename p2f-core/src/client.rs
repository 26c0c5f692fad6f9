//! The `Network` handle: a client of any node's control API, giving the seed's four
//! operations (`spin_process`, `kill_process`, `process_information`, `list_processes`) plus
//! logs and the node's own entry. HTTPS with the cluster CA only; the client shows its
//! certificate ([`Credentials`]), by which the node authorizes each call. A node is reached by
//! name ([`Network::peer`]): the TLS server name is `NAME.node.p2f`, so only the holder of that
//! node's certificate can answer, whatever address the gossip gave.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use p2f_model::{Finding, Node, Process, ProcessId, ProcessKey, ProcessSpec};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use crate::cluster::Credentials;
use crate::cluster::{ClusterError, client_config_for};
use crate::identity::node_server_name;
use crate::wire::{ErrorBody, LogsQuery, SpinQuery, SpinRequest};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call may take (a kill waits for the process's grace period, up to a few minutes).
const CALL_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// How long a spin that waits for its deploy step may take.
const SLOW_CALL_TIMEOUT: Duration = Duration::from_secs(35 * 60);

/// Why a call to the network failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The cluster's trust files.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The node could not be reached.
    #[error("cannot reach the node at {address}: {detail}")]
    Unreachable { address: String, detail: String },
    /// The node answered with an error (an invalid spec lists each finding).
    #[error("{message}{}", findings_text(.findings))]
    Api {
        status: u16,
        message: String,
        findings: Vec<(String, Finding)>,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer from {address}: {detail}")]
    Protocol { address: String, detail: String },
    /// A node has no API address to reach it at.
    #[error("node {0} publishes no API address")]
    NoApiAddress(String),
}

fn findings_text(findings: &[(String, Finding)]) -> String {
    findings
        .iter()
        .map(|(path, finding)| format!("; {path}: {finding}"))
        .collect()
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of the network, through one node's control API.
#[derive(Debug, Clone)]
pub struct Network {
    http: reqwest::Client,
    /// The node's address, for messages (`host:port`).
    address: String,
    /// The URL's authority: the address, or `NAME.node.p2f:PORT` for a node reached by name.
    authority: String,
    /// Where nodes reached by name are (shared by every clone).
    peers: Arc<PeerAddresses>,
    /// Nodes dialed through a forwarder (shared by every clone).
    detours: Arc<Detours>,
}

/// The addresses of nodes reached by name: `NAME.node.p2f` → host (an IP address or a name to
/// look up), as [`Network::peer`] last said.
#[derive(Debug, Default)]
struct PeerAddresses(RwLock<HashMap<String, String>>);

/// Nodes dialed somewhere else than where they publish their API: node name → `host:port` of
/// a forwarder on this machine (a node behind NAT, reached through the root; `relay/`).
#[derive(Debug, Default)]
struct Detours(RwLock<HashMap<String, String>>);

impl reqwest::dns::Resolve for PeerAddresses {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = self
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name.as_str())
            .cloned();
        let wanted = name.as_str().to_owned();
        Box::pin(async move {
            let Some(host) = host else {
                // Only names of nodes this client was told about are looked up here; other
                // names (a node's advertised host name) through the system's resolver.
                if wanted.ends_with(crate::identity::NODE_DNS_SUFFIX) {
                    return Err(format!("no address known for node {wanted}").into());
                }
                let found = tokio::net::lookup_host((wanted.as_str(), 0)).await?;
                return Ok(Box::new(found.collect::<Vec<_>>().into_iter()) as reqwest::dns::Addrs);
            };
            if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                return Ok(Box::new(std::iter::once(std::net::SocketAddr::new(ip, 0)))
                    as reqwest::dns::Addrs);
            }
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(Box::new(found.collect::<Vec<_>>().into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl Network {
    /// A client of the node at `address` (`host:port`) with `credentials` (the CA to trust,
    /// the certificate to show).
    pub fn connect(address: &str, credentials: &Credentials) -> Result<Network, ClientError> {
        let peers = Arc::new(PeerAddresses::default());
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(client_config_for(credentials)?)
            .dns_resolver(Arc::clone(&peers))
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // Below the server's 30 s idle limit, so a pooled connection is never reused as it closes.
            .pool_idle_timeout(Duration::from_secs(20))
            .build()
            .map_err(|e| ClientError::Unreachable {
                address: address.to_owned(),
                detail: e.to_string(),
            })?;
        Ok(Network {
            http,
            address: address.to_owned(),
            authority: address.to_owned(),
            peers,
            detours: Arc::default(),
        })
    }

    /// The node this client talks to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The same client, talking to the node at `address`, checked like any server of the
    /// cluster (any node certificate naming that address).
    pub fn at(&self, address: &str) -> Network {
        Network {
            address: address.to_owned(),
            authority: address.to_owned(),
            ..self.clone()
        }
    }

    /// The same client, talking to node `name` at `address` (`host:port`, as the node
    /// publishes it): the call goes to that address, but only a server whose certificate
    /// names node `name` (`NAME.node.p2f`) is accepted.
    ///
    /// A node with a detour ([`Network::set_detour`]) is dialed at its detour instead.
    pub fn peer(&self, name: &p2f_model::NodeName, address: &str) -> Network {
        let detour = self
            .detours
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name.as_str())
            .cloned();
        let address = detour.as_deref().unwrap_or(address);
        let (host, port) = split_host_port(address);
        let server_name = node_server_name(name.as_str());
        self.peers
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(server_name.clone(), host.to_owned());
        Network {
            address: address.to_owned(),
            authority: match port {
                Some(port) => format!("{server_name}:{port}"),
                None => server_name,
            },
            ..self.clone()
        }
    }

    /// Dials node `name` at `address` (`host:port`, a forwarder on this machine) instead of
    /// where it publishes its API, from now on, in this client and every clone; `None` ends
    /// the detour. TLS still checks the node's name.
    pub fn set_detour(&self, name: &p2f_model::NodeName, address: Option<String>) {
        let mut detours = self
            .detours
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match address {
            Some(address) => detours.insert(name.as_str().to_owned(), address),
            None => detours.remove(name.as_str()),
        };
    }

    /// Whether the root reaches the calling member's API at `api` (`GET /v1/relay/probe`).
    pub async fn relay_probe(
        &self,
        api: &str,
    ) -> Result<crate::wire::RelayProbeAnswer, ClientError> {
        let query = crate::wire::RelayProbe {
            api: api.to_owned(),
        };
        let path = format!("/v1/relay/probe?{}", query_pair("api", &query.api));
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// Every node of the network as the node this client talks to knows it.
    pub async fn nodes(&self) -> Result<Vec<crate::wire::NodeStatus>, ClientError> {
        self.call(Method::GET, "/v1/nodes", None::<&()>).await
    }

    /// The P2PRC peers the node knows (none when it has no `[p2prc]`).
    pub async fn p2prc_peers(&self) -> Result<Vec<crate::wire::P2prcPeer>, ClientError> {
        self.call(Method::GET, "/v1/p2prc/peers", None::<&()>).await
    }

    /// Gives the root the services the network should run (`PUT /v1/deployment`); the root
    /// places and keeps them running.
    pub async fn deploy(
        &self,
        services: &[ProcessSpec],
    ) -> Result<crate::wire::DesiredState, ClientError> {
        let request = crate::wire::DeploymentRequest {
            services: services.to_vec(),
        };
        self.call(Method::PUT, "/v1/deployment", Some(&request))
            .await
    }

    /// Asks the root to move a process to `node`; returns its new record (a higher generation).
    pub async fn move_process(
        &self,
        id: &ProcessId,
        node: &p2f_model::NodeName,
    ) -> Result<Process, ClientError> {
        let request = crate::wire::MoveRequest { node: node.clone() };
        let path = format!("/v1/processes/{id}/move");
        self.call(Method::POST, &path, Some(&request)).await
    }

    /// The root's desired services (`GET /v1/deployment`).
    pub async fn desired(&self) -> Result<crate::wire::DesiredState, ClientError> {
        self.call(Method::GET, "/v1/deployment", None::<&()>).await
    }

    /// Asks the root for a member's certificate (`POST /v1/join`).
    pub async fn join(
        &self,
        request: &crate::wire::JoinRequest,
    ) -> Result<crate::wire::JoinResponse, ClientError> {
        self.call(Method::POST, "/v1/join", Some(request)).await
    }

    /// Asks the root for a new join token (`POST /v1/join-tokens`; the root and operators
    /// only).
    pub async fn join_token(
        &self,
        request: &crate::wire::TokenRequest,
    ) -> Result<crate::wire::TokenResponse, ClientError> {
        self.call(Method::POST, "/v1/join-tokens", Some(request))
            .await
    }

    /// This node's gossip keys (`GET /v1/gossip-keys`), the primary first.
    pub async fn gossip_keys(&self) -> Result<Vec<crate::mesh::KeyInfo>, ClientError> {
        self.call(Method::GET, "/v1/gossip-keys", None::<&()>).await
    }

    /// Makes this node accept the gossip key of `secret` (`POST /v1/gossip-keys`).
    pub async fn install_gossip_key(
        &self,
        secret: &crate::cluster::Secret,
    ) -> Result<Vec<crate::mesh::KeyInfo>, ClientError> {
        let request = crate::wire::InstallKeyRequest {
            secret: secret.expose().to_owned(),
        };
        self.call(Method::POST, "/v1/gossip-keys", Some(&request))
            .await
    }

    /// Makes this node tag its gossip with key `id` (`PUT /v1/gossip-keys/primary`).
    pub async fn use_gossip_key(
        &self,
        id: crate::mesh::KeyId,
    ) -> Result<Vec<crate::mesh::KeyInfo>, ClientError> {
        let request = crate::wire::UseKeyRequest { id };
        self.call(Method::PUT, "/v1/gossip-keys/primary", Some(&request))
            .await
    }

    /// Makes this node refuse gossip tagged with key `id` (`DELETE /v1/gossip-keys/{id}`).
    pub async fn remove_gossip_key(
        &self,
        id: crate::mesh::KeyId,
    ) -> Result<Vec<crate::mesh::KeyInfo>, ClientError> {
        let path = format!("/v1/gossip-keys/{id}");
        self.call(Method::DELETE, &path, None::<&()>).await
    }

    /// Asks the root to rotate the cluster's gossip key on every live node
    /// (`POST /v1/cluster/rotate-key`).
    pub async fn rotate_gossip_key(&self) -> Result<crate::wire::RotationReport, ClientError> {
        self.call(Method::POST, "/v1/cluster/rotate-key", None::<&()>)
            .await
    }

    /// The certificates this node refuses (`GET /v1/revoked`).
    pub async fn revoked(&self) -> Result<Vec<crate::wire::Revocation>, ClientError> {
        self.call(Method::GET, "/v1/revoked", None::<&()>).await
    }

    /// Replaces the certificates this node refuses (`PUT /v1/revoked`; the root and operators).
    pub async fn put_revoked(
        &self,
        list: &[crate::wire::Revocation],
    ) -> Result<Vec<crate::wire::Revocation>, ClientError> {
        self.call(Method::PUT, "/v1/revoked", Some(list)).await
    }

    /// Asks the root to sign operator `name`'s certificate request (`POST /v1/operators`).
    pub async fn add_operator(
        &self,
        request: &crate::wire::OperatorRequest,
    ) -> Result<crate::wire::OperatorResponse, ClientError> {
        self.call(Method::POST, "/v1/operators", Some(request))
            .await
    }

    /// Asks the root to revoke every certificate of operator `name`
    /// (`DELETE /v1/operators/{name}`); returns the whole revocation list.
    pub async fn remove_operator(
        &self,
        name: &str,
    ) -> Result<Vec<crate::wire::Revocation>, ClientError> {
        let path = format!("/v1/operators/{name}");
        self.call(Method::DELETE, &path, None::<&()>).await
    }

    /// Asks the root to remove node `name` (`DELETE /v1/nodes/{name}`): its certificates
    /// revoked everywhere, the gossip key rotated without it; its processes are placed
    /// elsewhere once it is seen lost.
    pub async fn remove_node(
        &self,
        name: &p2f_model::NodeName,
    ) -> Result<crate::wire::RemovalReport, ClientError> {
        let path = format!("/v1/nodes/{name}");
        self.call(Method::DELETE, &path, None::<&()>).await
    }

    /// The root's ingress: its listeners and each domain's route (`GET /v1/routes`; `409`
    /// from a node without an ingress).
    pub async fn routes(&self) -> Result<crate::wire::RoutesReport, ClientError> {
        self.call(Method::GET, "/v1/routes", None::<&()>).await
    }

    /// The P2PRC entry of the node this client talks to.
    pub async fn node(&self) -> Result<Node, ClientError> {
        self.call(Method::GET, "/v1/node", None::<&()>).await
    }

    /// Runs `spec` on `node` and returns its record once it runs (or failed, or is being
    /// restarted after a failure).
    pub async fn spin_process(
        &self,
        spec: &ProcessSpec,
        node: &Node,
    ) -> Result<Process, ClientError> {
        let address = node
            .api_address()
            .ok_or_else(|| ClientError::NoApiAddress(node.name.to_string()))?;
        let request = SpinRequest {
            spec: spec.clone(),
            id: None,
            generation: None,
            moved_from: None,
            external: None,
        };
        self.at(&address)
            .spin(&request, SpinQuery { wait: true })
            .await
    }

    /// `POST /v1/processes` on this client's node.
    pub async fn spin(
        &self,
        request: &SpinRequest,
        query: SpinQuery,
    ) -> Result<Process, ClientError> {
        let path = if query.wait {
            "/v1/processes?wait=true"
        } else {
            "/v1/processes"
        };
        self.call(Method::POST, path, Some(request)).await
    }

    /// Stops a process; returns its record, `Stopped`.
    pub async fn kill_process(&self, process: &Process) -> Result<Process, ClientError> {
        let path = format!("/v1/processes/{}/kill", process.id);
        self.call(Method::POST, &path, None::<&()>).await
    }

    /// Stops a process and deletes its record, bundle and logs.
    pub async fn remove_process(&self, id: &ProcessId) -> Result<(), ClientError> {
        let path = format!("/v1/processes/{id}");
        let response = self.send(Method::DELETE, &path, None::<&()>).await?;
        expect_success(&self.address, response).await.map(drop)
    }

    /// The record of the process `key` names, if there is one.
    pub async fn process_information(
        &self,
        key: ProcessKey,
    ) -> Result<Option<Process>, ClientError> {
        let path = match &key {
            ProcessKey::Id(id) => format!("/v1/processes/{id}"),
            ProcessKey::Domain(domain) => format!("/v1/domains/{domain}"),
        };
        match self.call(Method::GET, &path, None::<&()>).await {
            Ok(process) => Ok(Some(process)),
            Err(ClientError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The record of `id` that the node this client talks to keeps itself (`None` when it
    /// keeps none): what other nodes fetch to copy a record.
    pub async fn local_record(&self, id: &ProcessId) -> Result<Option<Process>, ClientError> {
        let path = format!("/v1/processes/{id}?scope=local");
        match self.call(Method::GET, &path, None::<&()>).await {
            Ok(process) => Ok(Some(process)),
            Err(ClientError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every process record of the network (as the node this client talks to knows it).
    pub async fn list_processes(&self) -> Result<Vec<Process>, ClientError> {
        self.call(Method::GET, "/v1/processes", None::<&()>).await
    }

    /// The records of the node this client talks to only.
    pub async fn list_local(&self) -> Result<Vec<Process>, ClientError> {
        self.call(Method::GET, "/v1/processes?scope=local", None::<&()>)
            .await
    }

    /// The last `lines` lines of a process's output, then (with `follow`) new output as it is
    /// written.
    pub async fn logs(
        &self,
        id: &ProcessId,
        query: LogsQuery,
    ) -> Result<impl Stream<Item = Result<Bytes, ClientError>> + use<>, ClientError> {
        let path = format!(
            "/v1/processes/{id}/logs?lines={}&follow={}",
            query.lines, query.follow
        );
        let response = self.send(Method::GET, &path, None::<&()>).await?;
        let response = expect_success(&self.address, response).await?;
        let address = self.address.clone();
        Ok(response.bytes_stream().map(move |chunk| {
            chunk.map_err(|e| ClientError::Unreachable {
                address: address.clone(),
                detail: e.to_string(),
            })
        }))
    }

    async fn send<B: serde::Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<reqwest::Response, ClientError> {
        let url = format!("https://{}{path}", self.authority);
        let mut request = self.http.request(method, &url);
        if let Some(body) = body {
            request = request.json(body);
        }
        request.send().await.map_err(|e| ClientError::Unreachable {
            address: self.address.clone(),
            detail: error_chain(&e),
        })
    }

    async fn call<T: DeserializeOwned, B: serde::Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        // A half-open connection to a node that lost power must not hang the caller; only a
        // spin that waits for a deploy step (which may build for minutes) waits longer.
        let limit = if path.contains("wait=true") {
            SLOW_CALL_TIMEOUT
        } else {
            CALL_TIMEOUT
        };
        let work = async {
            let response = self.send(method, path, body).await?;
            let response = expect_success(&self.address, response).await?;
            let bytes = read_limited(&self.address, response, MAX_ANSWER_BYTES).await?;
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
                address: self.address.clone(),
                detail: e.to_string(),
            })
        };
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| ClientError::Unreachable {
                address: self.address.clone(),
                detail: format!("no answer within {}", p2f_model::format_duration(limit)),
            })?
    }
}

/// The most an answer of the API may hold (a list of ten thousand records with their specs is
/// far below): a node that answers more is cut off, not buffered.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// The most of an error answer that is read.
const MAX_ERROR_BYTES: usize = 1024 * 1024;

/// The body of `response`, refused past `limit` bytes (read as it arrives, never buffered
/// beyond the limit).
async fn read_limited(
    address: &str,
    response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, ClientError> {
    let too_big = || ClientError::Protocol {
        address: address.to_owned(),
        detail: format!("the answer is larger than {} MiB", limit / (1024 * 1024)),
    };
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(too_big());
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ClientError::Unreachable {
            address: address.to_owned(),
            detail: error_chain(&e),
        })?;
        if body.len() + chunk.len() > limit {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The response if it is a success; its error body as a `ClientError` otherwise.
async fn expect_success(
    address: &str,
    response: reqwest::Response,
) -> Result<reqwest::Response, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = read_limited(address, response, MAX_ERROR_BYTES)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    let (message, findings) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => (body.error, body.findings),
        Err(_) if text.trim().is_empty() => (
            status.canonical_reason().unwrap_or("error").to_owned(),
            Vec::new(),
        ),
        Err(_) => (text.trim().to_owned(), Vec::new()),
    };
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        tracing::debug!(address, %status, "the node refused this client's certificate");
    }
    Err(ClientError::Api {
        status: status.as_u16(),
        message,
        findings,
    })
}

/// The host of `host:port` (an IPv6 literal without its brackets).
pub(crate) fn host_of(address: &str) -> &str {
    split_host_port(address).0
}

/// `name=value` with the value percent-encoded for a query string.
fn query_pair(name: &str, value: &str) -> String {
    let mut out = format!("{name}=");
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `host:port` split, an IPv6 literal without its brackets; no port when there is none.
fn split_host_port(address: &str) -> (&str, Option<&str>) {
    let (host, port) = match address.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':') => {
            (host, Some(port))
        }
        _ => (address, None),
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (host, port)
}

/// An error with its causes, on one line (reqwest's own message hides the TLS reason).
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer larger than the limit is refused after reading at most the limit, whether it
    /// says its length or streams without one.
    #[tokio::test]
    async fn an_oversized_answer_is_refused() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            for chunked in [false, true] {
                let (mut stream, _) = listener.accept().await.expect("accept");
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let head = if chunked {
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                } else {
                    "HTTP/1.1 200 OK\r\nContent-Length: 4194304\r\n\r\n"
                };
                let _ = stream.write_all(head.as_bytes()).await;
                let block = vec![b'x'; 64 * 1024];
                for _ in 0..64 {
                    let written = if chunked {
                        let size = format!("{:x}\r\n", block.len());
                        stream.write_all(size.as_bytes()).await.is_ok()
                            && stream.write_all(&block).await.is_ok()
                            && stream.write_all(b"\r\n").await.is_ok()
                    } else {
                        stream.write_all(&block).await.is_ok()
                    };
                    if !written {
                        break;
                    }
                }
            }
        });
        let ca = crate::cluster::ClusterCa::generate("t").expect("ca");
        let tls = crate::cluster::client_config(ca.cert_pem()).expect("tls");
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .build()
            .expect("client");
        for _ in 0..2 {
            let response = client
                .get(format!("http://{address}/"))
                .send()
                .await
                .expect("an answer");
            let refused = read_limited("test", response, 1024 * 1024)
                .await
                .expect_err("too big");
            assert!(
                refused.to_string().contains("larger than 1 MiB"),
                "{refused}"
            );
        }
        server.abort();
    }

    #[test]
    fn the_host_and_port_of_an_address() {
        for (address, host, port) in [
            ("127.0.0.1:7440", "127.0.0.1", Some("7440")),
            ("[::1]:7440", "::1", Some("7440")),
            ("pi.lan:7440", "pi.lan", Some("7440")),
            ("pi.lan", "pi.lan", None),
        ] {
            assert_eq!(split_host_port(address), (host, port), "{address}");
        }
    }
}

/// The most of a refused upgrade's answer that is read (its one-line JSON error).
const REFUSAL_LIMIT: usize = 4096;

/// Why [`upgrade`] gave no upgraded connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// TCP, TLS, HTTP, or the server's certificate is not of the role required.
    #[error("{0}")]
    Failed(String),
    /// The server answered something else than `101` (its status and error message).
    #[error("answered {status}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// Its error (`ErrorBody`), or the answer's text.
        message: String,
    },
}

/// A connection to a cluster node's control API at `address`, upgraded: TCP, TLS with `tls`
/// checking that the server's certificate names `server_name` (and, with `role`, that it is
/// of that role), then `GET path` with `Connection: upgrade` and `Upgrade: protocol`; the
/// upgraded connection after `101`. The one way P2F opens the agent's tunnel, a member's link
/// to the root and a connection through the root.
pub async fn upgrade(
    tls: &tokio_rustls::TlsConnector,
    address: &str,
    server_name: &str,
    role: Option<crate::identity::Role>,
    path: &str,
    protocol: &str,
) -> Result<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>, UpgradeError> {
    use http_body_util::BodyExt as _;
    let failed = UpgradeError::Failed;
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| failed(format!("connect {address}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| failed(format!("server name {server_name:?}: {e}")))?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| failed(format!("TLS: {e}")))?;
    if let Some(role) = role {
        let holder = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| crate::identity::Caller::from_certificate(cert));
        if holder.as_ref().map(|c| c.role) != Some(role) {
            return Err(failed(format!("{address} is not the cluster's {role}")));
        }
    }
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| failed(format!("HTTP: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("upgraded connection: {e}");
        }
    });
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, server_name)
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, protocol)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| failed(format!("request: {e}")))?;
    let mut response = send
        .send_request(request)
        .await
        .map_err(|e| failed(format!("HTTP: {e}")))?;
    if response.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status().as_u16();
        let body = http_body_util::Limited::new(response.into_body(), REFUSAL_LIMIT)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        return Err(UpgradeError::Refused { status, message });
    }
    let upgraded = hyper::upgrade::on(&mut response)
        .await
        .map_err(|e| failed(format!("upgrade: {e}")))?;
    Ok(hyper_util::rt::TokioIo::new(upgraded))
}
