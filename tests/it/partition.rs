//! The network across a real partition and through a NAT-like firewall: agents as `p2f node run`
//! processes in network namespaces on one bridge (`netns.rs`), the test's client in the
//! switch's namespace. A node is cut off by taking its switch port down (`ip link set … down`),
//! like pulling its cable at the switch.

use std::time::{Duration, Instant};

use p2f::core::Network;
use p2f::model::{NodeName, Process, ProcessId, ProcessSpec};

use crate::netns::{Firewall, Lan, NsAgent, block_on_in};
use crate::support::{eventually, p2f_bin};

#[test]
fn a_partitioned_minority_is_rescheduled_and_heals_to_one_copy() {
    p2f_bin(); // built here, before any thread enters a namespace
    let lan = Lan::new("part", 1, &["root", "a", "b"]);
    block_on_in(lan.switch(), || async {
        let mut root = NsAgent::init(lan.ns("root"), "root", &lan.ip("root"));
        root.start(true).await;
        let mut a = NsAgent::join(&root, lan.ns("a"), "node-a", &lan.ip("a"));
        a.start(true).await;
        let mut b = NsAgent::join(&root, lan.ns("b"), "node-b", &lan.ip("b"));
        b.start(true).await;
        let members = [("node-a", "a", &a), ("node-b", "b", &b)];
        all_alive(root.network(), &["node-a", "node-b", "root"]).await;

        let web = ProcessSpec::new("web", "exec sleep 1000").with_pin([
            NodeName::from_static("node-a"),
            NodeName::from_static("node-b"),
        ]);
        let desired = root.network().deploy(&[web]).await.expect("deploy");
        let id = desired.services[0].id.clone();
        let first = running(root.network(), &id, 1).await;
        let (cut_name, cut_role, cut) = *members
            .iter()
            .find(|(name, ..)| *name == first.node.name.as_str())
            .expect("placed on a member");
        let (other_name, _, other) = *members
            .iter()
            .find(|(name, ..)| *name != cut_name)
            .expect("the other member");
        assert_eq!(cut.os_copies(&id).len(), 1, "{id} runs once on {cut_name}");
        assert!(other.os_copies(&id).is_empty());

        // Cut the node running web off: the root (majority side, with the other member) sees
        // it dead and places web on the other member with generation 2.
        let cut_at = Instant::now();
        lan.cut(cut_role);
        let moved = running(root.network(), &id, 2).await;
        let replaced = cut_at.elapsed();
        assert_eq!(
            (moved.node.name.as_str(), moved.generation),
            (other_name, 2),
            "{moved:#?}"
        );
        assert_eq!(other.os_copies(&id).len(), 1);
        // The minority side cannot learn of generation 2: its copy keeps running meanwhile
        // (two copies exist while the partition lasts; fencing happens on heal).
        assert_eq!(cut.os_copies(&id).len(), 1, "the cut-off copy still runs");
        eprintln!(
            "partition: {cut_name} cut off -> web Running on {other_name} (gen 2) after {replaced:?}"
        );

        // Heal: the cut-off node hears of generation 2 and stops its stale copy; every node
        // lists exactly one copy, running on the other member.
        let healed_at = Instant::now();
        lan.heal(cut_role);
        let agents = [("root", &root), ("node-a", &a), ("node-b", &b)];
        one_copy_everywhere(&agents, &id, other_name, Duration::from_secs(30)).await;
        let converged = healed_at.elapsed();
        eprintln!("heal: one copy listed on every node, one OS process, after {converged:?}");
        all_alive(root.network(), &["node-a", "node-b", "root"]).await;

        // And it stays that way (no late re-placement, no second copy).
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            one_copy_everywhere(&agents, &id, other_name, Duration::from_secs(5)).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        for (name, agent) in agents {
            let log = agent.log();
            assert!(!log.contains("panicked"), "{name} panicked:\n{log}");
        }
    });
}

/// Nodes behind a home router (NAT) or a default host firewall accept no new inbound
/// connections. Such a node can still join (the join request and its gossip go out; replies
/// come back as part of connections it opened) and stays a member: gossip is UDP on one socket,
/// so a peer's datagrams to it match a flow it opened itself.
///
/// What does not work yet through such a firewall: nothing can open a connection to its API.
/// So the root cannot place processes on it (a spin is a call to its API), other nodes cannot
/// fetch the records it publishes (fetched over its API) nor forward logs, kill or remove to
/// it. Relaying those calls through a connection the node keeps open to the root is not built.
#[test]
fn a_node_behind_a_nat_like_firewall_joins_and_stays_a_member() {
    p2f_bin();
    let lan = Lan::new("nat", 2, &["root", "b", "nat"]);
    // Up before the node joins: the join itself goes through the firewall.
    let firewall = Firewall::drop_new_inbound(lan.ns("nat"));
    let nat = block_on_in(lan.switch(), || async {
        let mut root = NsAgent::init(lan.ns("root"), "root", &lan.ip("root"));
        root.start(true).await;
        let mut b = NsAgent::join(&root, lan.ns("b"), "node-b", &lan.ip("b"));
        b.start(true).await;
        let started = Instant::now();
        let mut nat = NsAgent::join(&root, lan.ns("nat"), "node-nat", &lan.ip("nat"));
        // Its API is unreachable from here (that is the point), so only its address file is
        // waited for.
        nat.start(false).await;
        for agent in [&root, &b] {
            all_alive(agent.network(), &["node-b", "node-nat", "root"]).await;
        }
        eprintln!(
            "firewalled node joined and is alive at the root after {:?}",
            started.elapsed()
        );

        // It stays a member: alive at the root and at the other member, all along.
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            for (name, agent) in [("root", &root), ("node-b", &b)] {
                let nodes = agent.network().nodes().await.expect("nodes");
                let alive: Vec<(&str, bool)> = nodes
                    .iter()
                    .map(|n| (n.node.name.as_str(), n.alive))
                    .collect();
                assert_eq!(
                    alive,
                    [("node-b", true), ("node-nat", true), ("root", true)],
                    "as {name} sees it"
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        // The firewall is real: a new connection to its API does not get through.
        let api = nat.network().address().to_owned();
        let attempt =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(&api))
                .await;
        assert!(
            !matches!(attempt, Ok(Ok(_))),
            "{api} must not accept connections from outside"
        );
        (root, b, nat)
    });
    // The root and node-b keep running (and gossiping) until the end of the test.
    let (_root, _b, nat) = nat;
    assert!(
        firewall.dropped_packets() > 0,
        "the firewall dropped nothing"
    );

    // The root cannot reach its API either (same check, from the root's namespace).
    let api = nat.network().address().to_owned();
    let from_root = block_on_in(lan.ns("root"), || async {
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(&api))
            .await
            .is_ok_and(|connected| connected.is_ok())
    });
    assert!(!from_root, "the root must not reach {api}");

    // From inside its own namespace (loopback passes the firewall), the node sees the others
    // alive: it hears their gossip, not only they its.
    let cluster = nat.cluster();
    block_on_in(lan.ns("nat"), || async {
        let local = Network::with_cluster_files(&api, &cluster).expect("client");
        let nodes = local.nodes().await.expect("its own view");
        let alive: Vec<(&str, bool)> = nodes
            .iter()
            .map(|n| (n.node.name.as_str(), n.alive))
            .collect();
        assert_eq!(
            alive,
            [("node-b", true), ("node-nat", true), ("root", true)],
            "as the firewalled node sees it"
        );
    });
}

/// Waits until `network` lists exactly `names` (sorted), all alive.
async fn all_alive(network: &Network, names: &[&str]) {
    eventually(&format!("{names:?} alive"), Duration::from_secs(20), || {
        let network = network.clone();
        async move {
            let nodes = network.nodes().await.ok()?;
            let alive: Vec<&str> = nodes
                .iter()
                .filter(|n| n.alive)
                .map(|n| n.node.name.as_str())
                .collect();
            (alive == names && nodes.len() == names.len()).then_some(())
        }
    })
    .await;
}

/// Waits until `network` lists `id` `Running` with at least `generation`.
async fn running(network: &Network, id: &ProcessId, generation: u64) -> Process {
    eventually(
        &format!("{id} Running with generation {generation}"),
        Duration::from_secs(20),
        || {
            let (network, id) = (network.clone(), id.clone());
            async move {
                let all = network.list_processes().await.ok()?;
                all.into_iter()
                    .find(|p| p.id == id && p.is_running() && p.generation >= generation)
            }
        },
    )
    .await
}

/// Waits until every agent lists exactly one record of `id`, running on `on` with generation
/// 2, and exactly one OS process of it runs (on `on`).
async fn one_copy_everywhere(
    agents: &[(&str, &NsAgent)],
    id: &ProcessId,
    on: &str,
    timeout: Duration,
) {
    eventually(
        &format!("one copy of {id} on {on}, listed by every node"),
        timeout,
        || {
            let os: Vec<(&str, usize)> = agents
                .iter()
                .map(|(name, agent)| (*name, agent.os_copies(id).len()))
                .collect();
            let clients: Vec<Network> = agents.iter().map(|(_, a)| a.network().clone()).collect();
            let id = id.clone();
            async move {
                if os.iter().map(|(_, n)| n).sum::<usize>() != 1
                    || !os.iter().any(|(name, n)| *name == on && *n == 1)
                {
                    return None;
                }
                for client in clients {
                    let all = client.list_processes().await.ok()?;
                    let copies: Vec<&Process> = all.iter().filter(|p| p.id == id).collect();
                    match copies.as_slice() {
                        [p] if p.is_running()
                            && p.node.name.as_str() == on
                            && p.generation == 2 => {}
                        _ => return None,
                    }
                }
                Some(())
            }
        },
    )
    .await;
}
