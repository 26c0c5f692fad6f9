//! Where a process goes: named feasibility filters (alive, pins, port, memory), each saying
//! why it rules a node out, then a rank among the nodes left (not failed on, fewest processes,
//! name). Pure: the root's reconcile calls it once per process and pass.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use p2f_model::{NodeName, Process, ProcessSpec, Rejection, Status, Unfit};

use crate::wire::NodeStatus;

/// A node with less available memory than this takes no new process.
pub const MIN_FREE_MEMORY: u64 = 128 * 1024 * 1024;

/// What runs where, counted once per reconcile pass.
#[derive(Debug, Default)]
pub struct Usage<'a> {
    /// Processes that are not stopped or failed, per node.
    load: HashMap<&'a NodeName, usize>,
    /// Ports held on each node (by processes neither ended nor lost).
    ports: HashSet<(&'a NodeName, u16)>,
}

impl<'a> Usage<'a> {
    /// Counts `records`.
    pub fn of(records: impl IntoIterator<Item = &'a Arc<Process>>) -> Usage<'a> {
        let mut usage = Usage::default();
        for p in records.into_iter().filter(|p| !p.status.is_final()) {
            if p.status == Status::Unplaced {
                continue;
            }
            *usage.load.entry(&p.node.name).or_default() += 1;
            if let Some(port) = p.port
                && p.status != Status::Lost
            {
                usage.ports.insert((&p.node.name, port));
            }
        }
        usage
    }
}

/// The first filter that rules `node` out for `spec`, if any.
fn unfit(spec: &ProcessSpec, node: &NodeStatus, usage: &Usage<'_>) -> Option<Unfit> {
    let name = &node.node.name;
    if !node.alive {
        return Some(Unfit::Dead);
    }
    if !spec.allows(name) {
        return Some(Unfit::PinnedOut);
    }
    if let Some(port) = spec.port()
        && usage.ports.contains(&(name, port))
    {
        return Some(Unfit::PortTaken { port });
    }
    // Unknown memory counts as enough.
    if let Some(available) = node.memory_available
        && available < MIN_FREE_MEMORY
    {
        return Some(Unfit::LowMemory { available });
    }
    None
}

/// The node `spec` goes to among `nodes`: one every filter lets through, not one it failed on
/// (`avoid`, most recent last; when only those are left, the one failed on least recently),
/// with the fewest processes (counting `placed_now`, this pass's placements), then by name so
/// placements are predictable. When no node passes the filters: why each was ruled out.
pub fn select<'n>(
    spec: &ProcessSpec,
    nodes: &'n [NodeStatus],
    usage: &Usage<'_>,
    avoid: &[NodeName],
    placed_now: &HashMap<NodeName, usize>,
) -> Result<&'n NodeStatus, Vec<Rejection>> {
    let mut rejected = Vec::new();
    let mut feasible = Vec::new();
    for node in nodes {
        match unfit(spec, node, usage) {
            Some(why) => rejected.push(Rejection {
                node: node.node.name.clone(),
                why,
            }),
            None => feasible.push(node),
        }
    }
    let failed_at = |n: &NodeStatus| avoid.iter().position(|a| a == &n.node.name);
    feasible
        .into_iter()
        .min_by_key(|n| {
            let load = usage.load.get(&n.node.name).copied().unwrap_or(0)
                + placed_now.get(&n.node.name).copied().unwrap_or(0);
            // `None` (never failed there) sorts before any position.
            (failed_at(n), load, n.node.name.clone())
        })
        .ok_or(rejected)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use p2f_model::{NodeRef, ProcessId, Timestamp};

    pub(crate) fn node(name: &'static str, alive: bool, free_mib: Option<u64>) -> NodeStatus {
        NodeStatus {
            node: p2f_model::Node::named(NodeName::from_static(name)),
            alive,
            incarnation: 1,
            processes: 0,
            memory_available: free_mib.map(|mib| mib * 1024 * 1024),
            reach: crate::wire::Reach::Direct,
            link: None,
        }
    }

    fn running_on(name: &'static str, port: Option<u16>) -> Arc<Process> {
        let spec = match port {
            Some(port) => ProcessSpec::new("other", "true").with_port(port),
            None => ProcessSpec::new("other", "true"),
        };
        let node = NodeRef {
            name: NodeName::from_static(name),
            address: String::new(),
        };
        let mut p = Process::placed(
            ProcessId::for_service("other", 1),
            1,
            spec,
            node,
            Timestamp(1),
        );
        p.status = Status::Running;
        Arc::new(p)
    }

    /// Where `spec` goes among `nodes`, given what runs and where it failed (least recent
    /// first): the node, or each node's reason.
    fn check(
        spec: &ProcessSpec,
        nodes: &[NodeStatus],
        running: &[Arc<Process>],
        avoid: &[&'static str],
        expected: Result<&str, &[(&str, Unfit)]>,
    ) {
        let usage = Usage::of(running);
        let avoid: Vec<NodeName> = avoid.iter().map(|n| NodeName::from_static(n)).collect();
        let chosen = select(spec, nodes, &usage, &avoid, &HashMap::new());
        let got = chosen.map(|n| n.node.name.as_str()).map_err(|rejected| {
            rejected
                .into_iter()
                .map(|r| (r.node.to_string(), r.why))
                .collect::<Vec<_>>()
        });
        let expected = expected.map_err(|e| {
            e.iter()
                .map(|(n, why)| (n.to_string(), why.clone()))
                .collect::<Vec<_>>()
        });
        assert_eq!(got, expected, "avoid {avoid:?}");
    }

    #[test]
    fn placement_weighs_pins_liveness_ports_memory_load_and_failures() {
        let abc = [
            node("a", true, Some(4096)),
            node("b", true, Some(4096)),
            node("c", true, Some(4096)),
        ];
        let any = ProcessSpec::new("web", "true");
        let web = any.with_port(8080);
        let a_b = any.with_pin([NodeName::from_static("a"), NodeName::from_static("b")]);
        // The fewest processes, then the name.
        check(&any, &abc, &[], &[], Ok("a"));
        check(&any, &abc, &[running_on("a", None)], &[], Ok("b"));
        // A port held on a node rules it out.
        check(&web, &abc, &[running_on("a", Some(8080))], &[], Ok("b"));
        // Pins, and dead nodes.
        check(&a_b, &abc, &[running_on("a", None)], &[], Ok("b"));
        let b_dead = [
            node("a", true, None),
            node("b", false, None),
            node("c", true, None),
        ];
        let a_twice = [running_on("a", None), running_on("a", None)];
        check(&a_b, &b_dead, &a_twice, &[], Ok("a"));
        // Under 128 MiB free takes nothing new; unknown memory counts as enough.
        let low = [node("a", true, Some(100)), node("b", true, None)];
        check(&any, &low, &[], &[], Ok("b"));
        // A node it failed on is avoided while another is allowed, even a busier one.
        check(&a_b, &abc, &[running_on("b", None)], &["a"], Ok("b"));
        // When it failed everywhere allowed, the node it failed on least recently.
        check(&a_b, &abc, &[], &["a", "b"], Ok("a"));
        check(&a_b, &abc, &[], &["b", "a"], Ok("b"));
    }

    #[test]
    fn no_node_says_why_each_was_ruled_out() {
        use Unfit::*;
        let a_b = ProcessSpec::new("web", "true")
            .with_port(8080)
            .with_pin([NodeName::from_static("a"), NodeName::from_static("b")]);
        check(
            &a_b,
            &[node("c", true, None)],
            &[],
            &[],
            Err(&[("c", PinnedOut)]),
        );
        let nodes = [
            node("a", false, None),
            node("b", true, None),
            node("c", true, None),
        ];
        check(
            &a_b,
            &nodes,
            &[running_on("b", Some(8080))],
            &[],
            Err(&[
                ("a", Dead),
                ("b", PortTaken { port: 8080 }),
                ("c", PinnedOut),
            ]),
        );
        let low = [node("a", true, Some(100)), node("b", true, Some(64))];
        check(
            &a_b,
            &low,
            &[],
            &[],
            Err(&[
                (
                    "a",
                    LowMemory {
                        available: 100 << 20,
                    },
                ),
                (
                    "b",
                    LowMemory {
                        available: 64 << 20,
                    },
                ),
            ]),
        );
        check(&a_b, &[], &[], &[], Err(&[]));
    }
}
