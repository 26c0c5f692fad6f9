//! Reaching a process: the [`Upstream`] seam (a route's [`Target`] in, a byte stream to the
//! process's port out) and its implementations:
//! - [`ThroughAgent`], through the process's node agent: TLS to the agent's control API,
//!   `GET /v1/processes/{id}/tunnel` with `Upgrade: p2f-tunnel`, and the upgraded connection is
//!   spliced by the agent to `127.0.0.1:PORT` on its machine — so a service may bind loopback
//!   only;
//! - [`Local`], in front of another upstream: a process on the ingress's own node (the root)
//!   is connected to directly on loopback, after the checks the agent's tunnel makes, asked
//!   in-process of that node's supervisor ([`LocalProcesses`]); every other target goes to the
//!   upstream it wraps. Half the socket writes per request of going through the root's own
//!   tunnel (client → ingress → process, instead of client → ingress → agent → process).
//!
//! A relay for nodes behind NAT implements the same trait.
//!
//! The proxy's pool ([`super::pool`]) keeps connections per target, so a moved process (a new
//! node, port or generation) gets new ones.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use p2f_model::NodeName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::routes::Target;
use crate::client::UpgradeError;
use crate::cluster::Credentials;
use crate::cluster::{ClusterError, client_config_for};
use crate::identity::node_server_name;
use crate::reach::{OpenError, PortOpener};
use crate::records::Records;
use crate::wire::TUNNEL_PROTOCOL;

/// The longest reaching a process may take: TCP and TLS to its agent, the tunnel request, and
/// the agent's connection to the port.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub use crate::reach::{Io, LocalProcesses};

/// Why a process could not be reached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The node publishes no API address (it is unknown or gone).
    #[error("node {node} has no known address")]
    NoAddress {
        /// The node.
        node: NodeName,
    },
    /// The node's agent could not be reached (TCP, TLS or HTTP).
    #[error("cannot reach the agent of {node} at {address}: {detail}")]
    Agent {
        /// The node.
        node: NodeName,
        /// Its API address.
        address: String,
        /// What failed.
        detail: String,
    },
    /// The agent refused to open the tunnel (the process is not running there, a replaced
    /// generation, the port answers nothing).
    #[error("the agent of {node} refused the tunnel ({status}): {message}")]
    Refused {
        /// The node.
        node: NodeName,
        /// The agent's HTTP status.
        status: u16,
        /// Its error.
        message: String,
    },
    /// A process on the ingress's own node could not be opened: the checks and answers of the
    /// agent's tunnel (404 not here; 409 not running, another generation, no port or another
    /// port; 502 the port answers nothing), made in-process by [`Local`].
    #[error("{node} (this node) refused to open its process's port ({status}): {message}")]
    LocalRefused {
        /// The node (the ingress's own).
        node: NodeName,
        /// The status the agent's tunnel answers in the same case.
        status: u16,
        /// Its error.
        message: String,
    },
    /// A P2PRC peer's address (`/AddProxy`) could not be connected to.
    #[error("cannot reach the P2PRC peer {peer} at {address}: {detail}")]
    Peer {
        /// The peer.
        peer: NodeName,
        /// Its address.
        address: std::net::SocketAddr,
        /// What failed.
        detail: String,
    },
    /// Reaching it took longer than 5 s.
    #[error("reaching {node} took longer than {CONNECT_TIMEOUT:?}")]
    Timeout {
        /// The node.
        node: NodeName,
    },
    /// The cluster's TLS configuration.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// Something that reaches a process's port: through its agent ([`ThroughAgent`]), directly
/// on the ingress's own node ([`Local`]), later through a relay tunnel.
pub trait Upstream: Send + Sync + 'static {
    /// A byte stream to `target`'s port, or why there is none. Bounded in time.
    fn connect(&self, target: &Target) -> BoxFuture<'static, Result<Box<dyn Io>, UpstreamError>>;
    /// How requests reach `target`, for people (`agent pi → 127.0.0.1:8080`,
    /// `local → 127.0.0.1:8080`).
    fn describe(&self, target: &Target) -> String;
}

/// Reaches a process through its node's agent (see the module's documentation).
#[derive(Clone)]
pub struct ThroughAgent {
    records: Records,
    tls: TlsConnector,
}

impl std::fmt::Debug for ThroughAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThroughAgent").finish_non_exhaustive()
    }
}

impl ThroughAgent {
    /// Reaches agents found in `records` with `credentials` (the root's certificate: only
    /// the root may open tunnels), checking that each agent's certificate names its node.
    pub fn new(records: Records, credentials: &Credentials) -> Result<Self, UpstreamError> {
        let config = client_config_for(credentials)?;
        Ok(ThroughAgent {
            records,
            tls: TlsConnector::from(Arc::new(config)),
        })
    }
}

impl Upstream for ThroughAgent {
    fn connect(&self, target: &Target) -> BoxFuture<'static, Result<Box<dyn Io>, UpstreamError>> {
        let address = self
            .records
            .client_for(&target.node)
            .map(|client| client.address().to_owned());
        let (tls, target) = (self.tls.clone(), target.clone());
        Box::pin(async move {
            let node = target.node.clone();
            let address = address.ok_or_else(|| UpstreamError::NoAddress { node: node.clone() })?;
            let open = open_tunnel(tls, &target, &address);
            tokio::time::timeout(CONNECT_TIMEOUT, open)
                .await
                .map_err(|_| UpstreamError::Timeout { node })?
        })
    }

    fn describe(&self, target: &Target) -> String {
        format!("agent {} → 127.0.0.1:{}", target.node, target.port)
    }
}

/// TLS to the agent at `address` (which must hold the certificate of `target.node`), the
/// tunnel request, the upgraded connection.
async fn open_tunnel(
    tls: TlsConnector,
    target: &Target,
    address: &str,
) -> Result<Box<dyn Io>, UpstreamError> {
    // The query is `TunnelQuery`: only this copy, this port.
    let path = format!(
        "/v1/processes/{}/tunnel?generation={}&port={}&protocol={}",
        target.id,
        target.generation,
        target.port,
        crate::reach::protocol_name(target.protocol)
    );
    let server_name = node_server_name(target.node.as_str());
    match crate::client::upgrade(&tls, address, &server_name, None, &path, TUNNEL_PROTOCOL).await {
        Ok(upgraded) => Ok(Box::new(upgraded)),
        Err(UpgradeError::Refused { status, message }) => Err(UpstreamError::Refused {
            node: target.node.clone(),
            status,
            message,
        }),
        Err(e @ UpgradeError::Failed(_)) => Err(UpstreamError::Agent {
            node: target.node.clone(),
            address: address.to_owned(),
            detail: e.to_string(),
        }),
    }
}

/// Reaches a process on its own node (see [`LocalProcesses`]) directly on loopback, after the
/// checks the agent's tunnel makes; any other target through the upstream it wraps.
pub struct Local {
    processes: LocalProcesses,
    others: Arc<dyn Upstream>,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local")
            .field("processes", &self.processes)
            .finish_non_exhaustive()
    }
}

impl Local {
    /// The processes of `processes`' node directly, the rest through `others`.
    pub fn new(processes: LocalProcesses, others: Arc<dyn Upstream>) -> Local {
        Local { processes, others }
    }

    fn is_local(&self, target: &Target) -> bool {
        target.node == *self.processes.node()
    }
}

impl Upstream for Local {
    fn connect(&self, target: &Target) -> BoxFuture<'static, Result<Box<dyn Io>, UpstreamError>> {
        if !self.is_local(target) {
            return self.others.connect(target);
        }
        let (processes, request, node) = (
            self.processes.clone(),
            target.port_request(),
            target.node.clone(),
        );
        Box::pin(async move {
            let open = processes.open(&request);
            let opened = tokio::time::timeout(CONNECT_TIMEOUT, open)
                .await
                .map_err(|_| UpstreamError::Timeout { node: node.clone() })?
                .map_err(|refusal| UpstreamError::LocalRefused {
                    node,
                    status: refusal.status,
                    message: refusal.message,
                })?;
            Ok(opened.into_io())
        })
    }

    fn describe(&self, target: &Target) -> String {
        if self.is_local(target) {
            format!("local → 127.0.0.1:{}", target.port)
        } else {
            self.others.describe(target)
        }
    }
}

/// Reaches a P2PRC peer's address directly (a target with `direct`, from `/AddProxy`), and
/// every other target through `others`.
pub struct Direct {
    others: Arc<dyn Upstream>,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct").finish_non_exhaustive()
    }
}

impl Direct {
    /// Direct targets directly, the rest through `others`.
    pub fn new(others: Arc<dyn Upstream>) -> Direct {
        Direct { others }
    }
}

impl Upstream for Direct {
    fn connect(&self, target: &Target) -> BoxFuture<'static, Result<Box<dyn Io>, UpstreamError>> {
        let Some(address) = target.direct else {
            return self.others.connect(target);
        };
        let peer = target.node.clone();
        Box::pin(async move {
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
                .await
                .map_err(|_| UpstreamError::Timeout { node: peer.clone() })?
                .map_err(|e| UpstreamError::Peer {
                    peer,
                    address,
                    detail: e.to_string(),
                })?;
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as Box<dyn Io>)
        })
    }

    fn describe(&self, target: &Target) -> String {
        match target.direct {
            Some(address) => format!("p2prc peer {} → {address}", target.node),
            None => self.others.describe(target),
        }
    }
}

/// Reaches the processes of nodes behind NAT through their link to the root (the `opener`,
/// the relay's hub); any other target through the upstream it wraps.
pub struct Relayed {
    opener: Arc<dyn PortOpener>,
    others: Arc<dyn Upstream>,
}

impl std::fmt::Debug for Relayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relayed").finish_non_exhaustive()
    }
}

impl Relayed {
    /// Targets on nodes `opener` handles through it, the rest through `others`.
    pub fn new(opener: Arc<dyn PortOpener>, others: Arc<dyn Upstream>) -> Relayed {
        Relayed { opener, others }
    }
}

impl Upstream for Relayed {
    fn connect(&self, target: &Target) -> BoxFuture<'static, Result<Box<dyn Io>, UpstreamError>> {
        let Some(open) = self.opener.open(&target.node, target.port_request()) else {
            return self.others.connect(target);
        };
        let node = target.node.clone();
        Box::pin(async move {
            tokio::time::timeout(CONNECT_TIMEOUT, open)
                .await
                .map_err(|_| UpstreamError::Timeout { node: node.clone() })?
                .map_err(|e| match e {
                    OpenError::Refused(refusal) => UpstreamError::Refused {
                        node,
                        status: refusal.status,
                        message: refusal.message,
                    },
                    OpenError::Unreachable(detail) => UpstreamError::Agent {
                        node,
                        address: "its link to the root".into(),
                        detail,
                    },
                })
        })
    }

    fn describe(&self, target: &Target) -> String {
        if self.opener.handles(&target.node) {
            format!("link {} → 127.0.0.1:{}", target.node, target.port)
        } else {
            self.others.describe(target)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use p2f_model::{NodeRef, Process, ProcessId, ProcessSpec, Status, Timestamp};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::reach::Protocol;

    fn target(node: &str, generation: u64, port: u16) -> Target {
        Target {
            id: ProcessId::new("wiki").expect("id"),
            generation,
            node: NodeName::new(node).expect("node"),
            port,
            protocol: Protocol::Tcp,
            direct: None,
        }
    }

    /// `wiki` on node `root`, generation 2, port `port`, with `status`.
    fn wiki(status: Status, port: Option<u16>) -> Process {
        let spec = ProcessSpec::new("wiki", "exec true").with_domain("wiki.lan");
        let node = NodeRef {
            name: NodeName::from_static("root"),
            address: "127.0.0.1".into(),
        };
        let id = ProcessId::new("wiki").expect("id");
        let mut process = Process::placed(id, 2, spec, node, Timestamp(1));
        process.status = status;
        process.port = port;
        process
    }

    /// The processes of node `root`: `process`, if any.
    fn root_with(process: Option<Process>) -> LocalProcesses {
        LocalProcesses::new(NodeName::from_static("root"), "127.0.0.1", move |id| {
            process.clone().filter(|p| &p.id == id)
        })
    }

    /// An upstream for the other nodes that counts what it is asked for and reaches nothing.
    #[derive(Default)]
    struct Others {
        asked: AtomicUsize,
    }

    impl Upstream for Others {
        fn connect(
            &self,
            target: &Target,
        ) -> BoxFuture<'static, Result<Box<dyn Io>, UpstreamError>> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            let node = target.node.clone();
            Box::pin(std::future::ready(Err(UpstreamError::NoAddress { node })))
        }

        fn describe(&self, target: &Target) -> String {
            format!("agent {} → 127.0.0.1:{}", target.node, target.port)
        }
    }

    fn local(processes: LocalProcesses) -> (Local, Arc<Others>) {
        let others = Arc::new(Others::default());
        (Local::new(processes, others.clone()), others)
    }

    /// The status and message a local target is refused with.
    async fn refusal(local: &Local, target: &Target) -> (u16, String) {
        match local.connect(target).await {
            Err(UpstreamError::LocalRefused {
                node,
                status,
                message,
            }) => {
                assert_eq!(node.as_str(), "root");
                (status, message)
            }
            Err(e) => panic!("refused otherwise: {e}"),
            Ok(_) => panic!("{target:?} was opened"),
        }
    }

    #[tokio::test]
    async fn a_local_target_is_refused_as_the_agents_tunnel_refuses_it() {
        // (status, message) as `node/tunnel.rs` answers them, and the port check it adds.
        let cases = [
            (None, target("root", 2, 8080), 404, "no process wiki here"),
            (
                Some(wiki(Status::Stopped, Some(8080))),
                target("root", 2, 8080),
                409,
                "wiki is not running here (stopped)",
            ),
            (
                Some(wiki(Status::Pending, Some(8080))),
                target("root", 2, 8080),
                409,
                "wiki is not running here (pending)",
            ),
            (
                Some(wiki(Status::Running, Some(8080))),
                target("root", 1, 8080),
                409,
                "wiki runs here with generation 2, not 1",
            ),
            (
                Some(wiki(Status::Running, Some(8080))),
                target("root", 3, 8080),
                409,
                "wiki runs here with generation 2, not 3",
            ),
            (
                Some(wiki(Status::Running, None)),
                target("root", 2, 8080),
                409,
                "wiki has no TCP port 8080 (its port: none)",
            ),
            (
                Some(wiki(Status::Running, Some(8081))),
                target("root", 2, 8080),
                409,
                "wiki has no TCP port 8080 (its port: 8081)",
            ),
        ];
        for (process, target, status, message) in cases {
            let (local, others) = local(root_with(process.clone()));
            let got = refusal(&local, &target).await;
            assert_eq!(got, (status, message.to_owned()), "{process:?}");
            assert_eq!(others.asked.load(Ordering::SeqCst), 0);
        }
    }

    #[tokio::test]
    async fn a_running_local_process_is_connected_to_on_loopback() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (local, others) = local(root_with(Some(wiki(Status::Running, Some(port)))));
        let target = target("root", 2, port);
        assert_eq!(local.describe(&target), format!("local → 127.0.0.1:{port}"));
        let (stream, accepted) = tokio::join!(local.connect(&target), listener.accept());
        let (mut stream, mut accepted) =
            (stream.expect("connected"), accepted.expect("accepted").0);
        stream.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        assert_eq!(others.asked.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_local_port_that_answers_nothing_is_a_502() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("address").port()
        };
        let (local, _) = local(root_with(Some(wiki(Status::Running, Some(port)))));
        let (status, message) = refusal(&local, &target("root", 2, port)).await;
        assert_eq!(status, 502);
        let expected = format!("port {port} does not answer on this machine (");
        assert!(message.starts_with(&expected), "{message}");
    }

    #[tokio::test]
    async fn another_nodes_target_goes_to_the_wrapped_upstream() {
        // Even when the id is one the root runs too (a copy elsewhere wins).
        let (local, others) = local(root_with(Some(wiki(Status::Running, Some(8080)))));
        let elsewhere = target("pi", 2, 8080);
        assert_eq!(local.describe(&elsewhere), "agent pi → 127.0.0.1:8080");
        let Err(UpstreamError::NoAddress { node }) = local.connect(&elsewhere).await else {
            panic!("not through the wrapped upstream");
        };
        assert_eq!(node.as_str(), "pi");
        assert_eq!(others.asked.load(Ordering::SeqCst), 1);
    }
}
