//! What every node runs: the agent, one per machine. [`Agent::start`] is the composition root:
//! it loads the cluster's trust files and this node's certificate, computes the node's role
//! once (root, member, alone), opens the record store, starts the supervisor (which re-adopts
//! what still runs), then by role the records, the root, and the control API over TLS.
//! `lifecycle` decides; the rest is the OS edge.

pub mod api;
mod compat;
pub mod config;
pub mod contain;
pub mod health;
pub mod lifecycle;
pub mod logs;
pub mod os;
pub mod relay;
pub mod strategy;
pub mod supervisor;
pub mod tunnel;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use p2f_model::{Node, NodeRef, NodeRole, P2fNodeInfo, ProcessId};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{
    AgentConfig, ConfigError, ContainmentMode, IngressSettings, MeshSettings, SupervisorConfig,
};
pub use supervisor::{Recovery, Shutdown, Supervisor};

use crate::cluster::Credentials;
use crate::cluster::{ClusterCa, ClusterError, ClusterFiles, NodeCert};
use crate::identity::Role;
use crate::ingress::acme::{AcmeConfig, LETS_ENCRYPT};
use crate::ingress::{Ingress, IngressConfig, IngressError};
use crate::reach::LocalProcesses;
use crate::records::listing::Listed;
use crate::records::{CatchUp, LocalRecords, Origin, Records};
use crate::root::Root;
use crate::root::unplaced::Unplaced;
use crate::server::{Accept, PlainHttp};
use crate::store::{Store, StoreError};
use crate::trust::gossip_keys::{self, GossipKeys};
use crate::trust::revoked;
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
    /// The cluster's client (the records fetch through it) could not be made.
    #[error("cannot make the cluster's client: {0}")]
    Client(#[from] crate::ClientError),
    /// A file of the agent could not be written.
    #[error(transparent)]
    Write(#[from] crate::fsutil::WriteError),
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
        "this node has no certificate in {0}, no CA key to make one, and no root and join token to ask with; join the cluster with `p2f node join --token-file FILE` (a token from `p2f node token` on the root)"
    )]
    NoCertificate(PathBuf),
    /// The root's ingress could not start.
    #[error(transparent)]
    Ingress(#[from] IngressError),
    /// The node's SSH key or the `authorized_keys` it keeps (`[p2prc]`).
    #[error(transparent)]
    SshKey(#[from] crate::ssh_keys::SshKeyError),
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    role: NodeRole,
    supervisor: Supervisor,
    address: SocketAddr,
    node: Node,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
    records: Option<Records>,
    root: Option<Root>,
    ingress: Option<Ingress>,
    p2prc: Option<crate::p2prc::P2prc>,
    /// Why the agent cannot go on (its gossip died), once that happens.
    failed: tokio::sync::watch::Receiver<Option<String>>,
}

/// This node's role: the holder of the CA key is the root (with a mesh on loopback if its
/// config has none, so one machine is a network of one); a node with a mesh is a member; one
/// without is alone.
fn role_of(config: &AgentConfig, ca: &ClusterCa) -> NodeRole {
    match (ca.key_pem().is_some(), config.mesh.is_some()) {
        (true, _) => NodeRole::Root,
        (false, true) => NodeRole::Member,
        (false, false) => NodeRole::Alone,
    }
}

/// The network parts a node runs beside its supervisor.
struct Network {
    records: Option<Records>,
    root: Option<Root>,
    ingress: Option<Ingress>,
    features: Vec<axum::Router>,
    unrun: Vec<Arc<dyn LocalRecords>>,
    /// The root's end of members' links.
    hub: Option<crate::relay::hub::Hub>,
}

impl Agent {
    /// Starts an agent with `config`: trust files and certificate, record store, supervisor
    /// (which re-adopts what still runs), then by role the records, the root, and the control
    /// API.
    pub async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        let data = &config.data_dir;
        std::fs::create_dir_all(data).map_err(|source| AgentError::Io {
            what: "cannot create the data directory",
            path: data.clone(),
            source,
        })?;
        join_if_asked(&config).await?;
        let (ca, secret) = ClusterFiles::new(config.cluster_dir()).load()?;
        let gossip_keys = Arc::new(GossipKeys::load(
            &ClusterFiles::new(config.cluster_dir()),
            &secret,
        ));
        let revoked = Arc::new(revoked::Revoked::load(
            config.cluster_dir().join("revoked.json"),
        ));
        let role = role_of(&config, &ca);
        let cert = node_certificate(&config, &ca)?;
        let tls = crate::cluster::api_server_config(&cert, ca.cert_pem())?;
        let credentials = Credentials::new(ca.cert_pem(), Some(cert));
        let db_path = data.join("records.redb");
        let store = Arc::new(Store::open_or_set_aside(&db_path)?);
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
        let node = node_entry(&config, &host, address, role);
        let (node, key_mesh) = compat::entry(&config, &ca, node)?;
        let node_ref = NodeRef {
            name: config.name.clone(),
            address: host,
        };
        let deploy = DeployOptions {
            nix_options: config.supervisor.nix_options.clone(),
            timeout: config.supervisor.deploy_timeout,
        };
        // A member that was away may have had its processes placed elsewhere meanwhile: it
        // starts nothing again until it has heard the network (`unpark` below). The root
        // places processes itself, and a node alone is on its own.
        let recovery = match role {
            NodeRole::Member => Recovery::Park,
            _ => Recovery::Restart,
        };
        let supervisor = Supervisor::start(
            node_ref.clone(),
            store.clone(),
            data,
            config.supervisor.clone(),
            deploy,
            recovery,
        )?;
        let (failed_tx, failed) = tokio::sync::watch::channel(None);
        // From here on processes may run: if anything else fails, let go of them (they are
        // re-adopted by the next start) before saying so.
        let rest = async {
            let trust = Trust {
                ca: &ca,
                gossip_keys: &gossip_keys,
                credentials: &credentials,
                revoked: &revoked,
            };
            let network =
                start_network(&config, role, trust, &node, address, &supervisor, store).await?;
            if let Some(records) = &network.records {
                records.track(tokio::spawn(watch_gossip(records.clone(), failed_tx)));
            }
            let parts = api::ApiParts {
                supervisor: supervisor.clone(),
                revoked: Arc::clone(&revoked),
                node: node.clone(),
                records: network.records.clone(),
                unrun: network.unrun,
                hub: network.hub,
            };
            let mut features = network.features;
            let (records, ingress) = (network.records.as_ref(), network.ingress.as_ref());
            let p2prc =
                compat::start(&config, &node, records, ingress, &revoked, key_mesh, &ca).await?;
            features.extend(p2prc.as_ref().map(crate::p2prc::P2prc::routes));
            features.push(tunnel::routes(supervisor.clone()));
            features.push(revoked::routes(Arc::clone(&revoked)));
            features.push(gossip_keys::routes(
                Arc::clone(&gossip_keys),
                network.records.clone(),
            ));
            let app = api::router(parts, features);
            let (stop, stopped) = oneshot::channel();
            let accept = Accept::Tls {
                config: tls,
                plain: PlainHttp::CONTROL_API,
                without_sni: None,
            };
            let server = tokio::spawn(crate::server::serve(listener, accept, app, async move {
                let _ = stopped.await;
            }));
            // Written whole or not at all: readers never see it half-done.
            crate::fsutil::write_private(&data.join("api.addr"), address.to_string())?;
            let parts = (network.records, network.root, network.ingress, p2prc);
            Ok::<_, AgentError>((parts, stop, server))
        }
        .await;
        let ((records, root, ingress, p2prc), stop, server) = match rest {
            Ok(parts) => parts,
            Err(e) => {
                supervisor.shutdown(Shutdown::Detach).await;
                return Err(e);
            }
        };
        tracing::info!(node = %config.name, %role, "control API on https://{address}/v1");
        Ok(Agent {
            role,
            supervisor,
            address,
            node,
            stop: Some(stop),
            server,
            records,
            root,
            ingress,
            p2prc,
            failed,
        })
    }

    /// Resolves when the agent cannot go on — its gossip task died, so its view of the network
    /// would freeze — with why; the caller should shut it down and exit with an error (a
    /// service manager starts it again). Never resolves otherwise.
    pub fn failed(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut failed = self.failed.clone();
        async move {
            let why = match failed.wait_for(Option::is_some).await {
                Ok(why) => why.clone(),
                Err(_) => None,
            };
            match why {
                Some(why) => why,
                None => std::future::pending().await,
            }
        }
    }

    /// This node's role.
    pub fn role(&self) -> NodeRole {
        self.role
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
    pub fn records(&self) -> Option<&Records> {
        self.records.as_ref()
    }

    /// The root's ingress, when it runs one.
    pub fn ingress(&self) -> Option<&Ingress> {
        self.ingress.as_ref()
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
        if let Some(p2prc) = self.p2prc.take() {
            p2prc.stop().await;
        }
        if let Some(ingress) = self.ingress.take() {
            ingress.stop().await;
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

/// What the node trusts and shows.
#[derive(Clone, Copy)]
struct Trust<'a> {
    ca: &'a ClusterCa,
    /// The gossip keys.
    gossip_keys: &'a Arc<GossipKeys>,
    /// The node's own client credentials (its certificate).
    credentials: &'a Credentials,
    /// The certificates it refuses.
    revoked: &'a Arc<revoked::Revoked>,
}

/// Starts what this node's role runs beside the supervisor: the mesh and the records (root and
/// members), the root's decisions and routes (root), and the unpark task (members).
async fn start_network(
    config: &AgentConfig,
    role: NodeRole,
    trust: Trust<'_>,
    node: &Node,
    api: SocketAddr,
    supervisor: &Supervisor,
    store: Arc<Store>,
) -> Result<Network, AgentError> {
    let settings = match (&config.mesh, role) {
        (Some(settings), _) => settings.clone(),
        // A root without peers configured gossips on loopback only: a network of one.
        (None, NodeRole::Root) => MeshSettings::new((config.listen.ip(), 0).into(), Vec::new()),
        (None, _) => {
            return Ok(Network {
                records: None,
                root: None,
                ingress: None,
                features: vec![
                    crate::ingress::api::elsewhere(),
                    crate::relay::hub::elsewhere(),
                ],
                unrun: Vec::new(),
                hub: None,
            });
        }
    };
    let Trust {
        ca,
        gossip_keys,
        credentials,
        revoked,
    } = trust;
    let mesh = crate::mesh::Mesh::start(mesh_config(config, &settings, gossip_keys.ring())).await?;
    let client = client_of(node, credentials)?;
    let unplaced = Arc::new(Unplaced::new(supervisor.node().clone()));
    let mut sources: Vec<Arc<dyn LocalRecords>> = vec![Arc::new(supervisor.clone())];
    if role == NodeRole::Root {
        sources.push(unplaced.clone());
    }
    let records = Records::start(mesh, sources, client, node).await?;
    records.track(tokio::spawn(publish_memory(records.clone())));
    if role == NodeRole::Member {
        records.track(tokio::spawn(unpark(records.clone(), supervisor.clone())));
        records.track(tokio::spawn(pull_revoked(
            records.clone(),
            Arc::clone(revoked),
        )));
        let link = crate::relay::link::LinkConfig {
            via_root: config.relay.via_root,
            api,
            advertised_api: node.api_address().unwrap_or_default(),
            root: config.root.clone(),
            credentials: credentials.clone(),
            processes: local_processes(supervisor),
        };
        records.track(tokio::spawn(crate::relay::link::run(records.clone(), link)));
        records.track(tokio::spawn(crate::relay::detour::run(
            records.clone(),
            credentials.clone(),
        )));
    }
    if role != NodeRole::Root {
        if config.ingress.is_some() {
            tracing::warn!("[ingress] in node.toml is ignored: the ingress runs on the root only");
        }
        return Ok(Network {
            records: Some(records),
            root: None,
            ingress: None,
            features: vec![
                crate::root::api::elsewhere(),
                crate::ingress::api::elsewhere(),
                crate::relay::hub::elsewhere(),
            ],
            unrun: Vec::new(),
            hub: None,
        });
    }
    let hub = crate::relay::hub::Hub::new(
        records.client().clone(),
        credentials.clone(),
        Arc::clone(revoked),
    );
    records.track(tokio::spawn(hub.clone().follow(records.clone())));
    let ingress = match &config.ingress {
        Some(settings) if settings.enabled => {
            let ingress_config = IngressConfig {
                http: settings.http,
                https: settings.https,
                hold: settings.hold,
                redirect: settings.redirect,
                workers: settings.worker_threads(),
                acme: settings.acme_email.as_ref().map(|email| AcmeConfig {
                    directory: settings
                        .acme_directory
                        .clone()
                        .unwrap_or_else(|| LETS_ENCRYPT.to_owned()),
                    email: email.clone(),
                    ca: settings.acme_ca.clone(),
                    challenge: settings.acme_challenge,
                    dir: config.data_dir.join("acme"),
                }),
            };
            // The root's own processes are reached directly, checked against its supervisor;
            // linked members' through their links.
            let started = Ingress::start(
                ingress_config,
                records.clone(),
                ca.clone(),
                credentials,
                local_processes(supervisor),
                Arc::new(hub.clone()),
            )
            .await;
            match started {
                Ok(ingress) => Some(ingress),
                Err(e) => {
                    records.stop().await;
                    return Err(e.into());
                }
            }
        }
        _ => None,
    };
    // Placements learn where a service is reached from outside (the record's `external`);
    // no public port may take a port the root holds.
    let front = front_of(config, ingress.as_ref(), api, records.mesh().gossip_addr());
    let root = match Root::start(store, records.clone(), unplaced.clone(), front) {
        Ok(root) => root,
        Err(e) => {
            if let Some(ingress) = ingress {
                ingress.stop().await;
            }
            records.stop().await;
            return Err(e.into());
        }
    };
    forget_old_join_token(config);
    let routes = crate::root::api::routes(
        root.clone(),
        crate::root::api::RootApiParts {
            ca: ca.clone(),
            records: records.clone(),
            own: config.name.clone(),
            own_hosts: node_hosts(config),
            gossip_keys: Arc::clone(gossip_keys),
            revoked: Arc::clone(revoked),
            issued: crate::root::issued::Issued::open(&config.cluster_dir()),
            tokens: crate::root::tokens::TokenBook::open(config.data_dir.join("join-tokens.json")),
            api_address: node.api_address().unwrap_or_default(),
            gossip_address: Some(records.mesh().gossip_addr().to_string()),
        },
    );
    let ingress_routes = match &ingress {
        Some(ingress) => crate::ingress::api::routes(ingress.clone()),
        None => crate::ingress::api::elsewhere(),
    };
    Ok(Network {
        records: Some(records),
        root: Some(root),
        ingress,
        features: vec![
            routes,
            ingress_routes,
            crate::relay::hub::routes(hub.clone()),
        ],
        unrun: vec![unplaced],
        hub: Some(hub),
    })
}

/// Where the root is reached from outside, and the ports it holds itself.
fn front_of(
    config: &AgentConfig,
    ingress: Option<&Ingress>,
    api: SocketAddr,
    gossip: SocketAddr,
) -> crate::root::Front {
    use p2f_model::Protocol::{Tcp, Udp};
    let mut reserved = vec![
        (Tcp, api.port(), "the control API".to_owned()),
        (Udp, gossip.port(), "the gossip".to_owned()),
    ];
    if let Some(ingress) = ingress {
        reserved.push((
            Tcp,
            ingress.http_address().port(),
            "the ingress (HTTP)".into(),
        ));
        reserved.push((
            Tcp,
            ingress.https_address().port(),
            "the ingress (HTTPS)".into(),
        ));
    }
    crate::root::Front {
        https: ingress.map(|i| i.https_address().port()),
        host: config.advertised_host(),
        reserved,
    }
}

/// This node's processes as its supervisor has them now: what a request to open one of their
/// ports is checked against.
fn local_processes(supervisor: &Supervisor) -> LocalProcesses {
    let (own, at) = (supervisor.clone(), supervisor.node().clone());
    LocalProcesses::new(at.name, at.address, move |id: &ProcessId| {
        own.find(&p2f_model::ProcessKey::Id(id.clone()))
    })
}

/// The mesh's configuration from the node's.
fn mesh_config(
    config: &AgentConfig,
    settings: &MeshSettings,
    ring: crate::mesh::KeyRing,
) -> crate::mesh::MeshConfig {
    let mut mesh =
        crate::mesh::MeshConfig::with_gossip_keys(config.name.clone(), settings.listen, ring);
    mesh.seeds = settings.seeds.clone();
    mesh.gossip_interval = settings.gossip_interval;
    mesh.phi_threshold = settings.phi_threshold;
    if settings.listen.ip().is_unspecified() {
        let ip: std::net::IpAddr = config
            .advertised_host()
            .parse()
            .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
        mesh.advertise_addr = Some((ip, 0).into());
    }
    mesh
}

/// A client of the cluster with this node's certificate, pointed at this node's API.
fn client_of(node: &Node, credentials: &Credentials) -> Result<crate::Network, AgentError> {
    let api = node.api_address().unwrap_or_default();
    Ok(crate::Network::connect(&api, credentials)?)
}

/// Earlier roots wrote a permanent join token holding the cluster secret to `DATA/join-token`:
/// it no longer works, and it must not lie around.
fn forget_old_join_token(config: &AgentConfig) {
    let path = config.data_dir.join("join-token");
    if std::fs::remove_file(&path).is_ok() {
        tracing::info!(path = %path.display(), "removed the old permanent join token: make tokens with `p2f node token`");
    }
}

/// How often a node republishes its available memory.
const MEMORY_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Publishes this node's available memory (the root's placement reads it) when it changes.
async fn publish_memory(records: Records) {
    let mut last: Option<u64> = None;
    let mut ticker = tokio::time::interval(MEMORY_EVERY);
    loop {
        ticker.tick().await;
        let Some(available) = os::memory_available() else {
            continue;
        };
        if last != Some(available) {
            let key = crate::mesh::keys::MEMORY;
            if let Err(e) = records.mesh().set(key, &available.to_string()).await {
                tracing::warn!("cannot publish {key}: {e}");
            }
            last = Some(available);
        }
    }
}

impl LocalRecords for Supervisor {
    fn origin(&self) -> Origin {
        Origin::Local
    }

    fn listed(&self) -> Vec<Listed> {
        Supervisor::listed_in_any_order(self)
    }

    fn count(&self) -> usize {
        Supervisor::len(self)
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        Supervisor::changes(self)
    }

    fn fence(&self, id: &ProcessId) -> BoxFuture<'static, ()> {
        let (supervisor, id) = (self.clone(), id.clone());
        Box::pin(async move {
            if let Err(e) = supervisor.remove(&id).await {
                tracing::warn!(%id, "cannot remove the stale copy: {e}");
            }
        })
    }
}

/// Waits for the gossip to stop by itself and says so loudly ([`Agent::failed`]).
async fn watch_gossip(records: Records, failed: tokio::sync::watch::Sender<Option<String>>) {
    let why = records.mesh().stopped().await;
    tracing::error!(
        "{why}: this node no longer hears the network; the agent stops so that it is started again"
    );
    let _ = failed.send(Some(why));
    // Keep the sender: the receivers see the reason, not a closed channel.
    std::future::pending::<()>().await;
}

/// Fetches the root's revocation list now and then (the root also sends it when it changes; a
/// member that was down catches up here).
async fn pull_revoked(records: Records, revoked: Arc<revoked::Revoked>) {
    let mut ticker = tokio::time::interval(revoked::PULL_EVERY);
    loop {
        ticker.tick().await;
        let root = records
            .nodes()
            .into_iter()
            .find(|n| n.alive && n.node.p2f_info().and_then(|i| i.role) == Some(NodeRole::Root));
        let Some(client) = root.and_then(|root| records.client_for(&root.node.name)) else {
            continue;
        };
        match client.revoked().await {
            Ok(list) => match revoked.replace(list) {
                Ok(true) => tracing::info!("revocation list updated from the root"),
                Ok(false) => {}
                Err(e) => tracing::warn!("cannot save the revocation list: {e}"),
            },
            Err(e) => tracing::debug!("cannot fetch the revocation list: {e}"),
        }
    }
}

/// How long a returning member waits to hear every live node before it starts its processes
/// again anyway (the network is large, or split).
const CATCH_UP_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts the processes the supervisor parked at start, once this node has heard what every
/// live node runs: a copy the root placed elsewhere meanwhile (a newer generation) is dropped
/// without ever starting again here.
async fn unpark(records: Records, supervisor: Supervisor) {
    let started = std::time::Instant::now();
    let outcome = records.caught_up(CATCH_UP_LIMIT).await;
    match outcome {
        CatchUp::Heard => {}
        CatchUp::Alone => {
            tracing::warn!("no other node answers: starting this node's processes again")
        }
        CatchUp::TimedOut => tracing::warn!(
            "did not hear every live node within {CATCH_UP_LIMIT:?}: starting this node's processes again with what it knows"
        ),
    }
    tracing::debug!(waited = ?started.elapsed(), ?outcome, "unparking");
    // A parked copy is dropped only when the node said to run a newer one shows it over its
    // API; the gossip alone (anyone with the gossip key) cannot make a node give one up. An
    // unconfirmed copy starts, and is fenced later if the newer one shows up.
    let mut replaced = std::collections::HashMap::new();
    for process in supervisor.list() {
        if process.status != p2f_model::Status::Parked {
            continue;
        }
        if let Some((node, generation)) = records.newer_elsewhere(&process)
            && records.confirmed_elsewhere(&process, &node).await
        {
            let why = format!("the network has generation {generation} (on {node})");
            replaced.insert(process.id.clone(), why);
        }
    }
    supervisor.unpark(|process| replaced.get(&process.id).cloned());
}

/// The names and addresses this node's certificate carries.
fn node_hosts(config: &AgentConfig) -> Vec<String> {
    let mut hosts = vec![config.advertised_host(), config.listen.ip().to_string()];
    hosts.dedup();
    hosts
}

/// This node's certificate: issued (again) at each start when this node holds the CA key (the
/// root's, role `root`), so it always names the current address; read from `DATA/tls` on
/// members.
fn node_certificate(config: &AgentConfig, ca: &ClusterCa) -> Result<NodeCert, AgentError> {
    let dir = config.data_dir.join("tls");
    if ca.key_pem().is_some() {
        let cert = ca.issue_as(Role::Root, config.name.as_str(), &node_hosts(config))?;
        cert.save(&dir)?;
        return Ok(cert);
    }
    NodeCert::load(&dir).ok_or(AgentError::NoCertificate(dir))
}

/// The environment variable a join token may come in (`p2f node run`, joining by config).
pub const JOIN_TOKEN_ENV: &str = "P2F_JOIN_TOKEN";
/// The file in the cluster directory a join token may come in (written by a provisioning tool;
/// removed once used).
pub const JOIN_TOKEN_FILE: &str = "join-token";

/// Joining by config: a member whose config names its root, with no certificate yet, and a
/// join token in [`JOIN_TOKEN_ENV`] or `DATA/cluster/join-token`, asks the root for its
/// certificate (for a key made here) and the gossip secret, as `p2f node join` does. Nothing
/// happens for a node that has a certificate or a CA key.
async fn join_if_asked(config: &AgentConfig) -> Result<(), AgentError> {
    let tls = config.data_dir.join("tls");
    let cluster = ClusterFiles::new(config.cluster_dir());
    if NodeCert::load(&tls).is_some() || cluster.ca_key_path().exists() {
        return Ok(());
    }
    let Some(root) = &config.root else {
        return Ok(());
    };
    let token_file = cluster.dir().join(JOIN_TOKEN_FILE);
    let text = match std::env::var(JOIN_TOKEN_ENV) {
        Ok(text) => text,
        Err(_) => match std::fs::read_to_string(&token_file) {
            Ok(text) => text,
            Err(_) => return Err(AgentError::NoCertificate(tls)),
        },
    };
    let join = |source| AgentError::Join {
        root: root.clone(),
        source,
    };
    let token = crate::join::JoinToken::decode(&text).map_err(|e| {
        join(crate::join::JoinError::Root(crate::ClientError::Protocol {
            address: root.clone(),
            detail: e.to_string(),
        }))
    })?;
    let client = crate::Network::connect(root, &Credentials::new(token.ca_pem.clone(), None))
        .map_err(|e| join(e.into()))?;
    let (cert, secret) =
        crate::join::request_certificate(&client, &config.name, node_hosts(config), &token)
            .await
            .map_err(join)?;
    cluster.write_member(&token.ca_pem, &secret)?;
    cert.save(&tls)?;
    let _ = std::fs::remove_file(&token_file);
    tracing::info!(%root, "joined: the root signed this node's certificate");
    Ok(())
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
fn node_entry(config: &AgentConfig, host: &str, address: SocketAddr, role: NodeRole) -> Node {
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
        role: Some(role),
    })
}
