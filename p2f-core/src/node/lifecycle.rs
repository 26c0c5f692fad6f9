//! What the supervisor does when something happens to a process: a pure function from
//! (record, what happened) to the record's new state and the actions to take. No OS calls live
//! here, so every rule — how an exit is classified, when to restart, how long to wait — is
//! tested without starting a process.

use std::time::Duration;

use p2f_model::{EventKind, Failure, Health, Process, RestartPolicy, Status, Timestamp};

/// The first restart waits this long; each further one in a row waits twice as long.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// No restart waits longer than this.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// How long a process must stay up — and healthy, when it has a check — before its restarts in
/// a row start over (systemd's `StartLimitIntervalSec` default, 10 s). One passing check is not
/// enough: a service that answers and then crashes every 2 s would never spend its budget.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Whether `process`, which ran `uptime` since it last started, proved stable: its restarts in
/// a row (and so its backoff) start over. With a health check, the time counts from its first
/// passing check since it started, at `now`.
pub fn stable(process: &Process, uptime: Duration, now: Timestamp) -> bool {
    if process.spec.health() == Health::None {
        return uptime >= STABLE_AFTER;
    }
    process
        .events
        .iter()
        .rev()
        .take_while(|e| !matches!(e.kind, EventKind::Started { .. }))
        .find(|e| e.kind == EventKind::Healthy)
        .is_some_and(|healthy| {
            Duration::from_millis(now.0.saturating_sub(healthy.at.0)) >= STABLE_AFTER
        })
}

/// Whether a process of `spec` is expected to keep running (it has a port or a health check):
/// then even a clean exit (code 0) is a failure, not a stop.
pub fn keeps_running(spec: &p2f_model::ProcessSpec) -> bool {
    spec.port().is_some() || spec.health() != Health::None
}

/// How long to wait before the `attempt`-th restart in a row (1-based): 100 ms doubling, capped
/// at 30 s.
pub fn backoff(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    BACKOFF_START
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_CAP)
}

/// How a process ended, as `waitpid` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// What else the agent knew when the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitContext {
    /// The agent was stopping it (kill, move, shutdown): the exit is expected.
    pub stopping: bool,
    /// The kernel's OOM killer reported killing a process of its group.
    pub oom_killed: bool,
    /// Another program held the process's port when it exited (it never got to listen).
    pub port_taken: Option<u16>,
}

/// `sh -c` exits 127 when the command does not exist.
const SHELL_NOT_FOUND: i32 = 127;
const SIGKILL: i32 = 9;

/// The formal reason for an exit, or `None` when it was asked for.
pub fn classify(exit: Exit, cx: ExitContext) -> Option<Failure> {
    if cx.stopping {
        return None;
    }
    if let Some(port) = cx.port_taken {
        return Some(Failure::PortInUse { port });
    }
    Some(match exit {
        Exit::Code(SHELL_NOT_FOUND) => Failure::CommandNotFound,
        Exit::Code(code) => Failure::Exited { code },
        Exit::Signal(SIGKILL) if cx.oom_killed => Failure::OutOfMemory,
        Exit::Signal(signal) => Failure::Killed { signal },
    })
}

/// What the supervisor does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the process again after this delay.
    RestartAfter(Duration),
    /// Leave it down: the policy says so (the root may move it elsewhere).
    GiveUp,
    /// Nothing: it was stopped on request.
    Rest,
}

/// Whether `failure` of a process of `spec` is a clean end: exit code 0 of a process that is not
/// expected to keep running ([`keeps_running`]).
fn clean_end(spec: &p2f_model::ProcessSpec, failure: &Failure) -> bool {
    matches!(failure, Failure::Exited { code: 0 }) && !keeps_running(spec)
}

/// Whether the policy allows another restart, given the restarts in a row so far. A clean end
/// ([`clean_end`]) counts as a failure for `Always` only. A command that does not exist will not
/// appear by waiting, so it is never retried in place (the root may still move the process).
fn may_restart(policy: RestartPolicy, clean: bool, failure: &Failure, in_a_row: u32) -> bool {
    if matches!(failure, Failure::CommandNotFound) {
        return false;
    }
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure(limit) => !clean && in_a_row < limit,
        RestartPolicy::Never => false,
    }
}

/// Applies an exit to `process`: sets its status, last failure and history, and says what to
/// do next. `in_a_row` is the number of restarts since it last ran healthy.
pub fn on_exit(
    process: &mut Process,
    exit: Exit,
    cx: ExitContext,
    in_a_row: u32,
    now: Timestamp,
) -> Action {
    match classify(exit, cx) {
        Some(failure) => on_failure(process, failure, in_a_row, now),
        None => on_stopped(process, now),
    }
}

/// Moves `process` to `next`, checked against [`Status::can_become`]. An illegal move is a bug
/// of the supervisor: it is logged and trips an assertion in debug builds; in release the
/// record still takes the status, so that it says what the supervisor did.
fn set_status(process: &mut Process, next: Status) {
    if !process.status.can_become(&next) {
        tracing::error!(
            id = %process.id,
            from = %process.status,
            to = %next,
            "illegal status transition (a bug in the supervisor)"
        );
        debug_assert!(
            false,
            "illegal status transition of {}: {} -> {next}",
            process.id, process.status
        );
    }
    process.status = next;
}

/// Its deploy step starts: `Deploying`.
pub fn on_deploying(process: &mut Process) {
    set_status(process, Status::Deploying);
}

/// Its deploy step finished (the status stays until it starts).
pub fn on_deployed(process: &mut Process, now: Timestamp) {
    process.record(now, EventKind::Deployed);
}

/// Its command started as `pid`: `Running`, with a `Started` event.
pub fn on_started(process: &mut Process, pid: u32, now: Timestamp) {
    set_status(process, Status::Running);
    process.pid = Some(pid);
    process.started_at = Some(now);
    // Where it listens is learnt anew for each run.
    process.listen = None;
    process.record(now, EventKind::Started { pid });
}

/// Its health check passed for the first time since it started.
pub fn on_healthy(process: &mut Process, now: Timestamp) {
    process.record(now, EventKind::Healthy);
}

/// A stop was asked for while it runs: `Stopping` until it is gone.
pub fn on_stopping(process: &mut Process) {
    set_status(process, Status::Stopping);
}

/// Records a requested stop: `Stopped`, with a `Killed` event.
pub fn on_stopped(process: &mut Process, now: Timestamp) -> Action {
    process.pid = None;
    process.memory_bytes = 0;
    set_status(process, Status::Stopped);
    process.record(now, EventKind::Killed);
    Action::Rest
}

/// A requested stop that outlived its grace period: `Stopped` (it was killed), with
/// `StopTimedOut` as its last failure.
pub fn on_stop_timed_out(process: &mut Process, now: Timestamp) -> Action {
    let action = on_stopped(process, now);
    process.last_failure = Some(Failure::StopTimedOut);
    action
}

/// After an agent restart, the process was found running as `pid`: it is watched again. A
/// record that did not say so yet (the agent died between starting it and recording that) says
/// `Running` now; one being stopped stays `Stopping` (the stop goes on).
pub fn on_readopted(process: &mut Process, pid: u32, now: Timestamp) {
    if matches!(process.status, Status::Running | Status::Stopping) {
        process.pid = Some(pid);
    } else {
        on_started(process, pid, now);
    }
}

/// After an agent restart, the process should run but does not: `Pending`, to start again now.
/// One that was `Running` ended while nobody watched it (`Vanished`).
pub fn on_recovered(process: &mut Process, now: Timestamp) {
    vanished_while_down(process, now);
    set_status(process, Status::Pending);
}

/// Like [`on_recovered`], but it waits to hear the network before starting again: `Parked`.
pub fn on_parked(process: &mut Process, now: Timestamp) {
    vanished_while_down(process, now);
    set_status(process, Status::Parked);
}

/// A parked process may start again (the network did not replace it): `Pending`.
pub fn on_unparked(process: &mut Process) {
    set_status(process, Status::Pending);
}

fn vanished_while_down(process: &mut Process, now: Timestamp) {
    if process.status == Status::Running {
        process.last_failure = Some(Failure::Vanished);
        process.record(
            now,
            EventKind::Exited {
                failure: Failure::Vanished,
            },
        );
    }
    process.pid = None;
    process.memory_bytes = 0;
}

/// Applies a failure (an exit, or one found before or without an exit: the deploy step, a
/// busy port, a health check) to `process` and says what to do next.
pub fn on_failure(
    process: &mut Process,
    failure: Failure,
    in_a_row: u32,
    now: Timestamp,
) -> Action {
    process.pid = None;
    process.memory_bytes = 0;
    process.last_failure = Some(failure.clone());
    process.record(
        now,
        EventKind::Exited {
            failure: failure.clone(),
        },
    );
    let clean = clean_end(&process.spec, &failure);
    if may_restart(process.spec.restart(), clean, &failure, in_a_row) {
        let attempt = in_a_row + 1;
        let delay = backoff(attempt);
        set_status(process, Status::Pending);
        process.restarts += 1;
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        process.record(now, EventKind::Restarted { attempt, delay_ms });
        Action::RestartAfter(delay)
    } else {
        let next = if clean {
            Status::Stopped
        } else {
            Status::Failed(failure)
        };
        set_status(process, next);
        Action::GiveUp
    }
}

#[cfg(test)]
mod tests {
    use p2f_model::{NodeName, NodeRef, ProcessId, ProcessSpec};

    use super::*;

    fn process(policy: RestartPolicy) -> Process {
        let spec = ProcessSpec::new("svc", "sleep 1").with_restart(policy);
        let node = NodeRef {
            name: NodeName::from_static("n1"),
            address: "127.0.0.1".into(),
        };
        Process::placed(
            ProcessId::for_service("svc", 1),
            1,
            spec,
            node,
            Timestamp(0),
        )
    }

    #[test]
    fn backoff_doubles_from_100ms_and_caps_at_30s() {
        let ms: Vec<u128> = (1..=12).map(|a| backoff(a).as_millis()).collect();
        assert_eq!(
            ms,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000
            ]
        );
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
        assert_eq!(backoff(0), BACKOFF_START);
    }

    #[test]
    fn exits_are_classified_formally() {
        let cx = ExitContext::default();
        let cases = [
            (Exit::Code(3), cx, Some(Failure::Exited { code: 3 })),
            (Exit::Code(127), cx, Some(Failure::CommandNotFound)),
            (Exit::Signal(9), cx, Some(Failure::Killed { signal: 9 })),
            (
                Exit::Signal(9),
                ExitContext {
                    oom_killed: true,
                    ..cx
                },
                Some(Failure::OutOfMemory),
            ),
            (
                Exit::Code(1),
                ExitContext {
                    port_taken: Some(80),
                    ..cx
                },
                Some(Failure::PortInUse { port: 80 }),
            ),
            (
                Exit::Signal(15),
                ExitContext {
                    stopping: true,
                    ..cx
                },
                None,
            ),
        ];
        for (exit, cx, want) in cases {
            assert_eq!(classify(exit, cx), want, "{exit:?} {cx:?}");
        }
    }

    #[test]
    fn on_failure_restarts_up_to_its_limit_then_gives_up() {
        let mut p = process(RestartPolicy::OnFailure(2));
        let cx = ExitContext::default();
        assert_eq!(
            on_exit(&mut p, Exit::Code(3), cx, 0, Timestamp(1)),
            Action::RestartAfter(backoff(1))
        );
        assert_eq!(p.status, Status::Pending);
        assert_eq!(
            on_exit(&mut p, Exit::Code(3), cx, 1, Timestamp(2)),
            Action::RestartAfter(backoff(2))
        );
        assert_eq!(
            on_exit(&mut p, Exit::Code(3), cx, 2, Timestamp(3)),
            Action::GiveUp
        );
        assert_eq!(p.status, Status::Failed(Failure::Exited { code: 3 }));
        assert_eq!(p.restarts, 2);
        assert_eq!(p.last_failure, Some(Failure::Exited { code: 3 }));
        // A clean exit is not a failure for OnFailure: it stays stopped.
        let mut clean = process(RestartPolicy::OnFailure(5));
        assert_eq!(
            on_exit(&mut clean, Exit::Code(0), cx, 0, Timestamp(1)),
            Action::GiveUp
        );
        assert_eq!(clean.status, Status::Stopped);
        // A service expected to keep running (a port, or a health check) that exits 0 failed.
        let mut server = process(RestartPolicy::OnFailure(1));
        server.spec = server.spec.with_port(8080);
        assert_eq!(
            on_exit(&mut server, Exit::Code(0), cx, 0, Timestamp(1)),
            Action::RestartAfter(backoff(1))
        );
        assert_eq!(
            on_exit(&mut server, Exit::Code(0), cx, 1, Timestamp(2)),
            Action::GiveUp
        );
        assert_eq!(server.status, Status::Failed(Failure::Exited { code: 0 }));
        let mut checked = process(RestartPolicy::Never);
        checked.spec = checked.spec.with_health(Health::Cmd("true".into()));
        on_exit(&mut checked, Exit::Code(0), cx, 0, Timestamp(1));
        assert_eq!(checked.status, Status::Failed(Failure::Exited { code: 0 }));
    }

    /// `(health check?, uptime s, healthy s before now or none)` → stable.
    #[test]
    fn restarts_start_over_only_after_a_stable_period() {
        let check = |checked: bool, uptime: u64, healthy_for: Option<u64>, expected: bool| {
            let mut p = process(RestartPolicy::OnFailure(3));
            if checked {
                p.spec = p.spec.with_health(Health::Cmd("true".into()));
            }
            let now = Timestamp(100_000);
            p.record(
                Timestamp(now.0 - uptime * 1000),
                EventKind::Started { pid: 7 },
            );
            if let Some(s) = healthy_for {
                p.record(Timestamp(now.0 - s * 1000), EventKind::Healthy);
            }
            assert_eq!(
                stable(&p, Duration::from_secs(uptime), now),
                expected,
                "checked {checked}, up {uptime} s, healthy for {healthy_for:?} s"
            );
        };
        check(false, 2, None, false);
        check(false, 10, None, true);
        check(false, 60, None, true);
        // With a check: one pass is not enough; healthy for the whole period is.
        check(true, 2, Some(1), false);
        check(true, 30, None, false);
        check(true, 30, Some(9), false);
        check(true, 30, Some(10), true);
        // A Healthy event from before the last start does not count.
        let mut p = process(RestartPolicy::OnFailure(3));
        p.spec = p.spec.with_health(Health::Cmd("true".into()));
        p.record(Timestamp(1_000), EventKind::Healthy);
        p.record(Timestamp(90_000), EventKind::Started { pid: 8 });
        assert!(!stable(&p, Duration::from_secs(10), Timestamp(100_000)));
    }

    #[test]
    fn always_restarts_and_never_does_not() {
        let cx = ExitContext::default();
        let mut always = process(RestartPolicy::Always);
        assert_eq!(
            on_exit(&mut always, Exit::Code(0), cx, 40, Timestamp(1)),
            Action::RestartAfter(BACKOFF_CAP)
        );
        let mut never = process(RestartPolicy::Never);
        assert_eq!(
            on_exit(&mut never, Exit::Signal(9), cx, 0, Timestamp(1)),
            Action::GiveUp
        );
        assert_eq!(never.status, Status::Failed(Failure::Killed { signal: 9 }));
    }

    #[test]
    fn a_missing_command_is_not_retried_in_place() {
        let mut p = process(RestartPolicy::Always);
        let cx = ExitContext::default();
        assert_eq!(
            on_exit(&mut p, Exit::Code(127), cx, 0, Timestamp(1)),
            Action::GiveUp
        );
        assert_eq!(p.status, Status::Failed(Failure::CommandNotFound));
    }

    #[test]
    fn a_failure_found_before_start_follows_the_policy() {
        let mut p = process(RestartPolicy::OnFailure(1));
        let busy = Failure::PortInUse { port: 8080 };
        assert_eq!(
            on_failure(&mut p, busy.clone(), 0, Timestamp(1)),
            Action::RestartAfter(backoff(1))
        );
        assert_eq!(
            on_failure(&mut p, busy.clone(), 1, Timestamp(2)),
            Action::GiveUp
        );
        assert_eq!(p.status, Status::Failed(busy));
    }

    #[test]
    fn a_requested_stop_is_not_a_failure() {
        let mut p = process(RestartPolicy::Always);
        p.pid = Some(42);
        let cx = ExitContext {
            stopping: true,
            ..ExitContext::default()
        };
        assert_eq!(
            on_exit(&mut p, Exit::Signal(15), cx, 0, Timestamp(1)),
            Action::Rest
        );
        assert_eq!(
            (p.status.clone(), p.pid, p.last_failure.clone()),
            (Status::Stopped, None, None)
        );
        assert_eq!(
            p.events.last().map(|e| e.kind.clone()),
            Some(EventKind::Killed)
        );
    }

    fn last_event(p: &Process) -> Option<EventKind> {
        p.events.last().map(|e| e.kind.clone())
    }

    #[test]
    fn a_launch_goes_deploying_then_running() {
        let mut p = process(RestartPolicy::Never);
        on_deploying(&mut p);
        assert_eq!(p.status, Status::Deploying);
        on_deployed(&mut p, Timestamp(1));
        assert_eq!(
            (p.status.clone(), last_event(&p)),
            (Status::Deploying, Some(EventKind::Deployed))
        );
        on_started(&mut p, 42, Timestamp(2));
        assert_eq!(
            (p.status.clone(), p.pid, p.started_at),
            (Status::Running, Some(42), Some(Timestamp(2)))
        );
        assert_eq!(last_event(&p), Some(EventKind::Started { pid: 42 }));
        on_healthy(&mut p, Timestamp(3));
        assert!(p.is_healthy());
    }

    #[test]
    fn a_stop_goes_stopping_then_stopped() {
        let mut p = process(RestartPolicy::Always);
        on_started(&mut p, 42, Timestamp(1));
        on_stopping(&mut p);
        assert_eq!((p.status.clone(), p.pid), (Status::Stopping, Some(42)));
        assert_eq!(on_stop_timed_out(&mut p, Timestamp(2)), Action::Rest);
        assert_eq!(
            (p.status.clone(), p.pid, p.last_failure.clone()),
            (Status::Stopped, None, Some(Failure::StopTimedOut))
        );
        assert_eq!(last_event(&p), Some(EventKind::Killed));
    }

    #[test]
    fn recovery_readopts_or_waits_to_start_again() {
        // Found running although the record said Pending: it runs.
        let mut p = process(RestartPolicy::Always);
        on_readopted(&mut p, 7, Timestamp(1));
        assert_eq!((p.status.clone(), p.pid), (Status::Running, Some(7)));
        assert_eq!(last_event(&p), Some(EventKind::Started { pid: 7 }));
        // Found running and recorded so: only the pid is taken.
        let events = p.events.len();
        on_readopted(&mut p, 8, Timestamp(2));
        assert_eq!((p.status.clone(), p.pid), (Status::Running, Some(8)));
        assert_eq!(p.events.len(), events);
        // Found being stopped: the stop goes on.
        on_stopping(&mut p);
        on_readopted(&mut p, 9, Timestamp(3));
        assert_eq!((p.status.clone(), p.pid), (Status::Stopping, Some(9)));
        // Running, then gone while the agent was down: it vanished, and waits.
        let mut p = process(RestartPolicy::Always);
        on_started(&mut p, 7, Timestamp(1));
        on_parked(&mut p, Timestamp(2));
        assert_eq!(
            (p.status.clone(), p.pid, p.last_failure.clone()),
            (Status::Parked, None, Some(Failure::Vanished))
        );
        assert_eq!(
            last_event(&p),
            Some(EventKind::Exited {
                failure: Failure::Vanished
            })
        );
        // Parked again by the next restart: nothing new happened to it.
        let events = p.events.len();
        on_parked(&mut p, Timestamp(3));
        assert_eq!((p.status.clone(), p.events.len()), (Status::Parked, events));
        on_unparked(&mut p);
        assert_eq!(p.status, Status::Pending);
        // Never started: it waits to start, without a failure.
        let mut p = process(RestartPolicy::Always);
        on_recovered(&mut p, Timestamp(1));
        assert_eq!(
            (p.status.clone(), p.last_failure.clone()),
            (Status::Pending, None)
        );
        // A parked process killed where it is.
        let mut p = process(RestartPolicy::Always);
        on_parked(&mut p, Timestamp(1));
        assert_eq!(on_stopped(&mut p, Timestamp(2)), Action::Rest);
        assert_eq!(p.status, Status::Stopped);
    }

    #[test]
    fn every_decision_moves_along_the_table() {
        // Each function from each status it is used in; an illegal move would trip the
        // debug assertion in `set_status`.
        let cx = ExitContext::default();
        for from in [Status::Pending, Status::Deploying, Status::Running] {
            let mut p = process(RestartPolicy::OnFailure(1));
            p.status = from.clone();
            on_failure(&mut p, Failure::PortInUse { port: 1 }, 0, Timestamp(1));
            assert_eq!(p.status, Status::Pending, "from {from}");
            p.status = from.clone();
            on_exit(&mut p, Exit::Code(0), cx, 0, Timestamp(2));
            assert_eq!(p.status, Status::Stopped, "from {from}");
            p.status = from.clone();
            on_exit(&mut p, Exit::Code(2), cx, 1, Timestamp(3));
            assert_eq!(p.status, Status::Failed(Failure::Exited { code: 2 }));
        }
    }
}
