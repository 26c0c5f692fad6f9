//! What the network records about one running instance of a spec: the seed's "P2PRC process".

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{NodeName, ProcessId, ProcessSpec};

/// Milliseconds since the Unix epoch.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current wall-clock time (milliseconds since the Unix epoch; 0 if the clock is set
    /// before it).
    pub fn now() -> Timestamp {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
    }
}

/// The formal reason a process is not running.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", deny_unknown_fields)]
#[non_exhaustive]
pub enum Failure {
    /// The strategy's deploy step failed.
    DeployFailed {
        exit: Option<i32>,
        stderr_tail: String,
    },
    /// The start command's program does not exist (the shell exited 127).
    CommandNotFound,
    /// Another program holds the port.
    PortInUse { port: u16 },
    /// The process exited by itself.
    Exited { code: i32 },
    /// The process was killed by a signal it did not ask for.
    Killed { signal: i32 },
    /// The kernel's OOM killer ended it.
    OutOfMemory,
    /// The health check kept failing.
    HealthCheckFailed { check: String, detail: String },
    /// Its node left the network.
    NodeLost { node: NodeName },
    /// No node can take it: `pins` are the nodes it may run on (empty: any), `rejected` says
    /// why each known node did not take it (empty in records written before P2F said so).
    NoAllowedNode {
        pins: Vec<NodeName>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rejected: Vec<Rejection>,
    },
    /// It did not stop within its grace period and was killed.
    StopTimedOut,
    /// It ended while the agent watching it was not its parent (it was re-adopted after an
    /// agent restart), so its exit status is unknown.
    Vanished,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::DeployFailed { exit, stderr_tail } => {
                match exit {
                    Some(code) => write!(f, "deploy step failed with exit code {code}")?,
                    None => write!(f, "deploy step was killed")?,
                }
                match stderr_tail.lines().rev().find(|l| !l.trim().is_empty()) {
                    Some(last) => write!(f, ": {}", last.trim()),
                    None => Ok(()),
                }
            }
            Failure::CommandNotFound => f.write_str("command not found"),
            Failure::PortInUse { port } => write!(f, "port {port} is already in use"),
            Failure::Exited { code } => write!(f, "exited with code {code}"),
            Failure::Killed { signal } => write!(f, "killed by signal {signal}"),
            Failure::OutOfMemory => f.write_str("killed by the kernel: out of memory"),
            Failure::HealthCheckFailed { check, detail } => {
                write!(f, "health check {check} failed: {detail}")
            }
            Failure::NodeLost { node } => write!(f, "node {node} was lost"),
            Failure::NoAllowedNode { pins, rejected } if rejected.is_empty() => {
                let names: Vec<&str> = pins.iter().map(NodeName::as_str).collect();
                if names.is_empty() {
                    f.write_str("no node is alive")
                } else {
                    write!(f, "none of its nodes is alive ({})", names.join(", "))
                }
            }
            Failure::NoAllowedNode { rejected, .. } => {
                f.write_str("no node can take it: ")?;
                for (i, r) in rejected.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{} {}", r.node, r.why)?;
                }
                Ok(())
            }
            Failure::StopTimedOut => f.write_str("did not stop within its grace period"),
            Failure::Vanished => f.write_str("ended with an unknown exit status (re-adopted)"),
        }
    }
}

/// Why one node did not take a process (placement's feasibility filters, in the order they
/// run).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Unfit {
    /// The node is not alive.
    Dead,
    /// The process's pins do not name it.
    PinnedOut,
    /// Another process holds the port there.
    PortTaken { port: u16 },
    /// It has less memory available than a new process needs (bytes available).
    LowMemory { available: u64 },
}

impl fmt::Display for Unfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unfit::Dead => f.write_str("is dead"),
            Unfit::PinnedOut => f.write_str("is not in its pins"),
            Unfit::PortTaken { port } => write!(f, "has port {port} taken"),
            Unfit::LowMemory { available } => {
                write!(f, "has too little memory ({} MiB free)", available >> 20)
            }
        }
    }
}

/// A node that did not take a process, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rejection {
    /// The node.
    pub node: NodeName,
    /// Why it did not take the process.
    #[serde(flatten)]
    pub why: Unfit,
}

/// Where a process is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Status {
    /// Accepted by its node, waiting to start (first start, or a restart's backoff).
    Pending,
    /// Recovered after its agent restarted; waits to hear the network before starting again
    /// (the root may have placed it elsewhere meanwhile).
    Parked,
    /// Desired, but no node can take it; `last_failure` says why. The root places it as soon
    /// as a node can.
    Unplaced,
    /// Its strategy's deploy step is running.
    Deploying,
    /// Its command runs.
    Running,
    /// It is being stopped.
    Stopping,
    /// It was stopped on request.
    Stopped,
    /// It is not running, for this reason.
    Failed(Failure),
    /// Its node is gone; the root will place it again.
    Lost,
}

impl Status {
    /// The seed's boolean status.
    pub fn is_running(&self) -> bool {
        matches!(self, Status::Running)
    }

    /// Whether the process ended and will not come back by itself.
    pub fn is_final(&self) -> bool {
        matches!(self, Status::Stopped | Status::Failed(_))
    }

    /// Whether a record in this status may move to `next`: the lifecycle's transition table.
    /// Staying where it is (the very same status) is always allowed. A final status moves
    /// nowhere: a process stopped or failed comes back only as a new record (a new spin, a new
    /// placement).
    ///
    /// | from | to |
    /// | --- | --- |
    /// | `Pending` | `Parked`, `Unplaced`, `Deploying`, `Running`, `Stopped`, `Failed`, `Lost` |
    /// | `Parked` | `Pending` (unparked), `Running` (found running at recovery), `Stopped`, `Lost` |
    /// | `Unplaced` | `Pending` (a node can take it), `Stopped`, `Lost` |
    /// | `Deploying` | `Pending` (deploy failed, restarts), `Parked`, `Running`, `Stopped`, `Failed`, `Lost` |
    /// | `Running` | `Pending` (restarts), `Parked`, `Stopping`, `Stopped`, `Failed`, `Lost` |
    /// | `Stopping` | `Stopped`, `Lost` |
    /// | `Stopped`, `Failed` | nothing |
    /// | `Lost` | anything but `Unplaced` and `Lost`: its node came back and says where it is |
    pub fn can_become(&self, next: &Status) -> bool {
        use Status::*;
        if self == next {
            return true;
        }
        match self {
            Pending => matches!(
                next,
                Parked | Unplaced | Deploying | Running | Stopped | Failed(_) | Lost
            ),
            Parked => matches!(next, Pending | Running | Stopped | Lost),
            Unplaced => matches!(next, Pending | Stopped | Lost),
            Deploying => matches!(
                next,
                Pending | Parked | Running | Stopped | Failed(_) | Lost
            ),
            Running => matches!(
                next,
                Pending | Parked | Stopping | Stopped | Failed(_) | Lost
            ),
            Stopping => matches!(next, Stopped | Lost),
            Stopped | Failed(_) => false,
            Lost => !matches!(next, Unplaced | Lost),
        }
    }

    /// A short lower-case name (`running`, `failed`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Parked => "parked",
            Status::Unplaced => "unplaced",
            Status::Deploying => "deploying",
            Status::Running => "running",
            Status::Stopping => "stopping",
            Status::Stopped => "stopped",
            Status::Failed(_) => "failed",
            Status::Lost => "lost",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Failed(failure) => write!(f, "failed: {failure}"),
            other => f.write_str(other.name()),
        }
    }
}

/// What happened to a process.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", deny_unknown_fields)]
#[non_exhaustive]
pub enum EventKind {
    /// Assigned to a node with this generation.
    Placed { node: NodeName, generation: u64 },
    /// Its deploy step finished.
    Deployed,
    /// Its command started.
    Started { pid: u32 },
    /// It became healthy.
    Healthy,
    /// It ended, for this reason.
    Exited { failure: Failure },
    /// It is being started again (the n-th restart in a row) after a delay.
    Restarted { attempt: u32, delay_ms: u64 },
    /// It moved to another node.
    Moved { from: NodeName, to: NodeName },
    /// It was stopped on request.
    Killed,
    /// No node could take it, for this reason (the root keeps it unplaced).
    #[serde(alias = "Held")]
    Unplaced { failure: Failure },
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventKind::Placed { node, generation } => {
                write!(f, "placed on {node} (generation {generation})")
            }
            EventKind::Deployed => f.write_str("deployed"),
            EventKind::Started { pid } => write!(f, "started (pid {pid})"),
            EventKind::Healthy => f.write_str("healthy"),
            EventKind::Exited { failure } => write!(f, "exited: {failure}"),
            EventKind::Restarted { attempt, delay_ms } => {
                write!(f, "restart #{attempt} after {delay_ms} ms")
            }
            EventKind::Moved { from, to } => write!(f, "moved from {from} to {to}"),
            EventKind::Killed => f.write_str("killed on request"),
            EventKind::Unplaced { failure } => write!(f, "unplaced: {failure}"),
        }
    }
}

/// One entry of a process's history. (`deny_unknown_fields` does not combine with `flatten`;
/// the kind's own tag rejects what it does not know.)
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Event {
    /// When it happened.
    pub at: Timestamp,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The node a process runs on: its stable name and its current address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRef {
    /// The node's name.
    pub name: NodeName,
    /// Its address as the network last saw it (host, without port).
    pub address: String,
}

/// How a process is looked up: by id or by domain name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProcessKey {
    /// By its id.
    Id(ProcessId),
    /// By the domain name routed to it.
    Domain(String),
}

impl fmt::Display for ProcessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessKey::Id(id) => write!(f, "{id}"),
            ProcessKey::Domain(d) => f.write_str(d),
        }
    }
}

/// The network's record of one process: the seed's fields (address, port, task name and id,
/// deployment script, start/stop commands, status, domain, memory) and P2F's additions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    /// Stable across restarts and moves of the same placement.
    pub id: ProcessId,
    /// Grows each time the process is (re)placed; fences stale copies.
    pub generation: u64,
    /// Everything needed to reproduce it: the spec with its bundle.
    pub spec: ProcessSpec,
    /// The node it runs on.
    pub node: NodeRef,
    /// The address reachable from outside (through the root when its node is behind NAT).
    pub external: Option<String>,
    /// The port it listens on.
    pub port: Option<u16>,
    /// Where the kernel says its port is bound while it runs (`IP:PORT`, from the node's
    /// `/proc/net/tcp{,6}`): `0.0.0.0:P` or `[::]:P` for every address, `127.0.0.1:P` for its
    /// node only. Absent until it listens, and for a process without a port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Where it is in its life.
    pub status: Status,
    /// Its OS process id (the process group leader).
    pub pid: Option<u32>,
    /// When its command last started.
    pub started_at: Option<Timestamp>,
    /// Restarts in place since it was placed.
    pub restarts: u32,
    /// Why it last failed.
    pub last_failure: Option<Failure>,
    /// RSS of its process group, refreshed while it runs.
    pub memory_bytes: u64,
    /// Its recent history, oldest first (at most [`Process::HISTORY`] entries).
    pub events: Vec<Event>,
}

impl Process {
    /// How many events a record keeps.
    pub const HISTORY: usize = 32;

    /// A new record for `spec` placed on `node`, `Pending`, with a `Placed` event.
    pub fn placed(
        id: ProcessId,
        generation: u64,
        spec: ProcessSpec,
        node: NodeRef,
        at: Timestamp,
    ) -> Process {
        let port = spec.port();
        let mut process = Process {
            id,
            generation,
            spec,
            node,
            external: None,
            port,
            listen: None,
            status: Status::Pending,
            pid: None,
            started_at: None,
            restarts: 0,
            last_failure: None,
            memory_bytes: 0,
            events: Vec::new(),
        };
        let placed = EventKind::Placed {
            node: process.node.name.clone(),
            generation,
        };
        process.record(at, placed);
        process
    }

    /// The service name (the seed's task name).
    pub fn name(&self) -> &str {
        self.spec.name()
    }

    /// The domain routed to it.
    pub fn domain(&self) -> Option<&str> {
        self.spec.domain()
    }

    /// The seed's boolean status.
    pub fn is_running(&self) -> bool {
        self.status.is_running()
    }

    /// Whether a health check passed since its command last started.
    pub fn passed_health_check(&self) -> bool {
        self.events
            .iter()
            .rev()
            .take_while(|e| !matches!(e.kind, EventKind::Started { .. }))
            .any(|e| e.kind == EventKind::Healthy)
    }

    /// Running, and its health check passed since it started.
    pub fn is_healthy(&self) -> bool {
        self.is_running() && self.passed_health_check()
    }

    /// Whether `key` names this process.
    pub fn matches(&self, key: &ProcessKey) -> bool {
        match key {
            ProcessKey::Id(id) => &self.id == id,
            ProcessKey::Domain(d) => self.domain().is_some_and(|own| own.eq_ignore_ascii_case(d)),
        }
    }

    /// Appends an event, keeping the last [`Process::HISTORY`].
    pub fn record(&mut self, at: Timestamp, kind: EventKind) {
        if self.events.len() >= Self::HISTORY {
            let excess = self.events.len() + 1 - Self::HISTORY;
            self.events.drain(..excess);
        }
        self.events.push(Event { at, kind });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_say_why_in_one_line() {
        let cases = [
            (Failure::Exited { code: 3 }, "exited with code 3"),
            (Failure::Killed { signal: 9 }, "killed by signal 9"),
            (Failure::CommandNotFound, "command not found"),
            (Failure::PortInUse { port: 80 }, "port 80 is already in use"),
            (
                Failure::DeployFailed {
                    exit: Some(1),
                    stderr_tail: "a\nerror: no flake\n\n".into(),
                },
                "deploy step failed with exit code 1: error: no flake",
            ),
            (
                Failure::NoAllowedNode {
                    pins: vec![NodeName::from_static("pi")],
                    rejected: Vec::new(),
                },
                "none of its nodes is alive (pi)",
            ),
            (
                Failure::NoAllowedNode {
                    pins: Vec::new(),
                    rejected: vec![
                        Rejection {
                            node: NodeName::from_static("a"),
                            why: Unfit::Dead,
                        },
                        Rejection {
                            node: NodeName::from_static("b"),
                            why: Unfit::PortTaken { port: 80 },
                        },
                        Rejection {
                            node: NodeName::from_static("c"),
                            why: Unfit::LowMemory {
                                available: 64 << 20,
                            },
                        },
                    ],
                },
                "no node can take it: a is dead, b has port 80 taken, c has too little memory (64 MiB free)",
            ),
        ];
        for (failure, text) in cases {
            assert_eq!(failure.to_string(), text);
            let json = serde_json::to_string(&failure).expect("serialize");
            assert_eq!(
                serde_json::from_str::<Failure>(&json).expect("parse"),
                failure
            );
        }
    }

    #[test]
    fn status_transitions_follow_the_table() {
        use Status::*;
        let failed = || Failed(Failure::Exited { code: 1 });
        let check = |from: Status, to: Status, allowed: bool| {
            assert_eq!(from.can_become(&to), allowed, "{from} -> {to}");
        };
        // Staying is not a move.
        check(Pending, Pending, true);
        check(Running, Running, true);
        check(Stopped, Stopped, true);
        check(failed(), failed(), true);
        check(failed(), Failed(Failure::Exited { code: 2 }), false);
        // Pending: accepted, waiting to start.
        check(Pending, Parked, true);
        check(Pending, Unplaced, true);
        check(Pending, Deploying, true);
        check(Pending, Running, true);
        check(Pending, Stopping, false);
        check(Pending, Stopped, true);
        check(Pending, failed(), true);
        check(Pending, Lost, true);
        // Parked: recovered, waiting to hear the network.
        check(Parked, Pending, true);
        check(Parked, Running, true);
        check(Parked, Stopped, true);
        check(Parked, Lost, true);
        check(Parked, Deploying, false);
        check(Parked, Stopping, false);
        check(Parked, failed(), false);
        check(Parked, Unplaced, false);
        // Unplaced: the root's record of a process no node can take.
        check(Unplaced, Pending, true);
        check(Unplaced, Stopped, true);
        check(Unplaced, Lost, true);
        check(Unplaced, Running, false);
        check(Unplaced, Deploying, false);
        check(Unplaced, Parked, false);
        check(Unplaced, failed(), false);
        // Deploying: its deploy step runs.
        check(Deploying, Running, true);
        check(Deploying, Pending, true);
        check(Deploying, Parked, true);
        check(Deploying, Stopped, true);
        check(Deploying, failed(), true);
        check(Deploying, Lost, true);
        check(Deploying, Stopping, false);
        check(Deploying, Unplaced, false);
        // Running.
        check(Running, Stopping, true);
        check(Running, Pending, true);
        check(Running, Parked, true);
        check(Running, Stopped, true);
        check(Running, failed(), true);
        check(Running, Lost, true);
        check(Running, Deploying, false);
        check(Running, Unplaced, false);
        // Stopping: only its end.
        check(Stopping, Stopped, true);
        check(Stopping, Lost, true);
        check(Stopping, Running, false);
        check(Stopping, Pending, false);
        check(Stopping, failed(), false);
        // Final: nowhere.
        check(Stopped, Pending, false);
        check(Stopped, Running, false);
        check(Stopped, Lost, false);
        check(failed(), Pending, false);
        check(failed(), Stopped, false);
        check(failed(), Lost, false);
        // Lost: its node came back and says where the process is.
        check(Lost, Running, true);
        check(Lost, Pending, true);
        check(Lost, Stopped, true);
        check(Lost, failed(), true);
        check(Lost, Unplaced, false);
    }

    #[test]
    fn history_keeps_the_newest_events() {
        let spec = ProcessSpec::new("wiki", "true");
        let node = NodeRef {
            name: NodeName::from_static("pi"),
            address: "127.0.0.1".into(),
        };
        let mut p = Process::placed(
            ProcessId::for_service("wiki", 1),
            1,
            spec,
            node,
            Timestamp(0),
        );
        for i in 0..100 {
            p.record(Timestamp(i), EventKind::Started { pid: i as u32 });
        }
        assert_eq!(p.events.len(), Process::HISTORY);
        assert_eq!(p.events.last().map(|e| e.at), Some(Timestamp(99)));
    }
}
