//! The root's records of desired processes that no node could take: `Unplaced`, with the
//! reason, published like any local record until the process is placed (or killed on request:
//! then `Stopped`, and the root stops trying until the deployment is given again).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use p2f_model::{EventKind, Failure, NodeRef, Process, ProcessId, ProcessSpec, Status, Timestamp};
use tokio::sync::watch;

use crate::records::listing::Listed;
use crate::records::{LocalRecords, Origin};

/// The unplaced records, a source of this node's records.
#[derive(Debug)]
pub struct Unplaced {
    /// Where the records say they are: the root.
    root: NodeRef,
    records: Mutex<HashMap<ProcessId, Listed>>,
    version: watch::Sender<u64>,
}

impl Unplaced {
    /// An empty set, its records shown on `root`.
    pub fn new(root: NodeRef) -> Unplaced {
        Unplaced {
            root,
            records: Mutex::new(HashMap::new()),
            version: watch::channel(0).0,
        }
    }

    fn records(&self) -> MutexGuard<'_, HashMap<ProcessId, Listed>> {
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The unplaced record of `id`, if there is one.
    pub fn get(&self, id: &ProcessId) -> Option<Process> {
        self.records().get(id).map(|l| (**l.process()).clone())
    }

    /// Keeps `id` unplaced at `generation` for `failure`: a new record, or the existing one
    /// with the new reason (its history says so once per change of reason).
    pub fn hold(&self, id: &ProcessId, generation: u64, spec: &ProcessSpec, failure: Failure) {
        let now = Timestamp::now();
        let mut records = self.records();
        let mut process = match records.get(id) {
            Some(old) if old.process().generation == generation && old.process().spec == *spec => {
                if old.process().last_failure.as_ref() == Some(&failure) {
                    return;
                }
                (**old.process()).clone()
            }
            _ => {
                let mut p =
                    Process::placed(id.clone(), generation, spec.clone(), self.root.clone(), now);
                // Not placed anywhere: the history starts with why.
                p.events.clear();
                p
            }
        };
        process.status = Status::Unplaced;
        process.last_failure = Some(failure.clone());
        process.record(now, EventKind::Unplaced { failure });
        records.insert(id.clone(), Listed::new(process));
        drop(records);
        self.bump();
    }

    /// Stops keeping `id` unplaced (it was placed, or left the deployment).
    pub fn release(&self, id: &ProcessId) {
        let removed = self.records().remove(id).is_some();
        if removed {
            self.bump();
        }
    }
}

impl LocalRecords for Unplaced {
    fn origin(&self) -> Origin {
        Origin::Unplaced
    }

    fn listed(&self) -> Vec<Listed> {
        let mut all: Vec<Listed> = self.records().values().cloned().collect();
        all.sort_by(|a, b| a.process().id.cmp(&b.process().id));
        all
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn kill_unrun(&self, id: &ProcessId) -> Option<Process> {
        let mut records = self.records();
        let listed = records.get(id)?;
        let mut process = (**listed.process()).clone();
        if process.status != Status::Stopped {
            process.status = Status::Stopped;
            process.record(Timestamp::now(), EventKind::Killed);
            records.insert(id.clone(), Listed::new(process.clone()));
            drop(records);
            self.bump();
        }
        Some(process)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2f_model::NodeName;

    #[test]
    fn a_reason_is_recorded_once_per_change_and_a_kill_stops_it() {
        let unplaced = Unplaced::new(NodeRef {
            name: NodeName::from_static("root"),
            address: "127.0.0.1".into(),
        });
        let id = ProcessId::for_service("web", 1);
        let spec = ProcessSpec::new("web", "true");
        let dead = Failure::NoAllowedNode {
            pins: Vec::new(),
            rejected: Vec::new(),
        };
        unplaced.hold(&id, 3, &spec, dead.clone());
        unplaced.hold(&id, 3, &spec, dead.clone());
        let record = unplaced.get(&id).expect("held");
        assert_eq!(
            (
                record.status.clone(),
                record.generation,
                record.events.len()
            ),
            (Status::Unplaced, 3, 1)
        );
        let other = Failure::NoAllowedNode {
            pins: vec![NodeName::from_static("pi")],
            rejected: Vec::new(),
        };
        unplaced.hold(&id, 3, &spec, other.clone());
        let record = unplaced.get(&id).expect("held");
        assert_eq!((record.last_failure, record.events.len()), (Some(other), 2));

        let killed = unplaced.kill_unrun(&id).expect("known");
        assert_eq!(killed.status, Status::Stopped);
        assert_eq!(unplaced.listed().len(), 1, "kept, stopped");
        assert!(
            unplaced
                .kill_unrun(&ProcessId::for_service("x", 1))
                .is_none()
        );
        unplaced.release(&id);
        assert!(unplaced.listed().is_empty());
    }
}
