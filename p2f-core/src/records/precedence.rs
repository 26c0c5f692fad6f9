//! Which copy of a process wins when a node knows several: its own, other nodes' (two while a
//! returning node still has the copy the network replaced), and the root's record of a process
//! no node could take. One rule, used by listing, fencing, unparking, every lookup and the root:
//!
//! 1. the higher generation (a fencing token: the root raises it at every placement);
//! 2. then the copy furthest along: `Running` before deploying, pending, stopping, parked,
//!    unplaced, ended; a copy whose node is dead counts as `Lost`, last;
//! 3. then a real copy before the root's unplaced record;
//! 4. then the node whose name sorts first (the same answer on every node).
//!
//! Two real copies of one generation exist only by mistake (a root restarted while a placement
//! was in doubt, a spin by hand); the rule keeps exactly one of them.

use std::cmp::Ordering;

use p2f_model::{NodeName, Process, Status};

/// Where a copy of a record comes from, as seen by one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// This node's supervisor runs it.
    Local,
    /// Another node published it.
    Remote,
    /// The root keeps it because no node could take it (on the root only; other nodes see it
    /// as a remote record whose status is `Unplaced`).
    Unplaced,
}

/// What precedence looks at in one copy.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Its generation.
    pub generation: u64,
    /// Its status as recorded.
    pub status: &'a Status,
    /// Where it comes from.
    pub origin: Origin,
    /// The node it is recorded on.
    pub node: &'a NodeName,
    /// Whether that node is alive (a dead node's copy counts as `Lost`).
    pub alive: bool,
}

impl<'a> Candidate<'a> {
    /// `process` as a candidate from `origin`, its node alive.
    pub fn of(process: &'a Process, origin: Origin) -> Candidate<'a> {
        Candidate {
            generation: process.generation,
            status: &process.status,
            origin,
            node: &process.node.name,
            alive: true,
        }
    }

    /// The same candidate, its node alive or not.
    pub fn alive(self, alive: bool) -> Candidate<'a> {
        Candidate { alive, ..self }
    }
}

/// How far along a status is: lower wins.
fn progress(status: &Status, alive: bool) -> u8 {
    if !alive {
        return 9;
    }
    match status {
        Status::Running => 0,
        Status::Deploying => 1,
        Status::Pending => 2,
        Status::Stopping => 3,
        Status::Parked => 4,
        Status::Unplaced => 5,
        Status::Stopped => 6,
        Status::Failed(_) => 7,
        Status::Lost => 8,
        // A status added later ranks with the ended ones until it is placed here.
        _ => 6,
    }
}

fn origin_rank(origin: Origin) -> u8 {
    match origin {
        Origin::Local | Origin::Remote => 0,
        Origin::Unplaced => 1,
    }
}

/// The order of two copies of the same process: `Less` when `a` wins.
pub fn order(a: &Candidate<'_>, b: &Candidate<'_>) -> Ordering {
    b.generation
        .cmp(&a.generation)
        .then_with(|| progress(a.status, a.alive).cmp(&progress(b.status, b.alive)))
        .then_with(|| origin_rank(a.origin).cmp(&origin_rank(b.origin)))
        .then_with(|| a.node.cmp(b.node))
}

/// Whether copy `a` wins over copy `b` of the same process.
pub fn wins(a: &Candidate<'_>, b: &Candidate<'_>) -> bool {
    order(a, b) == Ordering::Less
}

/// Among the winning copies of *different* processes that match one lookup (a domain may have
/// an old stopped process beside the one serving it): the live one first (not ended, not
/// lost), then by [`order`].
pub fn serving_order(a: &Candidate<'_>, b: &Candidate<'_>) -> Ordering {
    let ended = |c: &Candidate<'_>| c.status.is_final() || *c.status == Status::Lost || !c.alive;
    ended(a).cmp(&ended(b)).then_with(|| order(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2f_model::Failure;

    fn name(n: &'static str) -> NodeName {
        NodeName::from_static(n)
    }

    /// `(generation, status, origin, node, alive)` of two copies, and whether the first wins.
    type Side = (u64, Status, Origin, &'static str, bool);

    fn check(a: Side, b: Side, a_wins: bool) {
        let (na, nb) = (name(a.3), name(b.3));
        let ca = Candidate {
            generation: a.0,
            status: &a.1,
            origin: a.2,
            node: &na,
            alive: a.4,
        };
        let cb = Candidate {
            generation: b.0,
            status: &b.1,
            origin: b.2,
            node: &nb,
            alive: b.4,
        };
        assert_eq!(wins(&ca, &cb), a_wins, "{a:?} over {b:?}");
        // The rule is a total order: exactly one of two different copies wins.
        assert_eq!(wins(&cb, &ca), !a_wins, "{b:?} over {a:?}");
    }

    #[test]
    fn which_copy_wins() {
        use Origin::{Local as L, Remote as R, Unplaced as U};
        use Status::*;
        let failed = || Failed(Failure::Exited { code: 1 });
        // A higher generation wins whatever else holds.
        check((2, Stopped, R, "b", true), (1, Running, L, "a", true), true);
        check((2, Lost, R, "b", true), (1, Running, L, "a", true), true);
        check(
            (2, Unplaced, U, "z", true),
            (1, Running, R, "a", true),
            true,
        );
        check(
            (2, Pending, R, "b", false),
            (1, Running, L, "a", true),
            true,
        );
        // Equal generations: the copy furthest along.
        check((1, Running, R, "b", true), (1, Pending, L, "a", true), true);
        check(
            (1, Running, R, "b", true),
            (1, Deploying, L, "a", true),
            true,
        );
        check(
            (1, Deploying, R, "b", true),
            (1, Pending, L, "a", true),
            true,
        );
        check(
            (1, Pending, R, "b", true),
            (1, Stopping, L, "a", true),
            true,
        );
        check((1, Running, R, "b", true), (1, Parked, L, "a", true), true);
        check((1, Stopping, R, "b", true), (1, Parked, L, "a", true), true);
        check((1, Parked, L, "b", true), (1, Stopped, R, "a", true), true);
        check((1, Running, R, "b", true), (1, Stopped, L, "a", true), true);
        check(
            (1, Stopped, R, "b", true),
            (1, failed(), L, "a", true),
            true,
        );
        check((1, failed(), R, "b", true), (1, Lost, L, "a", true), true);
        // A real copy before the root's unplaced record of the same generation.
        check(
            (1, Pending, R, "z", true),
            (1, Unplaced, U, "a", true),
            true,
        );
        check((1, Stopped, R, "z", true), (1, Stopped, U, "a", true), true);
        // A dead node's copy counts as lost, whatever it last said.
        check(
            (1, Stopped, R, "b", true),
            (1, Running, R, "a", false),
            true,
        );
        check((1, Lost, R, "b", true), (1, Running, R, "a", false), true);
        // Two running copies of one generation (a mistake): the node named first.
        check((1, Running, R, "a", true), (1, Running, L, "b", true), true);
        check((1, Running, L, "a", true), (1, Running, R, "b", true), true);
        check((3, Stopped, L, "a", true), (3, Stopped, R, "b", true), true);
    }

    #[test]
    fn a_lookup_prefers_the_live_process() {
        let (a, b) = (name("a"), name("b"));
        let old = Candidate {
            generation: 9,
            status: &Status::Stopped,
            origin: Origin::Remote,
            node: &a,
            alive: true,
        };
        let live = Candidate {
            generation: 1,
            status: &Status::Pending,
            origin: Origin::Remote,
            node: &b,
            alive: true,
        };
        assert_eq!(serving_order(&live, &old), Ordering::Less);
        assert_eq!(serving_order(&live.alive(false), &old), Ordering::Greater);
        assert_eq!(serving_order(&old, &old), Ordering::Equal);
    }
}
