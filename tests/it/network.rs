//! Several agents as one network (real `p2f node run` processes on 127.0.0.1–3, joined with
//! the root's token, gossiping over the mesh): a record written on one node is visible on all,
//! a node that dies shows its records as `Lost` everywhere else, and the others still answer
//! for the whole network while the root is down.

use std::time::{Duration, Instant};

use p2f::model::{
    Failure, Health, NodeName, Process, ProcessId, ProcessKey, ProcessSpec, Rejection, Status,
    Unfit,
};

use p2f::model::EventKind;
use p2f_testkit::eventually;

use crate::support::{log_containing, member, root, running, service_port};

/// How long the network may take to see a node dead, a record lost or a process moved: the
/// test settings declare a silent node lost after about 5 s; the rest is margin for a loaded
/// machine.
const FAILOVER: Duration = Duration::from_secs(40);
/// How long a record may take to reach another node (well under a second when idle).
const SPREAD: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_spread_to_every_node_and_a_dead_nodes_records_are_lost() -> anyhow::Result<()> {
    let root = root("root").await?;
    let mut a = member(&root, "node-a", "127.0.0.2").await?;
    let b = member(&root, "node-b", "127.0.0.3").await?;
    root.all_alive(&["node-a", "node-b", "root"]).await?;

    let node_a = a.network().node().await.expect("node a");
    let spec = ProcessSpec::new("spread", "echo hello from $P2F_NODE; exec sleep 1000")
        .with_port(service_port())
        .with_domain("spread.home.arpa")
        .with_health(Health::None); // nothing listens on the port
    let written = Instant::now();
    let p = root
        .network()
        .spin_process(&spec, &node_a)
        .await
        .expect("spin on node a");
    assert_eq!(
        (p.status.clone(), p.node.name.as_str()),
        (Status::Running, "node-a")
    );

    // Every node lists it, with its spec, and finds it by domain.
    for (name, agent) in [("root", &root), ("node-b", &b), ("node-a", &a)] {
        let net = agent.network().clone();
        let id = p.id.clone();
        let seen = eventually(&format!("{name} to list the record"), SPREAD, || {
            let (net, id) = (net.clone(), id.clone());
            async move {
                let all = net.list_processes().await.ok()?;
                all.into_iter().find(|q| q.id == id && q.is_running())
            }
        })
        .await?;
        assert_eq!(seen.spec, spec, "{name} holds the whole spec");
        assert_eq!(seen.node.name.as_str(), "node-a");
        let by_domain = net
            .process_information(ProcessKey::Domain("spread.home.arpa".into()))
            .await
            .expect("lookup")
            .expect("found by domain");
        assert_eq!(by_domain.id, p.id, "{name}");
    }
    eprintln!("record visible on 3 nodes after {:?}", written.elapsed());

    // Every node knows every node, with its P2PRC entry.
    let nodes = b.network().nodes().await.expect("nodes");
    let names: Vec<(&str, bool)> = nodes
        .iter()
        .map(|n| (n.node.name.as_str(), n.alive))
        .collect();
    assert_eq!(names, [("node-a", true), ("node-b", true), ("root", true)]);
    assert!(
        nodes
            .iter()
            .all(|n| n.memory_available.is_some_and(|m| m > 0)),
        "every node publishes its free memory: {nodes:?}"
    );
    // Without a client certificate, every node answers 401.
    let ca = std::fs::read_to_string(root.config().cluster_dir().join("ca.pem")).expect("ca");
    for agent in [&root, &a, &b] {
        let stranger = p2f::core::Network::connect(
            agent.network().address(),
            &p2f::core::cluster::Credentials::new(ca.clone(), None),
        )
        .expect("client");
        let refused = stranger.list_processes().await.expect_err("401");
        assert_eq!(refused.status(), Some(401), "{refused}");
    }
    let entry_a = &nodes[0].node;
    assert_eq!(
        entry_a.ipv4.map(|ip| ip.to_string()).as_deref(),
        Some("127.0.0.2")
    );
    assert_eq!(
        entry_a.api_address().as_deref(),
        Some(a.network().address())
    );

    // Any node answers for a process of another node: logs and kill are forwarded to its node.
    let logs = log_containing(root.network(), &p.id, "hello", SPREAD).await?;
    assert_eq!(logs.trim(), "hello from node-a");
    let killed = b
        .network()
        .kill_process(&p)
        .await
        .expect("kill through node b");
    assert_eq!(
        (killed.status, killed.node.name.as_str()),
        (Status::Stopped, "node-a")
    );
    assert!(a.os_copies(&p.id).is_empty(), "stopped on its own node");

    // Node a dies (the agent): the others show its record as Lost.
    a.sigkill();
    let died = Instant::now();
    for (name, agent) in [("root", &root), ("node-b", &b)] {
        let net = agent.network().clone();
        let id = p.id.clone();
        eventually(&format!("{name} to see the record lost"), FAILOVER, || {
            let (net, id) = (net.clone(), id.clone());
            async move {
                let all = net.list_processes().await.ok()?;
                all.into_iter()
                    .find(|q| q.id == id && q.status == Status::Lost)
            }
        })
        .await?;
    }
    eprintln!(
        "node a's record shown Lost everywhere after {:?}",
        died.elapsed()
    );
    // The local view of a node has only its own records.
    let local = b.network().list_local().await.expect("local list");
    assert!(local.is_empty(), "{local:?}");

    // The root dies too: node b still lists the network and finds records by id and domain.
    let mut root = root;
    root.sigkill();
    eventually("node-b to see the root dead", FAILOVER, || {
        let net = b.network().clone();
        async move {
            let nodes = net.nodes().await.ok()?;
            nodes
                .iter()
                .any(|n| n.node.name.as_str() == "root" && !n.alive)
                .then_some(())
        }
    })
    .await?;
    let all = b
        .network()
        .list_processes()
        .await
        .expect("list without the root");
    assert!(
        all.iter().any(|q| q.id == p.id && q.status == Status::Lost),
        "{all:?}"
    );
    let by_id = b
        .network()
        .process_information(ProcessKey::Id(p.id.clone()))
        .await
        .expect("lookup without the root")
        .expect("found by id");
    assert_eq!((by_id.status, by_id.spec), (Status::Lost, spec.clone()));
    let by_domain = b
        .network()
        .process_information(ProcessKey::Domain("spread.home.arpa".into()))
        .await
        .expect("lookup without the root")
        .expect("found by domain");
    assert_eq!(by_domain.id, p.id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_places_services_and_moves_them_off_a_dead_node() -> anyhow::Result<()> {
    let root = root("root").await?;
    let a = member(&root, "node-a", "127.0.0.2").await?;
    let b = member(&root, "node-b", "127.0.0.3").await?;
    let mut agents = [a, b];
    root.all_alive(&["node-a", "node-b", "root"]).await?;
    let pins = [
        NodeName::from_static("node-a"),
        NodeName::from_static("node-b"),
    ];
    // Every start of `web` leaves a line: which node, which generation.
    let starts_dir = tempfile::tempdir().expect("temp dir");
    let starts = starts_dir.path().join("starts");
    let web = ProcessSpec::new(
        "web",
        format!(
            "echo \"$P2F_NODE $P2F_GENERATION\" >> {}; exec sleep 1000",
            starts.display()
        ),
    )
    .with_port(service_port())
    .with_health(Health::None) // nothing listens on the port
    .with_pin(pins.clone());
    let worker = ProcessSpec::new("worker", "exec sleep 1000").with_pin(pins);
    let desired = root
        .network()
        .deploy(&[web.clone(), worker.clone()])
        .await
        .expect("the root takes the deployment");
    let ids: Vec<ProcessId> = desired.services.iter().map(|s| s.id.clone()).collect();
    // A member is not the root.
    let refused = agents[0]
        .network()
        .deploy(std::slice::from_ref(&web))
        .await
        .expect_err("not the root");
    assert_eq!(refused.status(), Some(409));

    // Both run, one on each node (the fewest processes first), each exactly once.
    let first = running(root.network(), &ids, 1).await?;
    let nodes: Vec<&str> = first.iter().map(|p| p.node.name.as_str()).collect();
    assert_eq!(nodes, ["node-a", "node-b"], "spread over the allowed nodes");
    for id in &ids {
        let count: usize = agents.iter().map(|n| n.os_copies(id).len()).sum();
        assert_eq!(count, 1, "{id} runs once");
    }
    // Each was placed once: generation 1, one placement event, one start (the root waited for
    // its placements to show up instead of sending them again).
    for p in &first {
        let placed = p
            .events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Placed { .. }))
            .count();
        assert_eq!((p.generation, placed), (1, 1), "{p:#?}");
    }

    // The node running `web` dies (agent and processes): web runs again on the other one.
    let web_id = &ids[0];
    let died = Instant::now();
    agents[0].kill_node()?;
    let moved = running(root.network(), std::slice::from_ref(web_id), 2).await?;
    let failover = died.elapsed();
    assert_eq!(moved[0].node.name.as_str(), "node-b");
    assert_eq!(agents[1].os_copies(web_id).len(), 1);
    eprintln!("failover: SIGKILL of node-a -> web Running on node-b after {failover:?}");

    // node-a comes back: its stale copy (generation 1) is dropped without ever starting again;
    // exactly one copy remains.
    agents[0].start().await?;
    eventually("node-a to drop its stale copy", FAILOVER, || {
        let (stale, fresh) = (agents[0].os_copies(web_id), agents[1].os_copies(web_id));
        let local = agents[0].network().clone();
        let id = web_id.clone();
        async move {
            let records = local.list_local().await.ok()?;
            (stale.is_empty() && fresh.len() == 1 && !records.iter().any(|p| p.id == id))
                .then_some(())
        }
    })
    .await?;

    let started: Vec<String> = std::fs::read_to_string(&starts)?
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        started,
        ["node-a 1", "node-b 2"],
        "the returning node must not start its stale copy again; {}",
        root.log_tail(60)
    );

    // Moving it back on request: a new generation on node-a, node-b drops its copy.
    let a_name = NodeName::from_static("node-a");
    root.hears("node-a").await?;
    let moved = root
        .network()
        .move_process(web_id, &a_name)
        .await
        .expect("move");
    assert_eq!((moved.node.name.as_str(), moved.generation), ("node-a", 3));
    assert!(moved.is_running(), "{moved:?}");
    assert!(
        moved.events.iter().any(|e| e.kind
            == p2f::model::EventKind::Moved {
                from: NodeName::from_static("node-b"),
                to: NodeName::from_static("node-a"),
            }),
        "the history says it moved: {:?}",
        moved.events
    );
    let again = root
        .network()
        .move_process(web_id, &a_name)
        .await
        .expect_err("already there");
    assert_eq!(again.status(), Some(409), "{again}");
    eventually("node-b to drop its copy", FAILOVER, || {
        let (on_a, on_b) = (agents[0].os_copies(web_id), agents[1].os_copies(web_id));
        async move { (on_a.len() == 1 && on_b.is_empty()).then_some(()) }
    })
    .await?;
    Ok(())
}

/// The last `Exited { Vanished }` event of `p` (recorded when the agent found the process gone
/// at its start) and the first `Started` after it: when the agent noticed, and when it started
/// the process again.
fn vanished_then_started(p: &Process) -> Option<(u64, u64)> {
    let vanished = p.events.iter().rposition(|e| {
        e.kind
            == EventKind::Exited {
                failure: Failure::Vanished,
            }
    })?;
    let started = p.events[vanished..]
        .iter()
        .find(|e| matches!(e.kind, EventKind::Started { .. }))?;
    Some((p.events[vanished].at.0, started.at.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_member_starts_again_what_nobody_replaced() -> anyhow::Result<()> {
    let mut root = root("root").await?;
    let mut a = member(&root, "node-a", "127.0.0.9").await?;
    root.all_alive(&["node-a", "root"]).await?;
    // Spun on node-a directly: the root does not manage them, so nobody replaces them.
    // `canary` is only there to show when node-a has decided what to start again.
    let node_a = a.network().node().await.expect("node a");
    let mut spun = Vec::new();
    for name in ["keeper", "canary"] {
        let spec = ProcessSpec::new(name, "exec sleep 1000");
        let p = root
            .network()
            .spin_process(&spec, &node_a)
            .await
            .expect("spin on node a");
        spun.push(p);
    }
    let [p, canary] = <[Process; 2]>::try_from(spun).expect("two");
    root.all_alive(&["node-a", "root"]).await?;

    // The node dies and comes back before anyone could act: it waits to hear the root, then
    // starts the same generation again.
    a.kill_node()?;
    assert!(a.os_copies(&p.id).is_empty());
    a.start().await?;
    let again = a
        .wait_for(&p.id, FAILOVER, "running again", |q| q.is_running())
        .await?;
    assert_eq!(again.generation, 1);
    assert_eq!(a.os_copies(&p.id).len(), 1);
    // It did not start it at once: it waited until it had heard the others and the set of
    // live nodes had been stable for a while (the replica's settle time, 500 ms). A lower
    // bound: load only makes the wait longer.
    let (noticed, restarted) = vanished_then_started(&again).expect("vanished, then started");
    assert!(
        restarted >= noticed + 500,
        "started again {} ms after the agent found it gone: it did not wait for the network; {again:#?}",
        restarted.saturating_sub(noticed)
    );

    // With the root gone too, the node finds itself alone and starts it anyway, once nobody
    // answered for 3 s.
    root.sigkill();
    a.kill_node()?;
    a.start().await?;
    let again = a
        .wait_for(&p.id, FAILOVER, "running again alone", |q| q.is_running())
        .await?;
    assert_eq!(again.generation, 1);
    assert_eq!(a.os_copies(&p.id).len(), 1);
    let (noticed, restarted) = vanished_then_started(&again).expect("vanished, then started");
    assert!(
        restarted >= noticed + 3_000,
        "started again {} ms after the agent found it gone, before it could know it was alone",
        restarted.saturating_sub(noticed)
    );

    // Killed while it waits (alone, for 3 s): it is stopped where it is and never starts.
    a.kill_node()?;
    a.start().await?;
    let parked = a
        .network()
        .process_information(ProcessKey::Id(p.id.clone()))
        .await
        .expect("info")
        .expect("the record");
    assert_eq!(
        parked.status,
        Status::Parked,
        "not parked any more: the agent took longer to answer than the 3 s it waits when alone; \
         {parked:?}"
    );
    let killed = a.network().kill_process(&parked).await.expect("kill");
    assert_eq!(killed.status, Status::Stopped);
    // The wait ends: the canary, parked alike, runs again. The killed one did not start.
    a.wait_for(&canary.id, FAILOVER, "the canary to run again", |q| {
        q.is_running()
    })
    .await?;
    let after = a
        .network()
        .process_information(ProcessKey::Id(p.id.clone()))
        .await
        .expect("info")
        .expect("the record");
    assert_eq!(after.status, Status::Stopped, "{after:?}");
    assert!(a.os_copies(&p.id).is_empty(), "never started again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_pinned_to_a_dead_node_waits_and_returns_with_it() -> anyhow::Result<()> {
    let root = root("root").await?;
    let mut pi = member(&root, "pi", "127.0.0.4").await?;
    root.all_alive(&["pi", "root"]).await?;
    let spec =
        ProcessSpec::new("only-on-pi", "exec sleep 1000").with_pin([NodeName::from_static("pi")]);
    let desired = root.network().deploy(&[spec]).await.expect("deploy");
    let id = desired.services[0].id.clone();
    running(root.network(), std::slice::from_ref(&id), 1).await?;

    pi.kill_node()?;
    let held = eventually("the process to wait for its node", FAILOVER, || {
        let net = root.network().clone();
        let id = id.clone();
        async move {
            let all = net.list_processes().await.ok()?;
            all.into_iter()
                .find(|p| p.id == id && p.status == Status::Unplaced)
        }
    })
    .await?;
    assert_eq!(
        held.last_failure,
        Some(Failure::NoAllowedNode {
            pins: vec![NodeName::from_static("pi")],
            rejected: vec![
                Rejection {
                    node: NodeName::from_static("pi"),
                    why: Unfit::Dead,
                },
                Rejection {
                    node: NodeName::from_static("root"),
                    why: Unfit::PinnedOut,
                },
            ],
        })
    );
    assert_eq!(
        held.generation, 2,
        "one record per id: the held one replaces the lost one"
    );

    // pi returns: its stale copy goes, and the process runs there again, once.
    pi.start().await?;
    let back = running(root.network(), std::slice::from_ref(&id), 2).await?;
    assert_eq!(back[0].node.name.as_str(), "pi");
    eventually("exactly one copy on pi", FAILOVER, || {
        let count = pi.os_copies(&id).len();
        async move { (count == 1).then_some(()) }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_restarts_move_a_process_to_a_node_it_has_not_failed_on() -> anyhow::Result<()> {
    let root = root("root").await?;
    let a = member(&root, "node-a", "127.0.0.5").await?;
    let b = member(&root, "node-b", "127.0.0.6").await?;
    root.all_alive(&["node-a", "node-b", "root"]).await?;
    // It crashes on node-a (where it is placed first: the fewest processes, then by name).
    let spec = ProcessSpec::new(
        "picky",
        "test \"$P2F_NODE\" = node-b || exit 3; exec sleep 1000",
    )
    .with_pin([
        NodeName::from_static("node-a"),
        NodeName::from_static("node-b"),
    ])
    .with_restart(p2f::model::RestartPolicy::OnFailure(1));
    let desired = root.network().deploy(&[spec]).await.expect("deploy");
    let id = desired.services[0].id.clone();
    // Its restart on node-a is spent: the root places it on node-b, the node it has not
    // failed on (or, if node-b looked dead for a moment under load, after one more failure on
    // node-a: the node failed on least recently comes next).
    let moved = eventually("it runs on node-b", FAILOVER, || {
        let net = root.network().clone();
        let id = id.clone();
        async move {
            let all = net.list_processes().await.ok()?;
            all.into_iter().find(|p| {
                p.id == id
                    && p.is_running()
                    && p.generation >= 2
                    && p.node.name.as_str() == "node-b"
            })
        }
    })
    .await?;
    if moved.generation > 2 {
        eprintln!(
            "moved to node-b only with generation {}; {}",
            moved.generation,
            root.log_tail(80)
        );
    }
    assert_eq!(b.os_copies(&id).len(), 1);
    assert!(a.os_copies(&id).is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_spec_or_pin_replaces_the_process() -> anyhow::Result<()> {
    let root = root("root").await?;
    let a = member(&root, "node-a", "127.0.0.7").await?;
    let b = member(&root, "node-b", "127.0.0.8").await?;
    root.all_alive(&["node-a", "node-b", "root"]).await?;
    let both = [
        NodeName::from_static("node-a"),
        NodeName::from_static("node-b"),
    ];
    let v1 = ProcessSpec::new("svc", "exec sleep 1000").with_pin(both);
    let desired = root
        .network()
        .deploy(std::slice::from_ref(&v1))
        .await
        .expect("deploy");
    let id = desired.services[0].id.clone();
    let first = running(root.network(), std::slice::from_ref(&id), 1).await?;
    assert_eq!(first[0].node.name.as_str(), "node-a");

    // Pinned to node-b only now: it moves, keeping its id, with a higher generation.
    let v2 = v1.with_pin([NodeName::from_static("node-b")]);
    let again = root
        .network()
        .deploy(std::slice::from_ref(&v2))
        .await
        .expect("deploy");
    assert_eq!(again.services[0].id, id, "the id is kept");
    let moved = running(root.network(), std::slice::from_ref(&id), 2).await?;
    assert_eq!(moved[0].node.name.as_str(), "node-b");
    assert_eq!(moved[0].spec, v2);
    eventually("one copy, on node-b", FAILOVER, || {
        let (on_a, on_b) = (a.os_copies(&id).len(), b.os_copies(&id).len());
        async move { (on_a == 0 && on_b == 1).then_some(()) }
    })
    .await?;
    Ok(())
}

/// A restarted root does not place again a process whose node is silent while it comes back:
/// `web` runs on node-a, SIGSTOPped while the root restarts; node-b is heard at once and still
/// carries node-a's state in the gossip, so the root sees `web` where it was and leaves it
/// there; node-a speaks again after 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_root_leaves_a_silent_nodes_process_alone() -> anyhow::Result<()> {
    use p2f_testkit::procs::{Signal, signal};

    let mut root = crate::support::agent("root")
        .fixed_ports([127, 0, 0, 1].into(), service_port(), service_port())
        .init()?
        .started()
        .await?;
    let a = member(&root, "node-a", "127.0.0.2").await?;
    let b = member(&root, "node-b", "127.0.0.3").await?;
    root.all_alive(&["node-a", "node-b", "root"]).await?;
    let pins = [
        NodeName::from_static("node-a"),
        NodeName::from_static("node-b"),
    ];
    // node-b runs one process already, so web (pinned to both) goes to node-a.
    let filler =
        ProcessSpec::new("filler", "exec sleep 1000").with_pin([NodeName::from_static("node-b")]);
    let web = ProcessSpec::new("web", "exec sleep 1000").with_pin(pins);
    let desired = root.network().deploy(&[filler, web]).await?;
    let id = desired
        .services
        .iter()
        .find(|s| s.spec.name() == "web")
        .map(|s| s.id.clone())
        .expect("web in the desired state");
    let placed = running(root.network(), std::slice::from_ref(&id), 1).await?;
    assert_eq!(placed[0].node.name.as_str(), "node-a");
    // The root stores the live nodes at its next reconcile pass.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let a_pid = a.pid().expect("node-a runs");
    signal(a_pid, Signal::SIGSTOP);
    let resumed = resume_on_drop(a_pid);
    root.sigterm()?;
    root.start().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(resumed); // SIGCONT
    let after = eventually("web shown on node-a again", FAILOVER, || async {
        let all = root.network().list_processes().await.ok()?;
        all.into_iter()
            .find(|p| p.id == id && p.node.name.as_str() == "node-a" && p.is_running())
    })
    .await;
    let after = match after {
        Ok(after) => after,
        Err(e) => {
            let all = root.network().list_processes().await;
            let nodes = root.network().nodes().await;
            anyhow::bail!(
                "{e:#}\nprocesses: {all:#?}\nnodes: {nodes:#?}\nroot:\n{}",
                root.log_tail(40)
            );
        }
    };
    assert_eq!(after.generation, 1, "web was placed again: {after:#?}");
    // And stays there: nothing started on node-b meanwhile or since.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(b.os_copies(&id).is_empty(), "web started on node-b");
    assert_eq!(a.os_copies(&id).len(), 1, "web runs once on node-a");
    Ok(())
}

/// SIGCONTs `pid` when dropped (also when the test fails while it is stopped).
fn resume_on_drop(pid: u32) -> impl Drop {
    struct Resume(u32);
    impl Drop for Resume {
        fn drop(&mut self) {
            p2f_testkit::procs::signal(self.0, p2f_testkit::procs::Signal::SIGCONT);
        }
    }
    Resume(pid)
}
