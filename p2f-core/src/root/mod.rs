//! The root decides: it holds the desired services (durably, in its store), places each on an
//! allowed live node (pins, ports already used there, fewest processes), and when a node is
//! declared dead or a process's restarts are spent there, places it again elsewhere with a
//! higher generation. Nodes fence their own stale copies (`records::fence`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use p2f_model::{Deployment, NodeName, Process, ProcessId, ProcessSpec, Status};
use tokio::task::JoinHandle;

use crate::Network;
use crate::node::store::{Store, StoreError};
use crate::records::Records;
use crate::wire::{DesiredService, DesiredState, NodeStatus, SpinQuery, SpinRequest};

/// The store key of the desired state.
const DESIRED_KEY: &str = "desired";
/// How often the root compares the network with the desired state.
const RECONCILE_EVERY: Duration = Duration::from_millis(250);
/// A node with less available memory than this takes no new process.
const MIN_FREE_MEMORY: u64 = 128 * 1024 * 1024;
/// How long the root waits for a node to take a placement.
const PLACE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a placement is given to show up in the network before it is tried again.
const PLACEMENT_GRACE: Duration = Duration::from_secs(10);

/// Why the desired state could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootError {
    /// The services break rules.
    #[error(transparent)]
    Invalid(#[from] p2f_model::Invalid),
    /// It could not be stored.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a process could not be moved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MoveError {
    /// The root does not manage it (it was not deployed through the root).
    #[error("process {0} is not part of the root's deployment")]
    NotManaged(ProcessId),
    /// Its pins do not allow the node.
    #[error("its pins do not allow node {0}")]
    NotAllowed(NodeName),
    /// It already runs there.
    #[error("it already runs on node {0}")]
    AlreadyThere(NodeName),
    /// The node is not a live member.
    #[error("node {0} is not alive")]
    NotAlive(NodeName),
    /// The node refused the placement.
    #[error("the node refused it: {0}")]
    Refused(crate::ClientError),
}

struct Inner {
    own: p2f_model::Node,
    store: Arc<Store>,
    records: Records,
    client: Network,
    desired: Mutex<DesiredState>,
    /// The last placement of each process: its generation, node and when.
    placed: Mutex<HashMap<ProcessId, (u64, NodeName, Instant)>>,
    /// What was sent where, and where each process failed (in memory: a restarted root starts
    /// from the records).
    history: Mutex<HashMap<ProcessId, History>>,
    /// Processes whose old copy is being removed to be placed again with a new spec.
    replacing: Mutex<std::collections::HashSet<ProcessId>>,
}

/// The root's decisions, running on the node that holds the cluster CA key.
#[derive(Clone)]
pub struct Root {
    inner: Arc<Inner>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Root").finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Root {
    /// Loads the desired state from `store` and starts reconciling.
    pub fn start(
        own: p2f_model::Node,
        store: Arc<Store>,
        records: Records,
        client: Network,
    ) -> Result<Root, StoreError> {
        let desired = match store.meta(DESIRED_KEY)? {
            Some(json) => serde_json::from_str(&json).unwrap_or_else(|e| {
                tracing::error!("the stored desired state cannot be read ({e}); starting empty");
                DesiredState::default()
            }),
            None => DesiredState::default(),
        };
        let inner = Arc::new(Inner {
            own,
            store,
            records,
            client,
            desired: Mutex::new(desired),
            placed: Mutex::new(HashMap::new()),
            history: Mutex::new(HashMap::new()),
            replacing: Mutex::new(std::collections::HashSet::new()),
        });
        let task = tokio::spawn(reconcile_forever(inner.clone()));
        Ok(Root {
            inner,
            task: Arc::new(Mutex::new(Some(task))),
        })
    }

    /// The desired services.
    pub fn desired(&self) -> DesiredState {
        lock(&self.inner.desired).clone()
    }

    /// Replaces the desired services (durably). A service keeps its process id across
    /// calls (matched by name); a new one gets a fresh id.
    pub fn set_desired(&self, services: Vec<ProcessSpec>) -> Result<DesiredState, RootError> {
        Deployment::owned(Vec::new(), services.clone()).validate()?;
        let mut desired = lock(&self.inner.desired);
        let next = DesiredState {
            services: services
                .into_iter()
                .map(|spec| {
                    let id = desired
                        .services
                        .iter()
                        .find(|s| s.spec.name() == spec.name())
                        .map(|s| s.id.clone())
                        .unwrap_or_else(|| ProcessId::for_service(spec.name(), rand::random()));
                    DesiredService { id, spec }
                })
                .collect(),
        };
        let json = serde_json::to_string(&next).unwrap_or_default();
        self.inner.store.set_meta(DESIRED_KEY, &json)?;
        let dropped: Vec<ProcessId> = desired
            .services
            .iter()
            .filter(|old| !next.services.iter().any(|s| s.id == old.id))
            .map(|old| old.id.clone())
            .collect();
        *desired = next.clone();
        drop(desired);
        // Services no longer wanted are stopped and forgotten wherever they run (the API
        // forwards each removal to the process's node).
        for id in dropped {
            self.inner.forget(&id);
            let client = self.inner.client.clone();
            tokio::spawn(async move {
                if let Err(e) = client.remove_process(&id).await
                    && e.status() != Some(404)
                {
                    tracing::warn!(%id, "cannot remove a service that left the deployment: {e}");
                }
            });
        }
        Ok(next)
    }

    /// Moves a desired process to `node` (which its pins must allow and which must be alive):
    /// it is placed there with a higher generation, and its old node fences the old copy.
    pub async fn move_to(&self, id: &ProcessId, node: &NodeName) -> Result<Process, MoveError> {
        let service = lock(&self.inner.desired)
            .services
            .iter()
            .find(|s| &s.id == id)
            .cloned()
            .ok_or_else(|| MoveError::NotManaged(id.clone()))?;
        if !service.spec.allows(node) {
            return Err(MoveError::NotAllowed(node.clone()));
        }
        let nodes = self.inner.records.nodes(&self.inner.own).await;
        let target = nodes
            .iter()
            .find(|n| &n.node.name == node && n.alive)
            .ok_or_else(|| MoveError::NotAlive(node.clone()))?;
        let api = target
            .node
            .api_address()
            .ok_or_else(|| MoveError::NotAlive(node.clone()))?;
        let newest = self
            .inner
            .records
            .list()
            .into_iter()
            .filter(|p| &p.id == id)
            .max_by_key(|p| p.generation);
        // The root's own last placement may be newer than what gossip has shown it yet.
        let last_placed = lock(&self.inner.placed).get(id).cloned();
        let (current_gen, current_node, current_live) = match (&newest, &last_placed) {
            (Some(p), Some((placed_gen, placed_on, _))) if *placed_gen > p.generation => {
                (*placed_gen, placed_on.clone(), true)
            }
            (Some(p), _) => (p.generation, p.node.name.clone(), !p.status.is_final()),
            (None, Some((placed_gen, placed_on, _))) => (*placed_gen, placed_on.clone(), true),
            (None, None) => (0, node.clone(), false),
        };
        if &current_node == node && current_live {
            return Err(MoveError::AlreadyThere(node.clone()));
        }
        let generation = self.inner.history(id, |h| h.reserve(current_gen + 1, node));
        self.inner.note_placement(id, generation, node);
        let request = SpinRequest {
            spec: service.spec,
            id: Some(id.clone()),
            generation: Some(generation),
        };
        tracing::info!(%id, generation, %node, "moving on request");
        let placed = self
            .inner
            .client
            .at(&api)
            .spin(&request, SpinQuery { wait: true })
            .await;
        match placed {
            // Not waiting for a node any more (if it was).
            Ok(process) => {
                self.inner.records.release(id);
                Ok(process)
            }
            Err(e) => {
                self.inner.forget_placement(id, generation);
                Err(MoveError::Refused(e))
            }
        }
    }

    /// Stops reconciling.
    pub async fn stop(&self) {
        let task = lock(&self.task).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Inner {
    /// `change` applied to the history of `id`, under one lock.
    fn history<T>(&self, id: &ProcessId, change: impl FnOnce(&mut History) -> T) -> T {
        change(lock(&self.history).entry(id.clone()).or_default())
    }

    /// Notes a placement of `generation` of `id` on `node`, unless a newer one was made
    /// meanwhile (a move and a reconcile pass may place at once).
    fn note_placement(&self, id: &ProcessId, generation: u64, node: &NodeName) {
        let mut placed = lock(&self.placed);
        if placed.get(id).is_none_or(|(g, _, _)| *g <= generation) {
            placed.insert(id.clone(), (generation, node.clone(), Instant::now()));
        }
    }

    /// Forgets everything about `id` (it left the deployment).
    fn forget(&self, id: &ProcessId) {
        lock(&self.placed).remove(id);
        lock(&self.history).remove(id);
        self.records.release(id);
    }

    /// Forgets the placement of `generation` of `id` (refused), unless a newer one was made.
    fn forget_placement(&self, id: &ProcessId, generation: u64) {
        let mut placed = lock(&self.placed);
        if placed.get(id).is_some_and(|(g, _, _)| *g == generation) {
            placed.remove(id);
        }
    }
}

/// What the root remembers of one process's placements.
#[derive(Debug, Default, Clone)]
struct History {
    /// The highest generation sent (or superseded), 0 if none.
    sent: u64,
    /// The node it went to, while sending it there again is a harmless repeat.
    sent_to: Option<NodeName>,
    /// Nodes it failed on or could not be placed on, the most recent last: placements avoid
    /// them while another node is allowed, then take the one failed on least recently.
    failed_on: Vec<NodeName>,
    /// The generation of the last failure noted on each node (a failed record is seen on
    /// every pass).
    noted: HashMap<NodeName, u64>,
}

impl History {
    /// The generation to send `wanted` to `node` with. The same node may get the generation it
    /// was last sent again (it answers a repeat with the copy it has); any other node gets one
    /// above every generation sent, so a copy that landed unanswered is fenced, never doubled.
    fn reserve(&mut self, wanted: u64, node: &NodeName) -> u64 {
        let generation = self.peek(wanted, Some(node));
        self.sent = generation;
        self.sent_to = Some(node.clone());
        generation
    }

    /// What [`History::reserve`] would give, without noting it (`None`: no node yet).
    fn peek(&self, wanted: u64, node: Option<&NodeName>) -> u64 {
        if self.sent == 0 {
            wanted
        } else if node.is_some() && self.sent_to.as_ref() == node && wanted <= self.sent {
            self.sent
        } else {
            wanted.max(self.sent + 1)
        }
    }

    /// Notes that `generation` is replaced: whatever comes next is above it, on any node.
    fn supersede(&mut self, generation: u64) {
        self.sent = self.sent.max(generation);
        self.sent_to = None;
    }

    /// Notes that `generation` failed on `node`; a generation noted already changes nothing.
    fn failed(&mut self, generation: u64, node: &NodeName) {
        let noted = self.noted.entry(node.clone()).or_default();
        if generation <= *noted {
            return;
        }
        *noted = generation;
        self.failed_on.retain(|n| n != node);
        self.failed_on.push(node.clone());
    }
}

async fn reconcile_forever(inner: Arc<Inner>) {
    let mut ticker = tokio::time::interval(RECONCILE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        reconcile(&inner).await;
    }
}

/// One pass: every desired service that has no live copy is placed.
async fn reconcile(inner: &Arc<Inner>) {
    let desired = lock(&inner.desired).clone();
    if desired.services.is_empty() {
        return;
    }
    let nodes = inner.records.nodes(&inner.own).await;
    let records = inner.records.list();
    let newest_of: HashMap<&ProcessId, &Process> =
        records.iter().map(|p| (&p.id, p.as_ref())).collect();
    let usage = Usage::of(&records);
    // Placements of this pass, not yet in `records`.
    let mut placed_now: HashMap<NodeName, usize> = HashMap::new();
    for service in &desired.services {
        let listed = newest_of.get(&service.id).copied();
        let mut held = inner.records.held(&service.id);
        // The newest real copy (the root's own held record is listed only when there is none
        // of its generation or above).
        let newest = listed.filter(|p| held.as_ref().is_none_or(|h| *p != h));
        // A real copy at or above the held generation (its node came back with it, or the
        // root restarted meanwhile): it no longer waits.
        if held.is_some() && newest.is_some_and(|p| p.status != Status::Lost) {
            inner.records.release(&service.id);
            held = None;
        }
        // A placement of this root's that has not shown up in the network yet is waited for,
        // unless its node died meanwhile or PLACEMENT_GRACE passed (a refused one is forgotten
        // at once, one that showed up too).
        let waiting = lock(&inner.placed).get(&service.id).cloned();
        if let Some((placed_gen, node, at)) = waiting {
            if newest.is_some_and(|p| p.generation >= placed_gen) {
                inner.forget_placement(&service.id, placed_gen);
            } else if nodes.iter().any(|n| n.node.name == node && n.alive) {
                if at.elapsed() < PLACEMENT_GRACE {
                    continue;
                }
                // It never showed up: that node is avoided for the next placement.
                tracing::warn!(id = %service.id, %node, generation = placed_gen, "placement did not show up");
                inner.history(&service.id, |h| h.failed(placed_gen, &node));
                inner.forget_placement(&service.id, placed_gen);
            }
        }
        let wanted = match (newest, &held) {
            // Waiting for an allowed node: try again with the generation it was held at.
            (_, Some(h)) => h.generation,
            // Never placed, or its old copy was removed to be replaced (the generation is
            // still above every one sent: `History::reserve`).
            (None, None) => 1,
            // Running with an older spec, or on a node its pins no longer allow: the old copy
            // is removed first (its id is reused), then the next pass places the new one.
            (Some(p), None)
                if !p.status.is_final()
                    && p.status != Status::Lost
                    && (p.spec != service.spec || !service.spec.allows(&p.node.name)) =>
            {
                if lock(&inner.replacing).insert(service.id.clone()) {
                    tracing::info!(id = %service.id, node = %p.node.name, "replacing: its spec or pins changed");
                    inner.history(&service.id, |h| h.supersede(p.generation));
                    lock(&inner.placed).remove(&service.id);
                    let (client, id, inner) =
                        (inner.client.clone(), service.id.clone(), inner.clone());
                    tokio::spawn(async move {
                        if let Err(e) = client.remove_process(&id).await {
                            tracing::warn!(%id, "cannot remove the old copy: {e}");
                        }
                        lock(&inner.replacing).remove(&id);
                    });
                }
                continue;
            }
            (Some(p), None) => match &p.status {
                Status::Lost => p.generation + 1,
                Status::Failed(_) => {
                    inner.history(&service.id, |h| h.failed(p.generation, &p.node.name));
                    p.generation + 1
                }
                _ => continue,
            },
        };
        let history = inner.history(&service.id, |h| h.clone());
        let Some(target) = choose(
            &service.spec,
            &nodes,
            &usage,
            &history.failed_on,
            &placed_now,
        ) else {
            if held.is_none() {
                tracing::warn!(id = %service.id, "no allowed node is alive: it waits");
                let generation = history.peek(wanted, None);
                inner
                    .records
                    .hold(held_record(&inner.own, service, generation));
            }
            continue;
        };
        let Some(api) = target.node.api_address() else {
            continue;
        };
        // A placement whose answer never came may still have landed: another node never gets
        // the same generation, so such a late copy is fenced by the next.
        let generation = inner.history(&service.id, |h| h.reserve(wanted, &target.node.name));
        let request = SpinRequest {
            spec: service.spec.clone(),
            id: Some(service.id.clone()),
            generation: Some(generation),
        };
        tracing::info!(id = %service.id, generation, node = %target.node.name, "placing");
        *placed_now.entry(target.node.name.clone()).or_default() += 1;
        inner.note_placement(&service.id, generation, &target.node.name);
        let client = inner.client.at(&api);
        let spun = tokio::time::timeout(
            PLACE_TIMEOUT,
            client.spin(&request, SpinQuery { wait: false }),
        )
        .await;
        match spun {
            // The placement stands: the held record (if it waited for a node) goes.
            Ok(Ok(_)) => inner.records.release(&service.id),
            Ok(Err(e)) => {
                // Tried again next pass (say, once the node removed a stale copy); a node the
                // root cannot reach (behind NAT) is avoided while another one is allowed.
                inner.forget_placement(&service.id, generation);
                if matches!(e, crate::ClientError::Unreachable { .. }) {
                    inner.history(&service.id, |h| h.failed(generation, &target.node.name));
                }
                tracing::warn!(id = %service.id, node = %target.node.name, "placement refused: {e}")
            }
            Err(_) => {
                // In doubt: the node may still take it (a slow disk, a stalled machine). The
                // placement stands for PLACEMENT_GRACE; if the copy has not shown up by then,
                // the node is avoided and the next copy goes elsewhere with a higher
                // generation, which fences this one should it start late. The held record (if
                // it waited for a node) goes, so that the wait sees the real copies.
                inner.records.release(&service.id);
                tracing::warn!(
                    id = %service.id,
                    node = %target.node.name,
                    "placement not answered within {}: waiting for it to show up",
                    p2f_model::format_duration(PLACE_TIMEOUT)
                )
            }
        }
    }
}

/// The record of a process that waits for an allowed node: `Pending`, with the reason, on the
/// root (which publishes it until it is placed).
fn held_record(own: &p2f_model::Node, service: &DesiredService, generation: u64) -> Process {
    let at = p2f_model::Timestamp::now();
    let node = p2f_model::NodeRef {
        name: own.name.clone(),
        address: own
            .ipv4
            .map(|ip| ip.to_string())
            .or_else(|| own.ipv6.map(|ip| ip.to_string()))
            .unwrap_or_default(),
    };
    let mut process = Process::placed(
        service.id.clone(),
        generation,
        service.spec.clone(),
        node,
        at,
    );
    let failure = p2f_model::Failure::NoAllowedNode {
        pins: service.spec.pin().to_vec(),
        rejected: Vec::new(),
    };
    process.last_failure = Some(failure.clone());
    process.record(at, p2f_model::EventKind::Unplaced { failure });
    process
}

/// What runs where, counted once per reconcile pass.
#[derive(Debug, Default)]
struct Usage<'a> {
    /// Processes that are not stopped or failed, per node.
    load: HashMap<&'a NodeName, usize>,
    /// Ports held on each node (by processes neither final nor lost).
    ports: std::collections::HashSet<(&'a NodeName, u16)>,
}

impl<'a> Usage<'a> {
    fn of(records: &'a [Arc<Process>]) -> Usage<'a> {
        let mut usage = Usage::default();
        for p in records.iter().filter(|p| !p.status.is_final()) {
            *usage.load.entry(&p.node.name).or_default() += 1;
            if let Some(port) = p.port
                && p.status != Status::Lost
            {
                usage.ports.insert((&p.node.name, port));
            }
        }
        usage
    }
}

/// The node a spec goes to: alive, allowed by its pins, its port free there, with at least
/// [`MIN_FREE_MEMORY`] available, not one it failed on (when only those are left, the one it
/// failed on least recently), with the fewest processes (then by name, so placements are
/// predictable).
fn choose<'a>(
    spec: &ProcessSpec,
    nodes: &'a [NodeStatus],
    usage: &Usage<'_>,
    avoid: &[NodeName],
    placed_now: &HashMap<NodeName, usize>,
) -> Option<&'a NodeStatus> {
    let candidates: Vec<&NodeStatus> = nodes
        .iter()
        .filter(|n| n.alive && spec.allows(&n.node.name))
        // A node nearly out of memory takes nothing new (unknown counts as enough).
        .filter(|n| {
            n.memory_available
                .is_none_or(|free| free >= MIN_FREE_MEMORY)
        })
        .filter(|n| {
            spec.port()
                .is_none_or(|port| !usage.ports.contains(&(&n.node.name, port)))
        })
        .collect();
    let failed_at = |n: &NodeStatus| avoid.iter().position(|a| a == &n.node.name);
    candidates.into_iter().min_by_key(|n| {
        let load = usage.load.get(&n.node.name).copied().unwrap_or(0)
            + placed_now.get(&n.node.name).copied().unwrap_or(0);
        // `None` (never failed there) sorts before any position.
        (failed_at(n), load, n.node.name.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &'static str, alive: bool, free_mib: Option<u64>) -> NodeStatus {
        NodeStatus {
            node: p2f_model::Node::named(NodeName::from_static(name)),
            alive,
            generation: 1,
            processes: 0,
            memory_available: free_mib.map(|mib| mib * 1024 * 1024),
        }
    }

    fn running_on(name: &'static str, port: Option<u16>) -> Arc<Process> {
        let spec = match port {
            Some(port) => ProcessSpec::new("other", "true").with_port(port),
            None => ProcessSpec::new("other", "true"),
        };
        let at = p2f_model::Timestamp::now();
        let node = p2f_model::NodeRef {
            name: NodeName::from_static(name),
            address: String::new(),
        };
        let mut p = Process::placed(ProcessId::for_service("other", 1), 1, spec, node, at);
        p.status = Status::Running;
        Arc::new(p)
    }

    /// Where `spec` goes among a, b, c (all alive, plenty of memory unless `nodes` says
    /// otherwise), given what runs and where it failed (least recent first).
    fn check(
        spec: &ProcessSpec,
        nodes: &[NodeStatus],
        running: &[Arc<Process>],
        avoid: &[&'static str],
        expected: Option<&str>,
    ) {
        let usage = Usage::of(running);
        let avoid: Vec<NodeName> = avoid.iter().map(|n| NodeName::from_static(n)).collect();
        let chosen = choose(spec, nodes, &usage, &avoid, &HashMap::new());
        assert_eq!(
            chosen.map(|n| n.node.name.as_str()),
            expected,
            "avoid {avoid:?}"
        );
    }

    #[test]
    fn placement_weighs_pins_liveness_ports_memory_load_and_failures() {
        let abc = [
            node("a", true, Some(4096)),
            node("b", true, Some(4096)),
            node("c", true, Some(4096)),
        ];
        let any = ProcessSpec::new("web", "true");
        let web = any.with_port(8080);
        let a_b = any.with_pin([NodeName::from_static("a"), NodeName::from_static("b")]);
        // The fewest processes, then the name.
        check(&any, &abc, &[], &[], Some("a"));
        check(&any, &abc, &[running_on("a", None)], &[], Some("b"));
        // A port held on a node rules it out.
        check(&web, &abc, &[running_on("a", Some(8080))], &[], Some("b"));
        // Pins, and dead nodes.
        check(&a_b, &abc, &[running_on("a", None)], &[], Some("b"));
        let b_dead = [
            node("a", true, None),
            node("b", false, None),
            node("c", true, None),
        ];
        check(
            &a_b,
            &b_dead,
            &[running_on("a", None), running_on("a", None)],
            &[],
            Some("a"),
        );
        check(&a_b, &[node("c", true, None)], &[], &[], None);
        // Under 128 MiB free takes nothing new; unknown memory counts as enough.
        let low = [node("a", true, Some(100)), node("b", true, None)];
        check(&any, &low, &[], &[], Some("b"));
        // A node it failed on is avoided while another is allowed, even a busier one.
        check(&a_b, &abc, &[running_on("b", None)], &["a"], Some("b"));
        // When it failed everywhere allowed, the node it failed on least recently.
        check(&a_b, &abc, &[], &["a", "b"], Some("a"));
        check(&a_b, &abc, &[], &["b", "a"], Some("b"));
    }

    #[test]
    fn another_node_never_gets_a_generation_sent_before() {
        let [a, b] = [NodeName::from_static("a"), NodeName::from_static("b")];
        let mut history = History::default();
        // (wanted, to) → sent
        let steps = [
            (1, &a, 1), // first placement
            (1, &a, 1), // the same node again (a repeat it answers with its copy)
            (1, &b, 2), // another node: above what a may hold
            (2, &b, 2),
            (3, &b, 3), // its copy failed: the next generation
            (2, &a, 4), // back to a with an old wish: still above everything sent
            (9, &a, 9),
        ];
        for (i, (wanted, to, sent)) in steps.into_iter().enumerate() {
            assert_eq!(history.reserve(wanted, to), sent, "step {i}");
        }
        assert_eq!(history.peek(1, None), 10, "a held record's generation");
        // A replaced copy (new spec): the next one is above it, on the same node too.
        history.supersede(9);
        assert_eq!(history.reserve(1, &a), 10);
    }

    #[test]
    fn failures_are_noted_once_per_generation_most_recent_last() {
        let [a, b] = [NodeName::from_static("a"), NodeName::from_static("b")];
        let mut history = History::default();
        history.failed(1, &a);
        history.failed(2, &b);
        // The failed record of generation 1 is seen again on the next pass: nothing changes,
        // so a (failed on least recently) is tried next.
        history.failed(1, &a);
        assert_eq!(history.failed_on, [a.clone(), b.clone()]);
        history.failed(3, &a);
        assert_eq!(history.failed_on, [b.clone(), a.clone()]);
        // Marks are per node: a later failure of an older generation elsewhere still counts
        // (a move's copy that never showed up, then the old copy failing).
        history.failed(5, &b);
        history.failed(4, &a);
        assert_eq!(history.failed_on, [b, a]);
    }
}
