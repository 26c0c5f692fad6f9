//! The network's records on this node. It publishes a digest of each local record in the mesh
//! (`p/<id>`, plus this node's API address under `api`). For every other node's digest it fetches
//! the full record once per spec change over that node's control API and keeps it. So any node
//! can list and look up the whole network from memory, also while the owner (or the root) is
//! down. A dead node's records show as `Lost`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use p2f_model::{EventKind, Node, NodeName, Process, ProcessId, ProcessKey, Status, Timestamp};

pub use crate::wire::NodeStatus;
use tokio::task::JoinHandle;

use super::supervisor::Supervisor;
use crate::Network;
use crate::mesh::{Member, Mesh, MeshError, PROCESS_PREFIX, ProcessDigest, spec_hash};

/// The mesh key under which a node publishes its API address.
pub const API_KEY: &str = "api";
/// The mesh key under which a node publishes its P2PRC IP-table entry (JSON).
pub const NODE_KEY: &str = "node";
/// The mesh key under which a node publishes its available memory in bytes.
pub const MEMORY_KEY: &str = "mem";
/// How often a node republishes its available memory.
const MEMORY_EVERY: Duration = Duration::from_secs(10);
/// How often other nodes' digests are compared with the copies held here.
const SYNC_EVERY: Duration = Duration::from_millis(250);
/// How long fetching one record from its node may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// A remote record held here, with the spec hash it was fetched for.
#[derive(Debug, Clone)]
struct Copy {
    record: Process,
    spec: String,
}

struct Inner {
    mesh: Mesh,
    node: NodeName,
    supervisor: Supervisor,
    client: Network,
    copies: Mutex<HashMap<ProcessId, Copy>>,
    /// The last membership seen: digests of every other node, and whether it is alive.
    remote: Mutex<Vec<(Member, bool)>>,
    /// Stale local copies being removed.
    fencing: Mutex<std::collections::HashSet<ProcessId>>,
    /// Records published for processes that run nowhere yet (the root's held ones).
    held: Mutex<HashMap<ProcessId, Process>>,
    held_changed: tokio::sync::Notify,
}

/// This node's replica of the network's records.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<Inner>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}

impl Replica {
    /// Starts publishing `supervisor`'s records in `mesh` and copying the others'. `client`
    /// (the cluster's CA and secret) fetches records from other nodes; `api` is this node's
    /// API address.
    pub async fn start(
        mesh: Mesh,
        supervisor: Supervisor,
        client: Network,
        node: &Node,
    ) -> Result<Replica, MeshError> {
        let api = node.api_address().unwrap_or_default();
        mesh.set(API_KEY, &api).await?;
        mesh.set(NODE_KEY, &serde_json::to_string(node).unwrap_or_default())
            .await?;
        let inner = Arc::new(Inner {
            node: mesh.node().clone(),
            mesh,
            supervisor,
            client,
            copies: Mutex::new(HashMap::new()),
            remote: Mutex::new(Vec::new()),
            fencing: Mutex::new(std::collections::HashSet::new()),
            held: Mutex::new(HashMap::new()),
            held_changed: tokio::sync::Notify::new(),
        });
        let tasks = vec![
            tokio::spawn(publish(inner.clone())),
            tokio::spawn(sync(inner.clone())),
        ];
        Ok(Replica {
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
                let processes = member
                    .values
                    .keys()
                    .filter(|k| k.starts_with(PROCESS_PREFIX))
                    .count();
                NodeStatus {
                    node,
                    alive,
                    generation: member.generation,
                    processes,
                    memory_available: member.values.get(MEMORY_KEY).and_then(|v| v.parse().ok()),
                }
            })
            .collect();
        if !nodes.iter().any(|n| n.node.name == own.name) {
            nodes.push(NodeStatus {
                node: own.clone(),
                alive: true,
                generation: self.inner.mesh.generation(),
                processes: self.inner.supervisor.list().len(),
                memory_available: super::os::memory_available(),
            });
        }
        nodes.sort_by(|a, b| a.node.name.cmp(&b.node.name));
        nodes
    }

    /// The mesh this replica gossips in.
    pub fn mesh(&self) -> &Mesh {
        &self.inner.mesh
    }

    /// Every record of the network: this node's, every other node's as last published (`Lost`
    /// when that node is dead), and the ones this node holds for the root; one per id (the
    /// highest generation: a copy it replaced is stale), sorted by id.
    pub fn list(&self) -> Vec<Process> {
        let mut all = self.inner.supervisor.list();
        all.extend(lock(&self.inner.held).values().cloned());
        let remote = lock(&self.inner.remote);
        let copies = lock(&self.inner.copies);
        for (member, alive) in remote.iter() {
            for (key, value) in &member.values {
                if !key.starts_with(PROCESS_PREFIX) {
                    continue;
                }
                let Ok(digest) = ProcessDigest::decode(value) else {
                    continue;
                };
                let Some(copy) = copies.get(&digest.id) else {
                    continue;
                };
                all.push(merge(&copy.record, &digest, *alive));
            }
        }
        all.sort_by(|a, b| a.id.cmp(&b.id).then(b.generation.cmp(&a.generation)));
        all.dedup_by(|later, first| later.id == first.id);
        all
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
        let mut found: Vec<Process> = self.list().into_iter().filter(|p| p.matches(key)).collect();
        found.sort_by_key(|p| {
            (
                p.status.is_final() || p.status == Status::Lost,
                std::cmp::Reverse(p.generation),
            )
        });
        found.into_iter().next()
    }

    /// For a process of another node: a client of that node (if it publishes its API) and the
    /// record as last published.
    pub fn owner(&self, id: &ProcessId) -> Option<(Network, Process)> {
        let remote = lock(&self.inner.remote);
        let copies = lock(&self.inner.copies);
        remote.iter().find_map(|(member, alive)| {
            let value = member.values.get(&ProcessDigest::key_for(id))?;
            let digest = ProcessDigest::decode(value).ok()?;
            let api = member.values.get(API_KEY)?;
            let record = merge(&copies.get(id)?.record, &digest, *alive);
            Some((self.inner.client.at(api), record))
        })
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

/// Publishes a digest of every local record whenever one changes.
async fn publish(inner: Arc<Inner>) {
    let mut changes = inner.supervisor.changes();
    let mut published: HashMap<String, String> = HashMap::new();
    loop {
        let mut records = inner.supervisor.list();
        records.extend(lock(&inner.held).values().cloned());
        let now: HashMap<String, String> = records
            .iter()
            .map(|p| {
                let digest = ProcessDigest::of(p);
                (digest.key(), digest.encode())
            })
            .collect();
        for (key, value) in &now {
            if published.get(key) != Some(value)
                && let Err(e) = inner.mesh.set(key, value).await
            {
                tracing::warn!("cannot publish {key}: {e}");
            }
        }
        for key in published
            .keys()
            .filter(|k| !now.contains_key(*k) && k.as_str() != MEMORY_KEY)
        {
            inner.mesh.delete(key).await;
        }
        let memory = published.remove(MEMORY_KEY);
        published = now;
        if let Some(memory) = memory {
            published.insert(MEMORY_KEY.to_owned(), memory);
        }
        if let Some(available) = super::os::memory_available() {
            let value = available.to_string();
            if published.get(MEMORY_KEY) != Some(&value) {
                let _ = inner.mesh.set(MEMORY_KEY, &value).await;
            }
            published.insert(MEMORY_KEY.to_owned(), value);
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
fn fence(inner: &Arc<Inner>, others: &[(Member, bool)]) {
    for local in inner.supervisor.list() {
        let key = ProcessDigest::key_for(&local.id);
        let newer = others.iter().any(|(member, alive)| {
            *alive
                && member
                    .values
                    .get(&key)
                    .and_then(|v| ProcessDigest::decode(v).ok())
                    .is_some_and(|d| d.generation > local.generation)
        });
        if newer && lock(&inner.fencing).insert(local.id.clone()) {
            tracing::warn!(id = %local.id, generation = local.generation, "a newer generation runs elsewhere: stopping this stale copy");
            let inner = inner.clone();
            tokio::spawn(async move {
                if let Err(e) = inner.supervisor.remove(&local.id).await {
                    tracing::warn!(id = %local.id, "cannot remove the stale copy: {e}");
                }
                lock(&inner.fencing).remove(&local.id);
            });
        }
    }
}

/// Keeps the membership and a copy of every other node's records (fetched when a digest
/// names a record or spec not held yet).
async fn sync(inner: Arc<Inner>) {
    let mut ticker = tokio::time::interval(SYNC_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let membership = inner.mesh.membership().await;
        let others: Vec<(Member, bool)> = membership
            .live
            .into_iter()
            .map(|m| (m, true))
            .chain(membership.dead.into_iter().map(|m| (m, false)))
            .filter(|(m, _)| m.node != inner.node)
            .collect();
        let mut wanted: Vec<(String, ProcessId, String)> = Vec::new();
        {
            let mut copies = lock(&inner.copies);
            // Keep copies only of records some node still publishes.
            copies.retain(|id, _| {
                let key = ProcessDigest::key_for(id);
                others.iter().any(|(m, _)| m.values.contains_key(&key))
            });
            for (member, alive) in &others {
                let Some(api) = member.values.get(API_KEY) else {
                    continue;
                };
                for (key, value) in &member.values {
                    let Some(digest) = key
                        .starts_with(PROCESS_PREFIX)
                        .then(|| ProcessDigest::decode(value).ok())
                        .flatten()
                    else {
                        continue;
                    };
                    let held = copies
                        .get(&digest.id)
                        .is_some_and(|c| c.spec == digest.spec);
                    if *alive && !held {
                        wanted.push((api.clone(), digest.id, digest.spec));
                    }
                }
            }
        }
        fence(&inner, &others);
        *lock(&inner.remote) = others;
        for (api, id, spec) in wanted {
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
                    lock(&inner.copies).insert(id, Copy { record, spec });
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(%id, "cannot fetch the record from {api}: {e}"),
            }
        }
    }
}
