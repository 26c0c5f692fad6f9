//! One reconcile pass as a pure function: the desired services, the records as this node sees
//! them, the placement book and the time in; the actions out (Nomad's reconciler does the
//! same: classify, decide, then let an executor act). No IO and no clock, so every case is a
//! table test.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use p2f_model::{Failure, NodeName, Process, ProcessId, ProcessSpec, Status};

use super::book::{Book, Entry};
use super::placement::{self, Usage};
use crate::records::{Copy, Origin};
use crate::wire::{DesiredService, NodeStatus};

/// How long a placement is given to show up in the records before its node is avoided.
pub const PLACEMENT_GRACE: Duration = Duration::from_secs(10);

/// What the root does about one process.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// The placement of `generation` showed up: stop waiting for it.
    Settle { id: ProcessId, generation: u64 },
    /// The placement of `generation` on `node` never showed up: `node` is avoided next.
    Abandon {
        id: ProcessId,
        generation: u64,
        node: NodeName,
    },
    /// `generation` failed on `node` (its restarts are spent there): `node` is avoided next.
    NoteFailure {
        id: ProcessId,
        generation: u64,
        node: NodeName,
    },
    /// A real copy at or above the unplaced record's generation exists: the record goes.
    Release { id: ProcessId },
    /// The copy on `node` runs an old spec, or on a node its pins no longer allow: it is
    /// removed, and a later pass places the new spec with a generation above `superseded`.
    Replace {
        id: ProcessId,
        superseded: u64,
        node: NodeName,
    },
    /// Send `generation` of `spec` to `node`; `moved_from` is the node of the copy it
    /// replaces, if another.
    Place {
        id: ProcessId,
        generation: u64,
        node: NodeName,
        spec: ProcessSpec,
        moved_from: Option<NodeName>,
    },
    /// No node can take it: its unplaced record says why.
    Unplace {
        id: ProcessId,
        generation: u64,
        spec: ProcessSpec,
        failure: Failure,
    },
}

/// Where one desired process stands, before anything is decided.
#[derive(Debug)]
enum Standing<'a> {
    /// Killed on request while unplaced: left alone until the deployment is given again.
    Killed,
    /// A placement of this root's is on its way (not in the records yet, its node alive,
    /// within [`PLACEMENT_GRACE`]).
    InFlight,
    /// Its old copy is being removed.
    Replacing,
    /// Never placed, or its old copy is gone: place generation 1 (or above what was sent).
    New,
    /// Waiting for a node at `generation`.
    Unplaced { generation: u64 },
    /// Its copy runs an old spec, or where its pins no longer allow.
    Outdated(&'a Process),
    /// Its node is lost, or its restarts are spent there: place it again elsewhere.
    Down(&'a Process),
    /// Running, starting, or stopped on request: nothing to do.
    Settled,
}

/// The actions of one pass over `desired`. `view` is the records (one winning copy per id),
/// `unplaced` the root's unplaced records by id, `nodes` the directory.
pub fn plan(
    desired: &[DesiredService],
    view: &[Copy],
    unplaced: &HashMap<ProcessId, Process>,
    nodes: &[NodeStatus],
    book: &Book,
    now: Instant,
) -> Vec<Action> {
    let winners: HashMap<&ProcessId, &Copy> = view.iter().map(|c| (&c.process().id, c)).collect();
    let usage = Usage::of(view.iter().map(Copy::process));
    // Placements of this pass, not yet in the records.
    let mut placed_now: HashMap<NodeName, usize> = HashMap::new();
    let mut actions = Vec::new();
    for service in desired {
        let id = &service.id;
        let entry = book.get(id);
        // The newest real copy (the root's own unplaced record wins over lower generations).
        let newest = winners
            .get(id)
            .filter(|c| c.origin != Origin::Unplaced)
            .map(|c| c.process().as_ref());
        let mut held = unplaced.get(id);
        if held.is_some() && newest.is_some_and(|p| p.status != Status::Lost) {
            actions.push(Action::Release { id: id.clone() });
            held = None;
        }
        let standing = classify(service, newest, held, &entry, nodes, now, &mut actions);
        let (wanted, moved_from, mut entry) = match standing {
            Standing::Killed | Standing::InFlight | Standing::Replacing | Standing::Settled => {
                continue;
            }
            Standing::Outdated(p) => {
                actions.push(Action::Replace {
                    id: id.clone(),
                    superseded: p.generation,
                    node: p.node.name.clone(),
                });
                continue;
            }
            Standing::New => (1, None, entry),
            Standing::Unplaced { generation } => (generation, None, entry),
            Standing::Down(p) => {
                let mut entry = entry;
                if matches!(p.status, Status::Failed(_)) {
                    entry.failed(p.generation, &p.node.name);
                    actions.push(Action::NoteFailure {
                        id: id.clone(),
                        generation: p.generation,
                        node: p.node.name.clone(),
                    });
                }
                (p.generation + 1, Some(p.node.name.clone()), entry)
            }
        };
        let selected =
            placement::select(&service.spec, nodes, &usage, entry.failed_on(), &placed_now);
        match selected {
            Ok(target) => {
                let node = target.node.name.clone();
                let generation = entry.next_generation(wanted, Some(&node));
                entry.send(generation, &node, now);
                *placed_now.entry(node.clone()).or_default() += 1;
                actions.push(Action::Place {
                    id: id.clone(),
                    generation,
                    moved_from: moved_from.filter(|from| *from != node),
                    node,
                    spec: service.spec.clone(),
                });
            }
            Err(rejected) => {
                let failure = Failure::NoAllowedNode {
                    pins: service.spec.pin().to_vec(),
                    rejected,
                };
                let generation =
                    held.map_or_else(|| entry.next_generation(wanted, None), |h| h.generation);
                let same = held.is_some_and(|h| h.last_failure.as_ref() == Some(&failure));
                if !same {
                    actions.push(Action::Unplace {
                        id: id.clone(),
                        generation,
                        spec: service.spec.clone(),
                        failure,
                    });
                }
            }
        }
    }
    actions
}

/// Where `service` stands (see [`Standing`]); notes the book's changes it finds on the way
/// (a placement that showed up or was given up on) in `actions`.
fn classify<'a>(
    service: &DesiredService,
    newest: Option<&'a Process>,
    held: Option<&'a Process>,
    entry: &Entry,
    nodes: &[NodeStatus],
    now: Instant,
    actions: &mut Vec<Action>,
) -> Standing<'a> {
    let id = &service.id;
    if held.is_some_and(|h| h.status == Status::Stopped) {
        return Standing::Killed;
    }
    if entry.replacing() {
        return Standing::Replacing;
    }
    if let Some(placed) = entry.placed() {
        if newest.is_some_and(|p| p.generation >= placed.generation) {
            actions.push(Action::Settle {
                id: id.clone(),
                generation: placed.generation,
            });
        } else if nodes.iter().any(|n| n.node.name == placed.node && n.alive) {
            if now.saturating_duration_since(placed.at) < PLACEMENT_GRACE {
                return Standing::InFlight;
            }
            actions.push(Action::Abandon {
                id: id.clone(),
                generation: placed.generation,
                node: placed.node.clone(),
            });
        }
    }
    match (newest, held) {
        (_, Some(h)) => Standing::Unplaced {
            generation: h.generation,
        },
        (None, None) => Standing::New,
        (Some(p), None)
            if !p.status.is_final()
                && p.status != Status::Lost
                && (p.spec != service.spec || !service.spec.allows(&p.node.name)) =>
        {
            Standing::Outdated(p)
        }
        (Some(p), None) if matches!(p.status, Status::Lost | Status::Failed(_)) => {
            Standing::Down(p)
        }
        (Some(_), None) => Standing::Settled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::listing::Listed;
    use crate::root::placement::tests::node;
    use p2f_model::{NodeRef, Rejection, Timestamp, Unfit};

    fn id(name: &str) -> ProcessId {
        ProcessId::new(format!("{name}-1")).expect("id")
    }

    fn service(name: &str, spec: ProcessSpec) -> DesiredService {
        DesiredService { id: id(name), spec }
    }

    fn copy(
        name: &str,
        spec: &ProcessSpec,
        generation: u64,
        on: &'static str,
        status: Status,
    ) -> Copy {
        let mut p = Process::placed(
            id(name),
            generation,
            spec.clone(),
            NodeRef {
                name: NodeName::from_static(on),
                address: String::new(),
            },
            Timestamp(1),
        );
        p.status = status;
        Copy {
            listed: Listed::new(p),
            origin: Origin::Remote,
        }
    }

    fn n(name: &'static str) -> NodeName {
        NodeName::from_static(name)
    }

    fn place(name: &str, spec: &ProcessSpec, generation: u64, on: &'static str) -> Action {
        Action::Place {
            id: id(name),
            generation,
            node: n(on),
            spec: spec.clone(),
            moved_from: None,
        }
    }

    /// One pass with the given state; `book` is changed as the executor would.
    fn pass(
        desired: &[DesiredService],
        view: &[Copy],
        unplaced: &[Process],
        nodes: &[NodeStatus],
        book: &Book,
        now: Instant,
    ) -> Vec<Action> {
        let unplaced = unplaced.iter().map(|p| (p.id.clone(), p.clone())).collect();
        plan(desired, view, &unplaced, nodes, book, now)
    }

    #[test]
    fn places_a_new_service_on_the_least_loaded_node_then_waits_for_it() {
        let web = ProcessSpec::new("web", "true");
        let db = ProcessSpec::new("db", "true");
        let nodes = [node("a", true, None), node("b", true, None)];
        let desired = [service("web", web.clone()), service("db", db.clone())];
        let t0 = Instant::now();
        let mut book = Book::default();
        let actions = pass(&desired, &[], &[], &nodes, &book, t0);
        // Two new services spread over both nodes in one pass.
        assert_eq!(
            actions,
            [place("web", &web, 1, "a"), place("db", &db, 1, "b")]
        );
        book.entry(&id("web")).send(1, &n("a"), t0);
        book.entry(&id("db")).send(1, &n("b"), t0);
        // Not in the records yet, within the grace: nothing happens.
        assert_eq!(
            pass(
                &desired,
                &[],
                &[],
                &nodes,
                &book,
                t0 + Duration::from_secs(9)
            ),
            []
        );
        // It showed up: the wait is over, nothing else to do.
        let view = [
            copy("web", &web, 1, "a", Status::Running),
            copy("db", &db, 1, "b", Status::Pending),
        ];
        assert_eq!(
            pass(
                &desired,
                &view,
                &[],
                &nodes,
                &book,
                t0 + Duration::from_secs(1)
            ),
            [
                Action::Settle {
                    id: id("web"),
                    generation: 1
                },
                Action::Settle {
                    id: id("db"),
                    generation: 1
                },
            ]
        );
    }

    #[test]
    fn a_placement_that_never_shows_up_is_abandoned_and_goes_elsewhere_higher() {
        let web = ProcessSpec::new("web", "true");
        let nodes = [node("a", true, None), node("b", true, None)];
        let desired = [service("web", web.clone())];
        let t0 = Instant::now();
        let mut book = Book::default();
        book.entry(&id("web")).send(1, &n("a"), t0);
        let later = t0 + PLACEMENT_GRACE;
        let actions = pass(&desired, &[], &[], &nodes, &book, later);
        assert_eq!(
            actions[0],
            Action::Abandon {
                id: id("web"),
                generation: 1,
                node: n("a")
            }
        );
        // The executor notes the failure; the next pass goes to b with generation 2.
        book.entry(&id("web")).failed(1, &n("a"));
        book.entry(&id("web")).settle(1);
        assert_eq!(
            pass(&desired, &[], &[], &nodes, &book, later),
            [place("web", &web, 2, "b")]
        );
        // Its node died meanwhile: no wait, placed elsewhere at once.
        let mut book = Book::default();
        book.entry(&id("web")).send(1, &n("a"), t0);
        let a_dead = [node("a", false, None), node("b", true, None)];
        assert_eq!(
            pass(&desired, &[], &[], &a_dead, &book, t0),
            [place("web", &web, 2, "b")]
        );
    }

    #[test]
    fn a_lost_or_failed_copy_is_placed_again_elsewhere_with_the_next_generation() {
        let web = ProcessSpec::new("web", "true");
        let nodes = [node("a", false, None), node("b", true, None)];
        let desired = [service("web", web.clone())];
        let book = Book::default();
        let now = Instant::now();
        let lost = [copy("web", &web, 3, "a", Status::Lost)];
        assert_eq!(
            pass(&desired, &lost, &[], &nodes, &book, now),
            [Action::Place {
                id: id("web"),
                generation: 4,
                node: n("b"),
                spec: web.clone(),
                moved_from: Some(n("a")),
            }]
        );
        let nodes = [node("a", true, None), node("b", true, None)];
        let failed = [copy(
            "web",
            &web,
            3,
            "a",
            Status::Failed(Failure::Exited { code: 1 }),
        )];
        let actions = pass(&desired, &failed, &[], &nodes, &book, now);
        assert_eq!(
            actions,
            [
                Action::NoteFailure {
                    id: id("web"),
                    generation: 3,
                    node: n("a")
                },
                Action::Place {
                    id: id("web"),
                    generation: 4,
                    node: n("b"),
                    spec: web.clone(),
                    moved_from: Some(n("a")),
                },
            ]
        );
        // Running, or stopped on request: nothing to do.
        for status in [Status::Running, Status::Stopped, Status::Pending] {
            let view = [copy("web", &web, 3, "a", status)];
            assert_eq!(pass(&desired, &view, &[], &nodes, &book, now), []);
        }
    }

    #[test]
    fn a_changed_spec_or_pin_replaces_the_copy_first() {
        let old = ProcessSpec::new("web", "true");
        let new = ProcessSpec::new("web", "exec sleep 9");
        let nodes = [node("a", true, None), node("b", true, None)];
        let now = Instant::now();
        let mut book = Book::default();
        let view = [copy("web", &old, 2, "a", Status::Running)];
        let changed = [service("web", new.clone())];
        let replace = Action::Replace {
            id: id("web"),
            superseded: 2,
            node: n("a"),
        };
        assert_eq!(
            pass(&changed, &view, &[], &nodes, &book, now),
            std::slice::from_ref(&replace)
        );
        let pinned = old.with_pin([n("b")]);
        assert_eq!(
            pass(&[service("web", pinned)], &view, &[], &nodes, &book, now),
            [replace]
        );
        // While the removal runs, nothing; once the copy is gone, the next generation.
        book.entry(&id("web")).supersede(2);
        book.entry(&id("web")).set_replacing(true);
        assert_eq!(pass(&changed, &view, &[], &nodes, &book, now), []);
        book.entry(&id("web")).set_replacing(false);
        assert_eq!(
            pass(&changed, &[], &[], &nodes, &book, now),
            [place("web", &new, 3, "a")]
        );
    }

    #[test]
    fn no_node_keeps_it_unplaced_with_each_reason_and_places_it_when_one_returns() {
        let web = ProcessSpec::new("web", "true")
            .with_port(80)
            .with_pin([n("a"), n("b")]);
        let desired = [service("web", web.clone())];
        let book = Book::default();
        let now = Instant::now();
        let nodes = [
            node("a", false, None),
            node("b", true, Some(64)),
            node("c", true, None),
        ];
        let lost = [copy("web", &web, 1, "a", Status::Lost)];
        let actions = pass(&desired, &lost, &[], &nodes, &book, now);
        let failure = Failure::NoAllowedNode {
            pins: vec![n("a"), n("b")],
            rejected: vec![
                Rejection {
                    node: n("a"),
                    why: Unfit::Dead,
                },
                Rejection {
                    node: n("b"),
                    why: Unfit::LowMemory {
                        available: 64 << 20,
                    },
                },
                Rejection {
                    node: n("c"),
                    why: Unfit::PinnedOut,
                },
            ],
        };
        let unplace = Action::Unplace {
            id: id("web"),
            generation: 2,
            spec: web.clone(),
            failure: failure.clone(),
        };
        assert_eq!(actions, [unplace]);
        // Unplaced with the same reason: nothing new.
        let mut held = lost[0].process().as_ref().clone();
        held.generation = 2;
        held.status = Status::Unplaced;
        held.last_failure = Some(failure);
        let mut view = lost.to_vec();
        view[0].origin = Origin::Unplaced;
        view[0].listed = Listed::new(held.clone());
        let unplaced = [held.clone()];
        assert_eq!(pass(&desired, &view, &unplaced, &nodes, &book, now), []);
        // b has memory again: placed with the unplaced record's generation.
        let nodes = [node("a", false, None), node("b", true, None)];
        assert_eq!(
            pass(&desired, &view, &unplaced, &nodes, &book, now),
            [place("web", &web, 2, "b")]
        );
        // A real copy of that generation shows up: the record goes.
        let placed = [copy("web", &web, 2, "b", Status::Running)];
        assert_eq!(
            pass(&desired, &placed, &unplaced, &nodes, &book, now),
            [Action::Release { id: id("web") }]
        );
        // Killed while unplaced: left alone.
        held.status = Status::Stopped;
        assert_eq!(pass(&desired, &view, &[held], &nodes, &book, now), []);
    }
}
