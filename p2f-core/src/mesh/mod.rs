//! Membership and replication of small key-values between nodes: chitchat (scuttlebutt gossip,
//! phi-accrual failure detection) over UDP, every datagram authenticated with a key of the
//! node's [`KeyRing`] (HMAC-SHA256 tag over a header and chitchat's bytes) and dropped when it
//! is not fresh or was already received (`auth.rs`). The ring can change while the mesh runs
//! ([`Mesh::install_key`], [`Mesh::use_key`], [`Mesh::remove_key`]; `ring.rs` describes a
//! rotation).
//!
//! Each node owns its key-values ([`Mesh::set`], [`Mesh::delete`]) and sees everyone's
//! ([`Mesh::members`], [`Mesh::dead`], [`Mesh::watch`]). Nodes publish a [`ProcessDigest`] per
//! process under `p/<process-id>`, never whole records.
//!
//! Identity: chitchat's `ChitchatId { node_id, generation_id, gossip_advertise_addr }` with the
//! P2F node name and [`MeshConfig::incarnation`] (the agent's start time, chitchat's generation), so a restarted node is
//! a new incarnation that supersedes the old one.
//!
//! Sizes: chitchat sends a datagram of at most 65 507 bytes (the IPv4 UDP limit); ours carry a
//! 29-byte header and a 32-byte tag on top, so one that chitchat filled to within 61 bytes of
//! the limit is not sent ([`MeshStats::oversized`]; deltas are compressed, so only
//! incompressible values get there). A node's whole state may exceed a datagram: chitchat sends
//! what fits and the rest over the next rounds. One key is at most [`MAX_KEY_LEN`] bytes and
//! one value [`MAX_VALUE_LEN`], so that any single change fits in a datagram many times over (a
//! change that cannot fit would never spread). chitchat zstd-compresses deltas: 500 process
//! digests (~175 bytes each, 87 KB) travel in one 11 KB datagram and reach 3 nodes in one round;
//! 5 000 (875 KB) take a few rounds of ~52 KB datagrams (0.7 s).

mod auth;
mod process;
mod replay;
mod ring;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex as StdMutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::{
    Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion,
    spawn_chitchat,
};
use p2f_model::NodeName;
use tokio::net::UdpSocket;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::cluster::Secret;
use auth::{AuthTransport, Counters};

pub mod keys;

pub use process::{PROCESS_PREFIX, ProcessDigest, spec_hash};
pub use ring::{KeyId, KeyInfo, KeyRing, MAX_KEYS};

/// Default [`MeshConfig::gossip_interval`]: 4 rounds a second. Each round a node gossips with
/// up to 3 peers, so a change reaches every node in one or two rounds at 10 nodes (measured
/// p50 ~0.4 s, the goal is 1 s) and in a few more at 30, for ~9 small datagrams per node per
/// round. Slower rounds would also slow failure detection, which counts in heartbeat intervals;
/// faster ones buy little on a LAN whose nodes change their records a few times a day.
pub const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_millis(250);
/// Default [`MeshConfig::phi_threshold`]. chitchat's phi is the silence divided by the mean
/// interval between fresh heartbeats of that node (heard directly or relayed). With 250 ms
/// rounds that mean was ~125 ms at 3 nodes and ~130-180 ms at 10, so 16 means "lost after
/// ~2-2.8 s of silence", noticed at the end of a round: measured 2.2-2.5 s (3 nodes) and
/// 3.0-3.5 s (10 nodes) from a node's stop to every other node listing it dead
/// (`mesh::tests`). Short enough for the failover goal (5 s), long enough to ride out a Wi-Fi
/// stall of a second or so.
pub const DEFAULT_PHI_THRESHOLD: f64 = 16.0;
/// Default [`MeshConfig::dead_grace`]: how long a dead node's key-values stay known (and listed
/// by [`Mesh::dead`]) before they are forgotten.
pub const DEFAULT_DEAD_GRACE: Duration = Duration::from_secs(60 * 60);
/// How long a deleted key's tombstone is kept. A node that was away longer gets the owner's
/// whole state again instead of the deletions.
const TOMBSTONE_GRACE: Duration = Duration::from_secs(60 * 60);
/// Heartbeat intervals longer than this are not sampled (a node back from a long silence).
const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How many heartbeat intervals the failure detector averages.
const HEARTBEAT_WINDOW: usize = 1_000;
/// Longest key [`Mesh::set`] accepts.
pub const MAX_KEY_LEN: usize = 256;
/// Longest value [`Mesh::set`] accepts: 4 KiB, 1/16 of a datagram even when incompressible.
pub const MAX_VALUE_LEN: usize = 4 * 1024;

/// Everything that can go wrong with the mesh.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// The gossip socket could not be bound.
    #[error("cannot bind gossip socket {addr}/udp: {source}")]
    Bind {
        /// The address it was bound to.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// chitchat refused to start.
    #[error("cannot start gossip: {0}")]
    Start(String),
    /// A setting is out of range.
    #[error("invalid mesh setting: {0}")]
    Config(&'static str),
    /// A key is empty or longer than [`MAX_KEY_LEN`].
    #[error("mesh key `{key}` must be 1 to {MAX_KEY_LEN} bytes")]
    BadKey {
        /// The key (cut to [`MAX_KEY_LEN`] bytes).
        key: String,
    },
    /// A value is longer than [`MAX_VALUE_LEN`].
    #[error("value of mesh key `{key}` is {len} bytes, more than {MAX_VALUE_LEN}")]
    ValueTooLarge {
        /// Its key.
        key: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The key ring has no gossip key with this id.
    #[error("no gossip key {0} in the key ring")]
    UnknownKey(KeyId),
    /// The key ring already holds [`MAX_KEYS`] gossip keys.
    #[error("the gossip key ring is full ({MAX_KEYS} keys): remove one first")]
    KeyRingFull,
    /// The primary gossip key cannot be removed.
    #[error("gossip key {0} is the primary key: make another key primary before removing it")]
    RemovePrimary(KeyId),
    /// Another gossip key of the ring has the same id (a 1 in 2³² chance: use another secret).
    #[error("another gossip key of the ring already has id {0}")]
    KeyIdTaken(KeyId),
    /// Text that is not a gossip key id (8 hexadecimal digits).
    #[error("`{0}` is not a gossip key id (8 hexadecimal digits)")]
    BadKeyId(String),
}

/// How a node joins the mesh. [`MeshConfig::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// This node's name: its identity in the mesh.
    pub node: NodeName,
    /// This incarnation: the agent's start time in milliseconds since the Unix epoch by default.
    /// A node restarted with a higher incarnation supersedes its old one (chitchat's
    /// `generation_id`).
    pub incarnation: u64,
    /// Nodes with another cluster id answer "bad cluster" and are ignored.
    pub cluster_id: String,
    /// Where to listen for gossip (UDP). Port 0 picks a free port.
    pub gossip_addr: SocketAddr,
    /// The address peers should send gossip to; defaults to the bound address (required when
    /// `gossip_addr` is unspecified, such as `0.0.0.0`). A port 0 here means the bound port.
    pub advertise_addr: Option<SocketAddr>,
    /// Gossip addresses of nodes to join through (any member will do; several are safer).
    pub seeds: Vec<SocketAddr>,
    /// The gossip keys: datagrams are tagged with the primary one and accepted under any of
    /// them. [`MeshConfig::new`] makes a ring of the cluster secret's key alone.
    pub gossip_keys: KeyRing,
    /// Time between gossip rounds ([`DEFAULT_GOSSIP_INTERVAL`]).
    pub gossip_interval: Duration,
    /// Phi above which a silent node is declared dead ([`DEFAULT_PHI_THRESHOLD`]): roughly the
    /// number of mean heartbeat intervals of silence tolerated.
    pub phi_threshold: f64,
    /// How long a dead node stays known before it is forgotten ([`DEFAULT_DEAD_GRACE`]).
    pub dead_grace: Duration,
}

impl MeshConfig {
    /// A configuration with the defaults, the incarnation taken from the clock, no seeds, and a
    /// key ring of one key derived from `secret`.
    pub fn new(node: NodeName, gossip_addr: SocketAddr, secret: Secret) -> MeshConfig {
        MeshConfig::with_gossip_keys(node, gossip_addr, KeyRing::new(&secret))
    }

    /// A configuration with the defaults, the incarnation taken from the clock, no seeds, and
    /// the key ring `gossip_keys`.
    pub fn with_gossip_keys(
        node: NodeName,
        gossip_addr: SocketAddr,
        gossip_keys: KeyRing,
    ) -> MeshConfig {
        let incarnation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        MeshConfig {
            node,
            incarnation,
            cluster_id: "p2f".to_owned(),
            gossip_addr,
            advertise_addr: None,
            seeds: Vec::new(),
            gossip_keys,
            gossip_interval: DEFAULT_GOSSIP_INTERVAL,
            phi_threshold: DEFAULT_PHI_THRESHOLD,
            dead_grace: DEFAULT_DEAD_GRACE,
        }
    }

    fn check(&self) -> Result<(), MeshError> {
        if self.gossip_interval < Duration::from_millis(10) {
            return Err(MeshError::Config("gossip_interval must be at least 10 ms"));
        }
        if !(self.phi_threshold.is_finite() && self.phi_threshold > 0.0) {
            return Err(MeshError::Config("phi_threshold must be a positive number"));
        }
        if self.cluster_id.is_empty() {
            return Err(MeshError::Config("cluster_id must not be empty"));
        }
        Ok(())
    }
}

/// One incarnation of a node as this mesh last heard of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The node's name.
    pub node: NodeName,
    /// Its incarnation ([`MeshConfig::incarnation`]).
    pub incarnation: u64,
    /// Where it gossips.
    pub gossip_addr: SocketAddr,
    /// Its key-values (deleted ones excluded), shared between snapshots until the node changes
    /// one: comparing two snapshots of an unchanged node is a pointer comparison.
    pub values: Arc<BTreeMap<String, String>>,
}

/// Who is live and who is dead, sorted by node name; one entry per name (its newest
/// incarnation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Live nodes, this one included.
    pub live: Vec<Member>,
    /// Nodes this mesh saw live and whose failure detector has since declared them dead, with
    /// their last key-values; a name with a live incarnation is never listed here. A node that
    /// died before this mesh ever saw it live is in neither list (so that peers not yet heard
    /// twice at start-up are not reported dead).
    pub dead: Vec<Member>,
}

/// Gossip traffic counters of one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MeshStats {
    /// Datagrams sent.
    pub sent: u64,
    /// Bytes sent, headers and tags included.
    pub sent_bytes: u64,
    /// The largest datagram sent, header and tag included.
    pub largest_sent: u64,
    /// Datagrams received authentic, fresh and new (handed to chitchat).
    pub accepted: u64,
    /// Datagrams dropped as not authentic: garbage, unsigned chitchat, a key id this node's
    /// ring does not hold (another cluster, or a key removed or not yet installed), a wrong tag.
    pub rejected: u64,
    /// Authentic datagrams dropped because their timestamp was more than 30 s off this node's
    /// clock (the sender's or this node's clock is wrong).
    pub stale: u64,
    /// Authentic datagrams dropped because they had been received already (replays).
    pub replayed: u64,
    /// Datagrams not sent because they would exceed the UDP limit with their header and tag.
    pub oversized: u64,
    /// Datagrams not sent because this host had no route to the peer's address (a member
    /// behind NAT: it gossips out through its NAT, nobody gossips in).
    pub unreachable: u64,
}

/// A running node of the mesh. Dropping it leaves the mesh (peers declare it dead); prefer
/// [`Mesh::stop`], which waits until the socket is closed.
pub struct Mesh {
    node: NodeName,
    id: ChitchatId,
    handle: ChitchatHandle,
    chitchat: Arc<Mutex<Chitchat>>,
    seen: Arc<StdMutex<Seen>>,
    membership: watch::Receiver<Membership>,
    counters: Arc<Counters>,
    gossip_keys: Arc<RwLock<KeyRing>>,
    _monitor: AbortOnDrop,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// Binds the gossip socket and joins the mesh through `config.seeds`.
    pub async fn start(config: MeshConfig) -> Result<Mesh, MeshError> {
        config.check()?;
        let addr = config.gossip_addr;
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(|source| MeshError::Bind { addr, source })?;
        let bound = socket
            .local_addr()
            .map_err(|source| MeshError::Bind { addr, source })?;
        let advertise = match config.advertise_addr {
            Some(advertise) if advertise.port() == 0 => {
                SocketAddr::new(advertise.ip(), bound.port())
            }
            Some(advertise) => advertise,
            None if bound.ip().is_unspecified() => {
                return Err(MeshError::Config(
                    "advertise_addr is required when gossip_addr is unspecified",
                ));
            }
            None => bound,
        };
        let id = ChitchatId::new(config.node.as_str(), config.incarnation, advertise);
        let chitchat_config = ChitchatConfig {
            chitchat_id: id.clone(),
            cluster_id: config.cluster_id.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr: bound,
            seed_nodes: config.seeds.iter().map(ToString::to_string).collect(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: config.phi_threshold,
                sampling_window_size: HEARTBEAT_WINDOW,
                max_interval: MAX_HEARTBEAT_INTERVAL,
                initial_interval: config.gossip_interval,
                dead_node_grace_period: config.dead_grace,
            },
            marked_for_deletion_grace_period: TOMBSTONE_GRACE,
            catchup_callback: None,
            extra_liveness_predicate: None,
            // Every P2F node runs chitchat 0.13, which reads both versions; V1 compresses the
            // digest every SYN carries.
            protocol_version: ProtocolVersion::V1,
        };
        let counters = Arc::new(Counters::default());
        let gossip_keys = Arc::new(RwLock::new(config.gossip_keys));
        let transport = AuthTransport::new(Arc::clone(&gossip_keys), Arc::clone(&counters), socket);
        let handle = spawn_chitchat(chitchat_config, Vec::new(), &transport)
            .await
            .map_err(|error| MeshError::Start(format!("{error:#}")))?;

        let chitchat = handle.chitchat();
        let seen = Arc::new(StdMutex::new(Seen::default()));
        let (first, live) = {
            let guard = chitchat.lock().await;
            (snapshot(&guard, &seen), guard.live_nodes_watcher())
        };
        let (publish, membership) = watch::channel(first);
        let monitor = tokio::spawn(monitor(
            Arc::clone(&chitchat),
            Arc::clone(&seen),
            live,
            publish,
        ));
        tracing::debug!(node = %config.node, %advertise, generation = config.incarnation, "mesh started");
        Ok(Mesh {
            node: config.node,
            id,
            handle,
            chitchat,
            seen,
            membership,
            counters,
            gossip_keys,
            _monitor: AbortOnDrop(monitor),
        })
    }

    /// This node's name.
    pub fn node(&self) -> &NodeName {
        &self.node
    }

    /// This node's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.id.generation_id
    }

    /// The address peers gossip to (with the bound port when port 0 was asked for).
    pub fn gossip_addr(&self) -> SocketAddr {
        self.id.gossip_advertise_addr
    }

    /// Publishes `key` = `value` as this node's; peers see it within a few gossip rounds.
    pub async fn set(&self, key: &str, value: &str) -> Result<(), MeshError> {
        check_key(key)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(MeshError::ValueTooLarge {
                key: key.to_owned(),
                len: value.len(),
            });
        }
        self.chitchat.lock().await.self_node_state().set(key, value);
        Ok(())
    }

    /// Deletes this node's `key` (a tombstone spreads; deleting a missing key does nothing).
    pub async fn delete(&self, key: &str) {
        let mut chitchat = self.chitchat.lock().await;
        let state = chitchat.self_node_state();
        if state.get(key).is_some() {
            state.delete(key);
        }
    }

    /// Live nodes, this one included, with their key-values.
    pub async fn members(&self) -> Vec<Member> {
        self.membership().await.live
    }

    /// Nodes declared dead, with their last key-values (see [`Membership::dead`]).
    pub async fn dead(&self) -> Vec<Member> {
        self.membership().await.dead
    }

    /// Live and dead nodes, read now (one consistent view).
    pub async fn membership(&self) -> Membership {
        snapshot(&*self.chitchat.lock().await, &self.seen)
    }

    /// A receiver that holds the latest [`Membership`] and changes when a node joins, is
    /// declared dead, or changes its key-values (checked once per gossip round). Do not hold
    /// its `borrow()` (or the guard `wait_for` returns) across an `.await`: the mesh cannot
    /// publish while it is held.
    pub fn watch(&self) -> watch::Receiver<Membership> {
        self.membership.clone()
    }

    /// Gossip traffic so far.
    pub fn stats(&self) -> MeshStats {
        let c = &self.counters;
        MeshStats {
            sent: c.sent.load(Ordering::Relaxed),
            sent_bytes: c.sent_bytes.load(Ordering::Relaxed),
            largest_sent: c.largest_sent.load(Ordering::Relaxed),
            accepted: c.accepted.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            stale: c.stale.load(Ordering::Relaxed),
            replayed: c.replayed.load(Ordering::Relaxed),
            oversized: c.oversized.load(Ordering::Relaxed),
            unreachable: c.unreachable.load(Ordering::Relaxed),
        }
    }

    /// Adds the gossip key derived from `secret` to this node's ring as an accepted key (not
    /// primary) and returns its id; datagrams tagged with it are accepted from now on.
    /// Installing a key the ring already holds changes nothing.
    ///
    /// # Errors
    /// [`MeshError::KeyRingFull`] when the ring holds [`MAX_KEYS`] keys already;
    /// [`MeshError::KeyIdTaken`] when another key of the ring has the same id.
    pub fn install_key(&self, secret: &Secret) -> Result<KeyId, MeshError> {
        let id = self.write_keys().install(secret)?;
        tracing::info!(node = %self.node, key = %id, "gossip key installed (accepted)");
        Ok(id)
    }

    /// Makes the ring's key `id` primary: this node tags its datagrams with it from the next
    /// one on. Every peer must have installed it first, or it stops hearing this node.
    ///
    /// # Errors
    /// [`MeshError::UnknownKey`] when the ring has no key `id`.
    pub fn use_key(&self, id: KeyId) -> Result<(), MeshError> {
        self.write_keys().use_key(id)?;
        tracing::info!(node = %self.node, key = %id, "gossip key made primary");
        Ok(())
    }

    /// Removes the key `id` from the ring: datagrams tagged with it are rejected from now on.
    ///
    /// # Errors
    /// [`MeshError::UnknownKey`] when the ring has no key `id`; [`MeshError::RemovePrimary`]
    /// when it is the primary key.
    pub fn remove_key(&self, id: KeyId) -> Result<(), MeshError> {
        self.write_keys().remove(id)?;
        tracing::info!(node = %self.node, key = %id, "gossip key removed");
        Ok(())
    }

    /// The gossip key ring's ids, the primary first, then the others in the order they were
    /// installed.
    pub fn gossip_keys(&self) -> Vec<KeyInfo> {
        self.gossip_keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
    }

    fn write_keys(&self) -> std::sync::RwLockWriteGuard<'_, KeyRing> {
        self.gossip_keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves when this node's gossip stopped by itself — chitchat's task ended with an
    /// error or panicked — with why. It never resolves while the gossip runs. (After
    /// [`Mesh::stop`] it resolves too: whoever waits must stop waiting first.)
    pub fn stopped(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let watcher = self.handle.termination_watcher();
        async move {
            match watcher.await {
                Ok(()) => "the gossip task ended".to_owned(),
                Err(e) => format!("the gossip task failed: {e}"),
            }
        }
    }

    /// Kills the gossip task as a fault would (tests of [`Mesh::stopped`]).
    #[cfg(test)]
    fn kill_gossip(&self) {
        self.handle.abort();
    }

    /// Leaves the mesh: stops gossiping and closes the socket before returning. Peers declare
    /// this node dead after the failure detector's timeout.
    pub async fn stop(self) {
        if let Err(error) = self.handle.shutdown().await {
            tracing::debug!(%error, "gossip stopped with an error");
        }
    }

    /// The silence after which each peer would be declared dead now (phi threshold × its
    /// mean heartbeat interval), for measurements.
    #[cfg(test)]
    async fn detection_timeouts(&self) -> Vec<(String, Option<Duration>)> {
        let chitchat = self.chitchat.lock().await;
        chitchat
            .node_states()
            .keys()
            .filter(|id| **id != self.id)
            .map(|id| {
                (
                    id.node_id.to_string(),
                    chitchat.failure_detection_timeout(id),
                )
            })
            .collect()
    }
}

fn check_key(key: &str) -> Result<(), MeshError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        let mut cut = key.len().min(MAX_KEY_LEN);
        while !key.is_char_boundary(cut) {
            cut -= 1;
        }
        return Err(MeshError::BadKey {
            key: key[..cut].to_owned(),
        });
    }
    Ok(())
}

/// Aborts a task when dropped (the monitor holds the chitchat state alive otherwise).
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Republishes the membership each time chitchat's live set (or a live node's version)
/// changes, which chitchat checks once per gossip round.
async fn monitor(
    chitchat: Arc<Mutex<Chitchat>>,
    seen: Arc<StdMutex<Seen>>,
    mut live: watch::Receiver<BTreeMap<ChitchatId, chitchat::NodeState>>,
    publish: watch::Sender<Membership>,
) {
    while live.changed().await.is_ok() {
        let now = snapshot(&*chitchat.lock().await, &seen);
        publish.send_if_modified(|current| {
            if *current == now {
                return false;
            }
            *current = now;
            true
        });
    }
}

/// What the snapshots remember between calls: every incarnation seen live (so that one that
/// dies is listed dead), and each node's key-values as of its max version (so that an unchanged
/// node's values are shared, not copied, by the next snapshot).
#[derive(Default)]
struct Seen {
    live: HashSet<ChitchatId>,
    values: ValuesCache,
}

/// Each node's key-values as of its (last GC version, max version).
type ValuesCache = HashMap<ChitchatId, ((u64, u64), Arc<BTreeMap<String, String>>)>;

/// The membership as `chitchat` sees it; records every incarnation seen live in `seen`.
fn snapshot(chitchat: &Chitchat, seen: &StdMutex<Seen>) -> Membership {
    let mut seen = seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut live = BTreeMap::new();
    for id in chitchat.live_nodes() {
        seen.live.insert(id.clone());
        if let Some(member) = member(chitchat, id, &mut seen.values) {
            keep_newest(&mut live, member);
        }
    }
    let mut dead = BTreeMap::new();
    for id in chitchat.dead_nodes() {
        if !seen.live.contains(id) {
            continue;
        }
        if let Some(member) = member(chitchat, id, &mut seen.values)
            && !live.contains_key(&member.node)
        {
            keep_newest(&mut dead, member);
        }
    }
    // Forget incarnations chitchat itself forgot (after the dead grace).
    seen.live.retain(|id| chitchat.node_state(id).is_some());
    seen.values
        .retain(|id, _| chitchat.node_state(id).is_some());
    Membership {
        live: live.into_values().collect(),
        dead: dead.into_values().collect(),
    }
}

fn member(chitchat: &Chitchat, id: &ChitchatId, cache: &mut ValuesCache) -> Option<Member> {
    let state = chitchat.node_state(id)?;
    let Ok(node) = NodeName::new(&*id.node_id) else {
        tracing::debug!(node_id = %id.node_id, "mesh: ignoring a member with an invalid node name");
        return None;
    };
    // Every change (a set or a delete) raises the node's max version; a reset (after tombstones
    // were collected) raises its last GC version.
    let version = (state.last_gc_version(), state.max_version());
    let values = match cache.get(id) {
        Some((cached, values)) if *cached == version => Arc::clone(values),
        _ => {
            let values: Arc<BTreeMap<String, String>> = Arc::new(
                state
                    .key_values()
                    .map(|(key, value)| (key.to_owned(), value.to_owned()))
                    .collect(),
            );
            cache.insert(id.clone(), (version, Arc::clone(&values)));
            values
        }
    };
    Some(Member {
        node,
        incarnation: id.generation_id,
        gossip_addr: id.gossip_advertise_addr,
        values,
    })
}

fn keep_newest(by_name: &mut BTreeMap<NodeName, Member>, member: Member) {
    match by_name.get(&member.node) {
        Some(known) if known.incarnation >= member.incarnation => {}
        _ => {
            by_name.insert(member.node.clone(), member);
        }
    }
}
