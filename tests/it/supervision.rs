//! Supervision that holds for real programs (a real `p2f node run` agent): every process a
//! service starts is its own — counted by the kernel's cgroup membership, not by process
//! group — however it detaches; a crash behind `| tee` is not a clean stop; and its output
//! reaches its log files and `logs -f` whole, through rotations.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use p2f::core::node::ContainmentMode;
use p2f::core::node::contain::Containment;
use p2f::core::wire::LogsQuery;
use p2f::model::{Failure, Health, ProcessId, ProcessSpec, RestartPolicy, Status};
use p2f_testkit::procs::{self, Signal, signal};
use p2f_testkit::{Agent, eventually};

use crate::support::{agent, root, service_port};

const WAIT: Duration = Duration::from_secs(20);

/// The cgroup of process `id` on `agent`'s node. The machine must have a writable cgroup v2
/// hierarchy (this kind mounts one at /sys/fs/cgroup/unified): without it the agent falls back
/// to process trees, which these tests do not measure.
fn cell(agent: &Agent, id: &ProcessId) -> PathBuf {
    let config = agent.config();
    let subtree = Containment::subtree_of(&config.name, &config.data_dir)
        .expect("a cgroup v2 hierarchy (mount | grep cgroup2)");
    assert!(
        subtree.exists(),
        "the agent contains its processes in cgroups under {}",
        subtree.display()
    );
    subtree.join(id.as_str())
}

/// The processes in `id`'s cgroup, as the kernel lists them (none once it is gone).
fn members(agent: &Agent, id: &ProcessId) -> Vec<u32> {
    std::fs::read_to_string(cell(agent, id).join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.parse().ok()).collect())
        .unwrap_or_default()
}

/// Processes the agent started for `id` (by their variables), its relay excepted.
fn marked(agent: &Agent, id: &ProcessId) -> Vec<u32> {
    procs::marked(agent.dir())
        .into_iter()
        .filter(|p| p.var("P2F_PROCESS_ID") == Some(id.as_str()) && !p.is_relay())
        .map(|p| p.pid)
        .collect()
}

fn answers(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300))
        .is_ok()
}

async fn until(what: &str, done: impl Fn() -> bool) -> anyhow::Result<()> {
    eventually(what, WAIT, || {
        let ok = done();
        async move { ok.then_some(()) }
    })
    .await
}

/// A service whose port is served by a helper in a session of its own (`setsid`); its main
/// process only sleeps.
fn detached_helper(port: u16) -> ProcessSpec {
    ProcessSpec::new(
        "detached",
        "setsid python3 -m http.server --bind 127.0.0.1 $PORT & exec sleep 3600",
    )
    .with_port(port)
    .with_health(Health::Tcp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_helper_belongs_to_its_service() -> anyhow::Result<()> {
    let agent = root("detacher").await?;
    let net = agent.network();
    let node = net.node().await.expect("node");
    let port = service_port();
    let spec = detached_helper(port).with_restart(RestartPolicy::OnFailure(3));
    let p = net.spin_process(&spec, &node).await.expect("spin");
    let p = agent
        .wait_for(&p.id, WAIT, "the helper to serve", |p| p.is_healthy())
        .await?;
    let main = p.pid.expect("pid");
    let cell_members = members(&agent, &p.id);
    assert!(cell_members.contains(&main), "{cell_members:?}");
    assert!(
        cell_members.len() >= 2,
        "the setsid helper is a member: {cell_members:?}"
    );
    // Its memory counts the helper (another session, another group): at least the helper's.
    let helper_rss: u64 = cell_members
        .iter()
        .filter(|pid| **pid != main)
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(|kib| kib * 1024)
        .sum();
    assert!(helper_rss > 0, "the helper has resident memory");
    agent
        .wait_for(&p.id, WAIT, "its memory to count the helper", |p| {
            p.memory_bytes >= helper_rss
        })
        .await?;

    // A crash of the main process takes the helper along: the restart finds the port free.
    signal(main, Signal::SIGKILL);
    let p = agent
        .wait_for(&p.id, WAIT, "a restart that serves again", |p| {
            p.is_healthy() && p.pid != Some(main)
        })
        .await?;
    assert_eq!(p.restarts, 1);
    assert_eq!(p.last_failure, Some(Failure::Killed { signal: 9 }));

    // `kill` closes the port: nothing of the service is left, by the kernel's count.
    let killed = net.kill_process(&p).await.expect("kill");
    assert_eq!(killed.status, Status::Stopped);
    assert!(!answers(port), "the helper still answers on {port}");
    until("the cell to empty", || members(&agent, &p.id).is_empty()).await?;
    assert!(
        marked(&agent, &p.id).is_empty(),
        "{:?}",
        marked(&agent, &p.id)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outlives_a_stop_timeout_or_a_timed_out_health_check() -> anyhow::Result<()> {
    let agent = root("outliver").await?;
    let net = agent.network();
    let node = net.node().await.expect("node");
    // Ignores SIGTERM and detaches a helper that ignores it too: both die at the grace.
    let stubborn = ProcessSpec::new(
        "stubborn",
        "trap '' TERM; setsid sh -c \"trap '' TERM; while :; do sleep 0.1; done\" & \
         while :; do sleep 0.1; done",
    )
    .with_grace(Duration::from_millis(500));
    let stubborn = net.spin_process(&stubborn, &node).await.expect("spin");
    until("the helper to join", || {
        members(&agent, &stubborn.id).len() >= 3
    })
    .await?;
    let stopped = net.kill_process(&stubborn).await.expect("kill");
    assert_eq!(stopped.last_failure, Some(Failure::StopTimedOut));
    until("the cell to empty", || {
        members(&agent, &stubborn.id).is_empty()
    })
    .await?;
    assert!(marked(&agent, &stubborn.id).is_empty());

    // A health check that never answers, and detaches: gone when it times out and fails the
    // service, and the service's restart budget (none) ends it.
    let checked = ProcessSpec::new("hung-check", "exec sleep 3600")
        .with_health(Health::Cmd("setsid sleep 120 & sleep 120 | cat".into()))
        .with_restart(RestartPolicy::Never);
    let checked = net.spin_process(&checked, &node).await.expect("spin");
    let failed = agent
        .wait_for(
            &checked.id,
            Duration::from_secs(60),
            "the check to fail it",
            |p| p.status.is_final(),
        )
        .await?;
    assert!(
        matches!(
            failed.status,
            Status::Failed(Failure::HealthCheckFailed { .. })
        ),
        "{:?}",
        failed.status
    );
    until("the cell to empty", || {
        members(&agent, &checked.id).is_empty()
    })
    .await?;
    assert!(
        marked(&agent, &checked.id).is_empty(),
        "{:?}",
        marked(&agent, &checked.id)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_behind_a_pipe_to_tee_is_a_failure() -> anyhow::Result<()> {
    let agent = root("piper").await?;
    let net = agent.network();
    let node = net.node().await.expect("node");
    let spec = ProcessSpec::new(
        "piped",
        "python3 -c 'import sys,time; time.sleep(1); sys.exit(3)' 2>&1 | tee -a w.out",
    )
    .with_restart(RestartPolicy::OnFailure(2));
    let p = net.spin_process(&spec, &node).await.expect("spin");
    let p = agent
        .wait_for(&p.id, Duration::from_secs(30), "it to give up", |p| {
            p.status.is_final()
        })
        .await?;
    assert_eq!(p.status, Status::Failed(Failure::Exited { code: 3 }));
    assert_eq!(p.restarts, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_line_is_lost_or_split_at_rotation() -> anyhow::Result<()> {
    const LINES: usize = 200_000;
    const MAX: u64 = 65_536;
    let agent = agent("logger")
        .configure(|config| {
            config.supervisor.log_max_bytes = MAX;
            config.supervisor.log_keep = 100;
        })
        .init()?
        .started()
        .await?;
    let net = agent.network();
    let node = net.node().await.expect("node");
    let spec = ProcessSpec::new("counter", "sleep 1; seq 1 200000; exec sleep 3600");
    let p = net.spin_process(&spec, &node).await.expect("spin");
    // `logs -f` from the start, while the burst is written.
    let mut follow = Box::pin(
        net.logs(
            &p.id,
            LogsQuery {
                lines: 0,
                follow: true,
            },
        )
        .await
        .expect("follow"),
    );
    let mut followed = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while followed.iter().filter(|b| **b == b'\n').count() < LINES {
        let chunk = tokio::time::timeout_at(deadline, follow.next())
            .await
            .map_err(|_| anyhow::anyhow!("logs -f stalled at {} bytes", followed.len()))?
            .ok_or_else(|| anyhow::anyhow!("logs -f ended"))??;
        followed.extend_from_slice(&chunk);
    }
    let expected: String = (1..=LINES).map(|n| format!("{n}\n")).collect();
    assert!(
        followed == expected.as_bytes(),
        "logs -f skipped or split lines: {} bytes, expected {}",
        followed.len(),
        expected.len()
    );

    // The files, oldest first, hold every line once; none is far over the limit.
    let logs = agent.config().data_dir.join("logs");
    let current = logs.join(format!("{}.log", p.id));
    let mut files: Vec<(u32, PathBuf)> = std::fs::read_dir(&logs)?
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_name()?.to_str()?.to_owned();
            let n = name.strip_prefix(&format!("{}.log.", p.id))?.parse().ok()?;
            Some((n, path))
        })
        .collect();
    files.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    files.push((0, current));
    let mut joined = Vec::new();
    for (_, path) in &files {
        let bytes = std::fs::read(path)?;
        assert!(
            bytes.len() as u64 <= MAX,
            "{} holds {} bytes, over the limit of {MAX}",
            path.display(),
            bytes.len()
        );
        joined.extend_from_slice(&bytes);
    }
    assert!(files.len() > 10, "it rotated: {} files", files.len());
    assert!(
        joined == expected.as_bytes(),
        "the files lost or split lines: {} bytes, expected {}",
        joined.len(),
        expected.len()
    );
    Ok(())
}

/// What Ctrl-C does to `cargo run`'s embedded network (`Embedded::stop`, in this process):
/// a helper that left its process group and session is stopped with its service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_embedded_network_closes_a_detached_helper() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let embedded = p2f::cli::Embedded::start(state.path()).await?;
    let net = embedded.network().clone();
    let node = net.node().await?;
    let port = service_port();
    let spec = detached_helper(port);
    let p = net.spin_process(&spec, &node).await?;
    until("the helper to serve", || answers(port)).await?;
    let var = format!("P2F_PROCESS_ID={}", p.id);
    let left = || procs::processes_where(|v| v == var.as_bytes());
    assert!(left().len() >= 3, "relay, main and helper: {:?}", left());
    embedded.stop().await;
    assert!(!answers(port), "the helper still answers on {port}");
    until("nothing of it to be left", || left().is_empty()).await?;
    Ok(())
}

/// The agent is a child subreaper: what a health check leaves behind when it exits (here a
/// `setsid` sleep of 1 s, every 200 ms) is re-parented to the agent, not to PID 1, and reaped
/// by it when it ends — zombies do not pile up. (The check waits 0.2 s before it ends, so its
/// helper has left its process group by the time the group is killed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_that_reach_the_agent_are_reaped() -> anyhow::Result<()> {
    let agent = root("reaper").await?;
    orphans_are_reaped_by(&agent).await
}

/// The same with the agent as PID 1 of a PID namespace of its own, as in a container: every
/// orphan in it comes to the agent, and none is left a zombie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_the_agent_reaps_orphans_too() -> anyhow::Result<()> {
    let agent = agent("init").pid_namespace().init()?.started().await?;
    let pid = agent.pid().expect("the agent runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .unwrap_or("");
    assert!(
        nspid.trim_end().ends_with("\t1"),
        "the agent is PID 1 inside: {nspid}"
    );
    orphans_are_reaped_by(&agent).await
}

async fn orphans_are_reaped_by(agent: &Agent) -> anyhow::Result<()> {
    let net = agent.network();
    let node = net.node().await.expect("node");
    let spec = ProcessSpec::new("orphaner", "exec sleep 3600")
        .with_health(Health::Cmd("setsid sleep 1 & sleep 0.2".into()));
    let p = net.spin_process(&spec, &node).await.expect("spin");
    agent
        .wait_for(&p.id, WAIT, "it to be healthy", |p| p.is_healthy())
        .await?;
    let agent_pid = agent.pid().expect("the agent runs");
    // About 15 checks run meanwhile, each leaving one orphan that ends 1 s later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let adopted = procs::processes_where(|v| v == format!("P2F_PROCESS_ID={}", p.id).as_bytes())
        .into_iter()
        .filter(|f| !f.is_relay() && procs::Stat::of(f.pid).is_some_and(|s| s.ppid == agent_pid))
        .count();
    // A zombie lives until the next SIGCHLD's scan: the fewest seen over half a second.
    let mut fewest = procs::zombies_of(agent_pid);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = procs::zombies_of(agent_pid);
        if now.len() < fewest.len() {
            fewest = now;
        }
    }
    let tree: Vec<(u32, Option<u32>, bool)> =
        procs::processes_where(|v| v == format!("P2F_PROCESS_ID={}", p.id).as_bytes())
            .into_iter()
            .map(|f| (f.pid, procs::Stat::of(f.pid).map(|s| s.ppid), f.is_relay()))
            .collect();
    assert!(
        adopted >= 1,
        "the checks' orphans went elsewhere, not to the agent {agent_pid}: {tree:?}"
    );
    assert!(
        fewest.len() <= 1,
        "zombies pile up under the agent: {fewest:?} ({adopted} adopted alive)"
    );
    Ok(())
}

/// The fallback without cgroups (`containment = "tree"`): the relay is a subreaper, so the
/// detached helper stays in its tree and is stopped with the service, and a crash of the main
/// process does not leave the port taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tree_fallback_contains_a_detached_helper_too() -> anyhow::Result<()> {
    let agent = agent("treeish")
        .configure(|config| config.supervisor.containment = ContainmentMode::Tree)
        .init()?
        .started()
        .await?;
    let net = agent.network();
    let node = net.node().await.expect("node");
    let port = service_port();
    let spec = detached_helper(port).with_restart(RestartPolicy::OnFailure(3));
    let p = net.spin_process(&spec, &node).await.expect("spin");
    let p = agent
        .wait_for(&p.id, WAIT, "the helper to serve", |p| p.is_healthy())
        .await?;
    let main = p.pid.expect("pid");
    assert!(
        marked(&agent, &p.id).len() >= 2,
        "{:?}",
        marked(&agent, &p.id)
    );
    signal(main, Signal::SIGKILL);
    let p = agent
        .wait_for(&p.id, WAIT, "a restart that serves again", |p| {
            p.is_healthy() && p.pid != Some(main)
        })
        .await?;
    assert_eq!(p.restarts, 1);
    let killed = net.kill_process(&p).await.expect("kill");
    assert_eq!(killed.status, Status::Stopped);
    assert!(!answers(port), "the helper still answers on {port}");
    until("nothing of it to be left", || {
        marked(&agent, &p.id).is_empty()
    })
    .await?;
    Ok(())
}

/// The record says where a process's port really is bound (the kernel's view), so `status`
/// shows an address only where the service listens: a file server bound to 127.0.0.1 is
/// reachable from its node only, one bound to every address at the node's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_says_where_a_port_is_bound() -> anyhow::Result<()> {
    let agent = root("binder").await?;
    let net = agent.network();
    let node = net.node().await.expect("node");
    let (local, everywhere) = (service_port(), service_port());
    let spin = |name: &str, bind: &str, port: u16| {
        ProcessSpec::new(
            name,
            format!("exec python3 -m http.server $PORT --bind {bind}"),
        )
        .with_port(port)
        .with_health(Health::Tcp)
    };
    let a = net
        .spin_process(&spin("local", "127.0.0.1", local), &node)
        .await
        .expect("spin");
    let b = net
        .spin_process(&spin("everywhere", "0.0.0.0", everywhere), &node)
        .await
        .expect("spin");
    let a = agent
        .wait_for(&a.id, WAIT, "it to listen", |p| p.listen.is_some())
        .await?;
    let b = agent
        .wait_for(&b.id, WAIT, "it to listen", |p| p.listen.is_some())
        .await?;
    assert_eq!(a.listen, Some(format!("127.0.0.1:{local}")));
    assert_eq!(b.listen, Some(format!("0.0.0.0:{everywhere}")));
    Ok(())
}
