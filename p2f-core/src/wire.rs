//! The control API's request and response bodies, shared by the agent and the client so the
//! two cannot drift. `docs/api.md` describes them for people.

use p2f_model::{Finding, ProcessId, ProcessSpec};
use serde::{Deserialize, Serialize};

/// The API's version prefix.
pub const PREFIX: &str = "/v1";

/// The largest request body the agent reads (a spec with its embedded bundle).
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// `POST /v1/processes`: run a spec on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpinRequest {
    /// What to run.
    pub spec: ProcessSpec,
    /// The process's id; a fresh one when absent. The root sets it when it places a process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ProcessId>,
    /// The placement's generation; 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The node its previous copy ran on, when the root moves it (a migration or a failover):
    /// the new record's history then says `moved`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_from: Option<p2f_model::NodeName>,
    /// Where the process is reached from outside, set by the root for a process with a
    /// `domain` when it runs the ingress (`https://DOMAIN`, with `:PORT` unless 443): the
    /// record's `external`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<String>,
}

/// Query of `POST /v1/processes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpinQuery {
    /// Answer only when the process runs, failed, or is being restarted (not just recorded).
    #[serde(default)]
    pub wait: bool,
}

/// Query of `GET /v1/processes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// The whole network (the default) or this node only.
    #[serde(default)]
    pub scope: Scope,
}

/// Which records a list covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every node's records (what this node knows through the mesh).
    #[default]
    Network,
    /// This node's own records.
    Local,
}

/// Query of `GET /v1/processes/{id}/logs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// How many of the last lines to send first.
    #[serde(default = "default_lines")]
    pub lines: usize,
    /// Keep the response open and send new output as it is written.
    #[serde(default)]
    pub follow: bool,
}

impl Default for LogsQuery {
    fn default() -> Self {
        LogsQuery {
            lines: default_lines(),
            follow: false,
        }
    }
}

fn default_lines() -> usize {
    100
}

/// Every error the API answers with: one line saying what is wrong, and for an invalid spec
/// every finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, in one line.
    pub error: String,
    /// For `422 Unprocessable Entity` on an invalid spec: each finding with its path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<(String, Finding)>,
}

/// `GET /v1/nodes`: one node of the network as this node knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Its P2PRC IP-table entry (P2F's API address in `CustomInformation`).
    pub node: p2f_model::Node,
    /// Whether the mesh hears from it.
    pub alive: bool,
    /// Its incarnation (the agent's start time in ms): a node restarted after a crash comes
    /// back with a higher one.
    #[serde(alias = "generation")]
    pub incarnation: u64,
    /// How many process records it publishes.
    pub processes: usize,
    /// Its available memory (`MemAvailable`), in bytes, as it last published it.
    #[serde(default)]
    pub memory_available: Option<u64>,
    /// How its API is reached: `direct` (where it publishes it) or `root` (through its link
    /// to the root: it is behind NAT).
    #[serde(default)]
    pub reach: Reach,
    /// Its link to the root, as the root sees it (only in the root's answer, for nodes
    /// reached through the root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkInfo>,
}

/// How a node's API is reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reach {
    /// Where the node publishes its API.
    #[default]
    Direct,
    /// Through the node's link to the root (the node is behind NAT).
    Root,
}

/// A node's link to the root, as the root sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkInfo {
    /// Whether the link is up now.
    pub linked: bool,
    /// Since when, in milliseconds ago.
    pub since_ms: u64,
    /// The last ping's round-trip time through the link, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<u64>,
}

/// Query of `GET /v1/relay/probe` (the root): the API address the calling member publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayProbe {
    /// `host:port`.
    pub api: String,
}

/// `GET /v1/relay/probe`: whether the root reached the member's API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayProbeAnswer {
    /// Whether TCP and TLS to a server holding the member's certificate worked within 3 s.
    pub reachable: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `PUT /v1/deployment` (on the root): the services the network should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentRequest {
    /// Every service; one left out is no longer wanted.
    pub services: Vec<ProcessSpec>,
}

/// The root's desired state: each service with the process id it keeps across placements.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    /// The services, in the order given.
    pub services: Vec<DesiredService>,
}

/// One desired service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredService {
    /// The process id of every placement of this service.
    pub id: ProcessId,
    /// What it runs.
    pub spec: ProcessSpec,
}

/// `POST /v1/processes/{id}/move` (on the root): where to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// The node to run it on.
    pub node: p2f_model::NodeName,
}

/// `POST /v1/join` (on the root): a certificate for a new member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The member's node name: no live member may have it already.
    pub name: p2f_model::NodeName,
    /// The addresses and names its API is reached at (IPs or DNS names).
    pub hosts: Vec<String>,
    /// Its certificate signing request (PEM, from [`crate::cluster::CertRequest`]): the
    /// member's private key never leaves the member.
    pub csr_pem: String,
    /// The join token's secret part (see [`crate::join::JoinToken`]): what authorizes the
    /// request, the only call made without a client certificate.
    pub token: String,
}

/// The root's answer: the member's certificate (PEM), signed by the cluster CA, and the
/// cluster's gossip key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinResponse {
    /// The certificate.
    pub cert_pem: String,
    /// The cluster secret the gossip key is derived from (`DATA/cluster/secret`).
    pub gossip_secret: String,
}

impl std::fmt::Debug for JoinResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinResponse").finish_non_exhaustive()
    }
}

/// Body of `POST /v1/join-tokens` (the root; operators only): a new join token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// How long it may be used, in seconds (default 3600, at most 30 days).
    #[serde(default = "TokenRequest::default_ttl")]
    pub ttl_secs: u64,
    /// How many nodes may join with it (default 1, at most 1000).
    #[serde(default = "TokenRequest::default_uses")]
    pub uses: u32,
}

impl TokenRequest {
    fn default_ttl() -> u64 {
        3600
    }

    fn default_uses() -> u32 {
        1
    }
}

impl Default for TokenRequest {
    fn default() -> TokenRequest {
        TokenRequest {
            ttl_secs: TokenRequest::default_ttl(),
            uses: TokenRequest::default_uses(),
        }
    }
}

/// Answer of `POST /v1/join-tokens`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenResponse {
    /// The join token (`p2f-join-v2:…`), shown once: the root keeps only its hash.
    pub token: String,
    /// When it stops being accepted, in seconds since the Unix epoch.
    pub expires_at: u64,
    /// How many nodes may join with it.
    pub uses: u32,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_at", &self.expires_at)
            .field("uses", &self.uses)
            .finish_non_exhaustive()
    }
}

/// The `Upgrade` protocol of the agent's tunnel (`GET /v1/processes/{id}/tunnel`): after
/// `101 Switching Protocols` the connection carries the bytes of one TCP connection to the
/// process's port on the agent's machine.
pub const TUNNEL_PROTOCOL: &str = "p2f-tunnel";

/// Query of `GET /v1/processes/{id}/tunnel`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelQuery {
    /// Only this generation of the process (a copy the root replaced is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The port to open: the process's own (default) or the target of one of its public ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `tcp` (default: the upgraded connection carries bytes) or `udp` (it carries datagrams,
    /// each framed as its length in 2 bytes, big-endian, then its bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<p2f_model::Protocol>,
}

/// A public port's route (`GET /v1/routes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRouteInfo {
    /// `tcp` or `udp`.
    pub protocol: p2f_model::Protocol,
    /// Where the root listens (`IP:PORT`).
    pub address: String,
    /// The process whose record counts for it.
    pub process: ProcessId,
    /// Its service's name.
    pub service: String,
    /// The node of that record.
    pub node: p2f_model::NodeName,
    /// How it is reached now (`link nas → 127.0.0.1:25565`); `None` while no copy serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Why no copy serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<String>,
    /// Why the root cannot listen on it (another program holds the port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/routes` (the root): where the ingress listens and each domain's route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesReport {
    /// The plain-HTTP listener (`IP:PORT`).
    pub http: String,
    /// The HTTPS listener (`IP:PORT`).
    pub https: String,
    /// One route per domain, sorted by domain.
    pub routes: Vec<RouteInfo>,
    /// One route per public port, sorted by protocol and port.
    #[serde(default)]
    pub ports: Vec<PortRouteInfo>,
}

/// One domain's route as the ingress sees it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteInfo {
    /// The domain (lower case).
    pub domain: String,
    /// The process it routes to.
    pub process: ProcessId,
    /// Its service name.
    pub service: String,
    /// The node of the copy that counts now.
    pub node: p2f_model::NodeName,
    /// That copy's generation.
    pub generation: u64,
    /// Where requests go (`agent NODE → 127.0.0.1:PORT`); absent while no copy serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Why no copy serves (the record's reason), while none does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<String>,
    /// The certificate presented for the domain, once one was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateInfo>,
    /// Why the domain has no certificate (yet), or why the last try to renew it failed: the
    /// last ACME error, or that no issuer covers a public name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_error: Option<String>,
    /// The last error reaching the process, if any since it last served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A certificate the ingress presents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateInfo {
    /// Who issued it: `cluster CA`, or `ACME: ` and the issuing CA's common name (like
    /// `ACME: R11`).
    pub issuer: String,
    /// When it expires, in seconds since the Unix epoch.
    pub not_after: u64,
}

/// Body of `POST /v1/gossip-keys`: a gossip key to accept (from the secret it is derived
/// from; the root and operators only).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallKeyRequest {
    /// The secret (printable ASCII, 16–1024 characters).
    pub secret: String,
}

impl std::fmt::Debug for InstallKeyRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstallKeyRequest").finish_non_exhaustive()
    }
}

/// Body of `PUT /v1/gossip-keys/primary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UseKeyRequest {
    /// The key to tag gossip with from now on (8 hex digits).
    pub id: crate::mesh::KeyId,
}

/// Answer of `POST /v1/cluster/rotate-key` (the root): the key every live node now uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationReport {
    /// The key removed everywhere.
    pub old: crate::mesh::KeyId,
    /// The key every live node now tags its gossip with.
    pub new: crate::mesh::KeyId,
    /// The nodes that took it (the root included).
    pub rotated: Vec<p2f_model::NodeName>,
    /// Nodes that were down: they keep the old key and are not heard any more; join them again
    /// (`p2f node token`, `p2f node join`).
    pub skipped: Vec<p2f_model::NodeName>,
}

/// Body of `POST /v1/operators` (the root; the root and operators only): a new operator's
/// certificate request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorRequest {
    /// The operator's name (letters, digits, `-`).
    pub name: p2f_model::NodeName,
    /// A certificate signing request for the operator's key (PEM); the key stays where it was
    /// made.
    pub csr_pem: String,
}

/// Answer of `POST /v1/operators`: the operator's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorResponse {
    /// The certificate (PEM), `O=p2f:operator`.
    pub cert_pem: String,
    /// The cluster CA (PEM).
    pub ca_pem: String,
}

/// Answer of `DELETE /v1/nodes/{name}` (the root): what removing a node did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemovalReport {
    /// How many of its certificates are now refused by every node.
    pub revoked: usize,
    /// The gossip key rotation that shut it out of the gossip.
    pub rotation: RotationReport,
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    /// Whose it was.
    pub role: crate::identity::Role,
    /// The node's or operator's name.
    pub name: String,
    /// When it was revoked, in seconds since the Unix epoch.
    pub at: u64,
}

/// A P2PRC node this node knows (`GET /v1/p2prc/peers`): learned from a P2PRC table, known
/// but never trusted — it is no member, runs no P2F process and gets no SSH access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct P2prcPeer {
    /// Its IP-table entry as last learned (current format).
    pub node: p2f_model::Node,
    /// When it was last learned, in seconds since the Unix epoch.
    pub learned_at: u64,
    /// Where from: `posted by ADDRESS`, `exchange with NAME`, `import`.
    pub via: String,
}

/// A domain the root's ingress sends straight to a P2PRC peer's address (P2PRC's
/// `/AddProxy`, with `[p2prc] add_proxy` on the root): not a P2F process, reached directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectRoute {
    /// The domain, lower case.
    pub domain: String,
    /// The peer's address and port.
    pub address: std::net::SocketAddr,
    /// The peer's name.
    pub peer: p2f_model::NodeName,
}
