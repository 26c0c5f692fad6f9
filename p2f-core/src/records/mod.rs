//! The network's records on this node. It publishes a digest of each local record in the mesh
//! (`p/<id>`, plus this node's API address under `api`). For every other node's digest it fetches
//! the full record once per spec change over that node's control API and keeps it. So any node
//! can list and look up the whole network from memory, also while the owner (or the root) is
//! down. A dead node's records show as `Lost`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use p2f_model::{EventKind, Node, NodeName, Process, ProcessId, ProcessKey, Status, Timestamp};

pub use crate::wire::NodeStatus;
use tokio::task::JoinHandle;

pub mod listing;

use crate::Network;
use crate::mesh::{Member, Mesh, MeshError, PROCESS_PREFIX, ProcessDigest, spec_hash};
use crate::node::supervisor::Supervisor;
use listing::{Listed, newest_per_id};

/// The mesh key under which a node publishes its API address.
pub const API_KEY: &str = "api";
/// The mesh key under which a node publishes its P2PRC IP-table entry (JSON).
pub const NODE_KEY: &str = "node";
/// The mesh key under which a node publishes its available memory in bytes.
pub const MEMORY_KEY: &str = "mem";
/// The mesh key under which a node counts how many times it published its digests: set after
/// them, it tells another node that it has all of them (see [`Records::caught_up`]).
pub const SEQ_KEY: &str = "seq";
/// How long the set of live nodes must stay the same, every one caught up, before a returning
/// node trusts what it heard.
const SETTLE: Duration = Duration::from_millis(500);
/// How long a node waits to hear any other before it takes itself to be alone.
const ALONE_AFTER: Duration = Duration::from_secs(3);
/// How often a node republishes its available memory.
const MEMORY_EVERY: Duration = Duration::from_secs(10);
/// How often other nodes' digests are compared with the copies held here.
const SYNC_EVERY: Duration = Duration::from_millis(250);
/// How long fetching one record from its node may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

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

/// A remote record held here, with the spec hash it was fetched for.
#[derive(Debug, Clone)]
struct Copy {
    record: Process,
    spec: String,
}

/// A digest another node publishes, decoded once per change.
struct Published {
    node: NodeName,
    alive: bool,
    digest: ProcessDigest,
    /// The held copy merged with this digest, made when first listed after a change.
    listed: Option<Listed>,
}

/// What this node knows of the others, updated from the mesh a change at a time.
#[derive(Default)]
struct State {
    /// Every other node as last seen (its key-values are shared with the mesh's snapshot),
    /// and whether it is alive.
    members: Vec<(Member, bool)>,
    /// Every digest other nodes publish, by process id (usually one node per id; two while
    /// a returning node still publishes the copy the network replaced).
    published: BTreeMap<ProcessId, Vec<Published>>,
    /// Full records fetched from their nodes, by id.
    copies: HashMap<ProcessId, Copy>,
}

struct Inner {
    mesh: Mesh,
    node: NodeName,
    supervisor: Supervisor,
    client: Network,
    state: Mutex<State>,
    /// Held while the membership is read and taken in, so that an older read is never taken in
    /// after a newer one.
    refreshing: tokio::sync::Mutex<()>,
    /// Stale local copies being removed.
    fencing: Mutex<std::collections::HashSet<ProcessId>>,
    /// Records published for processes that run nowhere yet (the root's held ones).
    held: Mutex<HashMap<ProcessId, Process>>,
    held_changed: tokio::sync::Notify,
}

/// This node's records of the network's records.
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
    /// Starts publishing `supervisor`'s records in `mesh` and copying the others'. `client`
    /// (the cluster's CA and secret) fetches records from other nodes; `api` is this node's
    /// API address.
    pub async fn start(
        mesh: Mesh,
        supervisor: Supervisor,
        client: Network,
        node: &Node,
    ) -> Result<Records, MeshError> {
        let api = node.api_address().unwrap_or_default();
        mesh.set(API_KEY, &api).await?;
        mesh.set(NODE_KEY, &serde_json::to_string(node).unwrap_or_default())
            .await?;
        let inner = Arc::new(Inner {
            node: mesh.node().clone(),
            mesh,
            supervisor,
            client,
            state: Mutex::new(State::default()),
            refreshing: tokio::sync::Mutex::new(()),
            fencing: Mutex::new(std::collections::HashSet::new()),
            held: Mutex::new(HashMap::new()),
            held_changed: tokio::sync::Notify::new(),
        });
        let tasks = vec![
            tokio::spawn(publish(inner.clone())),
            tokio::spawn(sync(inner.clone())),
        ];
        Ok(Records {
            inner,
            tasks: Arc::new(Mutex::new(tasks)),
        })
    }

    /// Every node of the network this node knows of (itself included), alive or not.
    pub async fn nodes(&self, own: &Node) -> Vec<NodeStatus> {
        let membership = self.inner.mesh.membership().await;
        let mut nodes: Vec<NodeStatus> = membership
            .live
            .into_iter()
            .map(|m| (m, true))
            .chain(membership.dead.into_iter().map(|m| (m, false)))
            .map(|(member, alive)| {
                let node = member
                    .values
                    .get(NODE_KEY)
                    .and_then(|json| serde_json::from_str::<Node>(json).ok())
                    .unwrap_or_else(|| Node::named(member.node.clone()));
                NodeStatus {
                    node,
                    alive,
                    generation: member.generation,
                    processes: digests_of(&member.values).count(),
                    memory_available: member.values.get(MEMORY_KEY).and_then(|v| v.parse().ok()),
                }
            })
            .collect();
        if !nodes.iter().any(|n| n.node.name == own.name) {
            nodes.push(NodeStatus {
                node: own.clone(),
                alive: true,
                generation: self.inner.mesh.generation(),
                processes: self.inner.supervisor.len(),
                memory_available: crate::node::os::memory_available(),
            });
        }
        nodes.sort_by(|a, b| a.node.name.cmp(&b.node.name));
        nodes
    }

    /// The mesh this records gossips in.
    pub fn mesh(&self) -> &Mesh {
        &self.inner.mesh
    }

    /// Every record of the network as listed: this node's, every other node's as last
    /// published (`Lost` when that node is dead), and the ones this node holds for the root;
    /// one per id (the highest generation: a copy it replaced is stale), sorted by id. Each is
    /// merged and encoded once per change, so a list of thousands costs little more than
    /// copying their JSON.
    pub fn listed(&self) -> Vec<Listed> {
        let mut all = self.inner.supervisor.listed();
        {
            let mut state = lock(&self.inner.state);
            let State {
                published, copies, ..
            } = &mut *state;
            for (id, entries) in published.iter_mut() {
                let Some(copy) = copies.get(id) else {
                    continue;
                };
                for entry in entries {
                    let listed = entry.listed.get_or_insert_with(|| {
                        Listed::new(merge(&copy.record, &entry.digest, entry.alive))
                    });
                    all.push(listed.clone());
                }
            }
        }
        // Held records last: a real copy of the same generation is listed instead.
        all.extend(
            lock(&self.inner.held)
                .values()
                .map(|p| Listed::new(p.clone())),
        );
        newest_per_id(&mut all);
        all
    }

    /// Every record of the network (see [`Records::listed`]).
    pub fn list(&self) -> Vec<Arc<Process>> {
        self.listed()
            .into_iter()
            .map(|l| Arc::clone(l.process()))
            .collect()
    }

    /// Publishes `process` as this node's record although nothing runs it: the root holds a
    /// process that waits for a node (`Pending`, with the reason).
    pub fn hold(&self, process: Process) {
        lock(&self.inner.held).insert(process.id.clone(), process);
        self.inner.held_changed.notify_one();
    }

    /// Stops publishing a held record.
    pub fn release(&self, id: &ProcessId) {
        if lock(&self.inner.held).remove(id).is_some() {
            self.inner.held_changed.notify_one();
        }
    }

    /// The held record of `id`, if this node holds one.
    pub fn held(&self, id: &ProcessId) -> Option<Process> {
        lock(&self.inner.held).get(id).cloned()
    }

    /// The record `key` names anywhere in the network (a live one before a stopped one).
    pub fn find(&self, key: &ProcessKey) -> Option<Process> {
        if let ProcessKey::Id(_) = key
            && let Some(local) = self.inner.supervisor.find(key)
        {
            return Some(local);
        }
        self.list()
            .into_iter()
            .filter(|p| p.matches(key))
            .min_by_key(|p| {
                (
                    p.status.is_final() || p.status == Status::Lost,
                    std::cmp::Reverse(p.generation),
                )
            })
            .map(|p| (*p).clone())
    }

    /// For a process of another node: a client of that node (if it publishes its API) and the
    /// record as last published (the newest copy a live node has, if several nodes have one).
    pub fn owner(&self, id: &ProcessId) -> Option<(Network, Process)> {
        let state = lock(&self.inner.state);
        let copy = state.copies.get(id)?;
        state
            .published
            .get(id)?
            .iter()
            .max_by_key(|e| (e.alive, e.digest.generation))
            .and_then(|entry| {
                let (member, _) = state.members.iter().find(|(m, _)| m.node == entry.node)?;
                let api = member.values.get(API_KEY)?;
                let record = merge(&copy.record, &entry.digest, entry.alive);
                Some((self.inner.client.at(api), record))
            })
    }

    /// The node and generation of a copy of `id` on a live node that a parked copy of
    /// `generation` must give way to: a higher generation, or the same one running anywhere
    /// else (a parked copy has not proven itself).
    pub fn newer_elsewhere(&self, id: &ProcessId, generation: u64) -> Option<(NodeName, u64)> {
        let state = lock(&self.inner.state);
        newer_copy(&state, id, generation, &self.inner.node, Tie::GiveWay)
    }

    /// Waits until this node holds what every live node publishes, or `limit` passes. A node caught up with another once it has that node's `seq` marker: each node
    /// sets it after its digests, and chitchat delivers a node's key-values in the order they
    /// were set. Another node must be live for at least [`SETTLE`] first (after a start the
    /// others become live as their heartbeats arrive); with none after [`ALONE_AFTER`], this
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
                !others.is_empty() && others.iter().all(|m| m.values.contains_key(SEQ_KEY));
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

    /// Reads the mesh now and updates what this node knows of the others; returns the records
    /// it should fetch.
    async fn refresh(&self) -> Vec<Wanted> {
        refresh(&self.inner).await
    }

    /// Ties a task that holds this records to it: [`Records::stop`] aborts it first (else the
    /// mesh could not be stopped while the task lives).
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How a copy of the same generation elsewhere is weighed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tie {
    /// A running copy on a node whose name sorts first wins (the same rule on both sides).
    ByName,
    /// Any running copy wins (this one is parked: it has not run since its node came back).
    GiveWay,
}

/// A copy of `id` on a live node that wins over `own`'s copy of `generation`: a higher
/// generation, or the same one `Running` elsewhere as `tie` says. Two nodes hold the same
/// generation only by mistake (a root restarted while a placement was in doubt, a spin by
/// hand), and then one copy stays. The root's record of a process waiting for a node
/// (`Pending`, the generation it will be placed with) never wins a tie, nor does a copy that
/// is still deploying.
fn newer_copy(
    state: &State,
    id: &ProcessId,
    generation: u64,
    own: &NodeName,
    tie: Tie,
) -> Option<(NodeName, u64)> {
    state
        .published
        .get(id)?
        .iter()
        .filter(|e| e.alive && e.node != *own)
        .filter(|e| {
            e.digest.generation > generation
                || (e.digest.generation == generation
                    && e.digest.status == Status::Running
                    && (tie == Tie::GiveWay || e.node < *own))
        })
        .max_by_key(|e| e.digest.generation)
        .map(|e| (e.node.clone(), e.digest.generation))
}

/// A remote record as its digest says it is now.
fn merge(copy: &Process, digest: &ProcessDigest, alive: bool) -> Process {
    let mut record = copy.clone();
    record.generation = digest.generation;
    record.node.name = digest.node.clone();
    record.port = digest.port;
    record.restarts = digest.restarts;
    record.started_at = digest.started_at;
    record.status = if alive {
        digest.status.clone()
    } else {
        Status::Lost
    };
    if let Status::Failed(failure) = &record.status {
        record.last_failure = Some(failure.clone());
    }
    // The copy's history is as of its fetch; the digest says what happened since.
    record.pid = digest.pid;
    if let (Some(at), Some(pid)) = (digest.started_at, digest.pid)
        && digest.started_at != copy.started_at
    {
        record.record(at, EventKind::Started { pid });
    }
    if digest.healthy && !record.passed_health_check() {
        let at = digest.started_at.unwrap_or(Timestamp(0));
        record.record(at, EventKind::Healthy);
    }
    record
}

/// Where a published digest comes from.
enum Source {
    /// A record of this node (unchanged while the `Arc` is the same).
    Local(Arc<Process>),
    /// A record held for the root: few, digested every time.
    Held(Box<Process>),
}

/// What was published under one key.
struct Sent {
    /// The local record it was made from.
    from: Option<Arc<Process>>,
    /// The spec hash in it (kept, so that a record whose spec did not change is not hashed
    /// again: a spec holds its bundle).
    spec: String,
    value: String,
}

/// Publishes a digest of every local record whenever one changes, then bumps [`SEQ_KEY`].
async fn publish(inner: Arc<Inner>) {
    let mut changes = inner.supervisor.changes();
    let mut published: HashMap<String, Sent> = HashMap::new();
    let mut seq: u64 = 0;
    let mut memory: Option<String> = None;
    loop {
        let mut current: HashMap<String, Source> = HashMap::with_capacity(published.len());
        for listed in inner.supervisor.listed() {
            let process = Arc::clone(listed.process());
            current.insert(ProcessDigest::key_for(&process.id), Source::Local(process));
        }
        // A held record wins over a local one of the same id (the root's own copy failed and
        // no node can take it): it is the newer generation.
        for held in lock(&inner.held).values() {
            current.insert(
                ProcessDigest::key_for(&held.id),
                Source::Held(Box::new(held.clone())),
            );
        }
        let mut now: HashMap<String, Sent> = HashMap::with_capacity(current.len());
        let mut changed = false;
        for (key, source) in current {
            let old = published.remove(&key);
            let unchanged = matches!(
                (&source, &old),
                (Source::Local(process), Some(Sent { from: Some(from), .. }))
                    if Arc::ptr_eq(from, process)
            );
            if unchanged {
                if let Some(old) = old {
                    now.insert(key, old);
                }
                continue;
            }
            let (process, from) = match source {
                Source::Local(process) => ((*process).clone(), Some(process)),
                Source::Held(process) => (*process, None),
            };
            let spec = match &old {
                Some(Sent {
                    from: Some(before),
                    spec,
                    ..
                }) if before.spec == process.spec => spec.clone(),
                _ => spec_hash(&process.spec),
            };
            let value = ProcessDigest::with_spec_hash(&process, spec.clone()).encode();
            if old.as_ref().map(|o| &o.value) != Some(&value) {
                if let Err(e) = inner.mesh.set(&key, &value).await {
                    tracing::warn!("cannot publish {key}: {e}");
                }
                changed = true;
            }
            now.insert(key, Sent { from, spec, value });
        }
        // What is left was published before and is gone now.
        for key in published.keys() {
            inner.mesh.delete(key).await;
            changed = true;
        }
        published = now;
        if changed || seq == 0 {
            seq += 1;
            if let Err(e) = inner.mesh.set(SEQ_KEY, &seq.to_string()).await {
                tracing::warn!("cannot publish {SEQ_KEY}: {e}");
            }
        }
        if let Some(available) = crate::node::os::memory_available() {
            let value = available.to_string();
            if memory.as_ref() != Some(&value) {
                let _ = inner.mesh.set(MEMORY_KEY, &value).await;
                memory = Some(value);
            }
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = inner.held_changed.notified() => {}
            () = tokio::time::sleep(MEMORY_EVERY) => {}
        }
    }
}

/// Stops and forgets local copies that the network has replaced: a live node runs the same
/// process with a higher generation (this node was lost, and the root placed it elsewhere).
fn fence(inner: &Arc<Inner>) {
    if lock(&inner.state).published.is_empty() {
        return;
    }
    // Never with the state lock held: the supervisor's lock is taken first elsewhere.
    let local = inner.supervisor.listed();
    let stale: Vec<(ProcessId, u64, NodeName, u64)> = {
        let state = lock(&inner.state);
        if state.published.is_empty() {
            return;
        }
        local
            .iter()
            .map(Listed::process)
            .filter_map(|local| {
                newer_copy(
                    &state,
                    &local.id,
                    local.generation,
                    &inner.node,
                    Tie::ByName,
                )
                .map(|(node, newer)| (local.id.clone(), local.generation, node, newer))
            })
            .collect()
    };
    for (id, generation, node, newer) in stale {
        if inner.supervisor.is_parked(&id) || !lock(&inner.fencing).insert(id.clone()) {
            // A parked copy is decided when it is unparked.
            continue;
        }
        tracing::warn!(%id, generation, %node, newer, "a copy that wins runs elsewhere: stopping this stale one");
        let inner = inner.clone();
        tokio::spawn(async move {
            if let Err(e) = inner.supervisor.remove(&id).await {
                tracing::warn!(%id, "cannot remove the stale copy: {e}");
            }
            lock(&inner.fencing).remove(&id);
        });
    }
}

/// A record to fetch: from which API, which id, for which spec hash.
struct Wanted {
    api: String,
    id: ProcessId,
    spec: String,
}

/// Reads the membership and applies what changed since the last time (see
/// [`State::absorb`]); returns the records to fetch.
async fn refresh(inner: &Arc<Inner>) -> Vec<Wanted> {
    let _one_at_a_time = inner.refreshing.lock().await;
    let membership = inner.mesh.membership().await;
    let others: Vec<(Member, bool)> = membership
        .live
        .into_iter()
        .map(|m| (m, true))
        .chain(membership.dead.into_iter().map(|m| (m, false)))
        .filter(|(m, _)| m.node != inner.node)
        .collect();
    let mut state = lock(&inner.state);
    state.absorb(others);
    state.wanted()
}

impl State {
    /// Takes in the other nodes as the mesh shows them now. Only nodes whose key-values or
    /// liveness changed are looked at, and of those only the digests that changed are decoded
    /// (and their listed records made again).
    fn absorb(&mut self, others: Vec<(Member, bool)>) {
        let mut changed = false;
        let mut before: HashMap<NodeName, (Member, bool)> = std::mem::take(&mut self.members)
            .into_iter()
            .map(|(m, alive)| (m.node.clone(), (m, alive)))
            .collect();
        for (member, alive) in &others {
            let old = before.remove(&member.node);
            let same_incarnation = old
                .as_ref()
                .is_some_and(|(o, a)| o.generation == member.generation && a == alive);
            if same_incarnation
                && old
                    .as_ref()
                    .is_some_and(|(o, _)| Arc::ptr_eq(&o.values, &member.values))
            {
                continue;
            }
            changed = true;
            let old_values = old.map(|(o, _)| o.values);
            // Digests this node no longer publishes.
            if let Some(old_values) = &old_values {
                for (key, _) in digests_of(old_values) {
                    if !member.values.contains_key(key) {
                        forget(&mut self.published, key, &member.node);
                    }
                }
            }
            for (key, value) in digests_of(&member.values) {
                let unchanged = same_incarnation
                    && old_values
                        .as_ref()
                        .and_then(|v| v.get(key))
                        .is_some_and(|old| old == value);
                if unchanged {
                    continue;
                }
                let Ok(digest) = ProcessDigest::decode(value) else {
                    forget(&mut self.published, key, &member.node);
                    continue;
                };
                let entries = self.published.entry(digest.id.clone()).or_default();
                entries.retain(|e| e.node != member.node);
                entries.push(Published {
                    node: member.node.clone(),
                    alive: *alive,
                    digest,
                    listed: None,
                });
            }
        }
        // Nodes the mesh forgot.
        for (node, (member, _)) in &before {
            changed = true;
            for (key, _) in digests_of(&member.values) {
                forget(&mut self.published, key, node);
            }
        }
        self.members = others;
        if changed {
            // Keep copies only of records some node still publishes.
            let published = &self.published;
            self.copies.retain(|id, _| published.contains_key(id));
        }
    }

    /// The records of live nodes not held yet, or held for another spec.
    fn wanted(&self) -> Vec<Wanted> {
        let apis: HashMap<&NodeName, &String> = self
            .members
            .iter()
            .filter_map(|(m, _)| m.values.get(API_KEY).map(|api| (&m.node, api)))
            .collect();
        let mut wanted = Vec::new();
        for (id, entries) in &self.published {
            for entry in entries.iter().filter(|e| e.alive) {
                let held = self
                    .copies
                    .get(id)
                    .is_some_and(|c| c.spec == entry.digest.spec);
                if let (false, Some(api)) = (held, apis.get(&entry.node)) {
                    wanted.push(Wanted {
                        api: (*api).clone(),
                        id: id.clone(),
                        spec: entry.digest.spec.clone(),
                    });
                }
            }
        }
        wanted
    }
}

/// The process digests among `values`.
fn digests_of(values: &BTreeMap<String, String>) -> impl Iterator<Item = (&String, &String)> {
    values
        .range::<str, _>((
            std::ops::Bound::Included(PROCESS_PREFIX),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|(key, _)| key.starts_with(PROCESS_PREFIX))
}

/// Drops `node`'s digest under mesh key `key`.
fn forget(published: &mut BTreeMap<ProcessId, Vec<Published>>, key: &str, node: &NodeName) {
    let Some(id) = key
        .strip_prefix(PROCESS_PREFIX)
        .and_then(|id| ProcessId::new(id).ok())
    else {
        return;
    };
    if let Some(entries) = published.get_mut(&id) {
        entries.retain(|e| &e.node != node);
        if entries.is_empty() {
            published.remove(&id);
        }
    }
}

/// Keeps the membership and a copy of every other node's records (fetched when a digest
/// names a record or spec not held yet), and fences stale local copies.
async fn sync(inner: Arc<Inner>) {
    let mut ticker = tokio::time::interval(SYNC_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let wanted = refresh(&inner).await;
        fence(&inner);
        for Wanted { api, id, spec } in wanted {
            let client = inner.client.at(&api);
            // One slow node must not hold up copying the others' records for long.
            let fetched = tokio::time::timeout(
                FETCH_TIMEOUT,
                client.process_information(ProcessKey::Id(id.clone())),
            )
            .await
            .unwrap_or_else(|_| {
                Err(crate::ClientError::Unreachable {
                    address: api.clone(),
                    detail: "no answer within 2s".into(),
                })
            });
            match fetched {
                Ok(Some(record)) => {
                    let spec = if spec_hash(&record.spec) == spec {
                        spec
                    } else {
                        spec_hash(&record.spec)
                    };
                    let mut state = lock(&inner.state);
                    if let Some(entries) = state.published.get_mut(&id) {
                        for entry in entries {
                            entry.listed = None;
                        }
                    }
                    state.copies.insert(id, Copy { record, spec });
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(%id, "cannot fetch the record from {api}: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2f_model::{NodeRef, ProcessSpec};

    fn name(n: &str) -> NodeName {
        NodeName::new(n).expect("name")
    }

    fn digest(id: &str, generation: u64, node: &str) -> (String, String) {
        digest_in(id, generation, node, Status::Pending)
    }

    fn digest_in(id: &str, generation: u64, node: &str, status: Status) -> (String, String) {
        let mut process = Process::placed(
            ProcessId::new(id).expect("id"),
            generation,
            ProcessSpec::new("web", "exec sleep 1"),
            NodeRef {
                name: name(node),
                address: "127.0.0.1".into(),
            },
            Timestamp(1),
        );
        process.status = status;
        let digest = ProcessDigest::of(&process);
        (digest.key(), digest.encode())
    }

    fn member(node: &str, generation: u64, values: &[(String, String)]) -> Member {
        let mut all: BTreeMap<String, String> = values.iter().cloned().collect();
        all.insert(API_KEY.into(), format!("{node}:1"));
        Member {
            node: name(node),
            generation,
            gossip_addr: ([127, 0, 0, 1], 1).into(),
            values: Arc::new(all),
        }
    }

    /// (id, node, generation, alive) of every digest held.
    fn held(state: &State) -> Vec<(String, String, u64, bool)> {
        state
            .published
            .iter()
            .flat_map(|(id, entries)| {
                entries.iter().map(move |e| {
                    (
                        id.to_string(),
                        e.node.to_string(),
                        e.digest.generation,
                        e.alive,
                    )
                })
            })
            .collect()
    }

    /// Marks every digest as listed, so that a test can see which ones a change made again.
    fn list_all(state: &mut State) {
        for entries in state.published.values_mut() {
            for e in entries {
                e.listed = Some(Listed::new(Process::placed(
                    e.digest.id.clone(),
                    e.digest.generation,
                    ProcessSpec::new("web", "exec sleep 1"),
                    NodeRef {
                        name: e.node.clone(),
                        address: String::new(),
                    },
                    Timestamp(1),
                )));
            }
        }
    }

    fn relisted(state: &State) -> Vec<String> {
        state
            .published
            .values()
            .flatten()
            .filter(|e| e.listed.is_none())
            .map(|e| e.digest.id.to_string())
            .collect()
    }

    #[test]
    fn only_what_changed_is_taken_in_again() {
        let mut state = State::default();
        let a = member("a", 1, &[digest("web-1", 1, "a"), digest("db-1", 1, "a")]);
        let b = member("b", 1, &[digest("cron-1", 2, "b")]);
        state.absorb(vec![(a.clone(), true), (b.clone(), true)]);
        assert_eq!(
            held(&state),
            [
                ("cron-1".into(), "b".into(), 2, true),
                ("db-1".into(), "a".into(), 1, true),
                ("web-1".into(), "a".into(), 1, true),
            ]
        );
        let wanted: Vec<(String, String)> = state
            .wanted()
            .into_iter()
            .map(|w| (w.api, w.id.to_string()))
            .collect();
        assert_eq!(
            wanted,
            [
                ("b:1".into(), "cron-1".into()),
                ("a:1".into(), "db-1".into()),
                ("a:1".into(), "web-1".into()),
            ]
        );

        // Nothing changed: the same shared values, nothing made again.
        list_all(&mut state);
        state.absorb(vec![(a.clone(), true), (b.clone(), true)]);
        assert!(relisted(&state).is_empty());

        // a restarts web-1 (a new digest) and drops db-1: only web-1 is made again.
        let a2 = member("a", 1, &[digest("web-1", 1, "a")]);
        let mut changed = (*a2.values).clone();
        let (key, mut value) = digest("web-1", 1, "a");
        value = value.replace("\"restarts\":0", "\"restarts\":1");
        changed.insert(key, value);
        let a2 = Member {
            values: Arc::new(changed),
            ..a2
        };
        state.absorb(vec![(a2.clone(), true), (b.clone(), true)]);
        assert_eq!(relisted(&state), ["web-1"]);
        assert_eq!(held(&state).len(), 2, "db-1 is gone");

        // b is declared dead: its digests are taken in again, not alive; no fetch from it.
        list_all(&mut state);
        state.absorb(vec![(a2.clone(), true), (b.clone(), false)]);
        assert_eq!(relisted(&state), ["cron-1"]);
        assert!(!state.published[&ProcessId::new("cron-1").expect("id")][0].alive);
        assert!(state.wanted().iter().all(|w| w.id.as_str() != "cron-1"));

        // The mesh forgets b: its digests go, and so does the copy of its record.
        state.copies.insert(
            ProcessId::new("cron-1").expect("id"),
            Copy {
                record: Process::placed(
                    ProcessId::new("cron-1").expect("id"),
                    2,
                    ProcessSpec::new("cron", "exec sleep 1"),
                    NodeRef {
                        name: name("b"),
                        address: String::new(),
                    },
                    Timestamp(1),
                ),
                spec: String::new(),
            },
        );
        state.absorb(vec![(a2, true)]);
        assert_eq!(held(&state), [("web-1".into(), "a".into(), 1, true)]);
        assert!(state.copies.is_empty());
    }

    #[test]
    fn a_new_incarnation_replaces_the_old_ones_digests_and_two_nodes_may_hold_one_id() {
        let mut state = State::default();
        let a = member("a", 1, &[digest("web-1", 1, "a"), digest("db-1", 1, "a")]);
        let b = member("b", 1, &[digest("web-1", 2, "b")]);
        state.absorb(vec![(a, true), (b.clone(), true)]);
        // While a still publishes its stale copy, both are held; the newer one is on b.
        let web = ProcessId::new("web-1").expect("id");
        assert_eq!(
            newer_copy(&state, &web, 1, &name("a"), Tie::ByName),
            Some((name("b"), 2))
        );
        assert_eq!(newer_copy(&state, &web, 2, &name("a"), Tie::ByName), None);
        // a comes back as a new incarnation that publishes only db-1.
        let a2 = member("a", 2, &[digest("db-1", 1, "a")]);
        state.absorb(vec![(a2, true), (b, true)]);
        assert_eq!(
            held(&state),
            [
                ("db-1".into(), "a".into(), 1, true),
                ("web-1".into(), "b".into(), 2, true),
            ]
        );
    }

    #[test]
    fn equal_generations_are_settled_by_name_and_a_held_record_never_wins() {
        let web = ProcessId::new("web-1").expect("id");
        let mut state = State::default();
        let with = |node, status| {
            (
                member(node, 1, &[digest_in("web-1", 2, node, status)]),
                true,
            )
        };
        state.absorb(vec![
            // The root's record of web waiting for a node: the generation it will place.
            with("a", Status::Pending),
            with("b", Status::Running),
            with("b0", Status::Deploying),
            with("bb", Status::Stopped),
        ]);
        let wins = |generation, own, tie| newer_copy(&state, &web, generation, &name(own), tie);
        // c runs generation 2 too: b's copy wins (b sorts first); a's held record, b0's copy
        // that is still deploying and bb's stopped copy do not.
        assert_eq!(wins(2, "c", Tie::ByName), Some((name("b"), 2)));
        assert_eq!(wins(2, "b", Tie::ByName), None);
        assert_eq!(wins(2, "bb", Tie::ByName), Some((name("b"), 2)));
        // A parked copy gives way to a running one of its generation, whatever the names.
        assert_eq!(wins(2, "0", Tie::ByName), None);
        assert_eq!(wins(2, "0", Tie::GiveWay), Some((name("b"), 2)));
        // Generation 3 anywhere wins over all of them.
        assert_eq!(wins(3, "c", Tie::GiveWay), None);
    }

    #[test]
    fn an_undecodable_digest_is_skipped() {
        let mut state = State::default();
        let mut values = vec![digest("web-1", 1, "a")];
        values.push(("p/junk".into(), "{not json".into()));
        state.absorb(vec![(member("a", 1, &values), true)]);
        assert_eq!(held(&state), [("web-1".into(), "a".into(), 1, true)]);
    }
}
