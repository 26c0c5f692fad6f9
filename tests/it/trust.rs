//! Keys that change (issue: trust): the gossip key rotated on a live network with nobody ever
//! seen lost, kept across restarts, and changed only by the root and operators.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use p2f_testkit::p2f_bin;

use crate::support::{member, root};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gossip_key_rotates_with_nobody_lost() -> anyhow::Result<()> {
    let root = root("root-rk").await?;
    let mut a = member(&root, "node-a", "127.0.0.2").await?;
    let b = member(&root, "node-b", "127.0.0.3").await?;
    let everyone = ["node-a", "node-b", "root-rk"];
    root.all_alive(&everyone).await?;
    a.all_alive(&everyone).await?;
    let old = root.network().gossip_keys().await?;
    assert_eq!(old.len(), 1, "{old:?}");

    // Every 50 ms, the root and node-a list the nodes; nobody may ever be seen dead.
    let stop = Arc::new(AtomicBool::new(false));
    let watch = |net: p2f::core::Network| {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut deaths = Vec::new();
            let mut looks = 0;
            while !stop.load(Ordering::Relaxed) && looks < 2_000 {
                if let Ok(nodes) = net.nodes().await {
                    looks += 1;
                    deaths.extend(
                        nodes
                            .iter()
                            .filter(|n| !n.alive)
                            .map(|n| n.node.name.to_string()),
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (looks, deaths)
        })
    };
    let watchers = [watch(root.client()?), watch(a.client()?)];

    // A member may not change another node's keys.
    let as_a = p2f::core::Network::connect(b.network().address(), &a.node_credentials()?)?;
    let refused = as_a
        .install_gossip_key(&p2f::core::cluster::Secret::generate())
        .await
        .expect_err("a member may not");
    assert_eq!(refused.status(), Some(403), "{refused}");

    let rotate = assert_cmd::Command::new(p2f_bin()?)
        .args(["cluster", "rotate-key", "--config"])
        .arg(root.config_path())
        .env_remove("P2F_OPERATOR")
        .timeout(Duration::from_secs(60))
        .assert()
        .success();
    let out = String::from_utf8_lossy(&rotate.get_output().stdout).into_owned();
    assert!(out.contains("replaced by"), "{out}");
    // Some more gossip rounds on the new key alone (a node still tagging with the old key
    // would now be silent, and declared lost within a few seconds).
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    for watcher in watchers {
        let (looks, deaths) = watcher.await?;
        assert!(looks > 20, "the watcher looked {looks} times");
        assert!(
            deaths.is_empty(),
            "seen dead during the rotation: {deaths:?}"
        );
    }
    // Every node has exactly the new key, as primary.
    let new = root.network().gossip_keys().await?;
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(new[0].primary && new[0].id != old[0].id, "{new:?}");
    for agent in [&a, &b] {
        assert_eq!(
            agent.network().gossip_keys().await?,
            new,
            "{}",
            agent.name()
        );
    }
    assert!(out.contains(&new[0].id.to_string()), "{out}");

    // The ring was saved: a restarted member is heard again, and hears.
    a.sigterm()?;
    a.start().await?;
    root.all_alive(&everyone).await?;
    a.all_alive(&everyone).await?;
    assert_eq!(a.network().gossip_keys().await?, new);
    // A node that joins now gets the new key.
    let c = member(&root, "node-c", "127.0.0.4").await?;
    c.all_alive(&["node-a", "node-b", "node-c", "root-rk"])
        .await?;
    assert_eq!(c.network().gossip_keys().await?, new);
    Ok(())
}

/// Removing an operator and a node (issue: trust): every node refuses their certificates, the
/// removed node is shut out of the gossip (the key is rotated without it) and its process is
/// placed on the other allowed node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_and_operator_are_refused_everywhere() -> anyhow::Result<()> {
    use p2f::model::{NodeName, ProcessSpec};
    let root = root("root-rm").await?;
    let a = member(&root, "node-a", "127.0.0.2").await?;
    let b = member(&root, "node-b", "127.0.0.3").await?;
    root.all_alive(&["node-a", "node-b", "root-rm"]).await?;
    let p2f = |args: &[&str]| {
        assert_cmd::Command::new(p2f_bin().expect("p2f"))
            .args(args)
            .arg("--config")
            .arg(root.config_path())
            .env_remove("P2F_OPERATOR")
            .timeout(Duration::from_secs(60))
            .assert()
    };

    // Operator bob, added through the root, may list; once removed, no node answers him.
    let home = tempfile::tempdir()?;
    let bob_dir = home.path().join("bob");
    p2f(&[
        "operator",
        "add",
        "bob",
        "--out",
        &bob_dir.to_string_lossy(),
    ])
    .success();
    let (bob, root_address) = p2f::core::cluster::Credentials::operator(&bob_dir)?;
    assert_eq!(root_address, root.network().address());
    let as_bob = |agent: &p2f_testkit::Agent| {
        p2f::core::Network::connect(agent.network().address(), &bob).expect("client")
    };
    assert!(as_bob(&root).list_processes().await.is_ok());
    assert!(as_bob(&b).list_processes().await.is_ok());
    p2f(&["operator", "remove", "bob"]).success();
    for agent in [&root, &a, &b] {
        let refused = as_bob(agent).list_processes().await.expect_err("revoked");
        assert_eq!(refused.status(), Some(401), "{}: {refused}", agent.name());
    }
    // Removing someone never admitted: 404, nothing changes.
    p2f(&["operator", "remove", "carol"])
        .code(1)
        .stderr(predicates::str::contains("no operator carol"));

    // A service allowed on both members; the node it runs on is removed.
    let spec = ProcessSpec::new("svc", "exec sleep 1000").with_pin([
        NodeName::from_static("node-a"),
        NodeName::from_static("node-b"),
    ]);
    let desired = root.network().deploy(&[spec]).await?;
    let id = desired.services[0].id.clone();
    let placed = root
        .wait_for(&id, Duration::from_secs(30), "running", |p| p.is_running())
        .await?;
    let (gone, stays) = if placed.node.name.as_str() == "node-a" {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let gone_credentials = gone.node_credentials()?;
    p2f(&["node", "remove", gone.name()]).success();
    // Its certificate is refused by the root and by the other member.
    for agent in [&root, stays] {
        let as_gone = p2f::core::Network::connect(agent.network().address(), &gone_credentials)?;
        let refused = as_gone.list_processes().await.expect_err("revoked");
        assert_eq!(refused.status(), Some(401), "{}: {refused}", agent.name());
    }
    // It is no longer heard (its gossip key is gone): seen lost, and its process moves.
    let moved = root
        .wait_for(
            &id,
            Duration::from_secs(60),
            "placed on the other member",
            |p| p.is_running() && p.node.name.as_str() == stays.name(),
        )
        .await?;
    assert!(moved.generation > placed.generation, "{moved:#?}");
    let nodes = root.network().nodes().await?;
    let removed = nodes
        .iter()
        .find(|n| n.node.name.as_str() == gone.name())
        .expect("still listed, as lost");
    assert!(!removed.alive, "{nodes:?}");
    Ok(())
}

/// Gossip alone cannot make a node give up its copy (issue: trust): a rogue holding the gossip
/// key (a stolen member's) publishes a newer copy of a process under a name of its own; the node
/// running it asks that node over its API (by name, so only the holder of that name's
/// certificate could answer), gets no confirmation, and keeps running its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_digest_does_not_fence_a_running_copy() -> anyhow::Result<()> {
    use p2f::core::mesh::{Mesh, MeshConfig, ProcessDigest, keys};
    use p2f::core::wire::{SpinQuery, SpinRequest};
    use p2f::model::{NodeName, ProcessSpec, Status};
    let root = root("root-fg").await?;
    let a = member(&root, "node-a", "127.0.0.2").await?;
    root.all_alive(&["node-a", "root-fg"]).await?;
    let request = SpinRequest {
        spec: ProcessSpec::new("victim", "exec sleep 1000"),
        id: None,
        generation: None,
        moved_from: None,
        external: None,
    };
    let victim = root
        .network()
        .at(a.network().address())
        .spin(&request, SpinQuery { wait: true })
        .await?;
    assert_eq!(victim.status, Status::Running);
    let pid = victim.pid.expect("pid");

    // The rogue: the gossip key from node-a's disk, a name of its own, an API nobody serves.
    let secret = std::fs::read_to_string(a.config().cluster_dir().join("secret"))?;
    let secret = p2f::core::cluster::Secret::parse(&secret)?;
    let mut config = MeshConfig::new(
        NodeName::from_static("mallory"),
        "127.0.0.9:0".parse()?,
        secret,
    );
    config.seeds = a.config().mesh.as_ref().expect("a mesh").seeds.clone();
    let rogue = Mesh::start(config).await?;
    let mut forged = ProcessDigest::of(&victim);
    forged.generation += 1;
    forged.node = NodeName::from_static("mallory");
    rogue.set(keys::API, "127.0.0.9:9").await?;
    rogue.set(&forged.key(), &forged.encode()).await?;
    rogue.set(keys::SEQ, "1").await?;
    p2f_testkit::eventually("node-a hears mallory", Duration::from_secs(20), || async {
        let nodes = a.network().nodes().await.ok()?;
        nodes
            .iter()
            .any(|n| n.node.name.as_str() == "mallory" && n.alive)
            .then_some(())
    })
    .await?;
    // For 5 s (twenty sync rounds) the copy keeps running, untouched.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(a.os_copies(&victim.id), [pid], "the copy on node-a runs on");
    }
    let record = a
        .network()
        .list_local()
        .await?
        .into_iter()
        .find(|p| p.id == victim.id)
        .expect("kept");
    assert_eq!(
        (record.status, record.generation),
        (Status::Running, victim.generation)
    );
    rogue.stop().await;
    Ok(())
}
