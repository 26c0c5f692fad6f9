//! The user's workflow end to end: `cargo run --example homelab` (the embedded default) as a
//! child process — its HTTP service answers, the CLI commands of the same binary talk to it from
//! another process, and SIGINT leaves no process behind.
//!
//! The homelab's ports are fixed (8480, 8481), so each test runs it inside a network namespace
//! of its own (loopback only): its ports there are private, whatever else uses them on the host
//! (a developer's demo, a benchmark) or in another test. Each run has its own state directory,
//! which also marks every process it starts.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use p2f_testkit::netns::{Netns, block_on_in, within};
use p2f_testkit::procs::{self, MARKER, Signal, signal};
use p2f_testkit::{Agent, eventually, example_bin, p2f_bin};
use predicates::prelude::PredicateBooleanExt;
use predicates::str::contains;

use crate::support::agent;

const WAIT: Duration = Duration::from_secs(60);

/// `homelab ARGS` in `ns`, against the embedded network whose state is in `state`, for
/// assert_cmd.
fn homelab_cmd(ns: &Netns, state: &Path, args: &[&str]) -> anyhow::Result<assert_cmd::Command> {
    let mut command = assert_cmd::Command::from_std(ns.command(example_bin("homelab")?));
    command
        .args(args)
        .env("P2F_STATE_DIR", state)
        .env(MARKER, state)
        .env("P2F_PASS_ENV", MARKER)
        .env("NO_COLOR", "1")
        .timeout(WAIT);
    Ok(command)
}

/// Runs `homelab ARGS` in `ns` against the state dir and returns (exit code, stdout, stderr).
fn homelab(ns: &Netns, state: &Path, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = homelab_cmd(ns, state, args)?.output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `curl http://127.0.0.1:PORT/` from inside `ns`.
fn curl(ns: &Netns, port: u16) -> anyhow::Result<String> {
    let page = ns
        .command("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()?;
    Ok(String::from_utf8_lossy(&page.stdout).into_owned())
}

/// The processes the homelab started for its services (not itself), by their marker.
fn services_under(state: &Path) -> Vec<u32> {
    procs::marked(state)
        .into_iter()
        .filter(|p| p.is_started_for_a_process())
        .map(|p| p.pid)
        .collect()
}

#[test]
fn the_homelab_runs_serves_answers_the_cli_and_stops_cleanly() -> anyhow::Result<()> {
    example_bin("homelab")?; // built here, before any thread enters a namespace
    let ns = Netns::new("homelab-up")?;
    let state = tempfile::Builder::new().prefix("p2f-homelab-").tempdir()?;
    let state = state.path();
    // Nothing runs yet: plan creates everything, status says no network.
    let (code, out, _) = homelab(&ns, state, &["plan"])?;
    assert_eq!(code, 0);
    assert!(
        out.contains("Plan: 4 to create, 0 to update, 0 unchanged."),
        "{out}"
    );
    homelab_cmd(&ns, state, &["status"])?
        .assert()
        .code(1)
        .stderr(contains("error: no network is running").and(contains("hint: ")));

    // A service that cannot start: the reason is printed, and the run ends with exit code 3.
    {
        let squatter = within(ns.name(), || std::net::TcpListener::bind("127.0.0.1:8480"))?;
        let (mut up, lines) = start_up(&ns, state)?;
        let guard = Kill(up.id(), state.to_owned());
        let failure = wait_line(&lines, |l| l.contains("services failed"));
        assert!(
            failure.contains("1 of 4 services failed: wiki: port 8480 is already in use"),
            "{failure}"
        );
        signal(up.id(), Signal::SIGINT);
        let status = wait_exit(&mut up);
        assert_eq!(status.code(), Some(3), "failed services exit 3");
        assert!(services_under(state).is_empty());
        drop((guard, squatter));
    }

    let (mut up, rx) = start_up(&ns, state)?;
    let pid = up.id();
    let guard = Kill(pid, state.to_owned());
    let healthy = wait_line(&rx, |l| l.starts_with("wiki: healthy on "));
    assert!(healthy.ends_with('s'), "{healthy}");
    wait_line(&rx, |l| l.contains("All services run"));

    // The HTTP service a person can curl.
    let page = curl(&ns, 8480)?;
    assert!(page.contains("<h1>Home wiki</h1>"), "{page}");

    // The same binary, from another process, talks to the running network.
    let (code, out, err) = homelab(&ns, state, &["status", "--json"])?;
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
            "url",
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
    // Its record says where it is reached from outside: the embedded root's ingress.
    let url = wiki["url"].as_str().expect("the wiki's public URL");
    assert!(url.starts_with("https://wiki.home.arpa:"), "{url}");

    // `up` went through the root: the embedded network is a root, and its desired state names
    // the very processes that run (placed by it: their ids are the ones it gave).
    let api = std::fs::read_to_string(state.join("api.addr"))?
        .trim()
        .to_owned();
    let (credentials, _) = p2f::core::cluster::Credentials::operator(&state.join("operator"))?;
    let (node, desired) = block_on_in(ns.name(), || async move {
        let network = p2f::core::Network::connect(&api, &credentials)?;
        anyhow::Ok((network.node().await?, network.desired().await?))
    })?;
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

    let (code, out, _) = homelab(&ns, state, &["plan"])?;
    assert_eq!(code, 0);
    assert!(
        out.contains("Plan: 0 to create, 0 to update, 4 unchanged."),
        "{out}"
    );

    let (code, out, err) = homelab(&ns, state, &["logs", "wiki"])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("wiki pages written to"),
        "deploy output is in the log: {out}"
    );

    homelab_cmd(&ns, state, &["logs", "wikki"])?
        .assert()
        .code(2)
        .stderr(contains(
            "no service wikki in this deployment (it has: wiki, files, backup, clock)",
        ));

    let (code, out, err) = homelab(&ns, state, &["kill", "clock"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "clock: stopped");

    // Ctrl-C: everything stops, nothing it started survives.
    let started = services_under(state);
    assert!(
        started.len() >= 3,
        "the services run as OS processes: {started:?}"
    );
    signal(pid, Signal::SIGINT);
    let status = wait_exit(&mut up);
    assert!(status.success(), "{status}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("nothing is left running")),
        "{rest:?}"
    );
    let left: Vec<u32> = procs::marked(state).into_iter().map(|p| p.pid).collect();
    assert_eq!(left, Vec::<u32>::new(), "no process survives Ctrl-C");
    drop(guard);
    Ok(())
}

/// Starts `homelab` (up) in `ns` and returns it with a channel of its stderr lines.
fn start_up(
    ns: &Netns,
    state: &Path,
) -> anyhow::Result<(std::process::Child, std::sync::mpsc::Receiver<String>)> {
    let mut up = ns
        .command(example_bin("homelab")?)
        .env("P2F_STATE_DIR", state)
        .env(MARKER, state)
        .env("P2F_PASS_ENV", MARKER)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = up.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Ok((up, rx))
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

/// Kills the example (by pid), and every process group it started (found by the marker of its
/// state directory), if the test fails before it stopped them.
struct Kill(u32, std::path::PathBuf);

impl Drop for Kill {
    fn drop(&mut self) {
        signal(self.0, Signal::SIGKILL);
        procs::kill_run(&self.1);
    }
}

/// Runs `homelab ARGS` in `ns` against a real network's root, as its operator (`P2F_OPERATOR`,
/// `P2F_ROOT`).
fn homelab_on(ns: &Netns, root: &Agent, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = ns
        .command(example_bin("homelab")?)
        .args(args)
        .env("P2F_ROOT", root.network().address())
        .env("P2F_OPERATOR", root.config().data_dir.join("operator"))
        .env("NO_COLOR", "1")
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn the_homelab_is_applied_through_the_root_of_a_real_network() -> anyhow::Result<()> {
    // Built here, before any thread enters a namespace.
    p2f_bin()?;
    example_bin("homelab")?;
    let ns = Netns::new("homelab-net")?;
    block_on_in(ns.name(), || async {
        let root = agent("root").netns(ns.name()).init()?.started().await?;
        let member = agent("laptop")
            .netns(ns.name())
            .ip("127.0.0.2")
            .join(&root)?
            .started()
            .await?;
        root.all_alive(&["laptop", "root"]).await?;
        let run = |args: &'static [&'static str]| {
            let (ns, root) = (&ns, &root);
            async move { tokio::task::block_in_place(|| homelab_on(ns, root, args)) }
        };
        let (code, out, err) = run(&["plan"]).await?;
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("Plan: 4 to create, 0 to update, 0 unchanged."),
            "{out}"
        );

        let (code, _, err) = run(&["apply"]).await?;
        assert_eq!(code, 0, "apply: {err}");
        assert!(err.contains("wiki: healthy on "), "{err}");

        let (code, out, err) = run(&["status", "--json"]).await?;
        assert_eq!(code, 0, "{err}");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
        assert_eq!(rows.len(), 4, "{out}");
        assert!(rows.iter().all(|r| r["status"] == "running"), "{out}");
        let nodes: std::collections::BTreeSet<&str> =
            rows.iter().filter_map(|r| r["node"].as_str()).collect();
        assert_eq!(nodes.len(), 2, "spread over both nodes: {nodes:?}");
        let page = tokio::task::block_in_place(|| curl(&ns, 8480))?;
        assert!(page.contains("<h1>Home wiki</h1>"), "{page}");

        let (code, out, _) = run(&["plan"]).await?;
        assert_eq!(code, 0);
        assert!(
            out.contains("Plan: 0 to create, 0 to update, 4 unchanged."),
            "{out}"
        );
        // The member's config file names the root: the same binary finds the network through it.
        let via_config = tokio::task::block_in_place(|| {
            ns.command(example_bin("homelab")?)
                .args(["status", "--json"])
                .env("P2F_CONFIG", member.config_path())
                .output()
                .map_err(anyhow::Error::from)
        })?;
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&via_config.stdout)?;
        assert_eq!(rows.len(), 4);

        let (code, out, err) = run(&["down"]).await?;
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out.lines().filter(|l| l.ends_with(": removed")).count(),
            4,
            "{out}"
        );
        eventually("every process to go", Duration::from_secs(30), || {
            let gone = root.started_groups().is_empty() && member.started_groups().is_empty();
            async move { gone.then_some(()) }
        })
        .await?;
        Ok(())
    })
}
