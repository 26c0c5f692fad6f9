//! The root's placement book: per desired process, what was sent where, where it failed, the
//! placement it waits to see, and whether its old copy is being removed. In memory: a restarted
//! root starts from the records.

use std::collections::HashMap;
use std::time::Instant;

use p2f_model::{NodeName, ProcessId};

/// A placement sent and not seen in the records yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Its generation.
    pub generation: u64,
    /// The node it went to.
    pub node: NodeName,
    /// When it was sent.
    pub at: Instant,
}

/// What the root remembers of one process.
#[derive(Debug, Default, Clone)]
pub struct Entry {
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
    /// The last placement, until it shows up.
    placed: Option<Placement>,
    /// Its old copy is being removed (to be placed again with a new spec).
    replacing: bool,
}

impl Entry {
    /// The generation to send `wanted` to `node` with (`None`: no node yet, for an unplaced
    /// record). The same node may get the generation it was last sent again (it answers a
    /// repeat with the copy it has); any other node gets one above every generation sent, so
    /// a copy that landed unanswered is fenced, never doubled.
    pub fn next_generation(&self, wanted: u64, node: Option<&NodeName>) -> u64 {
        if self.sent == 0 {
            wanted
        } else if node.is_some() && self.sent_to.as_ref() == node && wanted <= self.sent {
            self.sent
        } else {
            wanted.max(self.sent + 1)
        }
    }

    /// Notes that `generation` goes to `node` now.
    pub fn send(&mut self, generation: u64, node: &NodeName, at: Instant) {
        self.sent = self.sent.max(generation);
        self.sent_to = Some(node.clone());
        if self
            .placed
            .as_ref()
            .is_none_or(|p| p.generation <= generation)
        {
            self.placed = Some(Placement {
                generation,
                node: node.clone(),
                at,
            });
        }
    }

    /// Notes that `generation` is replaced: whatever comes next is above it, on any node.
    pub fn supersede(&mut self, generation: u64) {
        self.sent = self.sent.max(generation);
        self.sent_to = None;
        self.placed = None;
    }

    /// Notes that `generation` failed on `node`; a generation noted already changes nothing.
    pub fn failed(&mut self, generation: u64, node: &NodeName) {
        let noted = self.noted.entry(node.clone()).or_default();
        if generation <= *noted {
            return;
        }
        *noted = generation;
        self.failed_on.retain(|n| n != node);
        self.failed_on.push(node.clone());
    }

    /// Stops waiting for the placement of `generation` (it showed up, or was refused), unless
    /// a newer one was sent meanwhile.
    pub fn settle(&mut self, generation: u64) {
        if self
            .placed
            .as_ref()
            .is_some_and(|p| p.generation == generation)
        {
            self.placed = None;
        }
    }

    /// The placement waited for, if any.
    pub fn placed(&self) -> Option<&Placement> {
        self.placed.as_ref()
    }

    /// Nodes it failed on, the most recent last.
    pub fn failed_on(&self) -> &[NodeName] {
        &self.failed_on
    }

    /// Whether its old copy is being removed.
    pub fn replacing(&self) -> bool {
        self.replacing
    }

    /// Marks the removal of its old copy as under way or done.
    pub fn set_replacing(&mut self, replacing: bool) {
        self.replacing = replacing;
    }
}

/// Every desired process's [`Entry`].
#[derive(Debug, Default, Clone)]
pub struct Book {
    entries: HashMap<ProcessId, Entry>,
}

impl Book {
    /// The entry of `id` (an empty one if the root knows nothing of it yet).
    pub fn get(&self, id: &ProcessId) -> Entry {
        self.entries.get(id).cloned().unwrap_or_default()
    }

    /// The entry of `id`, to change.
    pub fn entry(&mut self, id: &ProcessId) -> &mut Entry {
        self.entries.entry(id.clone()).or_default()
    }

    /// Forgets `id` (it left the deployment).
    pub fn forget(&mut self, id: &ProcessId) {
        self.entries.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_node_never_gets_a_generation_sent_before() {
        let [a, b] = [NodeName::from_static("a"), NodeName::from_static("b")];
        let mut entry = Entry::default();
        let now = Instant::now();
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
            let generation = entry.next_generation(wanted, Some(to));
            entry.send(generation, to, now);
            assert_eq!(generation, sent, "step {i}");
        }
        assert_eq!(entry.next_generation(1, None), 10, "an unplaced record's");
        // A replaced copy (new spec): the next one is above it, on the same node too.
        entry.supersede(9);
        assert_eq!(entry.next_generation(1, Some(&a)), 10);
    }

    #[test]
    fn failures_are_noted_once_per_generation_most_recent_last() {
        let [a, b] = [NodeName::from_static("a"), NodeName::from_static("b")];
        let mut entry = Entry::default();
        entry.failed(1, &a);
        entry.failed(2, &b);
        // The failed record of generation 1 is seen again on the next pass: nothing changes,
        // so a (failed on least recently) is tried next.
        entry.failed(1, &a);
        assert_eq!(entry.failed_on(), [a.clone(), b.clone()]);
        entry.failed(3, &a);
        assert_eq!(entry.failed_on(), [b.clone(), a.clone()]);
        // Marks are per node: a later failure of an older generation elsewhere still counts
        // (a move's copy that never showed up, then the old copy failing).
        entry.failed(5, &b);
        entry.failed(4, &a);
        assert_eq!(entry.failed_on(), [b, a]);
    }

    #[test]
    fn a_placement_is_waited_for_until_it_settles_and_a_newer_one_is_kept() {
        let a = NodeName::from_static("a");
        let now = Instant::now();
        let mut entry = Entry::default();
        entry.send(2, &a, now);
        entry.send(1, &a, now);
        assert_eq!(
            entry.placed().map(|p| p.generation),
            Some(2),
            "an older send"
        );
        entry.settle(1);
        assert!(entry.placed().is_some(), "settling an older one keeps it");
        entry.settle(2);
        assert!(entry.placed().is_none());
    }
}
