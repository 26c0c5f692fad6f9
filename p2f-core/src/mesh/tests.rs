//! In-process meshes on 127.0.0.1: convergence, failure detection, authentication, sizes.
//!
//! Tests here check what happens and bound how long they wait for it generously (several times
//! what an idle machine needs), so a loaded CI machine does not fail them; they do not measure
//! speed. The figures (propagation, time to dead) are `examples/bench_network.rs`'s; the times
//! printed here with `--nocapture` are only a hint.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use chitchat::transport::UdpTransport;
use chitchat::{ChitchatConfig, ChitchatId, FailureDetectorConfig, ProtocolVersion};
use p2f_model::{NodeName, ProcessId};

use super::*;

const SECRET: &str = "mesh-test-secret-0123456789abcdef";

fn localhost() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

fn config(name: &str, seeds: &[SocketAddr], secret: &str) -> MeshConfig {
    let node = NodeName::new(name).expect("test node names are valid");
    let secret = Secret::parse(secret).expect("test secrets are valid");
    let mut config = MeshConfig::new(node, localhost(), secret);
    config.seeds = seeds.to_vec();
    config
}

async fn start(name: &str, seeds: &[SocketAddr]) -> Mesh {
    Mesh::start(config(name, seeds, SECRET))
        .await
        .expect("a mesh starts on 127.0.0.1")
}

/// `n` meshes named `n0..`, every one seeded with the first; waits until all see all.
async fn cluster(n: usize) -> Vec<Mesh> {
    let first = start("n0", &[]).await;
    let seed = [first.gossip_addr()];
    let mut meshes = vec![first];
    for i in 1..n {
        meshes.push(start(&format!("n{i}"), &seed).await);
    }
    let converged = wait_until(Duration::from_secs(10), async || {
        for mesh in &meshes {
            if mesh.members().await.len() != n {
                return false;
            }
        }
        true
    })
    .await;
    assert!(converged.is_some(), "{n} meshes did not converge in 10 s");
    meshes
}

/// Polls `check` every 5 ms until it holds (the time it took) or `limit` passes (`None`).
async fn wait_until(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

async fn value_on(mesh: &Mesh, node: &str, key: &str) -> Option<String> {
    mesh.members()
        .await
        .into_iter()
        .find(|m| m.node.as_str() == node)
        .and_then(|m| m.values.get(key).cloned())
}

async fn everyone_sees(meshes: &[Mesh], node: &str, key: &str, value: &str) -> bool {
    for mesh in meshes {
        if value_on(mesh, node, key).await.as_deref() != Some(value) {
            return false;
        }
    }
    true
}

/// Time for one key change on a rotating node to reach every node, `trials` times. Each change
/// is made at a different point of the gossip round (as real changes are), not right after the
/// round that delivered the previous one.
async fn propagation(meshes: &[Mesh], trials: usize) -> Vec<Duration> {
    let mut times = Vec::new();
    for trial in 0..trials {
        let phase = DEFAULT_GOSSIP_INTERVAL.mul_f64(trial as f64 / trials as f64);
        tokio::time::sleep(phase).await;
        let owner = &meshes[trial % meshes.len()];
        let value = format!("v{trial}");
        let started = Instant::now();
        owner
            .set("bench", &value)
            .await
            .expect("a small value is accepted");
        let node = owner.node().as_str().to_owned();
        let seen = wait_until(Duration::from_secs(10), async || {
            everyone_sees(meshes, &node, "bench", &value).await
        })
        .await;
        assert!(
            seen.is_some(),
            "trial {trial}: the change did not spread in 10 s"
        );
        times.push(started.elapsed());
    }
    times.sort();
    times
}

/// Drops the last mesh; the time until every other one lists it dead (at most `limit`).
async fn time_to_dead(mut meshes: Vec<Mesh>, limit: Duration) -> Duration {
    let lost = meshes.pop().expect("at least two meshes");
    let name = lost.node().as_str().to_owned();
    drop(lost);
    let started = Instant::now();
    let declared = wait_until(limit, async || {
        for mesh in &meshes {
            if !mesh.dead().await.iter().any(|m| m.node.as_str() == name) {
                return false;
            }
        }
        true
    })
    .await;
    assert!(
        declared.is_some(),
        "{name} was not declared dead everywhere within {limit:?}"
    );
    started.elapsed()
}

fn describe(times: &[Duration]) -> String {
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    format!(
        "p50 {:.0} ms, max {:.0} ms over {} trials",
        ms(&times[times.len() / 2]),
        ms(&times[times.len() - 1]),
        times.len()
    )
}

/// How long a key change may take to reach every node of a small mesh in a test: 5 times the
/// 2 s goal at 10 nodes (DESIGN §10), which an idle machine meets by far.
const SPREAD: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_meshes_converge_and_a_key_and_its_deletion_spread() {
    let meshes = cluster(3).await;
    meshes[2]
        .set("p/wiki-1", "{\"status\":\"running\"}")
        .await
        .expect("set");
    let took = wait_until(SPREAD, async || {
        everyone_sees(&meshes, "n2", "p/wiki-1", "{\"status\":\"running\"}").await
    })
    .await;
    let took = took.expect("the key reached every node");
    eprintln!(
        "mesh: one key reached 3 nodes in {:.0} ms",
        took.as_secs_f64() * 1000.0
    );

    // A deletion spreads too.
    meshes[2].delete("p/wiki-1").await;
    let gone = wait_until(SPREAD, async || {
        for mesh in &meshes {
            if value_on(mesh, "n2", "p/wiki-1").await.is_some() {
                return false;
            }
        }
        true
    })
    .await;
    assert!(
        gone.is_some(),
        "the deletion reached every node within {SPREAD:?}"
    );
    for mesh in &meshes {
        assert_eq!(mesh.stats().rejected, 0, "{:?}", mesh.stats());
        assert!(mesh.dead().await.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_is_declared_dead_and_comes_back_with_a_new_incarnation() {
    let mut meshes = cluster(3).await;
    meshes[1].set("p/db-1", "x").await.expect("set");
    assert!(
        wait_until(SPREAD, async || everyone_sees(&meshes, "n1", "p/db-1", "x")
            .await)
        .await
        .is_some()
    );
    // The failure detector has heard both others: it knows when it would give up on them.
    let heard = wait_until(SPREAD, async || {
        let timeouts = meshes[0].detection_timeouts().await;
        timeouts.len() == 2 && timeouts.iter().all(|(_, t)| t.is_some())
    })
    .await;
    assert!(
        heard.is_some(),
        "n0 never had a detection timeout for n1 and n2"
    );
    let mut configured = Duration::ZERO;
    for (name, timeout) in meshes[0].detection_timeouts().await {
        eprintln!("mesh: n0 would declare {name} dead after {timeout:?} of silence");
        configured = configured.max(timeout.unwrap_or_default());
    }
    let mut watch = meshes[0].watch();
    let lost = meshes.remove(1);
    let incarnation = lost.incarnation();
    drop(lost);
    let started = Instant::now();

    // The detector's timeout, plus the rounds until liveness is next checked, plus a second;
    // five times that, for a busy test machine.
    let bound = (configured + 2 * DEFAULT_GOSSIP_INTERVAL + Duration::from_secs(1)) * 5;
    let declared = wait_until(bound, async || {
        for mesh in &meshes {
            let dead = mesh.dead().await;
            if !dead.iter().any(|m| m.node.as_str() == "n1") {
                return false;
            }
        }
        true
    })
    .await;
    let declared = declared.unwrap_or_else(|| {
        panic!("n1 not declared dead by both others within {bound:?} (its detection timeout {configured:?})")
    });
    eprintln!(
        "mesh: a dropped node was declared dead by every other node after {:.2} s",
        declared.as_secs_f64()
    );
    // The dead entry keeps its last key-values; the live list no longer has it.
    let dead = meshes[0].dead().await;
    assert_eq!(dead[0].values.get("p/db-1").map(String::as_str), Some("x"));
    assert!(
        !meshes[0]
            .members()
            .await
            .iter()
            .any(|m| m.node.as_str() == "n1")
    );
    // The watch saw it too.
    // (`wait_for` returns a read guard of the watch: it must not be held, or the mesh cannot
    // publish again.)
    let reported = tokio::time::timeout(
        SPREAD,
        watch.wait_for(|m| m.dead.iter().any(|d| d.node.as_str() == "n1")),
    )
    .await
    .is_ok_and(|seen| seen.is_ok());
    assert!(reported, "the watch reported n1 dead");
    eprintln!(
        "mesh: watch reported it {:.2} s after the drop",
        started.elapsed().as_secs_f64()
    );

    // Restarted with a later incarnation, it is live again and no longer dead.
    let mut again = config("n1", &[meshes[0].gossip_addr()], SECRET);
    again.incarnation = incarnation + 1;
    let back = Mesh::start(again).await.expect("restart");
    meshes.push(back);
    let returned = wait_until(SPREAD * 2, async || {
        for mesh in &meshes {
            let membership = mesh.membership().await;
            let live = membership
                .live
                .iter()
                .any(|m| m.node.as_str() == "n1" && m.incarnation == incarnation + 1);
            if !live || membership.dead.iter().any(|m| m.node.as_str() == "n1") {
                return false;
            }
        }
        true
    })
    .await
    .expect("n1 live again everywhere");
    eprintln!(
        "mesh: the restarted node was live everywhere after {:.2} s",
        returned.as_secs_f64()
    );
    // Its old incarnation's key-values are not its new ones.
    assert_eq!(value_on(&meshes[0], "n1", "p/db-1").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_secret_unsigned_gossip_and_garbage_change_nothing() {
    let meshes = cluster(2).await;
    meshes[0]
        .set("secret-key", "members only")
        .await
        .expect("set");
    let seed = meshes[0].gossip_addr();

    // A mesh with another secret, seeded with n0.
    let intruder = Mesh::start(config(
        "intruder",
        &[seed],
        "another-secret-0123456789abcdef",
    ))
    .await
    .expect("start");
    intruder.set("evil", "1").await.expect("set");

    // Plain chitchat (no tag at all), same cluster id, seeded with n0.
    // (chitchat's UdpTransport binds by itself: find a free port first.)
    let plain_addr = std::net::UdpSocket::bind(localhost())
        .and_then(|socket| socket.local_addr())
        .expect("a free port");
    let plain = chitchat::spawn_chitchat(
        ChitchatConfig {
            chitchat_id: ChitchatId::new("plain", 1, plain_addr),
            cluster_id: "p2f".to_owned(),
            gossip_interval: Duration::from_millis(100),
            listen_addr: plain_addr,
            seed_nodes: vec![seed.to_string()],
            failure_detector_config: FailureDetectorConfig::default(),
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        },
        vec![("evil".to_owned(), "2".to_owned())],
        &UdpTransport,
    )
    .await
    .expect("plain chitchat starts");

    // Garbage: too short for a tag, a tag-sized blob, and a large random-ish datagram.
    let raw = std::net::UdpSocket::bind(localhost()).expect("bind");
    let before = meshes[0].stats().rejected;
    raw.send_to(b"x", seed).expect("send");
    raw.send_to(&[0u8; 32], seed).expect("send");
    let junk: Vec<u8> = (0..4000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    raw.send_to(&junk, seed).expect("send");
    assert!(
        wait_until(SPREAD, async || meshes[0].stats().rejected >= before + 3)
            .await
            .is_some(),
        "the three garbage datagrams were counted as rejected"
    );

    // Until the intruders' own gossip was refused several times (they gossip every round).
    assert!(
        wait_until(SPREAD, async || meshes[0].stats().rejected > before + 3 + 4)
            .await
            .is_some(),
        "the intruders' gossip was not dropped: {:?}",
        meshes[0].stats()
    );
    for mesh in &meshes {
        let membership = mesh.membership().await;
        let names: Vec<&str> = membership.live.iter().map(|m| m.node.as_str()).collect();
        assert_eq!(names, ["n0", "n1"], "only members are listed");
        assert!(membership.dead.is_empty());
    }
    let rejected = meshes[0].stats().rejected;
    eprintln!(
        "mesh: n0 dropped {rejected} unauthenticated datagrams, {:?}",
        meshes[0].stats()
    );
    let intruder_view = intruder.members().await;
    assert_eq!(
        intruder_view.len(),
        1,
        "the intruder learned nothing: {intruder_view:?}"
    );
    assert!(!intruder_view[0].values.contains_key("secret-key"));
    let plain_view = plain.with_chitchat(|c| c.node_states().len()).await;
    assert_eq!(plain_view, 1, "unsigned chitchat learned nothing");

    // And the mesh still works.
    meshes[0].set("after", "fine").await.expect("set");
    assert!(
        wait_until(SPREAD, async || everyone_sees(
            &meshes, "n0", "after", "fine"
        )
        .await)
        .await
        .is_some()
    );
}

#[tokio::test]
async fn keys_and_values_are_bounded() {
    let mesh = start("solo", &[]).await;
    assert!(matches!(
        mesh.set("", "v").await,
        Err(MeshError::BadKey { .. })
    ));
    let long_key = "k".repeat(MAX_KEY_LEN + 1);
    assert!(matches!(
        mesh.set(&long_key, "v").await,
        Err(MeshError::BadKey { .. })
    ));
    let big = "v".repeat(MAX_VALUE_LEN + 1);
    assert!(matches!(
        mesh.set("k", &big).await,
        Err(MeshError::ValueTooLarge { len, .. }) if len == MAX_VALUE_LEN + 1
    ));
    mesh.set("k", &"v".repeat(MAX_VALUE_LEN))
        .await
        .expect("the limit itself is fine");
    mesh.delete("missing").await;
    mesh.delete("k").await;
    assert!(mesh.members().await[0].values.is_empty());
    let mut unspecified = config("x", &[], SECRET);
    unspecified.gossip_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    assert!(matches!(
        Mesh::start(unspecified).await,
        Err(MeshError::Config(_))
    ));
}

/// A digest as a node would publish it, sized like a real one.
fn digest(i: usize) -> ProcessDigest {
    ProcessDigest {
        id: ProcessId::new(format!("service-{i:04}-3f9a1c")).expect("valid id"),
        generation: 1,
        status: p2f_model::Status::Running,
        restarts: 0,
        started_at: Some(p2f_model::Timestamp(1_795_000_000_000 + i as u64)),
        pid: Some(40_000 + i as u32),
        healthy: true,
        node: NodeName::new("n0").expect("valid name"),
        port: Some(10_000 + i as u16),
        domain: Some(format!("service-{i:04}.home.example.org")),
        spec: format!("{:016x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_process_digests_converge() {
    let meshes = cluster(3).await;
    let digests: Vec<ProcessDigest> = (0..500).map(digest).collect();
    let value_bytes: usize = digests
        .iter()
        .map(|d| d.key().len() + d.encode().len())
        .sum();
    let started = Instant::now();
    for d in &digests {
        meshes[0].set(&d.key(), &d.encode()).await.expect("set");
    }
    let set_time = started.elapsed();
    let took = wait_until(Duration::from_secs(20), async || {
        for mesh in &meshes[1..] {
            let members = mesh.members().await;
            let Some(n0) = members.iter().find(|m| m.node.as_str() == "n0") else {
                return false;
            };
            if n0.values.len() < 500 {
                return false;
            }
        }
        true
    })
    .await
    .expect("500 digests reached both peers within 20 s");
    let last = meshes[1].members().await;
    let n0 = last.iter().find(|m| m.node.as_str() == "n0").expect("n0");
    for d in &digests {
        let got = ProcessDigest::decode(&n0.values[&d.key()]).expect("decodes");
        assert_eq!(&got, d);
    }
    let stats = meshes[0].stats();
    eprintln!(
        "mesh: 500 digests ({} bytes of keys+values, {} per digest) reached 3 nodes in {:.2} s \
         (set took {:.0} ms); largest datagram {} bytes, limit {}, oversized {}",
        value_bytes,
        value_bytes / 500,
        took.as_secs_f64(),
        set_time.as_secs_f64() * 1000.0,
        stats.largest_sent,
        auth::MAX_DATAGRAM,
        stats.oversized
    );
    assert_eq!(stats.oversized, 0);
    assert!(stats.largest_sent as usize <= auth::MAX_DATAGRAM);
}

/// At 3 and 10 nodes, changes reach every node and a dropped node is declared dead everywhere,
/// each within a bound five times the goal (DESIGN §10: 1 s at 10 nodes; failover within 3 s
/// of which detection is most). The figures themselves are `bench_network`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagation_and_failure_detection_at_3_and_10_nodes() {
    for n in [3, 10] {
        let meshes = cluster(n).await;
        let times = propagation(&meshes, 10).await;
        eprintln!(
            "mesh: one key change reached all {n} nodes: {}",
            describe(&times)
        );
        assert!(
            times[times.len() / 2] < Duration::from_secs(10),
            "{n} nodes: {times:?}"
        );
        let timeouts: Vec<f64> = meshes[0]
            .detection_timeouts()
            .await
            .into_iter()
            .filter_map(|(_, timeout)| timeout.map(|t| t.as_secs_f64()))
            .collect();
        let dead_after = time_to_dead(meshes, Duration::from_secs(25)).await;
        eprintln!(
            "mesh: {n} nodes: detection timeouts {:.2}-{:.2} s; a dropped node was dead \
             everywhere after {:.2} s",
            timeouts.iter().copied().fold(f64::INFINITY, f64::min),
            timeouts.iter().copied().fold(0.0, f64::max),
            dead_after.as_secs_f64()
        );
    }
}

#[tokio::test]
async fn an_unchanged_nodes_values_are_shared_between_snapshots_and_a_change_makes_new_ones() {
    let mesh = start("solo", &[]).await;
    mesh.set("p/web-1", "a").await.expect("set");
    let first = mesh.membership().await;
    let second = mesh.membership().await;
    assert!(Arc::ptr_eq(&first.live[0].values, &second.live[0].values));
    mesh.set("p/web-1", "b").await.expect("set");
    let third = mesh.membership().await;
    assert!(!Arc::ptr_eq(&second.live[0].values, &third.live[0].values));
    assert_eq!(
        third.live[0].values.get("p/web-1").map(String::as_str),
        Some("b")
    );
    // A delete is a change too.
    mesh.delete("p/web-1").await;
    let fourth = mesh.membership().await;
    assert!(fourth.live[0].values.get("p/web-1").is_none());
    mesh.stop().await;
}

/// The time until a node counts as lost follows the configured phi threshold (what
/// `[mesh] phi_threshold` in a node's config sets): a higher threshold, a later verdict. (About
/// eight times later for eight times the threshold on an idle machine; a loaded one distorts
/// the ratio, so only the order is checked, with a bound five times the expected time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phi_threshold_sets_how_soon_a_silent_node_is_lost() {
    let mut lost_after = Vec::new();
    for phi in [4.0, 32.0] {
        let mut observer = config("observer", &[], SECRET);
        observer.gossip_interval = Duration::from_millis(100);
        observer.phi_threshold = phi;
        let observer = Mesh::start(observer).await.expect("start");
        let mut silent = config("silent", &[observer.gossip_addr()], SECRET);
        silent.gossip_interval = Duration::from_millis(100);
        let silent = Mesh::start(silent).await.expect("start");
        let both = wait_until(Duration::from_secs(10), async || {
            observer.members().await.len() == 2
        })
        .await;
        assert!(both.is_some(), "the meshes did not meet in 10 s");
        // Until the failure detector has sampled a few heartbeat intervals (it says when it
        // would give up on the silent node only once it has).
        let sampled = wait_until(Duration::from_secs(10), async || {
            observer
                .detection_timeouts()
                .await
                .iter()
                .all(|(_, t)| t.is_some())
        })
        .await;
        assert!(
            sampled.is_some(),
            "no detection timeout for the silent node"
        );
        lost_after.push(time_to_dead(vec![observer, silent], Duration::from_secs(40)).await);
    }
    eprintln!("mesh: a silent node was lost after {lost_after:?} with phi 4 and 32");
    let [low, high] = [lost_after[0], lost_after[1]];
    assert!(
        high > low,
        "phi 32 should take longer than phi 4: {lost_after:?}"
    );
}

/// Waits (at most `limit`) for a datagram sent to `socket` from `from`, skipping others.
async fn datagram_from(
    socket: &tokio::net::UdpSocket,
    from: SocketAddr,
    limit: Duration,
) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; auth::MAX_DATAGRAM];
    let read = async {
        loop {
            match socket.recv_from(&mut buf).await {
                Ok((len, sender)) if sender == from => return Some(buf[..len].to_vec()),
                Ok(_) => {}
                Err(error) => {
                    eprintln!("mesh test: receive failed: {error}");
                    return None;
                }
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_datagram_is_dropped() {
    // A tap stands where n1's seed should be and catches the gossip n1 sends it (a SYN).
    let tap = tokio::net::UdpSocket::bind(localhost())
        .await
        .expect("bind the tap");
    let spoof = tokio::net::UdpSocket::bind(localhost())
        .await
        .expect("bind the spoofing socket");
    let n0 = start("n0", &[]).await;
    let n1 = start("n1", &[tap.local_addr().expect("tap address")]).await;
    let captured = datagram_from(&tap, n1.gossip_addr(), SPREAD)
        .await
        .expect("n1 gossiped to its seed");

    // Delivered once (from the tap), it is authentic and new: n0 answers it.
    let before = n0.stats();
    tap.send_to(&captured, n0.gossip_addr())
        .await
        .expect("send");
    let answer = datagram_from(&tap, n0.gossip_addr(), SPREAD).await;
    assert!(answer.is_some(), "n0 answered the original datagram");
    assert!(n0.stats().accepted > before.accepted);

    // Sent again, from the tap and from another address: dropped, never answered.
    const TIMES: u64 = 5;
    for _ in 0..TIMES {
        tap.send_to(&captured, n0.gossip_addr())
            .await
            .expect("send");
        spoof
            .send_to(&captured, n0.gossip_addr())
            .await
            .expect("send");
    }
    let counted = wait_until(SPREAD, async || {
        n0.stats().replayed >= before.replayed + 2 * TIMES
    })
    .await;
    assert!(
        counted.is_some(),
        "the replays were not counted: {:?}",
        n0.stats()
    );
    let quiet = Duration::from_secs(1);
    assert_eq!(
        datagram_from(&spoof, n0.gossip_addr(), quiet).await,
        None,
        "n0 answered the spoofing socket"
    );
    assert_eq!(
        datagram_from(&tap, n0.gossip_addr(), quiet).await,
        None,
        "n0 answered a replay sent from the tap"
    );
    let after = n0.stats();
    assert_eq!(after.replayed, before.replayed + 2 * TIMES, "{after:?}");
    assert_eq!(after.rejected, before.rejected, "{after:?}");
    assert_eq!(after.stale, before.stale, "{after:?}");
    eprintln!("mesh: n0 dropped {} replays: {after:?}", 2 * TIMES);
    n1.stop().await;
    n0.stop().await;
}

/// How long each step of a key rotation is given before the next one.
const ROTATION_STEP: Duration = Duration::from_secs(2);

/// Watches `meshes` for `ROTATION_STEP` (every 50 ms): every one lists every name live and
/// nobody dead, rejects nothing, and keeps accepting gossip. Panics naming `step` otherwise.
async fn all_alive_through(meshes: &[&Mesh], names: &[&str], step: &str) {
    let accepted: Vec<u64> = meshes.iter().map(|m| m.stats().accepted).collect();
    let started = Instant::now();
    while started.elapsed() < ROTATION_STEP {
        for mesh in meshes {
            let membership = mesh.membership().await;
            let live: Vec<&str> = membership.live.iter().map(|m| m.node.as_str()).collect();
            assert_eq!(live, names, "{step}: {} lists these live", mesh.node());
            assert!(
                membership.dead.is_empty(),
                "{step}: {} lists dead nodes: {:?}",
                mesh.node(),
                membership.dead
            );
            let stats = mesh.stats();
            assert_eq!(
                (stats.rejected, stats.stale, stats.replayed),
                (0, 0, 0),
                "{step}: {} dropped gossip: {stats:?}",
                mesh.node()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (mesh, before) in meshes.iter().zip(accepted) {
        assert!(
            mesh.stats().accepted > before,
            "{step}: {} heard nothing",
            mesh.node()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_during_rotation_keep_everyone_alive() {
    let old = Secret::parse(SECRET).expect("valid");
    let new = Secret::parse("mesh-test-new-secret-0123456789abcdef").expect("valid");
    let old_id = KeyId::of(&old);
    let new_id = KeyId::of(&new);
    assert_ne!(old_id, new_id);

    // n1 and n2 run with the old key alone, then install the new one at runtime.
    let n1 = start("n1", &[]).await;
    let n2 = start("n2", &[n1.gossip_addr()]).await;
    for mesh in [&n1, &n2] {
        assert_eq!(
            mesh.gossip_keys(),
            [KeyInfo {
                id: old_id,
                primary: true
            }]
        );
        assert_eq!(mesh.install_key(&new).expect("room"), new_id);
    }
    // n0 starts with both, the new one primary.
    let mut ring = KeyRing::new(&new);
    ring.install(&old).expect("room");
    let mut n0 =
        MeshConfig::with_gossip_keys(NodeName::new("n0").expect("valid"), localhost(), ring);
    n0.seeds = vec![n1.gossip_addr()];
    let n0 = Mesh::start(n0).await.expect("start");
    assert_eq!(
        n0.gossip_keys()[0],
        KeyInfo {
            id: new_id,
            primary: true
        }
    );
    let meshes = [&n0, &n1, &n2];
    let names = ["n0", "n1", "n2"];
    let met = wait_until(SPREAD, async || {
        for mesh in meshes {
            if mesh.members().await.len() != 3 {
                return false;
            }
        }
        true
    })
    .await;
    assert!(met.is_some(), "the three meshes did not meet");
    all_alive_through(&meshes, &names, "n0 tags with the new key").await;

    // Everyone switches to the new key, then drops the old one, one node at a time.
    n1.use_key(new_id).expect("installed");
    all_alive_through(&meshes, &names, "n1 uses the new key").await;
    n2.use_key(new_id).expect("installed");
    all_alive_through(&meshes, &names, "n2 uses the new key").await;
    assert!(matches!(
        n2.remove_key(new_id),
        Err(MeshError::RemovePrimary(id)) if id == new_id
    ));
    for mesh in meshes {
        mesh.remove_key(old_id).expect("not primary");
        assert_eq!(
            mesh.gossip_keys(),
            [KeyInfo {
                id: new_id,
                primary: true
            }]
        );
        all_alive_through(
            &meshes,
            &names,
            &format!("{} removed the old key", mesh.node()),
        )
        .await;
    }

    // A datagram tagged with the removed key is rejected now.
    let raw = std::net::UdpSocket::bind(localhost()).expect("bind");
    let before = n0.stats().rejected;
    let header = auth::Header {
        key: old_id,
        sender: 0x5eed,
        timestamp_ms: auth::unix_ms(),
        counter: 1,
    };
    let sealed = auth::seal(KeyRing::new(&old).primary_key(), &header, b"old gossip");
    raw.send_to(&sealed, n0.gossip_addr()).expect("send");
    let rejected = wait_until(SPREAD, async || n0.stats().rejected > before).await;
    assert!(
        rejected.is_some(),
        "old-key datagram not rejected: {:?}",
        n0.stats()
    );
    assert_eq!(n0.stats().rejected, before + 1);
    for mesh in [n0, n1, n2] {
        mesh.stop().await;
    }
}

/// A gossip task that dies is noticed (the agent exits loudly on it instead of serving a frozen
/// view of the network): `stopped` resolves with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gossip_task_is_noticed() {
    let mesh = start("n0", &[]).await;
    let stopped = mesh.stopped();
    let pending = tokio::time::timeout(Duration::from_millis(300), mesh.stopped()).await;
    assert!(pending.is_err(), "a running gossip is not reported stopped");
    mesh.kill_gossip();
    let why = tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("noticed within 5 s");
    assert!(why.contains("gossip task"), "{why}");
}
