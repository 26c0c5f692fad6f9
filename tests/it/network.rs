//! Several agents as one network (real `p2f node run` processes on 127.0.0.1–3, joined with
//! the root's token, gossiping over the mesh): a record written on one node is visible on all,
//! a node that dies shows its records as `Lost` everywhere else, and the others still answer
//! for the whole network while the root is down.

use std::time::{Duration, Instant};

use p2f::model::{
    Failure, NodeName, Process, ProcessId, ProcessKey, ProcessSpec, Rejection, Status, Unfit,
};

use crate::support::{TestAgent, eventually, log_containing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_spread_to_every_node_and_a_dead_nodes_records_are_lost() {
    let root = TestAgent::start("root").await;
    let mut a = TestAgent::join(&root, "node-a", "127.0.0.2").await;
    let b = TestAgent::join(&root, "node-b", "127.0.0.3").await;

    let node_a = a.network().node().await.expect("node a");
    let spec = ProcessSpec::new("spread", "echo hello from $P2F_NODE; exec sleep 1000")
        .with_port(free_port())
        .with_domain("spread.home.arpa");
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
        let seen = eventually(
            &format!("{name} to list the record"),
            Duration::from_secs(10),
            || {
                let (net, id) = (net.clone(), id.clone());
                async move {
                    let all = net.list_processes().await.ok()?;
                    all.into_iter().find(|q| q.id == id && q.is_running())
                }
            },
        )
        .await;
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
    // Without the secret, every node answers 401.
    let ca = std::fs::read_to_string(root.config.cluster_dir().join("ca.pem")).expect("ca");
    for agent in [&root, &a, &b] {
        let stranger = p2f::core::Network::connect(
            agent.network().address(),
            p2f::core::cluster::Secret::generate(),
            &ca,
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
    let logs = log_containing(root.network(), &p.id, "hello", Duration::from_secs(10)).await;
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
    assert!(a.os_processes(&p.id).is_empty(), "stopped on its own node");

    // Node a dies (the agent): the others show its record as Lost.
    a.sigkill();
    let died = Instant::now();
    for (name, agent) in [("root", &root), ("node-b", &b)] {
        let net = agent.network().clone();
        let id = p.id.clone();
        eventually(
            &format!("{name} to see the record lost"),
            Duration::from_secs(15),
            || {
                let (net, id) = (net.clone(), id.clone());
                async move {
                    let all = net.list_processes().await.ok()?;
                    all.into_iter()
                        .find(|q| q.id == id && q.status == Status::Lost)
                }
            },
        )
        .await;
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
    eventually(
        "node-b to see the root dead",
        Duration::from_secs(15),
        || {
            let net = b.network().clone();
            async move {
                let nodes = net.nodes().await.ok()?;
                nodes
                    .iter()
                    .any(|n| n.node.name.as_str() == "root" && !n.alive)
                    .then_some(())
            }
        },
    )
    .await;
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_places_services_and_moves_them_off_a_dead_node() {
    let root = TestAgent::start("root").await;
    let a = TestAgent::join(&root, "node-a", "127.0.0.2").await;
    let b = TestAgent::join(&root, "node-b", "127.0.0.3").await;
    let mut agents = [a, b];
    all_alive(&root, 3).await;
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
    .with_port(free_port())
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
    let running = running_everywhere(&root, &ids, 1).await;
    let nodes: Vec<&str> = running.iter().map(|p| p.node.name.as_str()).collect();
    assert_eq!(nodes, ["node-a", "node-b"], "spread over the allowed nodes");
    for id in &ids {
        let count: usize = agents.iter().map(|n| n.os_processes(id).len()).sum();
        assert_eq!(count, 1, "{id} runs once");
    }
    // Each was placed once: the root waited for its placements to show up instead of sending
    // them again (which the nodes would have refused).
    let log = root.agent_log();
    assert!(!log.contains("placement refused"), "root log:\n{log}");

    // The node running `web` dies (agent and processes): web runs again on the other one.
    let web_id = &ids[0];
    let died = Instant::now();
    agents[0].kill_node();
    let moved = running_everywhere(&root, std::slice::from_ref(web_id), 2).await;
    let failover = died.elapsed();
    assert_eq!(moved[0].node.name.as_str(), "node-b");
    assert_eq!(agents[1].os_processes(web_id).len(), 1);
    eprintln!("failover: SIGKILL of node-a -> web Running on node-b after {failover:?}");

    // node-a comes back: its stale copy (generation 1) is dropped without ever starting again;
    // exactly one copy remains.
    agents[0].spawn().await;
    eventually(
        "node-a to drop its stale copy",
        Duration::from_secs(20),
        || {
            let (stale, fresh) = (
                agents[0].os_processes(web_id),
                agents[1].os_processes(web_id),
            );
            let local = agents[0].network().clone();
            let id = web_id.clone();
            async move {
                let records = local.list_local().await.ok()?;
                (stale.is_empty() && fresh.len() == 1 && !records.iter().any(|p| p.id == id))
                    .then_some(())
            }
        },
    )
    .await;

    let started: Vec<String> = std::fs::read_to_string(&starts)
        .expect("starts")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        started,
        ["node-a 1", "node-b 2"],
        "the returning node must not start its stale copy again; root log:\n{}",
        root.agent_log()
    );

    // Moving it back on request: a new generation on node-a, node-b drops its copy.
    let a_name = NodeName::from_static("node-a");
    eventually(
        "the root to see node-a alive again",
        Duration::from_secs(15),
        || {
            let net = root.network().clone();
            async move {
                let nodes = net.nodes().await.ok()?;
                nodes
                    .iter()
                    .any(|n| n.node.name.as_str() == "node-a" && n.alive)
                    .then_some(())
            }
        },
    )
    .await;
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
    eventually("node-b to drop its copy", Duration::from_secs(15), || {
        let (on_a, on_b) = (
            agents[0].os_processes(web_id),
            agents[1].os_processes(web_id),
        );
        async move { (on_a.len() == 1 && on_b.is_empty()).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_member_starts_again_what_nobody_replaced() {
    let mut root = TestAgent::start("root").await;
    let mut a = TestAgent::join(&root, "node-a", "127.0.0.9").await;
    all_alive(&root, 2).await;
    // Spun on node-a directly: the root does not manage it, so nobody replaces it.
    let node_a = a.network().node().await.expect("node a");
    let spec = ProcessSpec::new("keeper", "exec sleep 1000");
    let p = root
        .network()
        .spin_process(&spec, &node_a)
        .await
        .expect("spin on node a");
    all_alive(&root, 2).await;

    // The node dies and comes back before anyone could act: it waits to hear the root, then
    // starts the same generation again.
    a.kill_node();
    assert!(a.os_processes(&p.id).is_empty());
    let back = Instant::now();
    a.spawn().await;
    let again = a
        .wait_for(&p.id, Duration::from_secs(15), "running again", |q| {
            q.is_running()
        })
        .await;
    let waited = back.elapsed();
    assert_eq!(again.generation, 1);
    assert_eq!(a.os_processes(&p.id).len(), 1);
    let log = a.agent_log();
    assert!(log.contains("waiting for the network"), "{log}");
    assert!(!log.contains("no other node answers"), "{log}");
    assert!(!log.contains("did not hear every live node"), "{log}");
    assert!(
        waited < Duration::from_secs(8),
        "heard the root in {waited:?}"
    );

    // With the root gone too, the node finds itself alone and starts it anyway.
    root.sigkill();
    a.kill_node();
    a.spawn().await;
    let again = a
        .wait_for(&p.id, Duration::from_secs(20), "running again alone", |q| {
            q.is_running()
        })
        .await;
    assert_eq!(again.generation, 1);
    assert_eq!(a.os_processes(&p.id).len(), 1);
    assert!(a.agent_log().contains("no other node answers"));

    // Killed while it waits (alone, for 3 s): it is stopped where it is and never starts.
    a.kill_node();
    a.spawn().await;
    let parked = a
        .network()
        .process_information(ProcessKey::Id(p.id.clone()))
        .await
        .expect("info")
        .expect("the record");
    assert_eq!(parked.status, Status::Parked, "parked: {parked:?}");
    let killed = a.network().kill_process(&parked).await.expect("kill");
    assert_eq!(killed.status, Status::Stopped);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = a
        .network()
        .process_information(ProcessKey::Id(p.id.clone()))
        .await
        .expect("info")
        .expect("the record");
    assert_eq!(after.status, Status::Stopped, "{after:?}");
    assert!(a.os_processes(&p.id).is_empty(), "never started again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_pinned_to_a_dead_node_waits_and_returns_with_it() {
    let root = TestAgent::start("root").await;
    let mut pi = TestAgent::join(&root, "pi", "127.0.0.4").await;
    let spec =
        ProcessSpec::new("only-on-pi", "exec sleep 1000").with_pin([NodeName::from_static("pi")]);
    let desired = root.network().deploy(&[spec]).await.expect("deploy");
    let id = desired.services[0].id.clone();
    running_everywhere(&root, std::slice::from_ref(&id), 1).await;

    pi.kill_node();
    let held = eventually(
        "the process to wait for its node",
        Duration::from_secs(15),
        || {
            let net = root.network().clone();
            let id = id.clone();
            async move {
                let all = net.list_processes().await.ok()?;
                all.into_iter()
                    .find(|p| p.id == id && p.status == Status::Unplaced)
            }
        },
    )
    .await;
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
    pi.spawn().await;
    let back = running_everywhere(&root, std::slice::from_ref(&id), 2).await;
    assert_eq!(back[0].node.name.as_str(), "pi");
    eventually("exactly one copy on pi", Duration::from_secs(15), || {
        let count = pi.os_processes(&id).len();
        async move { (count == 1).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_restarts_move_a_process_to_a_node_it_has_not_failed_on() {
    let root = TestAgent::start("root").await;
    let a = TestAgent::join(&root, "node-a", "127.0.0.5").await;
    let b = TestAgent::join(&root, "node-b", "127.0.0.6").await;
    all_alive(&root, 3).await;
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
    let moved = eventually("it runs on node-b", Duration::from_secs(30), || {
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
    .await;
    if moved.generation > 2 {
        eprintln!(
            "moved to node-b only with generation {}; root log:\n{}",
            moved.generation,
            root.agent_log()
        );
    }
    assert_eq!(b.os_processes(&id).len(), 1);
    assert!(a.os_processes(&id).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_spec_or_pin_replaces_the_process() {
    let root = TestAgent::start("root").await;
    let a = TestAgent::join(&root, "node-a", "127.0.0.7").await;
    let b = TestAgent::join(&root, "node-b", "127.0.0.8").await;
    all_alive(&root, 3).await;
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
    let first = running_everywhere(&root, std::slice::from_ref(&id), 1).await;
    assert_eq!(first[0].node.name.as_str(), "node-a");

    // Pinned to node-b only now: it moves, keeping its id, with a higher generation.
    let v2 = v1.with_pin([NodeName::from_static("node-b")]);
    let again = root
        .network()
        .deploy(std::slice::from_ref(&v2))
        .await
        .expect("deploy");
    assert_eq!(again.services[0].id, id, "the id is kept");
    let moved = running_everywhere(&root, std::slice::from_ref(&id), 2).await;
    assert_eq!(moved[0].node.name.as_str(), "node-b");
    assert_eq!(moved[0].spec, v2);
    eventually("one copy, on node-b", Duration::from_secs(15), || {
        let (on_a, on_b) = (a.os_processes(&id).len(), b.os_processes(&id).len());
        async move { (on_a == 0 && on_b == 1).then_some(()) }
    })
    .await;
}

/// Waits until the root sees `count` nodes alive (itself included).
async fn all_alive(root: &TestAgent, count: usize) {
    let net = root.network().clone();
    eventually(
        "the root to see every member",
        Duration::from_secs(10),
        || {
            let net = net.clone();
            async move {
                let nodes = net.nodes().await.ok()?;
                (nodes.iter().filter(|n| n.alive).count() == count).then_some(())
            }
        },
    )
    .await;
}

/// Waits until the root lists each of `ids` `Running` with at least `generation`.
async fn running_everywhere(root: &TestAgent, ids: &[ProcessId], generation: u64) -> Vec<Process> {
    let net = root.network().clone();
    eventually("the services to run", Duration::from_secs(20), || {
        let net = net.clone();
        async move {
            let all = net.list_processes().await.ok()?;
            ids.iter()
                .map(|id| {
                    all.iter()
                        .find(|p| &p.id == id && p.is_running() && p.generation >= generation)
                        .cloned()
                })
                .collect::<Option<Vec<Process>>>()
        }
    })
    .await
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}
