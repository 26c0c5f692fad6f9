//! The supervisor: one task per process that deploys it, starts it in its own process group,
//! watches it (exit, health, requests) and applies `lifecycle`'s decisions. Every change of a
//! record is written to the store before anyone can read it from the API.
//!
//! Commands run as `sh -c START` with stdout and stderr appended to the process's log file, so
//! a process outlives the agent; when the agent starts again it re-adopts what still runs (same
//! pid and start time, or found by its `P2F_PROCESS_ID` and `P2F_GENERATION`), and starts again,
//! with the same id and port, what should run but does not.
//!
//! Here: the [`Supervisor`] handle and its registry of slots (spin, kill, remove, find, list).
//! `task` is one process's life, `spawn` the one `sh -c` builder, `recover` what happens to the
//! records when the agent starts again.
//!
//! No durable write happens under the slots lock, so that reads (the API's list, the mesh
//! publisher) never wait for an fsync: a write about an id claims the id under the lock, runs
//! off it, and is applied under the lock again (`Claim`).

mod recover;
pub(super) mod spawn;
mod task;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use p2f_model::{Invalid, NodeRef, Process, ProcessId, ProcessKey, ProcessSpec, Status, Timestamp};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::config::SupervisorConfig;
use super::contain::{Cell, Containment};
use super::lifecycle;
use super::logs::Logs;
use super::os;
use super::relay::Relay;
use super::strategy::DeployOptions;
use crate::records::listing::Listed;
use crate::store::{Entry, Local, Store, StoreError};
use task::Begin;

/// How long after SIGKILL a process group may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The current time as a record timestamp.
fn now() -> Timestamp {
    Timestamp::now()
}

/// Why a request to the supervisor was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// The spec breaks rules.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// No process has this id.
    #[error("no process {0}")]
    NotFound(ProcessId),
    /// A process with this id is not stopped or failed here, with another generation or spec
    /// (a spin of the same generation and spec answers the existing record instead).
    #[error("process {id} is {} here; kill it first", status.name())]
    Exists { id: ProcessId, status: Status },
    /// Another process of this node that is not stopped or failed has the port.
    #[error("port {port} is used by {by} ({service}) on this node")]
    PortTaken {
        port: u16,
        by: ProcessId,
        service: String,
    },
    /// The process was spun again while it was being removed; the new one stays.
    #[error("process {id} was started again while it was being removed")]
    StartedAgain { id: ProcessId },
    /// The record could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The agent is shutting down.
    #[error("the agent is shutting down")]
    ShuttingDown,
}

/// What a process's task is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Desired {
    /// Keep it running.
    Run,
    /// Stop it and keep the record.
    Stop,
    /// Leave it running and let go (the agent is shutting down).
    Detach,
}

/// What [`Supervisor::start`] does with a record that should run but does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Start it again now (a node on its own, or the root, which alone places processes).
    Restart,
    /// Wait for [`Supervisor::unpark`]: a member that was away must first hear whether the
    /// network replaced it, so that a stale copy never runs beside the newer one.
    Park,
}

/// How the supervisor lets go of its processes when the agent stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Processes keep running; the next agent re-adopts them (a daemon restart).
    Detach,
    /// Every process is stopped (the embedded network's Ctrl-C).
    StopAll,
}

/// Who looks after a slot's process.
#[derive(Debug)]
enum Runner {
    /// Its task (a finished handle once the task returned).
    Task(JoinHandle<()>),
    /// Recovered, to be started again once the network has said it was not replaced
    /// ([`Supervisor::unpark`]); no task runs it yet. Its record says `Parked`.
    Parked,
    /// Nobody: it ended, or [`Supervisor::shutdown`] took its task.
    Idle,
}

/// One process of this node.
#[derive(Debug)]
struct Slot {
    /// The record as it is on disk; changed only through [`Slot::update`].
    entry: Entry,
    desired: watch::Sender<Desired>,
    runner: Runner,
    /// The record as listed, made when first asked for after a change.
    listed: Option<Listed>,
}

impl Slot {
    fn new(entry: Entry, desired: watch::Sender<Desired>, runner: Runner) -> Slot {
        Slot {
            entry,
            desired,
            runner,
            listed: None,
        }
    }

    fn process(&self) -> &Process {
        &self.entry.process
    }

    /// Changes the record; the listed copy is made again when next asked for.
    fn update(&mut self, change: impl FnOnce(&mut Entry)) {
        change(&mut self.entry);
        self.listed = None;
    }

    /// The record as listed (shared, encoded once per change).
    fn listed(&mut self) -> Listed {
        let process = &self.entry.process;
        self.listed
            .get_or_insert_with(|| Listed::new(process.clone()))
            .clone()
    }

    /// Takes its task, if it has one (the slot is left `Idle`).
    fn take_task(&mut self) -> Option<JoinHandle<()>> {
        match std::mem::replace(&mut self.runner, Runner::Idle) {
            Runner::Task(task) => Some(task),
            other => {
                self.runner = other;
                None
            }
        }
    }
}

/// A durable write about an id, running off the lock.
#[derive(Debug)]
enum Writing {
    /// A spin's new record: no slot shows it yet (reads see only what is on disk), but its port
    /// is already taken.
    Placing(Box<Process>),
    /// A change of the slot's own record: a parked process is stopped, or a record forgotten.
    Changing,
}

/// The slots and the writes in flight, under one lock.
#[derive(Debug, Default)]
struct Registry {
    slots: HashMap<ProcessId, Slot>,
    /// While an id is here nothing else changes it: a spin, kill or remove of it waits
    /// ([`Inner::lock_settled`]), unpark skips it, shutdown waits for all to end.
    writing: HashMap<ProcessId, Writing>,
    /// Records whose last write failed (a full disk): written again by housekeeping until
    /// one succeeds, so the file catches up with the slot once the disk does.
    unsaved: std::collections::HashSet<ProcessId>,
}

/// What a spin meets in the registry.
#[derive(Debug, Clone, PartialEq)]
enum Admission {
    /// The same generation and spec is already here: the spin answers this record.
    Existing(Box<Process>),
    /// A new record, with this generation.
    New { generation: u64 },
}

impl Registry {
    /// What a spin of `id` for `spec` at `generation` (default 1) meets: the existing record, a
    /// conflict, or a new record's generation (above any stopped or failed one of the same id).
    fn admit(
        &self,
        id: &ProcessId,
        spec: &ProcessSpec,
        generation: Option<u64>,
    ) -> Result<Admission, SupervisorError> {
        let mut generation = generation.unwrap_or(1);
        if let Some(old) = self.slots.get(id).map(Slot::process) {
            if !old.status.is_final() {
                if old.generation == generation && old.spec == *spec {
                    return Ok(Admission::Existing(Box::new(old.clone())));
                }
                return Err(SupervisorError::Exists {
                    id: id.clone(),
                    status: old.status.clone(),
                });
            }
            generation = generation.max(old.generation + 1);
        }
        if let Some(port) = spec.port()
            && let Some(user) = self.port_user(port, id)
        {
            return Err(SupervisorError::PortTaken {
                port,
                by: user.id.clone(),
                service: user.name().to_owned(),
            });
        }
        Ok(Admission::New { generation })
    }

    /// A process other than `id`, not stopped or failed, that has `port`: in a slot, or being
    /// placed.
    fn port_user(&self, port: u16, id: &ProcessId) -> Option<&Process> {
        let placing = self.writing.values().filter_map(|w| match w {
            Writing::Placing(process) => Some(&**process),
            Writing::Changing => None,
        });
        self.slots
            .values()
            .map(Slot::process)
            .chain(placing)
            .find(|p| p.id != *id && p.port == Some(port) && !p.status.is_final())
    }

    /// Whether `id` waits for [`Supervisor::unpark`] (and no write about it is in flight).
    fn is_parked(&self, id: &ProcessId) -> bool {
        !self.writing.contains_key(id)
            && self
                .slots
                .get(id)
                .is_some_and(|s| matches!(s.runner, Runner::Parked))
    }
}

/// An id in [`Registry::writing`] while its durable write runs off the lock. It is released
/// under the lock together with the change it made ([`Claim::release`]) or, should its holder
/// unwind, when dropped; either way every waiter is woken. No claim is held across an `.await`,
/// so a wait for one lasts at most one write and cannot stall a current-thread runtime.
struct Claim<'a> {
    inner: &'a Inner,
    id: ProcessId,
    released: bool,
}

impl<'a> Claim<'a> {
    fn take(
        inner: &'a Inner,
        registry: &mut Registry,
        id: ProcessId,
        writing: Writing,
    ) -> Claim<'a> {
        registry.writing.insert(id.clone(), writing);
        Claim {
            inner,
            id,
            released: false,
        }
    }

    fn id(&self) -> &ProcessId {
        &self.id
    }

    fn release(mut self, registry: &mut Registry) {
        registry.writing.remove(&self.id);
        self.inner.settled.notify_all();
        self.released = true;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.released {
            self.inner.lock().writing.remove(&self.id);
            self.inner.settled.notify_all();
        }
    }
}

struct Inner {
    node: NodeRef,
    store: Arc<Store>,
    logs: Logs,
    /// How its processes are contained (their cgroups).
    containment: Containment,
    bundles: PathBuf,
    settings: SupervisorConfig,
    deploy: DeployOptions,
    registry: Mutex<Registry>,
    /// Signalled whenever a [`Claim`] is released.
    settled: Condvar,
    /// Bumped after every record change; waiters and the mesh watch it.
    version: watch::Sender<u64>,
    closing: AtomicBool,
}

/// The supervisor of one node's processes.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// Opens the supervisor over `store`: re-adopts what still runs, starts again what should
    /// run but does not (or, with [`Recovery::Park`], waits for [`Supervisor::unpark`] to),
    /// and keeps every other record as it is.
    pub fn start(
        node: NodeRef,
        store: Arc<Store>,
        data_dir: &std::path::Path,
        settings: SupervisorConfig,
        deploy: DeployOptions,
        recovery: Recovery,
    ) -> Result<Supervisor, StoreError> {
        let logs = Logs::new(data_dir.join("logs"), settings.log_keep);
        let (version, _) = watch::channel(0);
        let containment = Containment::detect(&node.name, data_dir, settings.containment);
        tracing::info!("processes are contained by {}", containment.describe());
        let supervisor = Supervisor {
            inner: Arc::new(Inner {
                node,
                store,
                logs,
                containment,
                bundles: data_dir.join("bundles"),
                settings,
                deploy,
                registry: Mutex::new(Registry::default()),
                settled: Condvar::new(),
                version,
                closing: AtomicBool::new(false),
            }),
        };
        for entry in supervisor.inner.store.all()? {
            supervisor.recover(entry, recovery)?;
        }
        supervisor.kill_unrecorded();
        tokio::spawn(housekeeping(Arc::downgrade(&supervisor.inner)));
        Ok(supervisor)
    }

    /// Kills what runs in a cell that no record names (its record was lost with a damaged
    /// store, or deleted while the agent was away): nothing the node cannot account for keeps
    /// running, holding ports, under its name.
    fn kill_unrecorded(&self) {
        let known: std::collections::HashSet<String> = self
            .inner
            .lock()
            .slots
            .keys()
            .map(|id| id.as_str().to_owned())
            .collect();
        for (name, cell) in self.inner.containment.cells() {
            if known.contains(&name) {
                continue;
            }
            if cell.populated(0) {
                tracing::warn!(cell = %name, "processes in a cell no record names: killed");
            }
            cell.kill(0);
            cell.remove();
        }
    }

    /// Whether a recovered process still waits for [`Supervisor::unpark`].
    pub fn is_parked(&self, id: &ProcessId) -> bool {
        self.inner.lock().is_parked(id)
    }

    /// The node this supervisor runs on.
    pub fn node(&self) -> &NodeRef {
        &self.inner.node
    }

    /// Where the process logs are.
    pub fn logs(&self) -> &Logs {
        &self.inner.logs
    }

    /// How this node contains its processes.
    pub fn containment(&self) -> &Containment {
        &self.inner.containment
    }

    /// Every record of this node as listed (shared, encoded once per change), sorted by id.
    pub fn listed(&self) -> Vec<Listed> {
        let mut all = self.listed_in_any_order();
        all.sort_by(|a, b| a.process().id.cmp(&b.process().id));
        all
    }

    /// Every record of this node as listed, in no particular order (for a caller that sorts
    /// them with others anyway: sorting ten thousand twice shows in a list's latency).
    pub fn listed_in_any_order(&self) -> Vec<Listed> {
        self.inner
            .lock()
            .slots
            .values_mut()
            .map(Slot::listed)
            .collect()
    }

    /// How many records this node has.
    pub fn len(&self) -> usize {
        self.inner.lock().slots.len()
    }

    /// Whether this node has no record.
    pub fn is_empty(&self) -> bool {
        self.inner.lock().slots.is_empty()
    }

    /// Every record of this node, sorted by id.
    pub fn list(&self) -> Vec<Process> {
        let mut all: Vec<Process> = self
            .inner
            .lock()
            .slots
            .values()
            .map(|s| s.process().clone())
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The record that `key` names.
    pub fn find(&self, key: &ProcessKey) -> Option<Process> {
        let registry = self.inner.lock();
        if let ProcessKey::Id(id) = key {
            return registry.slots.get(id).map(|s| s.process().clone());
        }
        // A domain may have old stopped records too: prefer the live one.
        let mut found: Vec<&Process> = registry
            .slots
            .values()
            .map(Slot::process)
            .filter(|p| p.matches(key))
            .collect();
        found.sort_by_key(|p| (p.status.is_final(), std::cmp::Reverse(p.generation)));
        found.first().map(|p| (*p).clone())
    }

    /// A receiver that changes after every record change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.version.subscribe()
    }

    /// Records and starts a process for `spec`. The record is on disk when this returns.
    pub fn spin(
        &self,
        spec: ProcessSpec,
        id: Option<ProcessId>,
        generation: Option<u64>,
    ) -> Result<Process, SupervisorError> {
        self.spin_moved(spec, id, generation, None, None)
    }

    /// [`Supervisor::spin`] of a process the root moved here from node `from` (a migration or
    /// a failover): its history says so after `placed`.
    pub fn spin_moved(
        &self,
        spec: ProcessSpec,
        id: Option<ProcessId>,
        generation: Option<u64>,
        from: Option<p2f_model::NodeName>,
        external: Option<String>,
    ) -> Result<Process, SupervisorError> {
        spec.validate()?;
        let id = id.unwrap_or_else(|| ProcessId::for_service(spec.name(), rand::random()));
        let (claim, entry) = {
            let mut registry = self.inner.lock_settled(&id);
            // Checked under the lock: once `shutdown` has waited for the placements already
            // claimed, none is admitted any more.
            if self.inner.closing.load(Ordering::SeqCst) {
                return Err(SupervisorError::ShuttingDown);
            }
            let generation = match registry.admit(&id, &spec, generation)? {
                Admission::Existing(process) => return Ok(*process),
                Admission::New { generation } => generation,
            };
            let at = now();
            let mut process =
                Process::placed(id.clone(), generation, spec, self.inner.node.clone(), at);
            process.external = external;
            if let Some(from) = from {
                let to = self.inner.node.name.clone();
                process.record(at, p2f_model::EventKind::Moved { from, to });
            }
            let placing = Writing::Placing(Box::new(process.clone()));
            let claim = Claim::take(&self.inner, &mut registry, id.clone(), placing);
            (
                claim,
                Entry {
                    process,
                    local: None,
                },
            )
        };
        // On disk before the slot shows it and before the caller answers; off the lock.
        let written = self.inner.store.put(&entry);
        let mut registry = self.inner.lock();
        claim.release(&mut registry);
        written?;
        let (desired, rx) = watch::channel(Desired::Run);
        let task = tokio::spawn(task::run(
            self.inner.clone(),
            entry.clone(),
            rx,
            Begin::Fresh,
        ));
        let process = entry.process.clone();
        let slot = Slot::new(entry, desired, Runner::Task(task));
        if let Some(mut old) = registry.slots.insert(id, slot)
            && let Some(task) = old.take_task()
        {
            task.abort();
        }
        drop(registry);
        self.inner.bump();
        Ok(process)
    }

    /// Waits until `id`'s record satisfies `done`, up to `timeout`; returns the last record.
    pub async fn wait_for(
        &self,
        id: &ProcessId,
        timeout: Duration,
        done: impl Fn(&Process) -> bool,
    ) -> Option<Process> {
        let mut changes = self.changes();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = self.find(&ProcessKey::Id(id.clone()))?;
            if done(&current) {
                return Some(current);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Some(current),
            }
        }
    }

    /// Stops a process (its stop command, or SIGTERM then SIGKILL after its grace) and keeps
    /// its record as `Stopped`. Returns the record once it is stopped.
    pub async fn kill(&self, id: &ProcessId) -> Result<Process, SupervisorError> {
        let grace = {
            let mut registry = self.inner.lock_settled(id);
            let slot = registry
                .slots
                .get_mut(id)
                .ok_or_else(|| SupervisorError::NotFound(id.clone()))?;
            match &slot.runner {
                Runner::Parked => return self.stop_parked(registry, id),
                Runner::Task(task) if !task.is_finished() => {}
                Runner::Task(_) | Runner::Idle => return Ok(slot.process().clone()),
            }
            slot.desired.send_replace(Desired::Stop);
            slot.process().spec.grace()
        };
        let wait = grace + KILL_WAIT + Duration::from_secs(1);
        self.wait_for(id, wait, |p| p.status.is_final())
            .await
            .ok_or_else(|| SupervisorError::NotFound(id.clone()))
    }

    /// Stops a parked process where it is (it never started again): `Stopped`, written off the
    /// lock; it stays parked if the write fails.
    fn stop_parked(
        &self,
        mut registry: MutexGuard<'_, Registry>,
        id: &ProcessId,
    ) -> Result<Process, SupervisorError> {
        let Some(slot) = registry.slots.get(id) else {
            return Err(SupervisorError::NotFound(id.clone()));
        };
        let mut stopped = slot.entry.clone();
        lifecycle::on_stopped(&mut stopped.process, now());
        let claim = Claim::take(&self.inner, &mut registry, id.clone(), Writing::Changing);
        drop(registry);
        let written = self.inner.store.put(&stopped);
        let mut registry = self.inner.lock();
        claim.release(&mut registry);
        written?;
        if let Some(slot) = registry.slots.get_mut(id) {
            slot.runner = Runner::Idle;
            slot.update(|entry| *entry = stopped.clone());
        }
        drop(registry);
        self.inner.bump();
        Ok(stopped.process)
    }

    /// Stops a process and forgets it: its record, bundle and logs are deleted.
    pub async fn remove(&self, id: &ProcessId) -> Result<(), SupervisorError> {
        let killed = self.kill(id).await?;
        // Still the record that was killed (not a new spin of the same id meanwhile)?
        let ours = |slot: &Slot| {
            slot.process().generation == killed.generation && slot.process().status.is_final()
        };
        let task = {
            let mut registry = self.inner.lock_settled(id);
            match registry.slots.get_mut(id) {
                None => return Ok(()),
                Some(slot) if !ours(slot) => {
                    return Err(SupervisorError::StartedAgain { id: id.clone() });
                }
                Some(slot) => slot.take_task(),
            }
        };
        if let Some(task) = task {
            let _ = task.await;
        }
        // Deleted off the lock under a claim: a spin of the same id waits for it, so its new
        // record is never the one deleted.
        let claim = {
            let mut registry = self.inner.lock_settled(id);
            match registry.slots.get(id) {
                None => return Ok(()),
                Some(slot) if !ours(slot) => {
                    return Err(SupervisorError::StartedAgain { id: id.clone() });
                }
                Some(_) => Claim::take(&self.inner, &mut registry, id.clone(), Writing::Changing),
            }
        };
        let forgotten = self.inner.forget(id);
        let mut registry = self.inner.lock();
        claim.release(&mut registry);
        forgotten?;
        registry.slots.remove(id);
        drop(registry);
        self.inner.bump();
        Ok(())
    }

    /// Lets go of every process: leaves them running for the next agent, or stops them.
    pub async fn shutdown(&self, how: Shutdown) {
        self.inner.closing.store(true, Ordering::SeqCst);
        let desired = match how {
            Shutdown::Detach => Desired::Detach,
            Shutdown::StopAll => Desired::Stop,
        };
        let tasks: Vec<JoinHandle<()>> = {
            // Spins admitted before `closing` was set finish first (their tasks are told here
            // too); no spin is admitted after, and `unpark` starts nothing after this lock.
            let mut registry = self.inner.lock_all_settled();
            registry
                .slots
                .values_mut()
                .filter_map(|slot| {
                    slot.desired.send_replace(desired);
                    slot.take_task()
                })
                .collect()
        };
        for task in tasks {
            let _ = task.await;
        }
        // Gone when every process stopped; kept (with the cells) when they run on.
        self.inner.containment.remove_if_empty();
    }
}

impl Inner {
    /// The relay settings of a process in `cell` (its command and user are the shell's).
    fn relay_for(&self, id: &ProcessId, cell: &Cell) -> Relay {
        Relay {
            log: self.logs.path(id),
            max_bytes: self.settings.log_max_bytes,
            keep: self.settings.log_keep,
            exit: self.logs.exit_path(id),
            cgroup: cell.cgroup().map(std::path::Path::to_path_buf),
            user: None,
            command: Vec::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The lock, once no write about `id` is in flight.
    fn lock_settled(&self, id: &ProcessId) -> MutexGuard<'_, Registry> {
        self.settled
            .wait_while(self.lock(), |registry| registry.writing.contains_key(id))
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The lock, once no write is in flight.
    fn lock_all_settled(&self) -> MutexGuard<'_, Registry> {
        self.settled
            .wait_while(self.lock(), |registry| !registry.writing.is_empty())
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Deletes what this node keeps of `id`: its record, logs and bundle.
    fn forget(&self, id: &ProcessId) -> Result<(), StoreError> {
        self.store.remove(id)?;
        self.logs.remove(id);
        self.containment.cell(id).remove();
        let _ = std::fs::remove_dir_all(self.bundles.join(id.as_str()));
        Ok(())
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Writes `entry` durably (off the runtime's threads), then makes it what the API answers.
    async fn commit(self: &Arc<Self>, entry: &Entry) {
        let store = self.store.clone();
        let copy = entry.clone();
        let written = tokio::task::spawn_blocking(move || store.put(&copy)).await;
        let saved = match written {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!(id = %entry.process.id, "record not saved (tried again later): {e}");
                false
            }
            Err(e) => {
                tracing::error!(id = %entry.process.id, "record not saved (tried again later): {e}");
                false
            }
        };
        let mut registry = self.lock();
        if saved {
            registry.unsaved.remove(&entry.process.id);
        } else {
            registry.unsaved.insert(entry.process.id.clone());
        }
        let slot = registry
            .slots
            .get_mut(&entry.process.id)
            .filter(|s| s.process().generation == entry.process.generation);
        if let Some(slot) = slot {
            slot.update(|current| {
                // The memory figure is refreshed on the slot by housekeeping; keep it while
                // running.
                let memory = current.process.memory_bytes;
                *current = entry.clone();
                if entry.process.is_running() && entry.process.memory_bytes == 0 {
                    current.process.memory_bytes = memory;
                }
            });
        }
        drop(registry);
        self.bump();
    }
}

/// Refreshes memory usage and rotates logs, every `memory_interval`, while the supervisor lives.
/// Writes again the records whose last write failed, as the slots hold them now.
async fn save_unsaved(inner: &Arc<Inner>) {
    let pending: Vec<Entry> = {
        let registry = inner.lock();
        registry
            .unsaved
            .iter()
            .filter(|id| !registry.writing.contains_key(*id))
            .filter_map(|id| registry.slots.get(id).map(|slot| slot.entry.clone()))
            .collect()
    };
    for entry in pending {
        let store = inner.store.clone();
        let copy = entry.clone();
        let written = tokio::task::spawn_blocking(move || store.put(&copy)).await;
        if matches!(written, Ok(Ok(()))) {
            tracing::info!(id = %entry.process.id, "record saved after an earlier failure");
            let mut registry = inner.lock();
            // Unless it changed meanwhile (and its own write failed again).
            if registry.slots.get(&entry.process.id).map(|s| &s.entry) == Some(&entry) {
                registry.unsaved.remove(&entry.process.id);
            }
        }
    }
}

async fn housekeeping(inner: std::sync::Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(inner) => inner.settings.memory_interval,
        None => return,
    };
    let mut ticker = tokio::time::interval(period);
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        save_unsaved(&inner).await;
        let running: Vec<(ProcessId, Local, Option<u16>)> = {
            let registry = inner.lock();
            registry
                .slots
                .values()
                .filter(|s| s.process().is_running())
                .filter_map(|s| {
                    let process = s.process();
                    s.entry.local.map(|l| (process.id.clone(), l, process.port))
                })
                .collect()
        };
        if running.is_empty() {
            continue;
        }
        // Everything in its cell counts (helpers, health checks); a process from before cells,
        // its group. And where its port really is bound.
        let containment = inner.containment.clone();
        let query = running.clone();
        let facts = tokio::task::spawn_blocking(move || {
            // The socket tables once for every process of the pass.
            let listening = os::Listening::read();
            query
                .iter()
                .map(|(id, local, port)| {
                    let members = containment.cell(id).members(local.relay);
                    let memory = if members.is_empty() {
                        os::group_rss(&[local.pgid])
                            .get(&local.pgid)
                            .copied()
                            .unwrap_or(0)
                    } else {
                        os::rss_of(&members)
                    };
                    let listen = port
                        .and_then(|port| listening.address(port))
                        .map(|address| address.to_string());
                    (memory, listen)
                })
                .collect::<Vec<(u64, Option<String>)>>()
        })
        .await
        .unwrap_or_default();
        let mut registry = inner.lock();
        for ((id, _, _), (memory, listen)) in running.iter().zip(facts) {
            if let Some(slot) = registry.slots.get_mut(id)
                && slot.process().is_running()
                && (slot.process().memory_bytes != memory || slot.process().listen != listen)
            {
                slot.update(|entry| {
                    entry.process.memory_bytes = memory;
                    entry.process.listen = listen;
                });
            }
        }
    }
}
