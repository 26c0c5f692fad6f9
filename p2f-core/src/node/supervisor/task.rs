//! One process's life, in its own task: deploy and start it (`launch`), watch it until it
//! ends, fails its health check or is asked to stop (`watch_process`), record what happened
//! through `lifecycle`, and wait out a restart's delay (`restart_after`); until it is stopped,
//! given up on, or the agent lets go.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use nix::sys::signal::Signal;
use p2f_model::{Failure, Health};
use tokio::process::Child;
use tokio::sync::watch;

use super::spawn::{Identity, Shell};
use super::{Desired, Inner, KILL_WAIT, now};
use crate::node::contain::Cell;
use crate::node::health;
use crate::node::lifecycle::{self, Action, Exit, ExitContext};
use crate::node::os;
use crate::node::relay;
use crate::node::strategy::{self, Prepared};
use crate::store::{Entry, Local};

/// A process that exits within this long of its start while another program holds its port
/// never got to listen: `PortInUse`.
const MIN_UPTIME: std::time::Duration = lifecycle::STABLE_AFTER;
/// How often a process is checked until it is first healthy.
const STARTUP_CHECK: std::time::Duration = std::time::Duration::from_millis(250);
/// How often a re-adopted process (not our child) is looked at.
const ADOPTED_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// How a process's task begins.
#[derive(Debug, Clone, Copy)]
pub(super) enum Begin {
    /// Deploy (unless done) and start it.
    Fresh,
    /// It was parked: record that it may start (`Pending`), then as `Fresh`.
    Unparked,
    /// It already runs: watch it.
    Adopt(Local),
}

/// A running process as its task sees it.
enum Running {
    /// Started by this agent: its relay is our child.
    Child(Child),
    /// Re-adopted: its relay (or, in a record from before relays, the process itself) is
    /// watched by pid.
    Adopted,
}

/// A started (or re-adopted) process.
struct Started {
    running: Running,
    local: Local,
    /// Where and as whom its stop command and health check run.
    shell: Arc<Shell>,
    /// Where its processes are.
    cell: Cell,
    /// Where its relay writes how it ended.
    exit_file: PathBuf,
}

impl Started {
    /// Sends `signal` to every process of the service: its cell; a process from before
    /// relays (not in a cell) by its group.
    fn signal(&self, signal: Signal) {
        if self.cell.signal(self.local.relay, signal) == 0
            && os::is_same_process(self.local.pgid, self.local.start_ticks)
        {
            let _ = os::signal_group(self.local.pgid, signal);
        }
    }

    /// Kills every process of the service and waits (bounded) until its cell is empty.
    async fn kill(&self) {
        self.signal(Signal::SIGKILL);
        let cell = self.cell.clone();
        let relay = self.local.relay;
        let _ = tokio::task::spawn_blocking(move || cell.kill(relay)).await;
    }

    /// Waits for the process to end: how, from its relay's exit file; `None` when that cannot
    /// be known (its relay was killed, or it is from before relays and not our child).
    async fn wait_exit(&mut self) -> Option<Exit> {
        let watched = if self.local.relay > 0 {
            (self.local.relay, self.local.relay_ticks)
        } else {
            (self.local.pgid, self.local.start_ticks)
        };
        match &mut self.running {
            Running::Child(child) => {
                if let Err(e) = child.wait().await {
                    tracing::warn!(pid = watched.0, "cannot wait for the relay: {e}");
                    wait_gone(watched).await;
                }
            }
            Running::Adopted => wait_gone(watched).await,
        }
        relay::read_exit(&self.exit_file)
    }
}

/// How watching a running process ended.
enum Outcome {
    Exited(Exit),
    Vanished,
    HealthFailed(Failure),
    Stopped { timed_out: bool },
    Detached,
}

type Check = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// One process's task.
struct Task {
    inner: Arc<Inner>,
    /// The record as this task last committed it.
    entry: Entry,
    desired: watch::Receiver<Desired>,
    /// Restarts since it last ran healthy.
    in_a_row: u32,
}

/// The life of one process, until it is stopped, given up on, or the agent lets go.
pub(super) async fn run(
    inner: Arc<Inner>,
    entry: Entry,
    desired: watch::Receiver<Desired>,
    begin: Begin,
) {
    let mut task = Task {
        inner,
        entry,
        desired,
        in_a_row: 0,
    };
    task.live(begin).await;
}

/// What is asked after a change of `desired` (its sender gone: let go).
fn asked(
    changed: Result<(), watch::error::RecvError>,
    desired: &watch::Receiver<Desired>,
) -> Desired {
    if changed.is_err() {
        Desired::Detach
    } else {
        *desired.borrow()
    }
}

impl Task {
    async fn live(&mut self, mut begin: Begin) {
        loop {
            let wanted = *self.desired.borrow();
            match wanted {
                Desired::Detach => return,
                Desired::Stop if !matches!(begin, Begin::Adopt(_)) => {
                    lifecycle::on_stopped(&mut self.entry.process, now());
                    self.entry.local = None;
                    self.commit().await;
                    return;
                }
                Desired::Run | Desired::Stop => {}
            }
            let started = match begin {
                Begin::Adopt(local) => self.adopted(local),
                Begin::Unparked => {
                    lifecycle::on_unparked(&mut self.entry.process);
                    self.commit().await;
                    begin = Begin::Fresh;
                    continue;
                }
                Begin::Fresh => match self.launch().await {
                    Ok(Some(started)) => started,
                    Ok(None) => return,
                    Err(failure) => {
                        let process = &mut self.entry.process;
                        let action = lifecycle::on_failure(process, failure, self.in_a_row, now());
                        self.entry.local = None;
                        self.commit().await;
                        if !self.restart_after(action).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            let Some(action) = self.watch(started).await else {
                return;
            };
            if !self.restart_after(action).await {
                return;
            }
            begin = Begin::Fresh;
        }
    }

    async fn commit(&self) {
        self.inner.commit(&self.entry).await;
    }

    /// Waits out a restart delay; `false` when the process does not start again (given up, or
    /// a stop or detach came in meanwhile). A stop asked for meanwhile still ends in
    /// `Stopped`, unless the record is already final (a failed process stays failed).
    async fn restart_after(&mut self, action: Action) -> bool {
        if let Action::RestartAfter(delay) = action
            && pause(delay, &mut self.desired).await
        {
            self.in_a_row += 1;
            return true;
        }
        let wanted = *self.desired.borrow();
        if wanted == Desired::Stop && !self.entry.process.status.is_final() {
            lifecycle::on_stopped(&mut self.entry.process, now());
            self.commit().await;
        }
        false
    }

    /// Deploys (once per generation) and starts the process. `Ok(None)`: a stop or detach came
    /// in during the deploy step.
    async fn launch(&mut self) -> Result<Option<Started>, Failure> {
        let log = self
            .inner
            .logs
            .open_for_writing(&self.entry.process.id)
            .map_err(|e| Failure::DeployFailed {
                exit: None,
                stderr_tail: format!("cannot open the log file: {e}"),
            })?;
        // Looked up once per launch: the chown, the start, the stop and every health check
        // use it.
        let who = Identity::of(&self.entry.process)?;
        let prepared = match strategy::already_deployed(&self.inner.bundles, &self.entry.process) {
            Some(prepared) => prepared,
            None => match self.deploy(&log, who.as_ref()).await? {
                Some(prepared) => prepared,
                None => return Ok(None),
            },
        };
        let id = &self.entry.process.id;
        let cell = self.inner.containment.cell(id);
        // Whatever an earlier run left in its cell ends before it starts again.
        let prepared_cell = cell.clone();
        tokio::task::spawn_blocking(move || prepared_cell.prepare())
            .await
            .map_err(|e| e.to_string())
            .and_then(|done| done.map_err(|e| e.to_string()))
            .map_err(|e| Failure::DeployFailed {
                exit: None,
                stderr_tail: format!("cannot create the process's cgroup: {e}"),
            })?;
        if let Some(port) = self.entry.process.port
            && os::port_in_use(port)
        {
            return Err(Failure::PortInUse { port });
        }
        if !relay::available() {
            return Err(Failure::DeployFailed {
                exit: None,
                stderr_tail: "this executable cannot start log relays (its p2f-core \
                              constructor did not run)"
                    .into(),
            });
        }
        let shell = Arc::new(Shell::new(
            &self.entry.process,
            &prepared,
            Ok(who.as_ref()),
            &cell,
            &self.inner.settings.pass_env,
        ));
        let relay = self.inner.relay_for(id, &cell);
        let exit_file = relay.exit.clone();
        let launched = shell
            .start(self.entry.process.spec.start(), log, relay)
            .await?;
        let pid = launched.pid;
        let relay_pid = launched.relay.id().unwrap_or(0);
        let local = Local {
            pgid: pid,
            start_ticks: os::start_ticks(pid).unwrap_or(0),
            relay: relay_pid,
            relay_ticks: os::start_ticks(relay_pid).unwrap_or(0),
        };
        lifecycle::on_started(&mut self.entry.process, pid, now());
        self.entry.local = Some(local);
        self.commit().await;
        Ok(Some(Started {
            running: Running::Child(launched.relay),
            local,
            shell,
            cell,
            exit_file,
        }))
    }

    /// Unpacks the bundle, runs the strategy's deploy step and gives the bundle to the
    /// process's user. `Ok(None)`: a stop or detach came in meanwhile.
    async fn deploy(
        &mut self,
        log: &std::fs::File,
        who: Option<&Identity>,
    ) -> Result<Option<Prepared>, Failure> {
        let spec = &self.entry.process.spec;
        if !matches!(spec.strategy(), p2f_model::Strategy::Shell) || !spec.bundle().is_empty() {
            // Worth a durable write only when there is a step to watch (BENCHMARKS.md).
            lifecycle::on_deploying(&mut self.entry.process);
            self.commit().await;
        }
        let inner = self.inner.clone();
        let snapshot = self.entry.process.clone();
        let deploy = strategy::deploy(&inner.bundles, &snapshot, log, &inner.deploy);
        tokio::pin!(deploy);
        let prepared = loop {
            tokio::select! {
                result = &mut deploy => break result?,
                changed = self.desired.changed() => match asked(changed, &self.desired) {
                    Desired::Run => {}
                    Desired::Stop => {
                        lifecycle::on_stopped(&mut self.entry.process, now());
                        self.commit().await;
                        return Ok(None);
                    }
                    Desired::Detach => return Ok(None),
                },
            }
        };
        if let Some(who) = who {
            // The process owns its bundle directory (as with systemd's StateDirectory=),
            // given once, before anything of that user ran in it.
            if let Err(e) = who.chown_tree(&prepared.bundle_dir) {
                // Deployed anew next time: a half-given directory is never started in.
                strategy::forget_deployed(&self.inner.bundles, &self.entry.process);
                return Err(Failure::DeployFailed {
                    exit: None,
                    stderr_tail: format!("cannot give the bundle directory to its user: {e}"),
                });
            }
        }
        lifecycle::on_deployed(&mut self.entry.process, now());
        Ok(Some(prepared))
    }

    /// A process re-adopted after an agent restart (not our child): deployed before.
    fn adopted(&self, local: Local) -> Started {
        let process = &self.entry.process;
        let prepared =
            strategy::already_deployed(&self.inner.bundles, process).unwrap_or_else(|| Prepared {
                bundle_dir: strategy::bundle_dir(&self.inner.bundles, process),
                nix_out: None,
            });
        // A user that cannot be resolved any more: its stop and health commands do not run
        // (never as the agent's user instead); a stop goes straight to SIGTERM.
        let who = Identity::of(process);
        if let Err(failure) = &who {
            tracing::warn!(id = %process.id, "{failure}: its stop and health commands will not run");
        }
        let cell = self.inner.containment.cell(&process.id);
        Started {
            running: Running::Adopted,
            local,
            shell: Arc::new(Shell::new(
                process,
                &prepared,
                who.as_ref().map(Option::as_ref).map_err(Clone::clone),
                &cell,
                &self.inner.settings.pass_env,
            )),
            cell,
            exit_file: self.inner.logs.exit_path(&process.id),
        }
    }

    /// Watches a started process until it ends; records how and says what to do next (`None`:
    /// the agent let go of it).
    async fn watch(&mut self, mut started: Started) -> Option<Action> {
        let oom_before = os::oom_kill_count();
        let since = Instant::now();
        let outcome = self.watch_process(&mut started).await;
        if lifecycle::stable(&self.entry.process, since.elapsed(), now()) {
            self.in_a_row = 0;
        }
        let (process, in_a_row, now) = (&mut self.entry.process, self.in_a_row, now());
        let action = match outcome {
            Outcome::Detached => return None,
            Outcome::Stopped { timed_out: false } => lifecycle::on_stopped(process, now),
            Outcome::Stopped { timed_out: true } => lifecycle::on_stop_timed_out(process, now),
            Outcome::Exited(exit) => {
                // Its relay killed what was left of its cell; a process from before relays
                // has its group killed here: a half-dead service would hold the port.
                if started.local.relay == 0 {
                    let _ = os::signal_group(started.local.pgid, Signal::SIGKILL);
                }
                let port_taken = process.port.filter(|port| {
                    exit != Exit::Code(0) && since.elapsed() < MIN_UPTIME && os::port_in_use(*port)
                });
                let cx = ExitContext {
                    stopping: false,
                    oom_killed: os::oom_kill_count() > oom_before,
                    port_taken,
                };
                lifecycle::on_exit(process, exit, cx, in_a_row, now)
            }
            // Its relay is gone without saying how it ended: whatever is left of the cell is
            // killed (`signal` checks that its pid is still its own before using it).
            Outcome::Vanished => {
                started.kill().await;
                lifecycle::on_failure(process, Failure::Vanished, in_a_row, now)
            }
            Outcome::HealthFailed(failure) => {
                lifecycle::on_failure(process, failure, in_a_row, now)
            }
        };
        started.cell.remove();
        self.entry.local = None;
        self.commit().await;
        Some(action)
    }

    /// Watches a running process until it ends, fails its health check, or is asked to stop or
    /// let go.
    async fn watch_process(&mut self, started: &mut Started) -> Outcome {
        let health = self.entry.process.spec.health();
        let port = self.entry.process.port;
        // Until it is first healthy, check often and give it `interval × failures` to get there
        // (a slow start is not a failure); after that, every `interval`, failing after `failures`
        // in a row.
        let interval = self.inner.settings.health_interval;
        let threshold = self.inner.settings.health_failures.max(1);
        let startup = tokio::time::Instant::now() + interval * threshold;
        let fast = interval.min(STARTUP_CHECK);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + fast, fast);
        let mut check: Option<Check> = None;
        let mut failures = 0;
        let mut healthy = false;
        let wanted = *self.desired.borrow_and_update();
        if wanted == Desired::Stop {
            // Re-adopted while it was being stopped: finish the stop.
            let timed_out = stop(&self.entry, started).await;
            return Outcome::Stopped { timed_out };
        }
        loop {
            tokio::select! {
                exit = started.wait_exit() => {
                    return match exit {
                        Some(exit) => Outcome::Exited(exit),
                        None => Outcome::Vanished,
                    };
                }
                changed = self.desired.changed() => match asked(changed, &self.desired) {
                    Desired::Run => {}
                    Desired::Detach => return Outcome::Detached,
                    Desired::Stop => {
                        lifecycle::on_stopping(&mut self.entry.process);
                        self.commit().await;
                        let timed_out = stop(&self.entry, started).await;
                        return Outcome::Stopped { timed_out };
                    }
                },
                _ = ticker.tick(), if health != Health::None && check.is_none() => {
                    let (health, shell) = (health.clone(), started.shell.clone());
                    check = Some(Box::pin(async move { health::check(&health, port, &shell).await }));
                }
                result = poll_check(&mut check) => {
                    check = None;
                    match result {
                        Ok(()) => {
                            failures = 0;
                            if !healthy {
                                healthy = true;
                                ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                                lifecycle::on_healthy(&mut self.entry.process, now());
                                // Healthy: where it listens is known now, not at the next refresh.
                                self.entry.process.listen = port
                                    .and_then(os::listen_address)
                                    .map(|address| address.to_string());
                                self.commit().await;
                            }
                        }
                        Err(detail) => {
                            failures += 1;
                            tracing::debug!(id = %self.entry.process.id, failures, "health check failed: {detail}");
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
                                stop(&self.entry, started).await;
                                return Outcome::HealthFailed(failure);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Waits `delay` before a restart; `false` when a stop or detach comes in meanwhile.
async fn pause(delay: std::time::Duration, desired: &mut watch::Receiver<Desired>) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return true,
            changed = desired.changed() => {
                if asked(changed, desired) != Desired::Run {
                    return false;
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

/// Waits until `(pid, start_ticks)` is no longer that process.
async fn wait_gone((pid, start_ticks): (u32, u64)) {
    while os::is_same_process(pid, start_ticks) {
        tokio::time::sleep(ADOPTED_POLL).await;
    }
}

/// Stops the service: its stop command (with `PID`; SIGTERM to every process of its cell as
/// soon as that command ends, or at once without one), then SIGKILL to the whole cell after
/// the grace period; the stop command (in the cell too) ends with it. Returns whether the
/// service outlived its grace (it had to be killed).
async fn stop(entry: &Entry, started: &mut Started) -> bool {
    let spec = &entry.process.spec;
    let pid = started.local.pgid;
    let deadline = tokio::time::Instant::now() + spec.grace();
    let mut stopper = match spec.stop() {
        Some(command) => match started.shell.stop(command, pid).await {
            Ok(child) => Some(child),
            Err(e) => {
                tracing::warn!(id = %entry.process.id, "stop command did not start: {e}; sending SIGTERM");
                None
            }
        },
        None => None,
    };
    if stopper.is_none() {
        started.signal(Signal::SIGTERM);
    }
    // Its group outlives it when it started something and exited: known now, not after `wait`.
    let stopper_group = stopper.as_ref().and_then(Child::id);
    let mut ended = false;
    if let Some(child) = stopper.as_mut() {
        // The process may end while its stop command runs. Once the stop command has ended —
        // done, or failed at once — what is left of the service gets SIGTERM (as systemd does
        // after ExecStop), not only SIGKILL after the whole grace.
        tokio::select! {
            _ = started.wait_exit() => ended = true,
            status = child.wait() => {
                if !status.as_ref().is_ok_and(|s| s.success()) {
                    tracing::warn!(id = %entry.process.id, "stop command failed ({status:?}); sending SIGTERM");
                }
                started.signal(Signal::SIGTERM);
            }
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
    if !ended {
        ended = tokio::time::timeout_at(deadline, started.wait_exit())
            .await
            .is_ok();
    }
    if let Some(mut child) = stopper {
        // The stop command and whatever it started end with the stop.
        if let Some(group) = stopper_group {
            let _ = os::signal_group(group, Signal::SIGKILL);
        }
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    started.kill().await;
    if !ended {
        let _ = tokio::time::timeout(KILL_WAIT, started.wait_exit()).await;
    }
    !ended
}
