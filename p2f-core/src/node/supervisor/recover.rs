//! What happens to this node's records when the agent starts again: what still runs is
//! re-adopted, what should run but does not starts again (or, on a member that was away, is
//! parked until [`Supervisor::unpark`] hears the network), the rest is kept as it is.

use p2f_model::{Process, Status};
use tokio::sync::watch;

use super::spawn::Identity;
use super::task::{self, Begin};
use super::{Claim, Desired, Recovery, Runner, Slot, Supervisor, Writing, now};
use crate::node::lifecycle;
use crate::node::os;
use crate::store::{Entry, Local, StoreError};

/// What becomes of a recovered record.
enum Next {
    /// Nothing runs it: it is stopped or failed.
    Rest,
    /// It waits for [`Supervisor::unpark`].
    Park,
    /// Its task starts now.
    Run(Begin),
}

impl Supervisor {
    /// Decides what to do with one stored record after a restart of the agent (before the
    /// supervisor is shared: the record is written without contention).
    pub(super) fn recover(&self, mut entry: Entry, recovery: Recovery) -> Result<(), StoreError> {
        let stored = entry.clone();
        let live = entry
            .local
            .filter(|l| os::is_same_process(l.pgid, l.start_ticks))
            .or_else(|| find_orphan(&entry.process));
        let process = &mut entry.process;
        let at = now();
        let next = match (&process.status, live) {
            (Status::Stopped | Status::Failed(_), _) => Next::Rest,
            (Status::Stopping, None) => {
                lifecycle::on_stopped(process, at);
                entry.local = None;
                Next::Rest
            }
            (_, Some(local)) => {
                tracing::info!(id = %process.id, pid = local.pgid, "re-adopted a running process");
                lifecycle::on_readopted(process, local.pgid, at);
                entry.local = Some(local);
                Next::Run(Begin::Adopt(local))
            }
            (status, None) => {
                if *status == Status::Running {
                    tracing::warn!(id = %process.id, "ended while the agent was down; starting it again");
                }
                entry.local = None;
                match recovery {
                    Recovery::Restart => {
                        lifecycle::on_recovered(process, at);
                        Next::Run(Begin::Fresh)
                    }
                    Recovery::Park => {
                        tracing::info!(id = %process.id, generation = process.generation, "waiting for the network before starting it again");
                        lifecycle::on_parked(process, at);
                        Next::Park
                    }
                }
            }
        };
        if entry != stored {
            self.inner.store.put(&entry)?;
        }
        let stopping = entry.process.status == Status::Stopping;
        let (desired, rx) = watch::channel(if stopping {
            Desired::Stop
        } else {
            Desired::Run
        });
        let runner = match next {
            Next::Rest => Runner::Idle,
            Next::Park => Runner::Parked,
            Next::Run(begin) => Runner::Task(tokio::spawn(task::run(
                self.inner.clone(),
                entry.clone(),
                rx,
                begin,
            ))),
        };
        let id = entry.process.id.clone();
        self.inner
            .lock()
            .slots
            .insert(id, Slot::new(entry, desired, runner));
        Ok(())
    }

    /// Starts the processes recovery parked (each says `Pending`, then runs), except those
    /// `replaced` names (with the reason): another node runs a newer generation, so this copy
    /// is forgotten without ever starting (its record, bundle and logs are deleted).
    pub fn unpark(&self, replaced: impl Fn(&Process) -> Option<String>) {
        // Decided without the slots lock (`replaced` may take other locks), then applied to
        // the slots still parked at the same generation.
        let parked: Vec<Process> = {
            let registry = self.inner.lock();
            registry
                .slots
                .iter()
                .filter(|(id, _)| registry.is_parked(id))
                .map(|(_, slot)| slot.process().clone())
                .collect()
        };
        let verdicts: Vec<(Process, Option<String>)> = parked
            .into_iter()
            .map(|process| {
                let reason = replaced(&process);
                (process, reason)
            })
            .collect();
        let mut forget = Vec::new();
        {
            let mut registry = self.inner.lock();
            // Under the lock `shutdown` takes to collect the tasks: no task starts after it.
            if self.inner.closing.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            for (process, reason) in verdicts {
                let id = &process.id;
                let still = registry.is_parked(id)
                    && registry.slots.get(id).map(|s| s.process().generation)
                        == Some(process.generation);
                if !still {
                    continue;
                }
                if let Some(reason) = reason {
                    tracing::warn!(%id, generation = process.generation, "not started again: {reason}");
                    // Deleted off the lock under a claim: a spin of the same id waits for it,
                    // so its new record is never the one deleted.
                    let claim =
                        Claim::take(&self.inner, &mut registry, id.clone(), Writing::Changing);
                    forget.push(claim);
                    continue;
                }
                tracing::info!(%id, "starting it again");
                let Some(slot) = registry.slots.get_mut(id) else {
                    continue;
                };
                let rx = slot.desired.subscribe();
                let run = task::run(self.inner.clone(), slot.entry.clone(), rx, Begin::Unparked);
                slot.runner = Runner::Task(tokio::spawn(run));
            }
        }
        if forget.is_empty() {
            return;
        }
        for claim in forget {
            if let Err(e) = self.inner.forget(claim.id()) {
                tracing::warn!(id = %claim.id(), "cannot delete the replaced record: {e}");
            }
            // Gone either way: the network has a newer copy. (A record left on disk is parked
            // again by the next start, and asked about again.)
            let mut registry = self.inner.lock();
            registry.slots.remove(claim.id());
            claim.release(&mut registry);
        }
        self.inner.bump();
    }
}

/// A process of this placement that runs although the record does not say so (the agent died
/// between starting it and writing its pid), with its relay when that runs too. Only one that
/// runs as the uid the record expects (its spec's user, else the agent's): anyone can set the
/// variables that name a placement, and adopting an impostor would let it be stopped, counted
/// and reported as the service.
fn find_orphan(process: &Process) -> Option<Local> {
    let found = os::find_by_env(process.id.as_str(), process.generation);
    let leaders = found.into_iter().filter(|(pid, pgid)| pid == pgid);
    let (relays, mains): (Vec<u32>, Vec<u32>) = leaders
        .map(|(pid, _)| pid)
        .partition(|pid| os::is_relay(*pid));
    let expected = match Identity::of(process) {
        Ok(Some(who)) => who.uid(),
        Ok(None) => nix::unistd::geteuid().as_raw(),
        Err(_) => return None,
    };
    let main = *mains
        .iter()
        .find(|pid| os::uid_of(**pid) == Some(expected))?;
    let agent = nix::unistd::geteuid().as_raw();
    let relay = relays
        .iter()
        .copied()
        .find(|pid| os::uid_of(*pid) == Some(agent))
        .unwrap_or(0);
    Some(Local {
        pgid: main,
        start_ticks: os::start_ticks(main)?,
        relay,
        relay_ticks: os::start_ticks(relay).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use p2f_model::{NodeName, NodeRef, ProcessId, ProcessSpec, Timestamp};

    use super::*;

    /// A process-group leader carrying the variables of placement `id` generation 1, run as
    /// `uid` (through `setpriv`, when not the agent's own); killed when dropped.
    struct Candidate(std::process::Child);

    impl Candidate {
        fn start(id: &ProcessId, uid: Option<u32>) -> Candidate {
            let mut command = match uid {
                Some(uid) => {
                    let mut command = Command::new("setpriv");
                    command.args([
                        format!("--reuid={uid}"),
                        format!("--regid={uid}"),
                        "--clear-groups".to_owned(),
                        "--".to_owned(),
                        "sleep".to_owned(),
                    ]);
                    command
                }
                None => Command::new("sleep"),
            };
            command
                .arg("100")
                .env("P2F_PROCESS_ID", id.as_str())
                .env("P2F_GENERATION", "1")
                .stdin(Stdio::null())
                .process_group(0);
            use std::os::unix::process::CommandExt as _;
            Candidate(command.spawn().expect("start the candidate"))
        }
    }

    impl Drop for Candidate {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// An orphan is adopted only when it runs as the uid its record expects: an impostor with
    /// the right variables (any local user can set them) is not (issue: trust, item 6).
    #[test]
    fn an_impostor_with_the_right_environment_is_not_adopted() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test runs an impostor as another user: run it as root (CI does)"
        );
        let node = NodeRef {
            name: NodeName::from_static("n1"),
            address: "127.0.0.1".into(),
        };
        let id = ProcessId::for_service("vault", std::process::id().into());
        let process = Process::placed(
            id.clone(),
            1,
            ProcessSpec::new("vault", "exec sleep 100"),
            node,
            Timestamp(1),
        );
        let impostor = Candidate::start(&id, Some(65534));
        let deadline = Instant::now() + Duration::from_secs(5);
        // Judged once it runs as its user: `setpriv` starts as root and drops to 65534 before
        // it execs the impostor (same pid), and only then is it what an impostor would be.
        let impostor_pid = impostor.0.id();
        while os::uid_of(impostor_pid) != Some(65534) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            os::uid_of(impostor_pid),
            Some(65534),
            "the impostor runs as nobody"
        );
        assert!(
            !os::find_by_env(id.as_str(), 1).is_empty(),
            "the impostor runs"
        );
        assert!(find_orphan(&process).is_none(), "an impostor was adopted");
        drop(impostor);
        let real = Candidate::start(&id, None);
        let pid = real.0.id();
        let mut found = None;
        while found.is_none() && Instant::now() < deadline + Duration::from_secs(5) {
            found = find_orphan(&process);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            found.map(|local| local.pgid),
            Some(pid),
            "the real one is adopted"
        );
    }
}
