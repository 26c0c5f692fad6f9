//! The supervisor: one task per process that deploys it, starts it in its own process group,
//! watches it (exit, health, requests) and applies `lifecycle`'s decisions. Every change of a
//! record is written to the store before anyone can read it from the API.
//!
//! Commands run as `sh -c START` with stdout and stderr appended to the process's log file, so
//! a process outlives the agent; when the agent starts again it re-adopts what still runs (same
//! pid and start time, or found by its `P2F_PROCESS_ID` and `P2F_GENERATION`), and starts again,
//! with the same id and port, what should run but does not.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use p2f_model::{
    EventKind, Failure, Health, Invalid, NodeRef, Process, ProcessId, ProcessKey, ProcessSpec,
    Status, Timestamp,
};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::config::SupervisorConfig;
use super::health;
use super::lifecycle::{self, Action, Exit, ExitContext};
use super::logs::Logs;
use super::os;
use super::strategy::{self, DeployOptions, Prepared};
use crate::records::listing::Listed;
use crate::store::{Entry, Local, Store, StoreError};

/// A process that ran this long without a health check counts as healthy again (its restarts in
/// a row start over).
const MIN_UPTIME: Duration = Duration::from_secs(10);
/// How often a process is checked until it is first healthy.
const STARTUP_CHECK: Duration = Duration::from_millis(250);
/// How often a re-adopted process (not our child) is looked at.
const ADOPTED_POLL: Duration = Duration::from_millis(500);
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
    /// The request conflicts with what runs.
    #[error("{0}")]
    Conflict(String),
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

struct Slot {
    entry: Entry,
    desired: watch::Sender<Desired>,
    task: Option<JoinHandle<()>>,
    /// Recovered, to be started again once the network has said it was not replaced
    /// ([`Supervisor::unpark`]); no task runs it yet.
    parked: bool,
    /// The record as listed, made when first asked for after a change.
    listed: Option<Listed>,
}

impl Slot {
    fn new(entry: Entry, desired: watch::Sender<Desired>, task: Option<JoinHandle<()>>) -> Slot {
        Slot {
            entry,
            desired,
            task,
            parked: false,
            listed: None,
        }
    }
}

struct Inner {
    node: NodeRef,
    store: Arc<Store>,
    logs: Logs,
    bundles: PathBuf,
    settings: SupervisorConfig,
    deploy: DeployOptions,
    slots: Mutex<HashMap<ProcessId, Slot>>,
    /// Bumped after every record change; waiters and (later) the mesh watch it.
    version: watch::Sender<u64>,
    closing: std::sync::atomic::AtomicBool,
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

/// How a process's task begins.
#[derive(Debug, Clone, Copy)]
enum Begin {
    /// Deploy (unless done) and start it.
    Fresh,
    /// It already runs: watch it.
    Adopt(Local),
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
        let logs = Logs::new(
            data_dir.join("logs"),
            settings.log_max_bytes,
            settings.log_keep,
        );
        let (version, _) = watch::channel(0);
        let supervisor = Supervisor {
            inner: Arc::new(Inner {
                node,
                store,
                logs,
                bundles: data_dir.join("bundles"),
                settings,
                deploy,
                slots: Mutex::new(HashMap::new()),
                version,
                closing: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        for entry in supervisor.inner.store.all()? {
            supervisor.recover(entry, recovery)?;
        }
        tokio::spawn(housekeeping(Arc::downgrade(&supervisor.inner)));
        Ok(supervisor)
    }

    /// Decides what to do with one stored record after a restart of the agent.
    fn recover(&self, mut entry: Entry, recovery: Recovery) -> Result<(), StoreError> {
        let process = &entry.process;
        let live = entry
            .local
            .filter(|l| os::is_same_process(l.pgid, l.start_ticks))
            .or_else(|| find_orphan(process));
        let begin = match (&process.status, live) {
            (Status::Stopped | Status::Failed(_), _) => None,
            (Status::Stopping, None) => {
                lifecycle::on_stopped(&mut entry.process, now());
                entry.local = None;
                self.inner.store.put(&entry)?;
                None
            }
            (_, Some(local)) => {
                tracing::info!(id = %process.id, pid = local.pgid, "re-adopted a running process");
                if matches!(entry.process.status, Status::Pending | Status::Deploying) {
                    // The agent died between starting it and recording that it runs.
                    let at = now();
                    entry.process.status = Status::Running;
                    entry.process.started_at = Some(at);
                    entry
                        .process
                        .record(at, EventKind::Started { pid: local.pgid });
                }
                entry.process.pid = Some(local.pgid);
                entry.local = Some(local);
                self.inner.store.put(&entry)?;
                Some(Begin::Adopt(local))
            }
            (_, None) => {
                if process.status == Status::Running {
                    tracing::warn!(id = %process.id, "ended while the agent was down; starting it again");
                    entry.process.last_failure = Some(Failure::Vanished);
                    entry.process.record(
                        now(),
                        EventKind::Exited {
                            failure: Failure::Vanished,
                        },
                    );
                }
                entry.process.status = Status::Pending;
                entry.process.pid = None;
                entry.local = None;
                self.inner.store.put(&entry)?;
                Some(Begin::Fresh)
            }
        };
        let stopping = entry.process.status == Status::Stopping;
        let (desired, rx) = watch::channel(if stopping {
            Desired::Stop
        } else {
            Desired::Run
        });
        let parked = matches!(begin, Some(Begin::Fresh)) && recovery == Recovery::Park;
        let task = begin
            .filter(|_| !parked)
            .map(|b| tokio::spawn(run(self.inner.clone(), entry.clone(), rx, b)));
        if parked {
            tracing::info!(id = %entry.process.id, generation = entry.process.generation, "waiting for the network before starting it again");
        }
        let id = entry.process.id.clone();
        let mut slot = Slot::new(entry, desired, task);
        slot.parked = parked;
        self.slots().insert(id, slot);
        Ok(())
    }

    /// Starts the processes recovery parked, except those `replaced` names (with the reason):
    /// another node runs a newer generation, so this copy is forgotten without ever starting
    /// (its record, bundle and logs are deleted).
    pub fn unpark(&self, replaced: impl Fn(&Process) -> Option<String>) {
        // Decided without the slots lock (`replaced` may take other locks), then applied to
        // the slots still parked at the same generation.
        let parked: Vec<Process> = self
            .slots()
            .values()
            .filter(|slot| slot.parked)
            .map(|slot| slot.entry.process.clone())
            .collect();
        let verdicts: Vec<(Process, Option<String>)> = parked
            .into_iter()
            .map(|process| {
                let reason = replaced(&process);
                (process, reason)
            })
            .collect();
        let mut forgotten = false;
        let mut slots = self.slots();
        // Under the lock `shutdown` takes to collect the tasks: no task starts after it.
        if self.inner.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        for (process, reason) in verdicts {
            let id = &process.id;
            let Some(slot) = slots
                .get_mut(id)
                .filter(|s| s.parked && s.entry.process.generation == process.generation)
            else {
                continue;
            };
            slot.parked = false;
            if let Some(reason) = reason {
                tracing::warn!(%id, generation = process.generation, "not started again: {reason}");
                // Deleted under the lock, so that a spin of the same id cannot come in between.
                slots.remove(id);
                if let Err(e) = self.inner.forget(id) {
                    tracing::warn!(%id, "cannot delete the replaced record: {e}");
                }
                forgotten = true;
                continue;
            }
            tracing::info!(%id, "starting it again");
            let rx = slot.desired.subscribe();
            slot.task = Some(tokio::spawn(run(
                self.inner.clone(),
                slot.entry.clone(),
                rx,
                Begin::Fresh,
            )));
        }
        drop(slots);
        if forgotten {
            self.inner.bump();
        }
    }

    /// Whether a recovered process still waits for [`Supervisor::unpark`].
    pub fn is_parked(&self, id: &ProcessId) -> bool {
        self.slots().get(id).is_some_and(|s| s.parked)
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<ProcessId, Slot>> {
        self.inner.slots()
    }

    /// The node this supervisor runs on.
    pub fn node(&self) -> &NodeRef {
        &self.inner.node
    }

    /// Where the process logs are.
    pub fn logs(&self) -> &Logs {
        &self.inner.logs
    }

    /// Every record of this node as listed (shared, encoded once per change), sorted by id.
    pub fn listed(&self) -> Vec<Listed> {
        let mut all: Vec<Listed> = self
            .slots()
            .values_mut()
            .map(|slot| {
                slot.listed
                    .get_or_insert_with(|| Listed::new(slot.entry.process.clone()))
                    .clone()
            })
            .collect();
        all.sort_by(|a, b| a.process().id.cmp(&b.process().id));
        all
    }

    /// How many records this node has.
    pub fn len(&self) -> usize {
        self.slots().len()
    }

    /// Whether this node has no record.
    pub fn is_empty(&self) -> bool {
        self.slots().is_empty()
    }

    /// Every record of this node, sorted by id.
    pub fn list(&self) -> Vec<Process> {
        let mut all: Vec<Process> = self
            .slots()
            .values()
            .map(|s| s.entry.process.clone())
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The record that `key` names.
    pub fn find(&self, key: &ProcessKey) -> Option<Process> {
        let slots = self.slots();
        if let ProcessKey::Id(id) = key {
            return slots.get(id).map(|s| s.entry.process.clone());
        }
        // A domain may have old stopped records too: prefer the live one.
        let mut found: Vec<&Process> = slots
            .values()
            .map(|s| &s.entry.process)
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
        spec.validate()?;
        let id = id.unwrap_or_else(|| ProcessId::for_service(spec.name(), rand::random()));
        let mut slots = self.slots();
        // Under the lock `shutdown` takes to collect the tasks: no task starts after it.
        if self.inner.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(SupervisorError::ShuttingDown);
        }
        let mut generation = generation.unwrap_or(1);
        if let Some(old) = slots.get(&id) {
            let old = &old.entry.process;
            if !old.status.is_final() {
                if old.generation == generation && old.spec == spec {
                    return Ok(old.clone());
                }
                return Err(SupervisorError::Conflict(format!(
                    "process {id} is {} here; kill it first",
                    old.status.name()
                )));
            }
            generation = generation.max(old.generation + 1);
        }
        if let Some(port) = spec.port()
            && let Some(user) = slots
                .values()
                .map(|s| &s.entry.process)
                .find(|p| p.id != id && p.port == Some(port) && !p.status.is_final())
        {
            return Err(SupervisorError::Conflict(format!(
                "port {port} is used by {} ({}) on this node",
                user.id,
                user.name()
            )));
        }
        let process = Process::placed(id.clone(), generation, spec, self.inner.node.clone(), now());
        let entry = Entry {
            process: process.clone(),
            local: None,
        };
        self.inner.store.put(&entry)?;
        let (desired, rx) = watch::channel(Desired::Run);
        let task = tokio::spawn(run(self.inner.clone(), entry.clone(), rx, Begin::Fresh));
        if let Some(old) = slots.insert(id, Slot::new(entry, desired, Some(task)))
            && let Some(task) = old.task
        {
            task.abort();
        }
        drop(slots);
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
            let mut slots = self.slots();
            let slot = slots
                .get_mut(id)
                .ok_or_else(|| SupervisorError::NotFound(id.clone()))?;
            if slot.parked {
                // Never started again: it is stopped where it is.
                slot.parked = false;
                lifecycle::on_stopped(&mut slot.entry.process, now());
                slot.listed = None;
                self.inner.store.put(&slot.entry)?;
                let stopped = slot.entry.process.clone();
                drop(slots);
                self.inner.bump();
                return Ok(stopped);
            }
            if slot.task.as_ref().is_none_or(|t| t.is_finished()) {
                return Ok(slot.entry.process.clone());
            }
            slot.desired.send_replace(Desired::Stop);
            slot.entry.process.spec.grace()
        };
        let wait = grace + KILL_WAIT + Duration::from_secs(1);
        self.wait_for(id, wait, |p| p.status.is_final())
            .await
            .ok_or_else(|| SupervisorError::NotFound(id.clone()))
    }

    /// Stops a process and forgets it: its record, bundle and logs are deleted.
    pub async fn remove(&self, id: &ProcessId) -> Result<(), SupervisorError> {
        let killed = self.kill(id).await?;
        let slot = {
            let mut slots = self.slots();
            match slots.get(id) {
                // A spin of the same id came in meanwhile: that one is not ours to delete.
                Some(slot)
                    if slot.entry.process.generation != killed.generation
                        || !slot.entry.process.status.is_final() =>
                {
                    return Err(SupervisorError::Conflict(format!(
                        "process {id} was started again while it was being removed"
                    )));
                }
                _ => slots.remove(id),
            }
        };
        if let Some(slot) = slot {
            if let Some(task) = slot.task {
                let _ = task.await;
            }
            self.inner.forget(id)?;
            self.inner.bump();
        }
        Ok(())
    }

    /// Lets go of every process: leaves them running for the next agent, or stops them.
    pub async fn shutdown(&self, how: Shutdown) {
        self.inner
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let desired = match how {
            Shutdown::Detach => Desired::Detach,
            Shutdown::StopAll => Desired::Stop,
        };
        let tasks: Vec<JoinHandle<()>> = {
            let mut slots = self.slots();
            slots
                .values_mut()
                .filter_map(|slot| {
                    slot.desired.send_replace(desired);
                    slot.task.take()
                })
                .collect()
        };
        for task in tasks {
            let _ = task.await;
        }
    }
}

impl Inner {
    fn slots(&self) -> MutexGuard<'_, HashMap<ProcessId, Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Deletes what this node keeps of `id`: its record, logs and bundle.
    fn forget(&self, id: &ProcessId) -> Result<(), StoreError> {
        self.store.remove(id)?;
        self.logs.remove(id);
        let _ = std::fs::remove_dir_all(self.bundles.join(id.as_str()));
        Ok(())
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Writes `entry` durably, then makes it what the API answers.
    async fn commit(self: &Arc<Self>, entry: &Entry) {
        let store = self.store.clone();
        let copy = entry.clone();
        let written = tokio::task::spawn_blocking(move || store.put(&copy)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(id = %entry.process.id, "record not saved: {e}"),
            Err(e) => tracing::error!(id = %entry.process.id, "record not saved: {e}"),
        }
        if let Some(slot) = self.slots().get_mut(&entry.process.id) {
            // The memory figure is refreshed on the slot by housekeeping; keep it while running.
            let memory = slot.entry.process.memory_bytes;
            slot.entry = entry.clone();
            slot.listed = None;
            if entry.process.is_running() && entry.process.memory_bytes == 0 {
                slot.entry.process.memory_bytes = memory;
            }
        }
        self.bump();
    }
}

/// A running process as its task sees it.
enum Running {
    /// Started by this agent: `wait` reports its exit status.
    Child(Child),
    /// Re-adopted: only its liveness can be seen.
    Adopted,
}

/// How watching a running process ended.
enum Outcome {
    Exited(ExitStatus),
    Vanished,
    HealthFailed(Failure),
    Stopped { timed_out: bool },
    Detached,
}

/// The life of one process, until it is stopped, given up on, or the agent lets go.
async fn run(inner: Arc<Inner>, entry: Entry, mut desired: watch::Receiver<Desired>, begin: Begin) {
    let mut entry = entry;
    let mut begin = begin;
    let mut in_a_row: u32 = 0;
    loop {
        let wanted = *desired.borrow();
        match wanted {
            Desired::Detach => return,
            Desired::Stop if matches!(begin, Begin::Fresh) => {
                lifecycle::on_stopped(&mut entry.process, now());
                entry.local = None;
                inner.commit(&entry).await;
                return;
            }
            _ => {}
        }
        let (mut running, local, prepared) = match begin {
            Begin::Adopt(local) => {
                let prepared = strategy::already_deployed(&inner.bundles, &entry.process)
                    .unwrap_or_else(|| Prepared {
                        bundle_dir: strategy::bundle_dir(&inner.bundles, &entry.process),
                        nix_out: None,
                    });
                (Running::Adopted, local, prepared)
            }
            Begin::Fresh => match launch(&inner, &mut entry, &mut desired).await {
                Ok(Some(started)) => started,
                Ok(None) => return,
                Err(failure) => {
                    let action =
                        lifecycle::on_failure(&mut entry.process, failure, in_a_row, now());
                    entry.local = None;
                    inner.commit(&entry).await;
                    match pause(action, &mut desired).await {
                        Some(()) => {
                            in_a_row += 1;
                            begin = Begin::Fresh;
                            continue;
                        }
                        None => {
                            finish_if_stop_requested(&inner, &mut entry, &desired).await;
                            return;
                        }
                    }
                }
            },
        };
        let oom_before = os::oom_kill_count();
        let started = Instant::now();
        let env = strategy::environment(&entry.process, &prepared);
        let outcome = watch_process(
            &inner,
            &mut entry,
            &mut running,
            local,
            &env,
            &prepared,
            &mut desired,
        )
        .await;
        if started.elapsed() >= MIN_UPTIME || entry.process.passed_health_check() {
            in_a_row = 0;
        }
        let now = now();
        let action = match outcome {
            Outcome::Detached => return,
            Outcome::Stopped { timed_out } => {
                let action = lifecycle::on_stopped(&mut entry.process, now);
                if timed_out {
                    entry.process.last_failure = Some(Failure::StopTimedOut);
                }
                action
            }
            Outcome::Exited(status) => {
                // Nothing of the group outlives its leader: a half-dead service would hold the port.
                let _ = os::signal_group(local.pgid, Signal::SIGKILL);
                let exit = exit_of(status);
                let port_taken = entry.process.port.filter(|port| {
                    exit != Exit::Code(0)
                        && started.elapsed() < MIN_UPTIME
                        && os::port_in_use(*port)
                });
                let cx = ExitContext {
                    stopping: false,
                    oom_killed: os::oom_kill_count() > oom_before,
                    port_taken,
                };
                lifecycle::on_exit(&mut entry.process, exit, cx, in_a_row, now)
            }
            Outcome::Vanished => {
                // No SIGKILL to its group here: its pid may already belong to someone else.
                lifecycle::on_failure(&mut entry.process, Failure::Vanished, in_a_row, now)
            }
            Outcome::HealthFailed(failure) => {
                lifecycle::on_failure(&mut entry.process, failure, in_a_row, now)
            }
        };
        entry.local = None;
        inner.commit(&entry).await;
        match pause(action, &mut desired).await {
            Some(()) => {
                in_a_row += 1;
                begin = Begin::Fresh;
            }
            None => {
                finish_if_stop_requested(&inner, &mut entry, &desired).await;
                return;
            }
        }
    }
}

/// After giving up, a pending stop request still ends in `Stopped`... only if it was not
/// already final; a failed process stays failed.
async fn finish_if_stop_requested(
    inner: &Arc<Inner>,
    entry: &mut Entry,
    desired: &watch::Receiver<Desired>,
) {
    let wanted = *desired.borrow();
    if wanted == Desired::Stop && !entry.process.status.is_final() {
        lifecycle::on_stopped(&mut entry.process, now());
        inner.commit(entry).await;
    }
}

/// Waits out a restart delay; `None` when the process should not start again (given up, or a
/// stop or detach came in meanwhile).
async fn pause(action: Action, desired: &mut watch::Receiver<Desired>) -> Option<()> {
    let Action::RestartAfter(delay) = action else {
        return None;
    };
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return Some(()),
            changed = desired.changed() => {
                let wanted = if changed.is_err() { Desired::Detach } else { *desired.borrow() };
                if wanted != Desired::Run {
                    return None;
                }
            }
        }
    }
}

/// Deploys (once per generation) and starts the process. `Ok(None)`: a stop or detach came in
/// during the deploy step.
async fn launch(
    inner: &Arc<Inner>,
    entry: &mut Entry,
    desired: &mut watch::Receiver<Desired>,
) -> Result<Option<(Running, Local, Prepared)>, Failure> {
    let log = inner
        .logs
        .open_for_writing(&entry.process.id)
        .map_err(|e| Failure::DeployFailed {
            exit: None,
            stderr_tail: format!("cannot open the log file: {e}"),
        })?;
    let prepared = match strategy::already_deployed(&inner.bundles, &entry.process) {
        Some(prepared) => prepared,
        None => {
            let spec = &entry.process.spec;
            if !matches!(spec.strategy(), p2f_model::Strategy::Shell) || !spec.bundle().is_empty() {
                // Worth a durable write only when there is a step to watch (BENCHMARKS.md).
                entry.process.status = Status::Deploying;
                inner.commit(entry).await;
            }
            let snapshot = entry.process.clone();
            let deploy = strategy::deploy(&inner.bundles, &snapshot, &log, &inner.deploy);
            tokio::pin!(deploy);
            let prepared = loop {
                tokio::select! {
                    result = &mut deploy => break result?,
                    changed = desired.changed() => {
                        let wanted = if changed.is_err() { Desired::Detach } else { *desired.borrow() };
                        if wanted != Desired::Run {
                            if wanted == Desired::Stop {
                                lifecycle::on_stopped(&mut entry.process, now());
                                inner.commit(entry).await;
                            }
                            return Ok(None);
                        }
                    }
                }
            };
            if let Some((uid, gid)) = identity(&entry.process)? {
                // The process owns its bundle directory (as with systemd's StateDirectory=),
                // given once, before anything of that user ran in it.
                chown_tree(&prepared.bundle_dir, uid, gid).map_err(|e| Failure::DeployFailed {
                    exit: None,
                    stderr_tail: format!("cannot give the bundle directory to its user: {e}"),
                })?;
            }
            entry.process.record(now(), EventKind::Deployed);
            prepared
        }
    };
    if let Some(port) = entry.process.port
        && os::port_in_use(port)
    {
        return Err(Failure::PortInUse { port });
    }
    let env = strategy::environment(&entry.process, &prepared);
    let child = spawn(&entry.process, &prepared, &env, log)?;
    let Some(pid) = child.id() else {
        return Err(Failure::Vanished);
    };
    let local = Local {
        pgid: pid,
        start_ticks: os::start_ticks(pid).unwrap_or(0),
    };
    let at = now();
    entry.process.status = Status::Running;
    entry.process.pid = Some(pid);
    entry.process.started_at = Some(at);
    entry.process.record(at, EventKind::Started { pid });
    entry.local = Some(local);
    inner.commit(entry).await;
    Ok(Some((Running::Child(child), local, prepared)))
}

/// The uid and gid a process runs as: its spec's `user`, or `None` for the agent's own.
fn identity(process: &Process) -> Result<Option<(nix::unistd::Uid, nix::unistd::Gid)>, Failure> {
    let Some(user) = process.spec.user() else {
        return Ok(None);
    };
    let failed = |message: String| Failure::DeployFailed {
        exit: None,
        stderr_tail: message,
    };
    let found = nix::unistd::User::from_name(user)
        .map_err(|e| failed(format!("cannot look up user {user}: {e}")))?
        .ok_or_else(|| failed(format!("no such user: {user}")))?;
    let me = nix::unistd::geteuid();
    if !me.is_root() && me != found.uid {
        return Err(failed(format!(
            "cannot run as {user}: the agent does not run as root"
        )));
    }
    Ok(Some((found.uid, found.gid)))
}

/// Runs `command` as `who` (from [`identity`]).
fn run_as(command: &mut Command, who: Option<(nix::unistd::Uid, nix::unistd::Gid)>) {
    if let Some((uid, gid)) = who {
        command.uid(uid.as_raw()).gid(gid.as_raw());
    }
}

/// Starts `sh -c START` as the leader of a new process group.
fn spawn(
    process: &Process,
    prepared: &Prepared,
    env: &[(String, String)],
    log: std::fs::File,
) -> Result<Child, Failure> {
    let spawn_failed = |message: String| Failure::DeployFailed {
        exit: None,
        stderr_tail: message,
    };
    let stderr = log
        .try_clone()
        .map_err(|e| spawn_failed(format!("cannot open the log file: {e}")))?;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(process.spec.start())
        .current_dir(&prepared.bundle_dir)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(false);
    run_as(&mut command, identity(process)?);
    command.spawn().map_err(|e| {
        let who = process
            .spec
            .user()
            .map(|u| format!(" as {u}"))
            .unwrap_or_default();
        spawn_failed(format!(
            "cannot start sh{who} in {}: {e}",
            prepared.bundle_dir.display()
        ))
    })
}

/// Gives `dir` and everything in it to `uid:gid` (not following symlinks).
fn chown_tree(
    dir: &std::path::Path,
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
) -> std::io::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &path,
            Some(uid),
            Some(gid),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(std::io::Error::from)?;
        if path.is_dir() && !path.is_symlink() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

fn exit_of(status: ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(signal)) => Exit::Signal(signal),
        (None, None) => Exit::Code(-1),
    }
}

type Check = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Watches a running process until it ends, fails its health check, or is asked to stop or
/// let go.
async fn watch_process(
    inner: &Arc<Inner>,
    entry: &mut Entry,
    running: &mut Running,
    local: Local,
    env: &[(String, String)],
    prepared: &Prepared,
    desired: &mut watch::Receiver<Desired>,
) -> Outcome {
    let health = entry.process.spec.health();
    let port = entry.process.port;
    // Until it is first healthy, check often and give it `interval × failures` to get there
    // (a slow start is not a failure); after that, every `interval`, failing after `failures`
    // in a row.
    let interval = inner.settings.health_interval;
    let threshold = inner.settings.health_failures.max(1);
    let startup = tokio::time::Instant::now() + interval * threshold;
    let fast = interval.min(STARTUP_CHECK);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + fast, fast);
    let mut check: Option<Check> = None;
    let mut failures = 0;
    let mut healthy = false;
    let wanted = *desired.borrow_and_update();
    if wanted == Desired::Stop {
        // Re-adopted while it was being stopped: finish the stop.
        let timed_out = stop(entry, running, local, env, prepared).await;
        return Outcome::Stopped { timed_out };
    }
    loop {
        tokio::select! {
            status = wait_exit(running, local) => {
                return match status {
                    Some(status) => Outcome::Exited(status),
                    None => Outcome::Vanished,
                };
            }
            changed = desired.changed() => {
                let wanted = if changed.is_err() { Desired::Detach } else { *desired.borrow() };
                match wanted {
                    Desired::Run => {}
                    Desired::Detach => return Outcome::Detached,
                    Desired::Stop => {
                        entry.process.status = Status::Stopping;
                        inner.commit(entry).await;
                        let timed_out = stop(entry, running, local, env, prepared).await;
                        return Outcome::Stopped { timed_out };
                    }
                }
            }
            _ = ticker.tick(), if health != Health::None && check.is_none() => {
                let (health, env, dir) = (health.clone(), env.to_vec(), prepared.bundle_dir.clone());
                let who = identity(&entry.process).ok().flatten().map(|(u, g)| (u.as_raw(), g.as_raw()));
                check = Some(Box::pin(async move { health::check(&health, port, &env, &dir, who).await }));
            }
            result = poll_check(&mut check) => {
                check = None;
                match result {
                    Ok(()) => {
                        failures = 0;
                        if !healthy {
                            healthy = true;
                            ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                            entry.process.record(now(), EventKind::Healthy);
                            inner.commit(entry).await;
                        }
                    }
                    Err(detail) => {
                        failures += 1;
                        tracing::debug!(id = %entry.process.id, failures, "health check failed: {detail}");
                        let spent = if healthy {
                            failures >= threshold
                        } else {
                            tokio::time::Instant::now() >= startup
                        };
                        if spent {
                            let failure = Failure::HealthCheckFailed {
                                check: health::describe(&health, port),
                                detail,
                            };
                            stop(entry, running, local, env, prepared).await;
                            return Outcome::HealthFailed(failure);
                        }
                    }
                }
            }
        }
    }
}

async fn poll_check(check: &mut Option<Check>) -> Result<(), String> {
    match check {
        Some(check) => check.await,
        None => std::future::pending().await,
    }
}

/// Waits for the process to end: `Some(status)` for our child, `None` for a re-adopted one.
async fn wait_exit(running: &mut Running, local: Local) -> Option<ExitStatus> {
    match running {
        Running::Child(child) => match child.wait().await {
            Ok(status) => Some(status),
            Err(e) => {
                tracing::warn!(pid = local.pgid, "cannot wait for the process: {e}");
                wait_gone(local).await;
                None
            }
        },
        Running::Adopted => {
            wait_gone(local).await;
            None
        }
    }
}

async fn wait_gone(local: Local) {
    while os::is_same_process(local.pgid, local.start_ticks) {
        tokio::time::sleep(ADOPTED_POLL).await;
    }
}

/// Stops the process group: its stop command (with `PID`) or SIGTERM, then SIGKILL after the
/// grace period. Returns whether it had to be killed.
async fn stop(
    entry: &Entry,
    running: &mut Running,
    local: Local,
    env: &[(String, String)],
    prepared: &Prepared,
) -> bool {
    let spec = &entry.process.spec;
    let mut stopper = None;
    match spec.stop() {
        Some(command) => {
            let mut stop_command = Command::new("sh");
            run_as(&mut stop_command, identity(&entry.process).ok().flatten());
            let spawned = stop_command
                .arg("-c")
                .arg(command)
                .current_dir(&prepared.bundle_dir)
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .env("PID", local.pgid.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn();
            match spawned {
                Ok(child) => stopper = Some(child),
                Err(e) => {
                    tracing::warn!(id = %entry.process.id, "stop command did not start: {e}; sending SIGTERM");
                    let _ = os::signal_group(local.pgid, Signal::SIGTERM);
                }
            }
        }
        None => {
            let _ = os::signal_group(local.pgid, Signal::SIGTERM);
        }
    }
    let ended = tokio::time::timeout(spec.grace(), wait_exit(running, local))
        .await
        .is_ok();
    if let Some(mut stopper) = stopper {
        let _ = stopper.start_kill();
        let _ = stopper.wait().await;
    }
    let _ = os::signal_group(local.pgid, Signal::SIGKILL);
    if !ended {
        let _ = tokio::time::timeout(KILL_WAIT, wait_exit(running, local)).await;
    }
    !ended
}

/// A process of this placement that runs although the record does not say so (the agent died
/// between starting it and writing its pid).
fn find_orphan(process: &Process) -> Option<Local> {
    let found = os::find_by_env(process.id.as_str(), process.generation);
    found
        .into_iter()
        .find(|(pid, pgid)| pid == pgid)
        .and_then(|(pid, _)| {
            os::start_ticks(pid).map(|start_ticks| Local {
                pgid: pid,
                start_ticks,
            })
        })
}

/// Refreshes memory usage and rotates logs, every `memory_interval`, while the supervisor lives.
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
        let (running, live): (Vec<(ProcessId, u32)>, Vec<ProcessId>) = {
            let slots = inner.slots();
            let running = slots
                .values()
                .filter(|s| s.entry.process.is_running())
                .filter_map(|s| s.entry.local.map(|l| (s.entry.process.id.clone(), l.pgid)))
                .collect();
            let live = slots
                .values()
                .filter(|s| !s.entry.process.status.is_final())
                .map(|s| s.entry.process.id.clone())
                .collect();
            (running, live)
        };
        // Logs of every process that may still write (a flapping one too), not only running ones.
        for id in &live {
            if let Err(e) = inner.logs.rotate_if_needed(id) {
                tracing::warn!(%id, "cannot rotate the log: {e}");
            }
        }
        if running.is_empty() {
            continue;
        }
        let pgids: Vec<u32> = running.iter().map(|(_, pgid)| *pgid).collect();
        let rss = tokio::task::spawn_blocking(move || os::group_rss(&pgids))
            .await
            .unwrap_or_default();
        {
            let mut slots = inner.slots();
            for (id, pgid) in &running {
                let memory = rss.get(pgid).copied().unwrap_or(0);
                if let Some(slot) = slots.get_mut(id)
                    && slot.entry.process.is_running()
                    && slot.entry.process.memory_bytes != memory
                {
                    slot.entry.process.memory_bytes = memory;
                    slot.listed = None;
                }
            }
        }
    }
}
