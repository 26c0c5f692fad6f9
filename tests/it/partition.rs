//! The network across a real partition and through a NAT-like firewall: agents as `p2f node run`
//! processes in network namespaces on one bridge (`p2f_testkit::netns::Lan`), the test's client
//! in the switch's namespace. A node is cut off by taking its switch port down
//! (`ip link set … down`), like pulling its cable at the switch.

use std::time::{Duration, Instant};

use p2f::core::Network;
use p2f::model::{NodeName, Process, ProcessId, ProcessSpec};
use p2f_testkit::netns::{Firewall, Lan, block_on_in};
use p2f_testkit::{Agent, eventually, p2f_bin};

use crate::support::{agent, running};

/// How long a converging network may take here (a silent node is lost after about 5 s with the
/// test settings; the rest is margin for a loaded machine).
const CONVERGE: Duration = Duration::from_secs(60);

/// A started member of `root`'s cluster in the namespace of `role`.
async fn member_in(lan: &Lan, root: &Agent, role: &str, name: &str) -> anyhow::Result<Agent> {
    agent(name)
        .netns(lan.ns(role))
        .ip(&lan.ip(role))
        .join(root)?
        .started()
        .await
}

#[test]
fn a_partitioned_minority_is_rescheduled_and_heals_to_one_copy() -> anyhow::Result<()> {
    p2f_bin()?; // built here, before any thread enters a namespace
    let lan = Lan::new("part", 1, &["root", "a", "b"])?;
    block_on_in(lan.switch(), || async {
        let mut root = agent("root")
            .netns(lan.ns("root"))
            .ip(&lan.ip("root"))
            .init()?
            .started()
            .await?;
        let mut a = member_in(&lan, &root, "a", "node-a").await?;
        let mut b = member_in(&lan, &root, "b", "node-b").await?;
        root.all_alive(&["node-a", "node-b", "root"]).await?;

        let web = ProcessSpec::new("web", "exec sleep 1000").with_pin([
            NodeName::from_static("node-a"),
            NodeName::from_static("node-b"),
        ]);
        let desired = root.network().deploy(&[web]).await?;
        let id = desired.services[0].id.clone();
        let first = running(root.network(), std::slice::from_ref(&id), 1).await?;
        let on_a = first[0].node.name.as_str() == "node-a";
        let ((cut_name, cut_role, cut), (other_name, other)) = if on_a {
            (("node-a", "a", &a), ("node-b", &b))
        } else {
            (("node-b", "b", &b), ("node-a", &a))
        };
        assert_eq!(cut.os_copies(&id).len(), 1, "{id} runs once on {cut_name}");
        assert!(other.os_copies(&id).is_empty());

        // Cut the node running web off: the root (majority side, with the other member) sees
        // it dead and places web on the other member with generation 2.
        let cut_at = Instant::now();
        lan.cut(cut_role)?;
        let moved = running(root.network(), std::slice::from_ref(&id), 2).await?;
        let replaced = cut_at.elapsed();
        assert_eq!(
            (moved[0].node.name.as_str(), moved[0].generation),
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
        lan.heal(cut_role)?;
        let agents = [("root", &root), ("node-a", &a), ("node-b", &b)];
        one_copy_everywhere(&agents, &id, other_name, CONVERGE).await?;
        let converged = healed_at.elapsed();
        eprintln!("heal: one copy listed on every node, one OS process, after {converged:?}");
        // The root has taken the healed node back: alive, publishing no process any more,
        // and the other member publishing the one copy.
        let counts = [(cut_name, 0), (other_name, 1), ("root", 0)];
        publishing(root.network(), &counts, Deaths::Expected).await?;

        // And it stays that way over the next gossip rounds (no late re-placement, no second
        // copy): a bounded number of checks, each of the whole state.
        for _ in 0..12 {
            one_copy_everywhere(&agents, &id, other_name, Duration::ZERO).await?;
            tokio::time::sleep(p2f::core::mesh::DEFAULT_GOSSIP_INTERVAL).await;
        }
        // No agent crashed on the way, and each still answers.
        for agent in [&mut root, &mut a, &mut b] {
            assert!(agent.is_running(), "{} exited", agent.name());
            agent.network().node().await?;
        }
        Ok(())
    })
}

/// Nodes behind a home router (NAT) or a default host firewall accept no new inbound
/// connections. Such a node can still join (the join request and its gossip go out; replies
/// come back as part of connections it opened) and stays a member: gossip is UDP on one socket,
/// so a peer's datagrams to it match a flow it opened itself. What it publishes reaches the
/// others, and what they publish reaches it.
///
/// What does not work yet through such a firewall: nothing can open a connection to its API.
/// So the root cannot place processes on it (a spin is a call to its API), other nodes cannot
/// fetch the records it publishes (fetched over its API) nor forward logs, kill or remove to
/// it. Relaying those calls through a connection the node keeps open to the root is not built.
#[test]
fn a_node_behind_a_nat_like_firewall_joins_and_stays_a_member() -> anyhow::Result<()> {
    p2f_bin()?;
    let lan = Lan::new("nat", 2, &["root", "b", "nat"])?;
    // Up before the node joins: the join itself goes through the firewall.
    let firewall = Firewall::drop_new_inbound(lan.ns("nat"))?;
    let everyone = ["node-b", "node-nat", "root"];
    // What each node publishes once a process was spun on node-b and one on node-nat.
    let counts = [("node-b", 1), ("node-nat", 1), ("root", 0)];
    let (root, b, nat) = block_on_in(lan.switch(), || async {
        let root = agent("root")
            .netns(lan.ns("root"))
            .ip(&lan.ip("root"))
            .init()?
            .started()
            .await?;
        let b = member_in(&lan, &root, "b", "node-b").await?;
        let started = Instant::now();
        // Its API is unreachable from here (that is the point), so only its address file is
        // waited for.
        let mut nat = agent("node-nat")
            .netns(lan.ns("nat"))
            .ip(&lan.ip("nat"))
            .join(&root)?;
        nat.start_unreachable().await?;
        for agent in [&root, &b] {
            agent.all_alive(&everyone).await?;
        }
        eprintln!(
            "firewalled node joined and is alive at the root after {:?}",
            started.elapsed()
        );

        // The firewall is real: a new connection to its API does not get through.
        let api = nat.network().address().to_owned();
        let attempt =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(&api))
                .await;
        assert!(
            !matches!(attempt, Ok(Ok(_))),
            "{api} must not accept connections from outside"
        );
        anyhow::Ok((root, b, nat))
    })?;
    let api = nat.network().address().to_owned();
    let credentials = nat.credentials()?;

    // From inside its own namespace (loopback passes the firewall) a process is spun on it,
    // and one is spun on node-b from the switch: each side must learn of the other's through
    // gossip alone.
    block_on_in(lan.ns("nat"), || async {
        let local = Network::connect(&api, &credentials)?;
        let node = local.node().await?;
        local
            .spin_process(&ProcessSpec::new("behind-nat", "exec sleep 1000"), &node)
            .await?;
        anyhow::Ok(())
    })?;
    block_on_in(lan.switch(), || async {
        let on_b = b.client()?;
        let node = on_b.node().await?;
        on_b.spin_process(&ProcessSpec::new("on-b", "exec sleep 1000"), &node)
            .await?;
        // The root and node-b hear that node-nat publishes one process; nobody is ever seen
        // dead meanwhile.
        for agent in [&root, &b] {
            publishing(&agent.client()?, &counts, Deaths::Fail).await?;
        }
        anyhow::Ok(())
    })?;
    // And the firewalled node hears node-b's: gossip flows both ways.
    block_on_in(lan.ns("nat"), || async {
        let local = Network::connect(&api, &credentials)?;
        publishing(&local, &counts, Deaths::Fail).await
    })?;
    assert!(
        firewall.dropped_packets()? > 0,
        "the firewall dropped nothing"
    );

    // The root cannot reach its API either (same check, from the root's namespace).
    let from_root = block_on_in(lan.ns("root"), || async {
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(&api))
            .await
            .is_ok_and(|connected| connected.is_ok())
    });
    assert!(!from_root, "the root must not reach {api}");
    drop((root, b, nat));
    Ok(())
}

/// Whether [`publishing`] may see a node dead on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deaths {
    /// A node comes back: it is listed dead until it is heard again.
    Expected,
    /// Nobody may be listed dead, not even for a moment.
    Fail,
}

/// Waits until `network` lists exactly the nodes of `counts`, each alive and publishing that
/// many processes.
async fn publishing(
    network: &Network,
    counts: &[(&str, usize)],
    deaths: Deaths,
) -> anyhow::Result<()> {
    let mut wanted: Vec<(String, usize)> =
        counts.iter().map(|(n, c)| ((*n).to_owned(), *c)).collect();
    wanted.sort();
    eventually(&format!("{wanted:?} alive and published"), CONVERGE, || {
        let network = network.clone();
        let wanted = wanted.clone();
        async move {
            let nodes = network.nodes().await.ok()?;
            let dead: Vec<&str> = nodes
                .iter()
                .filter(|n| !n.alive)
                .map(|n| n.node.name.as_str())
                .collect();
            assert!(
                deaths == Deaths::Expected || dead.is_empty(),
                "{dead:?} seen dead"
            );
            let mut seen: Vec<(String, usize)> = nodes
                .iter()
                .map(|n| (n.node.name.as_str().to_owned(), n.processes))
                .collect();
            seen.sort();
            (seen == wanted).then_some(())
        }
    })
    .await
}

/// Waits until every agent lists exactly one record of `id`, running on `on` with generation
/// 2, and exactly one OS process of it runs (on `on`). With a `limit` of zero: checks once.
async fn one_copy_everywhere(
    agents: &[(&str, &Agent)],
    id: &ProcessId,
    on: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    eventually(
        &format!("one copy of {id} on {on}, listed by every node"),
        limit,
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
    .await
}
