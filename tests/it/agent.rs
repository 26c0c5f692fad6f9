//! The node agent as a real OS process (`p2f node run`): the seed's four operations, logs,
//! exact failures, restarts per policy, surviving SIGKILL of the agent, and bad input.

use std::time::Duration;

use futures_util::StreamExt;
use p2f::core::ClientError;
use p2f::core::wire::{LogsQuery, SpinQuery, SpinRequest};
use p2f::model::{EventKind, Failure, Health, ProcessKey, ProcessSpec, RestartPolicy, Status};

use p2f_testkit::eventually;
use p2f_testkit::procs::{Signal, require, signal};

use crate::support::{log_containing, root, service_port};

const WAIT: Duration = Duration::from_secs(15);

fn spin_request(spec: ProcessSpec) -> SpinRequest {
    SpinRequest {
        spec,
        id: None,
        generation: None,
        moved_from: None,
        external: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_list_info_kill_and_logs() -> anyhow::Result<()> {
    let agent = root("solo").await?;
    let net = agent.network();
    let port = service_port();
    let web = ProcessSpec::new("web", "exec python3 -m http.server $PORT --bind 127.0.0.1")
        .with_port(port)
        .with_domain("web.home.arpa")
        .with_health(Health::Http("/".into()));
    let ticker = ProcessSpec::new(
        "ticker",
        "i=0; while true; do i=$((i+1)); echo tick $i from $P2F_SERVICE; sleep 0.05; done",
    );
    let node = net.node().await.expect("node entry");
    assert_eq!(node.name.as_str(), "solo");
    assert!(
        node.api_address().is_some(),
        "the node publishes its API address"
    );

    let web = net.spin_process(&web, &node).await.expect("spin web");
    assert_eq!(web.status, Status::Running, "{web:#?}");
    assert_eq!(web.port, Some(port));
    let ticker = net.spin_process(&ticker, &node).await.expect("spin ticker");
    assert!(ticker.is_running());

    let all = net.list_processes().await.expect("list");
    assert_eq!(all.len(), 2);
    let by_id = net
        .process_information(ProcessKey::Id(web.id.clone()))
        .await
        .expect("info")
        .expect("found by id");
    assert_eq!(by_id.id, web.id);
    let by_domain = net
        .process_information(ProcessKey::Domain("WEB.home.arpa".into()))
        .await
        .expect("info")
        .expect("found by domain");
    assert_eq!(by_domain.id, web.id);
    let missing = net
        .process_information(ProcessKey::Domain("nothing.home.arpa".into()))
        .await
        .expect("info");
    assert!(missing.is_none());

    // It turns healthy, really serves, and its memory is measured.
    let web = agent
        .wait_for(&web.id, WAIT, "web healthy with memory", |p| {
            p.events.iter().any(|e| e.kind == EventKind::Healthy) && p.memory_bytes > 0
        })
        .await?;
    let body = http_get(port).await;
    assert!(body.contains("Directory listing"), "{body}");
    assert!(web.memory_bytes > 1024 * 1024, "{}", web.memory_bytes);

    // Logs: the tail, then follow.
    let ticker_id = ticker.id.clone();
    let tail = eventually("ticker output", WAIT, || {
        let net = net.clone();
        let id = ticker_id.clone();
        async move {
            let stream = net
                .logs(
                    &id,
                    LogsQuery {
                        lines: 3,
                        follow: false,
                    },
                )
                .await
                .ok()?;
            let chunks: Vec<_> = stream.collect().await;
            let text: String = chunks
                .into_iter()
                .filter_map(Result::ok)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .collect();
            (text.lines().count() == 3).then_some(text)
        }
    })
    .await?;
    assert!(
        tail.lines()
            .all(|l| l.starts_with("tick ") && l.ends_with("from ticker")),
        "{tail}"
    );
    let mut follow = Box::pin(
        net.logs(
            &ticker.id,
            LogsQuery {
                lines: 0,
                follow: true,
            },
        )
        .await
        .expect("follow"),
    );
    let mut seen = String::new();
    while seen.lines().count() < 5 {
        let chunk = tokio::time::timeout(WAIT, follow.next())
            .await
            .expect("new output in time")
            .expect("stream open")
            .expect("chunk");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(follow);

    // Kill: stopped, the record stays, no OS process is left.
    let killed = net.kill_process(&ticker).await.expect("kill");
    assert_eq!(killed.status, Status::Stopped);
    assert_eq!(
        killed.events.last().map(|e| &e.kind),
        Some(&EventKind::Killed)
    );
    assert!(agent.os_copies(&ticker.id).is_empty());
    let killed = net.kill_process(&web).await.expect("kill");
    assert_eq!(killed.status, Status::Stopped);
    assert!(agent.os_copies(&web.id).is_empty());
    assert_eq!(net.list_processes().await.expect("list").len(), 2);
    // Removing forgets it.
    net.remove_process(&ticker.id).await.expect("remove");
    assert_eq!(net.list_processes().await.expect("list").len(), 1);
    Ok(())
}

async fn http_get(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .expect("send");
    let mut body = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut body))
        .await
        .expect("answer in time")
        .expect("read");
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_3_is_recorded_exactly_and_restarted_per_policy() -> anyhow::Result<()> {
    let agent = root("crashy").await?;
    let net = agent.network();
    let spec =
        ProcessSpec::new("crash", "sleep 0.1; exit 3").with_restart(RestartPolicy::OnFailure(2));
    let p = net
        .spin(&spin_request(spec), SpinQuery::default())
        .await
        .expect("spin");
    let p = agent
        .wait_for(&p.id, WAIT, "crash to give up", |p| p.status.is_final())
        .await?;
    assert_eq!(p.status, Status::Failed(Failure::Exited { code: 3 }));
    assert_eq!(p.restarts, 2);
    assert_eq!(p.last_failure, Some(Failure::Exited { code: 3 }));
    let kinds: Vec<&str> = p
        .events
        .iter()
        .map(|e| match &e.kind {
            EventKind::Started { .. } => "started",
            EventKind::Exited { .. } => "exited",
            EventKind::Restarted { .. } => "restarted",
            EventKind::Placed { .. } => "placed",
            EventKind::Deployed => "deployed",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "placed",
            "deployed",
            "started",
            "exited",
            "restarted",
            "started",
            "exited",
            "restarted",
            "started",
            "exited"
        ]
    );
    let delays: Vec<u64> = p
        .events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Restarted { delay_ms, .. } => Some(delay_ms),
            _ => None,
        })
        .collect();
    assert_eq!(delays, [100, 200], "exponential backoff from 100 ms");
    Ok(())
}

/// A service that answers its health check and then crashes every 2 s spends its budget: one
/// passing check does not start the count over (only a stable period does), and a clean exit of
/// a server is a failure too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_server_spends_its_restart_budget() -> anyhow::Result<()> {
    let agent = root("flappy").await?;
    let net = agent.network();
    let listen_then_crash = "exec python3 -c 'import os,socket,sys,time; s=socket.socket(); \
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \
        s.bind((\"127.0.0.1\", int(os.environ[\"PORT\"]))); s.listen(); time.sleep(2); sys.exit(70)'";
    let spec = ProcessSpec::new("flappy", listen_then_crash)
        .with_port(service_port())
        .with_restart(RestartPolicy::OnFailure(3));
    let p = net
        .spin(&spin_request(spec), SpinQuery::default())
        .await
        .expect("spin");
    let p = agent
        .wait_for(&p.id, Duration::from_secs(60), "flappy to give up", |p| {
            p.status.is_final()
        })
        .await?;
    assert_eq!(
        p.status,
        Status::Failed(Failure::Exited { code: 70 }),
        "{p:#?}"
    );
    assert_eq!(p.restarts, 3);
    let healthy = p
        .events
        .iter()
        .filter(|e| e.kind == EventKind::Healthy)
        .count();
    assert!(
        healthy >= 1,
        "it passed its check before crashing: {:?}",
        p.events
    );
    let restarts: Vec<(u32, u64)> = p
        .events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Restarted { attempt, delay_ms } => Some((attempt, delay_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(restarts, [(1, 100), (2, 200), (3, 400)]);

    // A server (it has a port) that exits 0 did not stop cleanly.
    let clean = ProcessSpec::new("clean", "sleep 0.2")
        .with_port(service_port())
        .with_health(Health::None)
        .with_restart(RestartPolicy::OnFailure(1));
    let p = net
        .spin(&spin_request(clean), SpinQuery::default())
        .await
        .expect("spin");
    let p = agent
        .wait_for(&p.id, WAIT, "clean to give up", |p| p.status.is_final())
        .await?;
    assert_eq!(p.status, Status::Failed(Failure::Exited { code: 0 }));
    assert_eq!(p.restarts, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_process_is_recorded_and_restarted() -> anyhow::Result<()> {
    let agent = root("victim").await?;
    let net = agent.network();
    let spec = ProcessSpec::new("sleeper", "exec sleep 1000");
    let node = net.node().await.expect("node");
    let p = net.spin_process(&spec, &node).await.expect("spin");
    let first_pid = p.pid.expect("pid");
    assert_eq!(agent.os_copies(&p.id), [first_pid]);
    signal(first_pid, Signal::SIGKILL);
    let p = agent
        .wait_for(&p.id, WAIT, "a restart with a new pid", |p| {
            p.is_running() && p.pid != Some(first_pid)
        })
        .await?;
    assert_eq!(p.last_failure, Some(Failure::Killed { signal: 9 }));
    assert_eq!(p.restarts, 1);
    assert_eq!(agent.os_copies(&p.id), [p.pid.expect("pid")]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formal_failures_command_not_found_port_in_use_health_check() -> anyhow::Result<()> {
    let agent = root("failing").await?;
    let net = agent.network();
    let spin = |spec: ProcessSpec| {
        let net = net.clone();
        async move {
            net.spin(&spin_request(spec), SpinQuery::default())
                .await
                .expect("spin")
        }
    };
    // A command that does not exist: not retried in place.
    let missing = spin(ProcessSpec::new("ghost", "no-such-command-p2f --flag")).await;
    // A port another program holds.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_port = holder.local_addr().expect("addr").port();
    let busy = spin(
        ProcessSpec::new("busy", "exec sleep 1000")
            .with_port(busy_port)
            .with_restart(RestartPolicy::Never),
    )
    .await;
    // A health check that keeps failing.
    let sick = spin(
        ProcessSpec::new("sick", "exec sleep 1000")
            .with_health(Health::Cmd("exit 7".into()))
            .with_restart(RestartPolicy::Never),
    )
    .await;

    let missing = agent
        .wait_for(&missing.id, WAIT, "ghost to fail", |p| p.status.is_final())
        .await?;
    assert_eq!(missing.status, Status::Failed(Failure::CommandNotFound));
    assert_eq!(missing.restarts, 0);

    let busy = agent
        .wait_for(&busy.id, WAIT, "busy to fail", |p| p.status.is_final())
        .await?;
    assert_eq!(
        busy.status,
        Status::Failed(Failure::PortInUse { port: busy_port })
    );
    assert!(agent.os_copies(&busy.id).is_empty(), "it never started");

    let sick = agent
        .wait_for(&sick.id, WAIT, "sick to fail", |p| p.status.is_final())
        .await?;
    assert_eq!(
        sick.status,
        Status::Failed(Failure::HealthCheckFailed {
            check: "cmd `exit 7`".into(),
            detail: "exited with code 7".into()
        })
    );
    assert!(
        agent.os_copies(&sick.id).is_empty(),
        "its group was stopped"
    );
    drop(holder);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_command_and_grace() -> anyhow::Result<()> {
    let agent = root("stopper").await?;
    let net = agent.network();
    // Ignores SIGTERM: killed after its grace, and the record says so.
    let stubborn = ProcessSpec::new("stubborn", "trap '' TERM; while true; do sleep 0.05; done")
        .with_grace(Duration::from_millis(300));
    // Has a stop command that gets PID.
    let polite = ProcessSpec::new("polite", "exec sleep 1000")
        .with_stop("echo stopping $PID >> stop.txt; kill -TERM $PID");
    let node = net.node().await.expect("node");
    let stubborn = net.spin_process(&stubborn, &node).await.expect("spin");
    let polite = net.spin_process(&polite, &node).await.expect("spin");
    let polite_pid = polite.pid.expect("pid");

    let started = std::time::Instant::now();
    let stubborn = net.kill_process(&stubborn).await.expect("kill");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(stubborn.status, Status::Stopped);
    assert_eq!(stubborn.last_failure, Some(Failure::StopTimedOut));
    assert!(agent.os_copies(&stubborn.id).is_empty());

    let polite = net.kill_process(&polite).await.expect("kill");
    assert_eq!(polite.status, Status::Stopped);
    assert_eq!(polite.last_failure, None);
    let bundle = agent
        .config()
        .data_dir
        .join("bundles")
        .join(polite.id.as_str())
        .join("g1");
    let said = std::fs::read_to_string(bundle.join("stop.txt"))
        .expect("stop command ran in the bundle dir");
    assert_eq!(said.trim(), format!("stopping {polite_pid}"));

    // A stop command that fails at once falls through to SIGTERM at once: no 30 s wait, and
    // the service did not outlive its grace.
    let failing = ProcessSpec::new("failing-stop", "exec sleep 1000")
        .with_stop("exit 1")
        .with_grace(Duration::from_secs(30));
    let failing = net.spin_process(&failing, &node).await.expect("spin");
    let started = std::time::Instant::now();
    let failing = net.kill_process(&failing).await.expect("kill");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "SIGTERM came at once, not after the grace: {:?}",
        started.elapsed()
    );
    assert_eq!(failing.status, Status::Stopped);
    assert_eq!(failing.last_failure, None);

    // Whatever the stop command started is killed with it.
    let lingering = ProcessSpec::new("lingering-stop", "exec sleep 1000")
        .with_stop("sleep 600")
        .with_grace(Duration::from_millis(500));
    let lingering = net.spin_process(&lingering, &node).await.expect("spin");
    let lingering = net.kill_process(&lingering).await.expect("kill");
    assert_eq!(lingering.status, Status::Stopped);
    assert_eq!(lingering.last_failure, Some(Failure::StopTimedOut));
    let id = lingering.id.clone();
    let left = || {
        p2f_testkit::procs::marked(agent.dir())
            .into_iter()
            .filter(|p| p.var("P2F_PROCESS_ID") == Some(id.as_str()))
            .map(|p| p.pid)
            .collect::<Vec<u32>>()
    };
    eventually("nothing of it or its stop command to be left", WAIT, || {
        let left = left();
        async move { left.is_empty().then_some(()) }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_and_custom_strategies_see_their_bundle_and_variables() -> anyhow::Result<()> {
    use p2f::model::{Bundle, BundleFile, Strategy};
    let agent = root("deployer").await?;
    let net = agent.network();
    let script =
        b"#!/bin/sh\necho \"installed for $P2F_SERVICE gen $P2F_GENERATION\" > installed.txt\n";
    let spec = ProcessSpec::new("scripted", "cat installed.txt; echo port=$PORT node=$P2F_NODE id=$P2F_PROCESS_ID mode=$MODE; exec sleep 1000")
        .with_strategy(Strategy::Script("deploy/install.sh".into()))
        .with_bundle(Bundle::owned(vec![BundleFile::owned("deploy/install.sh", script.to_vec())]))
        .with_port(service_port())
        .with_health(Health::None)
        .with_env("MODE", "home");
    let node = net.node().await.expect("node");
    let p = net.spin_process(&spec, &node).await.expect("spin");
    assert!(p.is_running(), "{p:#?}");
    let text = log_containing(net, &p.id, "mode=", WAIT).await?;
    let port = p.port.expect("port");
    assert!(text.contains("installed for scripted gen 1"), "{text}");
    assert!(
        text.contains(&format!("port={port} node=deployer id={} mode=home", p.id)),
        "{text}"
    );

    // A script's `#!` line is honoured: bash syntax runs under bash, not `sh` (dash here).
    let bash =
        b"#!/bin/bash\nif [[ -n $BASH_VERSION ]]; then echo \"ran under bash\" > shell.txt; fi\n";
    let spec = ProcessSpec::new("bashy", "cat shell.txt; exec sleep 1000")
        .with_strategy(Strategy::Script("deploy/bashy.sh".into()))
        .with_bundle(Bundle::owned(vec![BundleFile::owned(
            "deploy/bashy.sh",
            bash.to_vec(),
        )]));
    let p = net.spin_process(&spec, &node).await.expect("spin bashy");
    assert!(p.is_running(), "{p:#?}");
    let text = log_containing(net, &p.id, "ran under bash", WAIT).await?;
    assert!(text.contains("ran under bash"), "{text}");

    let failing = ProcessSpec::new("custom", "exec sleep 1000").with_strategy(Strategy::Custom(
        "echo building; echo 'error: no compiler' >&2; exit 4".into(),
    ));
    let f = net.spin_process(&failing, &node).await.expect("spin");
    let f = agent
        .wait_for(&f.id, WAIT, "custom deploy to fail", |p| {
            p.status.is_final()
        })
        .await?;
    assert_eq!(
        f.last_failure,
        Some(Failure::DeployFailed {
            exit: Some(4),
            stderr_tail: "error: no compiler\n".into()
        })
    );
    assert_eq!(
        f.status.to_string(),
        "failed: deploy step failed with exit code 4: error: no compiler"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_agent_loses_nothing_and_duplicates_nothing() -> anyhow::Result<()> {
    let mut agent = root("phoenix").await?;
    let node = agent.network().node().await.expect("node");
    let mut ids = Vec::new();
    for i in 0..3 {
        // A port, and no health check (nothing listens on it).
        let spec = ProcessSpec::new(format!("svc{i}"), "exec sleep 1000")
            .with_port(service_port())
            .with_health(Health::None);
        let p = agent
            .network()
            .spin_process(&spec, &node)
            .await
            .expect("spin");
        ids.push((p.id.clone(), p.pid.expect("pid"), p.port));
    }
    // One more, which dies while the agent is down: it must come back with its id and port.
    let doomed = ProcessSpec::new("doomed", "exec sleep 1000")
        .with_port(service_port())
        .with_health(Health::None);
    let doomed = agent
        .network()
        .spin_process(&doomed, &node)
        .await
        .expect("spin");
    let agent_pid = agent.pid().expect("the agent runs");
    agent.sigkill();
    assert!(
        std::fs::metadata(format!("/proc/{agent_pid}")).is_err(),
        "agent is gone"
    );
    signal(doomed.pid.expect("pid"), Signal::SIGKILL);

    agent.start().await?;
    let net = agent.network();
    let all = net.list_processes().await.expect("list");
    assert_eq!(all.len(), 4, "every record is still there");
    for (id, pid, port) in &ids {
        let p = all.iter().find(|p| &p.id == id).expect("record");
        assert_eq!(
            (p.pid, p.port, &p.status),
            (Some(*pid), *port, &Status::Running),
            "re-adopted"
        );
        assert_eq!(agent.os_copies(id), [*pid], "not started twice");
    }
    let back = agent
        .wait_for(&doomed.id, WAIT, "doomed to run again", |p| {
            p.is_running() && p.pid != doomed.pid
        })
        .await?;
    assert_eq!(
        (back.port, back.generation),
        (doomed.port, doomed.generation)
    );
    assert_eq!(agent.os_copies(&doomed.id).len(), 1);
    // A re-adopted process is still supervised: its crash is seen and it restarts.
    let (id, pid, _) = &ids[0];
    signal(*pid, Signal::SIGKILL);
    let p = agent
        .wait_for(id, WAIT, "re-adopted process restarted", |p| {
            p.is_running() && p.pid != Some(*pid)
        })
        .await?;
    // Its relay outlived the agent and saw how it ended.
    assert_eq!(p.last_failure, Some(Failure::Killed { signal: 9 }));
    // And SIGTERM stops the agent cleanly, leaving the processes running.
    let status = agent.sigterm()?;
    assert!(status.success(), "{status}");
    assert_eq!(agent.os_copies(&ids[1].0), [ids[1].1]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_agent_while_it_writes() -> anyhow::Result<()> {
    let mut agent = root("busy-writer").await?;
    let net = agent.network().clone();
    // Spins in flight when the agent dies: every one it answered must survive, none twice.
    // Eight are kept in flight; once a few were answered, the agent is SIGKILLed with eight
    // still outstanding.
    const IN_FLIGHT: usize = 8;
    const ANSWERED_BEFORE_KILL: usize = 5;
    let spin = |i: usize| {
        let net = net.clone();
        async move {
            let spec =
                ProcessSpec::new(format!("w{i}"), "exec sleep 1000").with_health(Health::None);
            net.spin(&spin_request(spec), SpinQuery::default()).await
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut answered = Vec::new();
    let mut sent = 0;
    while answered.len() < ANSWERED_BEFORE_KILL {
        while tasks.len() < IN_FLIGHT {
            tasks.spawn(spin(sent));
            sent += 1;
        }
        assert!(
            sent < 200,
            "only {} of {sent} spins answered",
            answered.len()
        );
        let done = tokio::time::timeout(WAIT, tasks.join_next())
            .await
            .expect("a spin answers in time")
            .expect("spins in flight");
        answered.push(
            done?
                .map_err(|e| anyhow::anyhow!("a spin before the kill: {e}"))?
                .id,
        );
    }
    let outstanding = tasks.len();
    agent.sigkill();
    let mut lost_answers = 0;
    while let Some(result) = tasks.join_next().await {
        match result? {
            Ok(p) => answered.push(p.id),
            Err(_) => lost_answers += 1,
        }
    }
    // The kill landed while spins were in flight: some had been answered, and some of those
    // outstanding at the kill never were.
    assert!(
        answered.len() >= ANSWERED_BEFORE_KILL && lost_answers > 0,
        "the kill did not land mid-write: {} answered, {lost_answers} of {outstanding} \
         outstanding unanswered",
        answered.len()
    );
    agent.start().await?;
    let net = agent.network();
    let all = net.list_processes().await.expect("list");
    for id in &answered {
        assert!(
            all.iter().any(|p| &p.id == id),
            "{id} was acknowledged, then lost"
        );
    }
    // Everything recorded runs exactly once, once the agent settled.
    for p in &all {
        let p = agent
            .wait_for(&p.id, WAIT, "every record running", |p| p.is_running())
            .await?;
        assert_eq!(agent.os_copies(&p.id), [p.pid.expect("pid")], "{}", p.id);
    }
    eprintln!(
        "agent killed mid-write: {} spins acknowledged, {lost_answers} unanswered, {} records \
         after restart",
        answered.len(),
        all.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_and_changes_nothing() -> anyhow::Result<()> {
    let agent = root("strict").await?;
    let net = agent.network();
    let ca = std::fs::read_to_string(agent.config().cluster_dir().join("ca.pem")).expect("ca");
    let operator = agent.credentials()?;
    let client = |credentials: &p2f::core::cluster::Credentials| {
        reqwest::Client::builder()
            .tls_backend_preconfigured(
                p2f::core::cluster::client_config_for(credentials).expect("tls"),
            )
            .build()
            .expect("client")
    };
    let http = client(&operator);
    let anonymous = client(&p2f::core::cluster::Credentials::new(ca.clone(), None));
    let url = format!("https://{}/v1/processes", net.address());
    let post = |body: Vec<u8>, authed: bool| {
        let request = if authed { &http } else { &anonymous }
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        async move {
            let response = request.send().await.expect("an answer");
            let status = response.status().as_u16();
            (status, response.text().await.expect("body"))
        }
    };
    let bearer = true;
    // (what, body, with the operator's certificate, status, the error says)
    type Case<'a> = (&'a str, Vec<u8>, bool, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            b"{\"spec\": {".to_vec(),
            bearer,
            400,
            "EOF",
        ),
        (
            "unknown field",
            br#"{"spec":{"name":"a","start":"true"},"colour":"red"}"#.to_vec(),
            bearer,
            422,
            "unknown field `colour`",
        ),
        (
            "an id that is a path",
            br#"{"spec":{"name":"a","start":"true"},"id":".."}"#.to_vec(),
            bearer,
            422,
            "not a valid process id",
        ),
        (
            "no client certificate",
            b"{}".to_vec(),
            false,
            401,
            "a client certificate from the cluster CA is required",
        ),
    ];
    // A certificate from another cluster's CA: refused in the TLS handshake.
    let stranger_ca = p2f::core::cluster::ClusterCa::generate("elsewhere").expect("ca");
    let stranger = p2f::core::cluster::Credentials::new(
        ca.clone(),
        Some(
            stranger_ca
                .issue_as(p2f::core::identity::Role::Operator, "mallory", &[])
                .expect("cert"),
        ),
    );
    let refused = client(&stranger).get(&url).send().await;
    assert!(
        refused.is_err(),
        "a foreign certificate is refused: {refused:?}"
    );
    for (what, body, auth, status, says) in cases {
        let (got, text) = post(body, auth).await;
        assert_eq!(got, status, "{what}: {text}");
        let parsed: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{what}: JSON error body: {text}"));
        let message = parsed["error"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{what}: {message}");
    }
    // A method a route does not take: still a JSON error.
    let put = http.put(&url).send().await.expect("an answer");
    assert_eq!(put.status().as_u16(), 405);
    let body: p2f::core::wire::ErrorBody = put.json().await.expect("JSON error");
    assert!(
        body.error.contains("PUT is not allowed on /v1/processes"),
        "{}",
        body.error
    );
    // A 10 MiB body, sent by curl (reqwest stops at the broken pipe when the agent refuses to
    // read the rest, and never shows the answer; curl, like most clients, reads it). The agent
    // answers 413 after reading 8 MiB and closes the connection without reading the rest, so
    // the client's kernel may get a reset before curl read the answer (curl then fails with
    // "Send failure: Broken pipe" and shows only the `100 Continue`). Such a lost answer is
    // retried, a few times at most; every answer that arrives must be the 413.
    require("curl", "curl")?;
    let big = agent.dir().join("big.json");
    std::fs::write(&big, vec![b' '; 10 * 1024 * 1024]).expect("write body");
    let mut lost = Vec::new();
    let answer = loop {
        let curl = std::process::Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}", "--cacert"])
            .arg(agent.config().cluster_dir().join("ca.pem"))
            .arg("--cert")
            .arg(agent.config().data_dir.join("operator/operator.pem"))
            .arg("--key")
            .arg(agent.config().data_dir.join("operator/operator.key"))
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", big.display()))
            .arg(&url)
            .output()?;
        let answer = String::from_utf8_lossy(&curl.stdout).into_owned();
        // curl's exit codes 55 and 56: failed sending, failed receiving.
        if matches!(curl.status.code(), Some(55 | 56)) && lost.len() < 4 {
            lost.push(String::from_utf8_lossy(&curl.stderr).into_owned());
            continue;
        }
        assert!(
            answer.ends_with("\n413"),
            "{answer} {} (answers lost before: {lost:?})",
            String::from_utf8_lossy(&curl.stderr)
        );
        break answer;
    };
    assert!(
        answer.contains("request body is larger than 8 MiB"),
        "{answer}"
    );
    // An invalid spec: 422 listing every finding.
    let bad =
        br#"{"spec":{"name":"bad","start":"","port":0,"domain":"-x-.home","env":{"1BAD":"v"}}}"#;
    let (status, text) = post(bad.to_vec(), bearer).await;
    assert_eq!(status, 422, "{text}");
    let body: p2f::core::wire::ErrorBody = serde_json::from_str(&text).expect("error body");
    let paths: Vec<&str> = body
        .findings
        .iter()
        .map(|(path, _)| path.as_str())
        .collect();
    assert_eq!(body.findings.len(), 4, "every finding: {paths:?}");
    assert_eq!(body.error, "invalid spec: 4 findings");
    // The client reports it the same way.
    let invalid = ProcessSpec::new("bad", "true").with_domain("nope..example");
    match net.spin(&spin_request(invalid), SpinQuery::default()).await {
        Err(ClientError::Api {
            status: 422,
            findings,
            ..
        }) => assert!(!findings.is_empty()),
        other => panic!("expected 422, got {other:?}"),
    }
    // Without a client certificate: 401 on every route.
    let wrong = p2f::core::Network::connect(
        net.address(),
        &p2f::core::cluster::Credentials::new(ca.clone(), None),
    )
    .expect("client");
    assert_eq!(
        wrong.list_processes().await.map_err(|e| e.status()).err(),
        Some(Some(401))
    );
    assert_eq!(
        wrong.node().await.map_err(|e| e.status()).err(),
        Some(Some(401))
    );
    // Plain HTTP on the TLS port: a clear answer.
    let plain = plain_http(net.address()).await;
    assert!(plain.starts_with("HTTP/1.1 400"), "{plain}");
    assert!(plain.contains("HTTPS only"), "{plain}");
    // Nothing changed and the agent still answers.
    assert!(net.list_processes().await.expect("list").is_empty());
    Ok(())
}

async fn plain_http(address: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream
        .write_all(b"GET /v1/processes HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_runs_as_its_user() -> anyhow::Result<()> {
    let agent = root("users").await?;
    // The temporary directory is private (0700); a data directory such as /var/lib/p2f is not.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(agent.dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let net = agent.network();
    let spec = ProcessSpec::new("unprivileged", "echo user=$(id -un); exec sleep 1000")
        .with_user("nobody")
        .with_restart(RestartPolicy::Never);
    let p = net
        .spin(&spin_request(spec), SpinQuery { wait: true })
        .await
        .expect("spin");
    let root = std::fs::read_to_string("/proc/self/status")
        .expect("status")
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root {
        // Without root the agent cannot switch users, and says so.
        let p = agent
            .wait_for(&p.id, WAIT, "refusal", |p| p.status.is_final())
            .await?;
        let reason = p.last_failure.map(|f| f.to_string()).unwrap_or_default();
        assert!(
            reason.contains("the agent does not run as root"),
            "{reason}"
        );
        return Ok(());
    }
    assert!(p.is_running(), "{p:#?}");
    let text = log_containing(net, &p.id, "user=", WAIT).await?;
    assert!(text.contains("user=nobody"), "{text}");
    Ok(())
}

/// A `Cmd` health check runs in a group of its own: a pipeline in it leaves nothing behind when
/// a check times out, and nothing of the service survives `kill` (counted by the processes
/// that carry its id, whatever their group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_pipeline_leaves_nothing_behind() -> anyhow::Result<()> {
    let agent = root("checked").await?;
    let net = agent.network();
    let spec = ProcessSpec::new(
        "checked",
        "exec python3 -m http.server $PORT --bind 127.0.0.1",
    )
    .with_port(service_port())
    .with_health(Health::Cmd("sleep 120 | cat".into()))
    .with_restart(RestartPolicy::Never);
    let p = net
        .spin(&spin_request(spec), SpinQuery::default())
        .await
        .expect("spin");
    let id = p.id.clone();
    let helpers = || -> (usize, usize) {
        let ours: Vec<u32> = p2f_testkit::procs::marked(agent.dir())
            .into_iter()
            .filter(|f| f.var("P2F_PROCESS_ID") == Some(id.as_str()))
            .map(|f| f.pid)
            .collect();
        let named = |program: &str| {
            ours.iter()
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c.split(|b| *b == 0).next() == Some(program.as_bytes()))
                })
                .count()
        };
        (named("sleep"), named("cat"))
    };
    // The check never answers (3 s each): the service fails its health check. At no time is
    // more than one check's pipeline alive.
    let failed = agent
        .wait_for(
            &id,
            Duration::from_secs(60),
            "the health check to fail",
            |p| p.status.is_final(),
        )
        .await?;
    assert!(
        matches!(
            failed.status,
            Status::Failed(Failure::HealthCheckFailed { .. })
        ),
        "{failed:#?}"
    );
    let (sleeps, cats) = helpers();
    assert!(sleeps <= 1 && cats <= 1, "{sleeps} sleeps, {cats} cats");
    net.kill_process(&failed).await.expect("kill");
    eventually("nothing of the check to be left", WAIT, || {
        let left = helpers();
        async move { (left == (0, 0)).then_some(()) }
    })
    .await?;
    assert!(agent.os_copies(&id).is_empty());
    Ok(())
}

/// A service's user is the whole user, as `su` and systemd make it: its supplementary groups
/// (a file readable only by one of them is read, by the service and by its `Cmd` check), and
/// `HOME`, `USER`, `LOGNAME` its own. Needs root (to add the user and group; CI runs as root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_user_has_its_groups_and_its_home() -> anyhow::Result<()> {
    require("useradd", "passwd")?;
    let uid = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().next() == Some("0"))
        });
    anyhow::ensure!(
        uid == Some(true),
        "this test adds a user and a group: run it as root"
    );
    let tag = std::process::id() % 100_000;
    let (user, group) = (format!("p2fsvc{tag}"), format!("p2fmedia{tag}"));
    let home = format!("/nonexistent/p2f-{user}");
    let shared = tempfile::tempdir()?;
    let secret = shared.path().join("only-media.txt");
    // Removed whatever happens below.
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("userdel").arg(&self.0).status();
            let _ = std::process::Command::new("groupdel").arg(&self.1).status();
        }
    }
    let _cleanup = Cleanup(user.clone(), group.clone());
    let run = |program: &str, args: &[&str]| -> anyhow::Result<()> {
        let status = std::process::Command::new(program).args(args).status()?;
        anyhow::ensure!(status.success(), "{program} {args:?}: {status}");
        Ok(())
    };
    run("groupadd", &[&group])?;
    run(
        "useradd",
        &[
            "-M", "-N", "-d", &home, "-s", "/bin/sh", "-G", &group, &user,
        ],
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(&secret, "the media library\n")?;
    run("chgrp", &[&group, &secret.to_string_lossy()])?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640))?;

    let agent = root("identity").await?;
    std::fs::set_permissions(agent.dir(), std::fs::Permissions::from_mode(0o755))?;
    let net = agent.network();
    let file = secret.to_string_lossy().into_owned();
    let spec = ProcessSpec::new(
        "media",
        format!(
            "echo groups=$(id -Gn); echo HOME=$HOME USER=$USER LOGNAME=$LOGNAME; \
             cat {file}; exec sleep 1000"
        ),
    )
    .with_user(&user)
    .with_health(Health::Cmd(format!("cat {file} > /dev/null").into()))
    .with_restart(RestartPolicy::Never);
    let p = net
        .spin(&spin_request(spec), SpinQuery::default())
        .await
        .expect("spin");
    agent
        .wait_for(&p.id, WAIT, "its check (as the user) to pass", |p| {
            p.is_healthy()
        })
        .await?;
    let log = log_containing(net, &p.id, "the media library", WAIT).await?;
    assert!(log.contains(&group), "supplementary group missing: {log}");
    assert!(
        log.contains(&format!("HOME={home} USER={user} LOGNAME={user}")),
        "{log}"
    );
    Ok(())
}

/// A full disk under the agent's data directory (a 48 MiB tmpfs, filled up by the test) while
/// spins must grow the record store; then space comes back. Without an agent restart, the next
/// spin succeeds and a kill is saved: after a restart, the killed process stays stopped. Needs
/// root (to mount the tmpfs; CI runs as root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_does_not_latch_the_record_store() -> anyhow::Result<()> {
    let mount = tempfile::tempdir()?;
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(mount.path())
        .status()?;
    anyhow::ensure!(status.success(), "mount -t tmpfs (run as root): {status}");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount.path().to_path_buf());
    let mut agent = crate::support::agent("fulldisk")
        .dir(mount.path().join("agent"))
        .init()?
        .started()
        .await?;
    let net = agent.network().clone();
    let node = net.node().await.expect("node");
    let victim = net
        .spin_process(&ProcessSpec::new("victim", "exec sleep 1000"), &node)
        .await
        .expect("spin");
    // Fill the file system up.
    let filler = mount.path().join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler)?;
        let block = vec![0u8; 1 << 20];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
    }
    // Spins grow the store until one cannot be saved (a bounded number of tries).
    let big = "x".repeat(60_000);
    let mut refused = None;
    for n in 0..200 {
        let spec = ProcessSpec::new(format!("grow{n}"), "exec sleep 1000").with_env("PAD", &big);
        if let Err(e) = net.spin_process(&spec, &node).await {
            refused = Some(e.to_string());
            break;
        }
    }
    let refused = refused.expect("a spin was refused while the disk was full");
    assert!(refused.contains("record store"), "{refused}");
    // Space comes back: the next spin works, and a kill is saved.
    std::fs::remove_file(&filler)?;
    let after = net
        .spin_process(&ProcessSpec::new("after", "exec sleep 1000"), &node)
        .await
        .expect("a spin once space is back");
    assert!(after.is_running() || after.status == Status::Pending);
    let killed = net
        .kill_process(&victim)
        .await
        .expect("kill once space is back");
    assert_eq!(killed.status, Status::Stopped);
    // Durable: after a restart the killed process is still stopped, the new one is there.
    agent.sigterm()?;
    agent.start().await?;
    let net = agent.network();
    let victim = net
        .process_information(ProcessKey::Id(victim.id.clone()))
        .await
        .expect("info")
        .expect("record");
    assert_eq!(victim.status, Status::Stopped, "the kill was saved");
    assert!(
        net.process_information(ProcessKey::Id(after.id.clone()))
            .await
            .expect("info")
            .is_some(),
        "the spin after the full disk was saved"
    );
    Ok(())
}

/// A damaged `records.redb` does not keep the node down: it is moved aside, the agent starts
/// with no records and says so, and a process that no record names any more is not left
/// running under the node's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_store_is_set_aside_and_the_node_starts() -> anyhow::Result<()> {
    let mut agent = root("damaged").await?;
    let net = agent.network().clone();
    let node = net.node().await.expect("node");
    let p = net
        .spin_process(&ProcessSpec::new("orphaned", "exec sleep 1000"), &node)
        .await
        .expect("spin");
    let pid = p.pid.expect("pid");
    let status = agent.sigterm()?;
    assert!(status.success(), "{status}");
    assert!(!p2f_testkit::procs::is_zombie(pid), "it outlives the agent");
    // Damage the file's header.
    let db = agent.config().data_dir.join("records.redb");
    {
        use std::io::{Seek, Write};
        let mut file = std::fs::OpenOptions::new().write(true).open(&db)?;
        file.seek(std::io::SeekFrom::Start(0))?;
        file.write_all(&[0xA5; 4096])?;
        file.sync_all()?;
    }
    agent.start().await?;
    let aside = std::fs::read_dir(&agent.config().data_dir)?
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("records.redb.damaged-")
        });
    assert!(aside, "the damaged file was kept aside");
    assert!(
        agent.log_tail(200).contains("the record store is damaged"),
        "the agent says so"
    );
    let listed = agent.network().list_processes().await.expect("list");
    assert!(listed.iter().all(|q| q.id != p.id), "{listed:?}");
    eventually("the unrecorded process to be killed", WAIT, || async move {
        p2f_testkit::procs::is_zombie(pid).then_some(())
    })
    .await?;
    Ok(())
}

/// A process gets a clean environment: its own variables, `PATH` and the like, and what
/// `[supervisor] pass_env` names (here the harness's marker) — not the agent's settings (the
/// agent runs with `RUST_LOG` set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_gets_a_clean_environment() -> anyhow::Result<()> {
    let agent = root("cleanenv").await?;
    let net = agent.network();
    let spec = ProcessSpec::new(
        "env",
        "echo \"rust_log=[$RUST_LOG] marker=[${P2F_TESTKIT_RUN:+set}] service=[$P2F_SERVICE] \
         path=[${PATH:+set}]\"; exec sleep 1000",
    )
    .with_restart(RestartPolicy::Never);
    let p = net
        .spin(&spin_request(spec), SpinQuery { wait: true })
        .await
        .expect("spin");
    let log = log_containing(net, &p.id, "service=[env]", WAIT).await?;
    assert!(
        log.contains("rust_log=[] marker=[set] service=[env] path=[set]"),
        "{log}"
    );
    Ok(())
}

/// Idle connections from one address cannot lock others out (issue: trust, the agent's OS
/// edge): 600 connections from 127.0.0.1 that never send a byte, then a call from 127.0.0.2 is
/// answered within a second. Unauthenticated connections are limited per address (32), so most
/// of the 600 are closed at once, and those kept are closed after the first-byte timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_address_do_not_lock_out_another() -> anyhow::Result<()> {
    let agent = root("crowded").await?;
    let address: std::net::SocketAddr = agent.network().address().parse()?;
    let mut idle = Vec::new();
    for _ in 0..600 {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(([127, 0, 0, 1], 0).into())?;
        idle.push(socket.connect(address).await?);
    }
    // Give the agent time to accept (and refuse) them all.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other = reqwest::Client::builder()
        .tls_backend_preconfigured(p2f::core::cluster::client_config_for(
            &agent.credentials()?,
        )?)
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()?;
    let url = format!("https://{address}/v1/node");
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(1), other.get(&url).send()).await;
    let answer = answer
        .map_err(|_| anyhow::anyhow!("no answer within 1 s while 600 connections idle"))??;
    assert_eq!(answer.status().as_u16(), 200);
    eprintln!("answered another address in {:?}", started.elapsed());
    // Most of the idle ones were closed by the agent: reading gives end-of-file at once.
    let mut closed = 0;
    for stream in &mut idle {
        let mut byte = [0u8; 1];
        use tokio::io::AsyncReadExt as _;
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(2), stream.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    assert!(
        closed >= 500,
        "only {closed} of 600 idle connections were closed"
    );
    // And the address itself still gets answers once it behaves.
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(agent.network().node().await.is_ok());
    Ok(())
}

/// The service's user deleted while it runs (issue: trust): its identity was resolved once at
/// launch and recorded, so its stop command still runs as that uid — never as root — and the
/// kill ends `Stopped`. Needs root (to add and delete the user; CI runs as root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_service_user_never_turns_into_root() -> anyhow::Result<()> {
    require("useradd", "passwd")?;
    let is_root = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    anyhow::ensure!(is_root, "this test adds and deletes a user: run it as root");
    let user = format!("p2fgone{}", std::process::id() % 100_000);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("userdel").arg(&self.0).status();
        }
    }
    let _cleanup = Cleanup(user.clone());
    let status = std::process::Command::new("useradd")
        .args(["-M", "-N", "-s", "/bin/sh", &user])
        .status()?;
    anyhow::ensure!(status.success(), "useradd {user}: {status}");
    let id = std::process::Command::new("id")
        .args(["-u", &user])
        .output()?;
    let uid = String::from_utf8_lossy(&id.stdout).trim().to_owned();
    anyhow::ensure!(!uid.is_empty(), "id -u {user}");

    let agent = root("forgetful").await?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(agent.dir(), std::fs::Permissions::from_mode(0o755))?;
    // Where the stop command writes who it ran as: anyone may write there.
    let out = tempfile::tempdir()?;
    std::fs::set_permissions(out.path(), std::fs::Permissions::from_mode(0o1777))?;
    let whoami = out.path().join("stop-uid");
    let spec = ProcessSpec::new("media", "exec sleep 1000")
        .with_user(&user)
        .with_stop(format!("id -u > {}; kill $PID", whoami.display()))
        .with_restart(RestartPolicy::Never);
    let net = agent.network();
    let p = net
        .spin(&spin_request(spec), SpinQuery { wait: true })
        .await?;
    assert_eq!(p.status, Status::Running);
    // `-f`: the user has a process running (that is the point).
    let status = std::process::Command::new("userdel")
        .args(["-f", &user])
        .status()?;
    anyhow::ensure!(status.success(), "userdel -f {user}: {status}");
    let stopped = net.kill_process(&p).await?;
    assert_eq!(stopped.status, Status::Stopped, "{stopped:#?}");
    let ran_as = std::fs::read_to_string(&whoami)?;
    assert_eq!(
        ran_as.trim(),
        uid,
        "the stop command ran as the recorded uid"
    );
    assert!(agent.os_copies(&p.id).is_empty());
    Ok(())
}
