//! The node agent: one per machine. It loads the cluster's trust files and its own
//! certificate, opens the record store, starts the supervisor (which re-adopts what still runs)
//! and serves the control API over TLS. `lifecycle` decides; the rest is the OS edge.

pub mod api;
pub mod config;
pub mod health;
pub mod lifecycle;
pub mod logs;
pub mod os;
pub mod store;
pub mod strategy;
pub mod supervisor;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use p2f_model::{Node, NodeRef, P2fNodeInfo};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{AgentConfig, ConfigError, MeshSettings, SupervisorConfig};
pub use supervisor::{Recovery, Shutdown, Supervisor};

use crate::cluster::{ClusterError, ClusterFiles, NodeCert, Secret};
use store::{Store, StoreError};
use strategy::DeployOptions;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The cluster's trust files or this node's certificate.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The record store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file or directory of the agent.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The listen address.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    /// The mesh could not start.
    #[error(transparent)]
    Mesh(#[from] crate::mesh::MeshError),
    /// A member could not get its certificate from the root.
    #[error("cannot get this node's certificate from the root at {root}: {source}")]
    Join {
        root: String,
        source: crate::join::JoinError,
    },
    /// A member without its certificate.
    #[error(
        "this node has no certificate in {0}, no CA key to make one and no root in its config to ask; join the cluster with `p2f node join TOKEN`"
    )]
    NoCertificate(PathBuf),
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    supervisor: Supervisor,
    address: SocketAddr,
    node: Node,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
    records: Option<crate::records::Records>,
    root: Option<crate::root::Root>,
}

impl Agent {
    /// Starts an agent with `config`.
    pub async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        let data = &config.data_dir;
        std::fs::create_dir_all(data).map_err(|source| AgentError::Io {
            what: "cannot create the data directory",
            path: data.clone(),
            source,
        })?;
        let (ca, secret) = ClusterFiles::new(config.cluster_dir()).load()?;
        let cert = node_certificate(&config, &ca, &secret).await?;
        let tls = crate::cluster::server_config(&cert)?;
        let db_path = data.join("records.redb");
        let store = Arc::new(Store::open(&db_path)?);
        let root_store = store.clone();
        // Records hold specs, and specs hold env values: only the agent reads them.
        set_private(&db_path)?;

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| AgentError::Listen {
                address: config.listen,
                source,
            })?;
        let address = listener.local_addr().map_err(|source| AgentError::Listen {
            address: config.listen,
            source,
        })?;
        let host = config.advertised_host();
        let node = node_entry(&config, &host, address);
        let node_ref = NodeRef {
            name: config.name.clone(),
            address: host,
        };
        let deploy = DeployOptions {
            nix_options: config.supervisor.nix_options.clone(),
            timeout: config.supervisor.deploy_timeout,
        };
        // A member that was away may have had its processes placed elsewhere meanwhile: it
        // starts nothing again until it has heard the network (`unpark` below). The root places
        // processes itself, and a node without a mesh is on its own.
        let recovery = if config.mesh.is_some() && ca.key_pem().is_none() {
            Recovery::Park
        } else {
            Recovery::Restart
        };
        let supervisor = Supervisor::start(
            node_ref,
            store,
            data,
            config.supervisor.clone(),
            deploy,
            recovery,
        )?;
        // From here on processes may run: if anything else fails, let go of them (they are
        // re-adopted by the next start) before saying so.
        let rest = async {
            let api_address = node.api_address().unwrap_or_else(|| address.to_string());
            let records = match &config.mesh {
                None => None,
                Some(settings) => {
                    let mut mesh_config = crate::mesh::MeshConfig::new(
                        config.name.clone(),
                        settings.listen,
                        secret.clone(),
                    );
                    mesh_config.seeds = settings.seeds.clone();
                    mesh_config.gossip_interval = settings.gossip_interval;
                    mesh_config.phi_threshold = settings.phi_threshold;
                    if settings.listen.ip().is_unspecified() {
                        let ip: std::net::IpAddr = config
                            .advertised_host()
                            .parse()
                            .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
                        mesh_config.advertise_addr = Some((ip, 0).into());
                    }
                    let mesh = crate::mesh::Mesh::start(mesh_config).await?;
                    let client =
                        crate::Network::connect(&api_address, secret.clone(), ca.cert_pem())
                            .map_err(|e| AgentError::Io {
                                what: "cannot make the mesh's client",
                                path: data.clone(),
                                source: std::io::Error::other(e.to_string()),
                            })?;
                    let records =
                        crate::records::Records::start(mesh, supervisor.clone(), client, &node)
                            .await?;
                    if recovery == Recovery::Park {
                        records.track(tokio::spawn(unpark(records.clone(), supervisor.clone())));
                    }
                    Some(records)
                }
            };
            if ca.key_pem().is_some() {
                let token = crate::join::JoinToken {
                    root: api_address.clone(),
                    gossip: records.as_ref().map(|r| r.mesh().gossip_addr().to_string()),
                    ca_pem: ca.cert_pem().to_owned(),
                    secret: secret.clone(),
                };
                write_private(
                    &data.join("join-token"),
                    format!("{}\n", token.encode()).as_bytes(),
                )?;
            }
            // The node holding the CA key decides placements (with a mesh to see the others).
            let root = match (&records, ca.key_pem()) {
                (Some(records), Some(_)) => Some(crate::root::Root::start(
                    node.clone(),
                    root_store.clone(),
                    records.clone(),
                    crate::Network::connect(&api_address, secret.clone(), ca.cert_pem()).map_err(
                        |e| AgentError::Io {
                            what: "cannot make the root's client",
                            path: data.clone(),
                            source: std::io::Error::other(e.to_string()),
                        },
                    )?,
                )?),
                _ => None,
            };
            let app = api::router(
                supervisor.clone(),
                secret,
                node.clone(),
                Some(ca),
                records.clone(),
                root.clone(),
            );
            let (stop, stopped) = oneshot::channel();
            let server = tokio::spawn(crate::server::serve_tls(listener, tls, app, async move {
                let _ = stopped.await;
            }));
            // Written whole or not at all (temp file + rename): readers never see it half-done.
            let addr_file = data.join("api.addr");
            let temp = data.join("api.addr.tmp");
            std::fs::write(&temp, address.to_string())
                .and_then(|()| std::fs::rename(&temp, &addr_file))
                .map_err(|source| AgentError::Io {
                    what: "cannot write",
                    path: addr_file,
                    source,
                })?;
            Ok::<_, AgentError>((records, root, stop, server))
        }
        .await;
        let (records, root, stop, server) = match rest {
            Ok(parts) => parts,
            Err(e) => {
                supervisor.shutdown(Shutdown::Detach).await;
                return Err(e);
            }
        };
        tracing::info!(node = %config.name, "control API on https://{address}/v1");
        Ok(Agent {
            supervisor,
            address,
            node,
            stop: Some(stop),
            server,
            records,
            root,
        })
    }

    /// Where the control API listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// This node's P2PRC entry, with the API address in `CustomInformation`.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The network's records as this node sees them (with a mesh).
    pub fn records(&self) -> Option<&crate::records::Records> {
        self.records.as_ref()
    }

    /// The supervisor (for the embedded network, which shares the process).
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// Stops serving, then lets go of the processes as `how` says.
    pub async fn shutdown(mut self, how: Shutdown) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.server).await {
            tracing::warn!("the API server ended badly: {e}");
        }
        if let Some(root) = self.root.take() {
            root.stop().await;
        }
        if let Some(records) = self.records.take() {
            records.stop().await;
        }
        self.supervisor.shutdown(how).await;
    }
}

/// How long a returning member waits to hear every live node before it starts its processes
/// again anyway (the network is large, or split).
const CATCH_UP_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts the processes the supervisor parked at start, once this node has heard what every
/// live node runs: a copy the root placed elsewhere meanwhile (a newer generation) is dropped
/// without ever starting again here.
async fn unpark(records: crate::records::Records, supervisor: Supervisor) {
    let started = std::time::Instant::now();
    let outcome = records.caught_up(CATCH_UP_LIMIT).await;
    match outcome {
        crate::records::CatchUp::Heard => {}
        crate::records::CatchUp::Alone => {
            tracing::warn!("no other node answers: starting this node's processes again")
        }
        crate::records::CatchUp::TimedOut => tracing::warn!(
            "did not hear every live node within {CATCH_UP_LIMIT:?}: starting this node's processes again with what it knows"
        ),
    }
    tracing::debug!(waited = ?started.elapsed(), ?outcome, "unparking");
    supervisor.unpark(|process| {
        records
            .newer_elsewhere(&process.id, process.generation)
            .map(|(node, generation)| {
                format!("the network has generation {generation} (on {node})")
            })
    });
}

/// This node's certificate: issued (again) at each start when this node holds the CA key, so
/// it always names the current address; read from `DATA/tls` on members. A member without one
/// whose config names its root (a config written by hand or by a provisioning tool, next to
/// the cluster's `ca.pem` and `secret`) asks the root for it, as `p2f node join` does.
async fn node_certificate(
    config: &AgentConfig,
    ca: &crate::cluster::ClusterCa,
    secret: &Secret,
) -> Result<NodeCert, AgentError> {
    let dir = config.data_dir.join("tls");
    let mut hosts = vec![config.advertised_host(), config.listen.ip().to_string()];
    hosts.dedup();
    if ca.key_pem().is_some() {
        let cert = ca.issue(config.name.as_str(), &hosts)?;
        cert.save(&dir)?;
        return Ok(cert);
    }
    if let Some(cert) = NodeCert::load(&dir) {
        return Ok(cert);
    }
    let Some(root) = &config.root else {
        return Err(AgentError::NoCertificate(dir));
    };
    let join = |source| AgentError::Join {
        root: root.clone(),
        source,
    };
    let client =
        crate::Network::connect(root, secret.clone(), ca.cert_pem()).map_err(|e| join(e.into()))?;
    let cert = crate::join::request_certificate(&client, &config.name, hosts)
        .await
        .map_err(join)?;
    cert.save(&dir)?;
    tracing::info!(%root, "joined: the root signed this node's certificate");
    Ok(cert)
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<(), AgentError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| AgentError::Io {
        what: "cannot write",
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    set_private(path)
}

/// Mode 0600, also for a file that existed with a wider mode.
fn set_private(path: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        AgentError::Io {
            what: "cannot make private",
            path: path.to_owned(),
            source,
        }
    })
}

/// This node's P2PRC entry.
fn node_entry(config: &AgentConfig, host: &str, address: SocketAddr) -> Node {
    let mut node = Node::named(config.name.clone());
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => node.ipv4 = Some(ip),
        Ok(std::net::IpAddr::V6(ip)) => node.ipv6 = Some(ip),
        Err(_) => {}
    }
    node.machine_username = std::env::var("USER").unwrap_or_default();
    node.unsafe_mode = config.unsafe_mode;
    let api = if host.contains(':') {
        format!("[{host}]:{}", address.port())
    } else {
        format!("{host}:{}", address.port())
    };
    node.with_p2f_info(&P2fNodeInfo {
        api: Some(api),
        version: Some(env!("CARGO_PKG_VERSION").to_owned()),
    })
}
