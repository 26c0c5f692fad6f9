//! The user's workflow end to end: `cargo run --example homelab` (the embedded default) as a
//! child process — its HTTP service answers, the CLI commands of the same binary talk to it from
//! another process, and SIGINT leaves no process behind.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use predicates::prelude::PredicateBooleanExt;
use predicates::str::contains;

use crate::support::{HOMELAB_PORTS, example_bin, processes_under, signal};

const WAIT: Duration = Duration::from_secs(60);

/// Runs `homelab ARGS` against the state dir and returns (exit code, stdout, stderr).
/// `homelab ARGS` against the embedded network whose state is in `state`, for assert_cmd.
fn homelab_cmd(state: &std::path::Path, args: &[&str]) -> assert_cmd::Command {
    let mut command = assert_cmd::Command::new(example_bin("homelab"));
    command
        .args(args)
        .env("P2F_STATE_DIR", state)
        .env("NO_COLOR", "1")
        .timeout(WAIT);
    command
}

/// Runs `homelab ARGS` against the state dir and returns (exit code, stdout, stderr).
fn homelab(state: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = homelab_cmd(state, args).output().expect("run homelab");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_homelab_runs_serves_answers_the_cli_and_stops_cleanly() {
    let _ports = HOMELAB_PORTS.blocking_lock();
    let state = tempfile::Builder::new()
        .prefix("p2f-homelab-")
        .tempdir()
        .expect("tempdir");
    // Nothing runs yet: plan creates everything, status says no network.
    let (code, out, _) = homelab(state.path(), &["plan"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Plan: 4 to create, 0 to update, 0 unchanged."),
        "{out}"
    );
    homelab_cmd(state.path(), &["status"])
        .assert()
        .code(1)
        .stderr(contains("error: no network is running").and(contains("hint: ")));

    // A service that cannot start: the reason is printed, and the run ends with exit code 3.
    {
        let squatter = std::net::TcpListener::bind("127.0.0.1:8480").expect("hold port 8480");
        let (mut up, lines) = start_up(state.path());
        let guard = Kill(up.id(), state.path().to_owned());
        let failure = wait_line(&lines, |l| l.contains("services failed"));
        assert!(
            failure.contains("1 of 4 services failed: wiki: port 8480 is already in use"),
            "{failure}"
        );
        signal(up.id(), 2);
        let status = wait_exit(&mut up);
        assert_eq!(status.code(), Some(3), "failed services exit 3");
        assert!(processes_under(state.path()).is_empty());
        drop((guard, squatter));
    }

    let (mut up, rx) = start_up(state.path());
    let pid = up.id();
    let guard = Kill(pid, state.path().to_owned());
    let healthy = wait_line(&rx, |l| l.starts_with("wiki: healthy on "));
    assert!(healthy.ends_with('s'), "{healthy}");
    wait_line(&rx, |l| l.contains("All services run"));

    // The HTTP service a person can curl.
    let page = Command::new("curl")
        .args(["-sS", "--max-time", "5", "http://127.0.0.1:8480/"])
        .output()
        .expect("curl");
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(page.contains("<h1>Home wiki</h1>"), "{page}");

    // The same binary, from another process, talks to the running network.
    let (code, out, err) = homelab(state.path(), &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("status --json is JSON");
    assert_eq!(rows.len(), 4);
    for row in &rows {
        for key in [
            "service",
            "id",
            "node",
            "address",
            "domain",
            "status",
            "running",
            "restarts",
            "memory_bytes",
            "uptime_seconds",
            "last_failure",
        ] {
            assert!(row.get(key).is_some(), "status row lacks {key}: {row}");
        }
        assert_eq!(row["status"], "running", "{row}");
    }
    let wiki = rows
        .iter()
        .find(|r| r["service"] == "wiki")
        .expect("wiki row");
    assert_eq!(wiki["address"], "127.0.0.1:8480");
    assert_eq!(wiki["domain"], "wiki.home.arpa");

    // `up` went through the root: the embedded network is a root, and its desired state names
    // the very processes that run (placed by it: their ids are the ones it gave).
    let network = p2f::core::Network::with_cluster_files(
        std::fs::read_to_string(state.path().join("api.addr"))
            .expect("api.addr")
            .trim(),
        &p2f::core::cluster::ClusterFiles::new(state.path().join("cluster")),
    )
    .expect("client of the embedded network");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (node, desired) = runtime.block_on(async {
        let node = network.node().await.expect("GET /v1/node");
        (node, network.desired().await.expect("GET /v1/deployment"))
    });
    assert_eq!(
        node.p2f_info().and_then(|i| i.role),
        Some(p2f::model::NodeRole::Root)
    );
    let mut placed: Vec<(String, String)> = desired
        .services
        .iter()
        .map(|s| (s.spec.name().to_owned(), s.id.to_string()))
        .collect();
    let mut running: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            let field = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (field("service"), field("id"))
        })
        .collect();
    placed.sort();
    running.sort();
    assert_eq!(placed, running, "every process is one the root placed");

    let (code, out, _) = homelab(state.path(), &["plan"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Plan: 0 to create, 0 to update, 4 unchanged."),
        "{out}"
    );

    let (code, out, err) = homelab(state.path(), &["logs", "wiki"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("wiki pages written to"),
        "deploy output is in the log: {out}"
    );

    homelab_cmd(state.path(), &["logs", "wikki"])
        .assert()
        .code(2)
        .stderr(contains(
            "no service wikki in this deployment (it has: wiki, files, backup, clock)",
        ));

    let (code, out, err) = homelab(state.path(), &["kill", "clock"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "clock: stopped");

    // Ctrl-C: everything stops, nothing it started survives.
    let started: Vec<u32> = processes_under(state.path());
    assert!(
        started.len() >= 3,
        "the services run as OS processes: {started:?}"
    );
    signal(pid, 2);
    let status = wait_exit(&mut up);
    assert!(status.success(), "{status}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("nothing is left running")),
        "{rest:?}"
    );
    assert_eq!(
        processes_under(state.path()),
        Vec::<u32>::new(),
        "no process survives Ctrl-C"
    );
    drop(guard);
}

/// Starts `homelab` (up) and returns it with a channel of its stderr lines.
fn start_up(state: &std::path::Path) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut up = Command::new(example_bin("homelab"))
        .env("P2F_STATE_DIR", state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start homelab");
    let stderr = up.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (up, rx)
}

/// The first line that `matches`, within [`WAIT`].
fn wait_line(lines: &std::sync::mpsc::Receiver<String>, matches: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if matches(&line) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no such line; saw:\n{}", seen.join("\n")),
        }
    }
}

/// Waits (bounded) for a child to exit.
fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "it did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the example (by pid), and every process group it started (found under its state
/// directory), if the test fails before it stopped them.
struct Kill(u32, std::path::PathBuf);

impl Drop for Kill {
    fn drop(&mut self) {
        signal(self.0, 9);
        for pid in processes_under(&self.1) {
            if let Some(pgid) = crate::support::pgid_of(pid) {
                signal(pgid, -9);
            }
        }
    }
}

/// Runs `homelab ARGS` against a real network's node (`P2F_NODE`, `P2F_CLUSTER`).
fn homelab_on(root: &crate::support::TestAgent, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(example_bin("homelab"))
        .args(args)
        .env("P2F_NODE", root.network().address())
        .env("P2F_CLUSTER", root.config.cluster_dir())
        .env("NO_COLOR", "1")
        .output()
        .expect("run homelab");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_homelab_is_applied_through_the_root_of_a_real_network() {
    let _ports = HOMELAB_PORTS.lock().await;
    let root = crate::support::TestAgent::start("root").await;
    let member = crate::support::TestAgent::join(&root, "laptop", "127.0.0.2").await;
    crate::support::eventually(
        "the root to see the laptop",
        std::time::Duration::from_secs(10),
        || {
            let net = root.network().clone();
            async move {
                let nodes = net.nodes().await.ok()?;
                (nodes.iter().filter(|n| n.alive).count() == 2).then_some(())
            }
        },
    )
    .await;
    let run = |args: &'static [&'static str]| {
        let root = &root;
        async move { tokio::task::block_in_place(|| homelab_on(root, args)) }
    };
    let (code, out, err) = run(&["plan"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Plan: 4 to create, 0 to update, 0 unchanged."),
        "{out}"
    );

    let (code, _, err) = run(&["apply"]).await;
    assert_eq!(code, 0, "apply: {err}");
    assert!(err.contains("wiki: healthy on "), "{err}");

    let (code, out, err) = run(&["status", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("JSON");
    assert_eq!(rows.len(), 4, "{out}");
    assert!(rows.iter().all(|r| r["status"] == "running"), "{out}");
    let nodes: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|r| r["node"].as_str()).collect();
    assert_eq!(nodes.len(), 2, "spread over both nodes: {nodes:?}");
    let page = Command::new("curl")
        .args(["-sS", "--max-time", "5", "http://127.0.0.1:8480/"])
        .output()
        .expect("curl");
    assert!(String::from_utf8_lossy(&page.stdout).contains("<h1>Home wiki</h1>"));

    let (code, out, _) = run(&["plan"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("Plan: 0 to create, 0 to update, 4 unchanged."),
        "{out}"
    );
    // The member's config file names the root: the same binary finds the network through it.
    let via_config = Command::new(example_bin("homelab"))
        .args(["status", "--json"])
        .env("P2F_CONFIG", &member.config_path)
        .output()
        .expect("run homelab");
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&via_config.stdout).expect("status --json through P2F_CONFIG");
    assert_eq!(rows.len(), 4);

    let (code, out, err) = run(&["down"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.ends_with(": removed")).count(),
        4,
        "{out}"
    );
    crate::support::eventually(
        "every process to go",
        std::time::Duration::from_secs(20),
        || {
            let gone = root.all_groups().is_empty() && member.all_groups().is_empty();
            async move { gone.then_some(()) }
        },
    )
    .await;
}
