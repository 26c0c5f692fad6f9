//! The network's records on this node, read-only to their users. Every node publishes a digest
//! of each of its own records in the mesh (`p/<id>`; see [`crate::mesh::keys`]); for every other
//! node's digest this node fetches the full record once per spec change over that node's
//! control API and keeps it. So any node lists and looks up the whole network from memory,
//! also while the owner (or the root) is down. A dead node's records show as `Lost`.
//!
//! Local records come from sources ([`LocalRecords`]): the supervisor, and on the root its
//! unplaced records. Which copy of a process wins is [`precedence`]'s one rule.

pub mod listing;
pub mod precedence;
mod publish;
mod state;
mod sync;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::BoxFuture;
use p2f_model::{Node, NodeName, Process, ProcessId, ProcessKey};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use crate::wire::NodeStatus;
pub use precedence::Origin;

use crate::Network;
use crate::mesh::{Member, Mesh, MeshError, keys};
use crate::wire::Reach;
use listing::Listed;
use precedence::Candidate;
use state::State;

/// How long the set of live nodes must stay the same, every one caught up, before a returning
/// node trusts what it heard.
const SETTLE: Duration = Duration::from_millis(500);
/// How long a node waits to hear any other before it takes itself to be alone.
const ALONE_AFTER: Duration = Duration::from_secs(3);

/// A source of this node's own records: the supervisor (what runs here), the root's unplaced
/// records. The records publish what each lists and fence what the network replaced.
pub trait LocalRecords: Send + Sync + 'static {
    /// What kind of copies these are.
    fn origin(&self) -> Origin;
    /// Every record of this source (each encoded once per change), in any order.
    fn listed(&self) -> Vec<Listed>;
    /// How many records this source has.
    fn count(&self) -> usize {
        self.listed().len()
    }
    /// Changes after every change of a record.
    fn changes(&self) -> watch::Receiver<u64>;
    /// Stops and forgets the copy of `id`: a copy that wins runs on another live node (see
    /// [`precedence`]). Asked only of sources whose origin is `Local` (what runs here); errors
    /// are the source's to log.
    fn fence(&self, _id: &ProcessId) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
    /// Stops `id` on request when this source keeps its record but runs nothing (the root's
    /// unplaced records): the record as it is now, `None` when this source does not have `id`.
    fn kill_unrun(&self, _id: &ProcessId) -> Option<Process> {
        None
    }
}

/// One copy of a record as this node sees it, and where it comes from.
#[derive(Debug, Clone)]
pub struct Copy {
    /// The record (shared, encoded once per change).
    pub listed: Listed,
    /// Where it comes from.
    pub origin: Origin,
}

impl Copy {
    /// The record.
    pub fn process(&self) -> &Arc<Process> {
        self.listed.process()
    }
}

/// How [`Records::caught_up`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Every live node's records have arrived.
    Heard,
    /// No other node answered: this node is on its own.
    Alone,
    /// Live nodes were heard, but not all of their records within the limit.
    TimedOut,
}

struct Inner {
    mesh: Mesh,
    node: NodeName,
    /// This node's directory entry.
    own: Node,
    sources: Vec<Arc<dyn LocalRecords>>,
    client: Network,
    state: Mutex<State>,
    /// Held while the membership is read and taken in, so that an older read is never taken in
    /// after a newer one.
    refreshing: tokio::sync::Mutex<()>,
    /// Stale local copies being fenced.
    fencing: Mutex<std::collections::HashSet<ProcessId>>,
    /// Bumped after every change of what this node knows.
    version: watch::Sender<u64>,
}

impl Inner {
    fn bump(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Every local copy, with its source's origin.
    fn local(&self) -> Vec<(Listed, Origin)> {
        let mut all = Vec::new();
        for source in &self.sources {
            let origin = source.origin();
            all.extend(source.listed().into_iter().map(|l| (l, origin)));
        }
        all
    }
}

/// This node's view of the network's records.
#[derive(Clone)]
pub struct Records {
    inner: Arc<Inner>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}

impl Records {
    /// Starts publishing the records of `sources` in `mesh` and copying the others'. `client`
    /// (the cluster's CA and secret) fetches records from other nodes; `own` is this node's
    /// directory entry, published with its API address.
    pub async fn start(
        mesh: Mesh,
        sources: Vec<Arc<dyn LocalRecords>>,
        client: Network,
        own: &Node,
    ) -> Result<Records, MeshError> {
        let api = own.api_address().unwrap_or_default();
        mesh.set(keys::API, &api).await?;
        mesh.set(keys::NODE, &serde_json::to_string(own).unwrap_or_default())
            .await?;
        let (version, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            node: mesh.node().clone(),
            own: own.clone(),
            mesh,
            sources,
            client,
            state: Mutex::new(State::default()),
            refreshing: tokio::sync::Mutex::new(()),
            fencing: Mutex::new(std::collections::HashSet::new()),
            version,
        });
        let tasks = vec![
            tokio::spawn(publish::publish(inner.clone())),
            tokio::spawn(sync::sync(inner.clone())),
        ];
        Ok(Records {
            inner,
            tasks: Arc::new(Mutex::new(tasks)),
        })
    }

    /// The mesh these records travel in.
    pub fn mesh(&self) -> &Mesh {
        &self.inner.mesh
    }

    /// This node's name.
    pub fn node(&self) -> &NodeName {
        &self.inner.node
    }

    /// The cluster's client these records reach other nodes with (every clone shares its
    /// detours: `Network::set_detour`).
    pub fn client(&self) -> &Network {
        &self.inner.client
    }

    /// Processes a live node publishes a digest of whose record has not been fetched yet: known
    /// to exist, not yet in [`Records::view`] (the root decides nothing about them meanwhile —
    /// after its restart, or while a node behind NAT is not linked yet).
    pub fn unfetched(&self) -> std::collections::HashSet<ProcessId> {
        let state = lock(&self.inner.state);
        state
            .published
            .iter()
            .filter(|(id, entries)| {
                !state.copies.contains_key(*id) && entries.iter().any(|e| e.alive)
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The other nodes that publish `reach = root` (behind NAT, reached through the root).
    pub fn reached_via_root(&self) -> Vec<NodeName> {
        lock(&self.inner.state)
            .members
            .iter()
            .filter(|(member, _)| reach_of(member) == Reach::Root)
            .map(|(member, _)| member.node.clone())
            .collect()
    }

    /// A receiver that changes whenever what this node knows changes (a local record, another
    /// node's digest or liveness, a fetched record).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.version.subscribe()
    }

    /// Every node of the network this node knows of (itself included), alive or not, sorted
    /// by name. Each node's entry is decoded once per change of it.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        let local: usize = self.inner.sources.iter().map(|s| s.count()).sum();
        let state = lock(&self.inner.state);
        let count = |member: &Member| state::digests_of(&member.values).count();
        let mut nodes: Vec<NodeStatus> = state
            .members
            .iter()
            .map(|(member, alive)| NodeStatus {
                node: state
                    .directory
                    .get(&member.node)
                    .cloned()
                    .unwrap_or_else(|| Node::named(member.node.clone())),
                alive: *alive,
                incarnation: member.incarnation,
                processes: count(member),
                memory_available: memory_of(member),
                reach: reach_of(member),
                link: None,
            })
            .collect();
        nodes.push(NodeStatus {
            node: self.inner.own.clone(),
            alive: true,
            incarnation: self.inner.mesh.incarnation(),
            processes: local,
            memory_available: state.own.as_ref().and_then(memory_of),
            reach: state.own.as_ref().map(reach_of).unwrap_or_default(),
            link: None,
        });
        nodes.sort_by(|a, b| a.node.name.cmp(&b.node.name));
        nodes
    }

    /// One copy per process of the network, the one that wins ([`precedence`]), sorted by id:
    /// this node's, every other node's as last published (`Lost` when that node is dead), and
    /// the root's unplaced ones. Each is merged and encoded once per change, so a view of
    /// thousands costs little more than copying pointers.
    pub fn view(&self) -> Vec<Copy> {
        let mut all = self.inner.local();
        lock(&self.inner.state).remote_listed(&mut all);
        // The one sort of the whole view (sources list in any order).
        all.sort_by(|(a, ao), (b, bo)| {
            a.process().id.cmp(&b.process().id).then_with(|| {
                precedence::order(
                    &Candidate::of(a.process(), *ao),
                    &Candidate::of(b.process(), *bo),
                )
            })
        });
        all.dedup_by(|later, first| later.0.process().id == first.0.process().id);
        all.into_iter()
            .map(|(listed, origin)| Copy { listed, origin })
            .collect()
    }

    /// Every record of the network as listed (see [`Records::view`]).
    pub fn listed(&self) -> Vec<Listed> {
        self.view().into_iter().map(|c| c.listed).collect()
    }

    /// The record `key` names anywhere in the network: by id the copy that wins; by domain
    /// the live process before an ended one.
    pub fn find(&self, key: &ProcessKey) -> Option<Process> {
        self.view()
            .into_iter()
            .filter(|c| c.process().matches(key))
            .min_by(|a, b| {
                precedence::serving_order(
                    &Candidate::of(a.process(), a.origin),
                    &Candidate::of(b.process(), b.origin),
                )
            })
            .map(|c| (**c.process()).clone())
    }

    /// A client of node `name`'s control API, if it publishes one (this node's own too).
    pub fn client_for(&self, name: &NodeName) -> Option<Network> {
        if *name == self.inner.node {
            return self
                .inner
                .own
                .api_address()
                .map(|api| self.inner.client.peer(name, &api));
        }
        let state = lock(&self.inner.state);
        state
            .api_of(name)
            .map(|api| self.inner.client.peer(name, api))
    }

    /// For a process of another node: a client of that node (if it publishes its API) and the
    /// record as last published there (the copy that wins, if several nodes have one).
    pub fn owner(&self, id: &ProcessId) -> Option<(Network, Process)> {
        let state = lock(&self.inner.state);
        let copy = state.copies.get(id)?;
        let entry = state.winning_entry(id)?;
        let api = state.api_of(&entry.node)?;
        let record = state::merge(&copy.record, &entry.digest, entry.alive);
        Some((self.inner.client.peer(&entry.node, api), record))
    }

    /// The node and generation of a copy on a live node that `local` (a record of this node)
    /// must give way to ([`precedence`]): a parked copy is dropped without starting when one
    /// exists.
    pub fn newer_elsewhere(&self, local: &Process) -> Option<(NodeName, u64)> {
        let state = lock(&self.inner.state);
        state.winner_elsewhere(
            &local.id,
            &Candidate::of(local, Origin::Local),
            &self.inner.node,
        )
    }

    /// Whether node `node` itself, asked over its API by name, shows a copy of `local`'s
    /// process that wins over `local` (what the gossip alone cannot prove).
    pub async fn confirmed_elsewhere(&self, local: &Process, node: &NodeName) -> bool {
        let api = lock(&self.inner.state).api_of(node).cloned();
        sync::confirmed(&self.inner, local, node, api.as_deref()).await
    }

    /// Waits until this node holds what every live node publishes, or `limit` passes. A node
    /// caught up with another once it has that node's `seq` marker: each node
    /// sets it after its digests, and chitchat delivers a node's key-values in the order they
    /// were set. Another node must be live for at least 500 ms first (after a start the
    /// others become live as their heartbeats arrive); with none after 3 s, this
    /// node is taken to be on its own.
    pub async fn caught_up(&self, limit: Duration) -> CatchUp {
        let started = tokio::time::Instant::now();
        // Since when every live node has been caught up with, and which nodes those were.
        let mut complete_since: Option<(tokio::time::Instant, Vec<NodeName>)> = None;
        loop {
            let membership = self.inner.mesh.membership().await;
            let others: Vec<&Member> = membership
                .live
                .iter()
                .filter(|m| m.node != self.inner.node)
                .collect();
            let names: Vec<NodeName> = others.iter().map(|m| m.node.clone()).collect();
            let complete =
                !others.is_empty() && others.iter().all(|m| m.values.contains_key(keys::SEQ));
            complete_since = match complete_since {
                Some((at, known)) if complete && known == names => Some((at, known)),
                _ if complete => Some((tokio::time::Instant::now(), names)),
                _ => None,
            };
            let settled = complete_since
                .as_ref()
                .is_some_and(|(at, _)| at.elapsed() >= SETTLE);
            let waited = started.elapsed();
            let outcome = if settled {
                Some(CatchUp::Heard)
            } else if others.is_empty() && waited >= ALONE_AFTER {
                Some(CatchUp::Alone)
            } else if waited >= limit {
                Some(CatchUp::TimedOut)
            } else {
                None
            };
            if let Some(outcome) = outcome {
                self.refresh().await;
                return outcome;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads the mesh now and updates what this node knows of the others.
    async fn refresh(&self) {
        sync::refresh(&self.inner).await;
    }

    /// Ties a task that holds these records to them: [`Records::stop`] aborts it first (else
    /// the mesh could not be stopped while the task lives).
    pub fn track(&self, task: JoinHandle<()>) {
        lock(&self.tasks).push(task);
    }

    /// Stops publishing and leaves the mesh.
    pub async fn stop(self) {
        let tasks: Vec<JoinHandle<()>> = lock(&self.tasks).drain(..).collect();
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        if let Ok(inner) = Arc::try_unwrap(self.inner) {
            inner.mesh.stop().await;
        }
    }
}

/// The memory a member publishes as available, in bytes.
fn reach_of(member: &Member) -> Reach {
    match member.values.get(keys::REACH).map(String::as_str) {
        Some(keys::REACH_VIA_ROOT) => Reach::Root,
        _ => Reach::Direct,
    }
}

fn memory_of(member: &Member) -> Option<u64> {
    member.values.get(keys::MEMORY).and_then(|v| v.parse().ok())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
