//! Benchmark of the network (DESIGN.md §9, issue 4): failover of a SIGKILLed node, the time a
//! record change takes to reach every node, and `list_processes` with 10 000 records.
//!
//! - **failover**: three real release `p2f node run` processes (the root on 127.0.0.1, members
//!   on 127.0.0.2 and .3), one service pinned to the two members and deployed through the root.
//!   Each trial SIGKILLs the member that runs it (the agent and every process group it started)
//!   and times, from the root's API, the node listed dead, the record `Lost`, and the record
//!   `Running` on the other member with a higher generation; then the killed member is started
//!   again and the network is given time to settle (its stale copy gone, it alive again).
//!   Before the trials, the same three agents time how long a record spun on one member takes to
//!   be listed `Running` by the two others.
//! - **propagation**: in-process meshes (`p2f::core::mesh`) of 3, 10 and 30 nodes, each node
//!   publishing a few process digests; one digest changes on one node, and the time until every
//!   other node holds the new value is measured.
//! - **list**: a root and a member (real agents); the member gets 10 000 records by spinning
//!   `exit 0` with `RestartPolicy::Never` (final `Stopped` records, no running processes); then
//!   `GET /v1/processes` is timed on the member (its own records) and on the root (copies), with
//!   the parts of the call measured apart.
//!
//! Run it with `bash bench/network/run.sh`, which builds `p2f` and this example in release and
//! passes `--p2f`. By hand:
//!
//! ```text
//! cargo run --release --example bench_network -- --p2f target/release/p2f \
//!     [--data-root /var/tmp] [--trials 10] [--sizes 3,10,30] [--changes 12] \
//!     [--records 10000] [--calls 50] [--only failover,propagation,list]
//! ```
//!
//! The agents are `p2f_testkit::Agent`s, the harness the integration tests use, with the
//! default settings a user gets. Every process the run starts carries
//! `P2F_TESTKIT_RUN=<a dir under its temp dir>` in its environment (the agents' children inherit
//! it) and is killed by pid when the run ends, also on error, panic, Ctrl-C or SIGTERM.
//! `bench_network sweep DIR` kills whatever a SIGKILLed run left under `DIR`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures_util::StreamExt;
use p2f::core::Network;
use p2f::core::cluster::Secret;
use p2f::core::mesh::{DEFAULT_GOSSIP_INTERVAL, Mesh, MeshConfig, ProcessDigest};
use p2f::core::wire::{SpinQuery, SpinRequest};
use p2f::model::{
    Health, NodeName, Process, ProcessId, ProcessSpec, RestartPolicy, Status, Timestamp,
};
use p2f_testkit::procs::{self, Signal, Stat, sweep};
use p2f_testkit::{Agent, Killed, poll as wait_for};

mod bench_common;
use bench_common::{
    CALL_TIMEOUT, Report, Sample, call, load_average, ms, run_interruptible, verdict,
};

/// How often the failover trial polls the APIs.
const POLL: Duration = Duration::from_millis(10);
/// The longest a failover may take before the trial counts as failed.
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);
/// The longest the network may take to settle after the killed node is started again.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// Quiet time before each kill, so the failure detectors have heard every node for a while
/// (a trial's phase within the gossip round is added to it).
const PAUSE: Duration = Duration::from_secs(2);
/// Process digests each in-process mesh node publishes (a node with a few services).
const DIGESTS_PER_NODE: usize = 5;
/// How often the propagation benchmark reads the meshes.
const MESH_POLL: Duration = Duration::from_millis(5);
#[derive(Debug, Clone)]
struct Options {
    p2f: PathBuf,
    data_root: PathBuf,
    trials: usize,
    sizes: Vec<usize>,
    changes: usize,
    records: usize,
    calls: usize,
    /// Spins in flight while the list benchmark creates its records.
    concurrency: usize,
    only: Vec<String>,
    /// Where `--perf` writes the agents' profiles (a path prefix); `None`: no profile.
    perf: Option<PathBuf>,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Options> {
        let mut options = Options {
            p2f: PathBuf::new(),
            data_root: PathBuf::from("/var/tmp"),
            trials: 10,
            sizes: vec![3, 10, 30],
            changes: 12,
            records: 10_000,
            calls: 50,
            concurrency: 8,
            only: vec!["failover".into(), "propagation".into(), "list".into()],
            perf: None,
        };
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| anyhow!("{flag} needs a value"))?;
            let number = || {
                value
                    .parse::<usize>()
                    .with_context(|| format!("{flag} {value}"))
            };
            match flag.as_str() {
                "--p2f" => options.p2f = PathBuf::from(&value),
                "--data-root" => options.data_root = PathBuf::from(&value),
                "--trials" => options.trials = number()?,
                "--changes" => options.changes = number()?,
                "--records" => options.records = number()?,
                "--calls" => options.calls = number()?,
                "--concurrency" => options.concurrency = number()?.max(1),
                "--sizes" => {
                    options.sizes = value
                        .split(',')
                        .map(|s| s.parse::<usize>().with_context(|| format!("--sizes {s}")))
                        .collect::<Result<_>>()?;
                }
                "--only" => options.only = value.split(',').map(str::to_owned).collect(),
                "--perf" => options.perf = Some(PathBuf::from(&value)),
                other => bail!("unknown option {other}"),
            }
        }
        ensure!(
            options.p2f.is_file(),
            "--p2f must name the p2f binary (got {:?})",
            options.p2f
        );
        ensure!(
            options.sizes.iter().all(|&n| (2..=100).contains(&n)),
            "--sizes: 2 to 100 nodes"
        );
        ensure!((1..=100).contains(&options.trials), "--trials: 1 to 100");
        ensure!(
            (1..=1000).contains(&options.changes),
            "--changes: 1 to 1000"
        );
        ensure!(
            (1..=100_000).contains(&options.records),
            "--records: 1 to 100000"
        );
        ensure!((1..=10_000).contains(&options.calls), "--calls: 1 to 10000");
        Ok(options)
    }

    fn runs(&self, part: &str) -> bool {
        self.only.iter().any(|p| p == part)
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("sweep") => {
            let dir = args.next().context("sweep DIR")?;
            let killed = sweep(Path::new(&dir));
            println!("killed {killed} leftover processes under {dir}");
            Ok(())
        }
        first => {
            let options = Options::parse(first.map(str::to_owned).into_iter().chain(args))?;
            run_interruptible(run(options))
        }
    }
}

/// The run's temp dir: every process marked with a dir under it is killed, then it is deleted.
struct Scratch {
    path: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl Scratch {
    fn new(parent: &Path) -> Result<Scratch> {
        let dir = tempfile::Builder::new()
            .prefix("p2f-bench-network-")
            .tempdir_in(parent)?;
        Ok(Scratch {
            // As the agents name their directories in their marker (canonical).
            path: std::fs::canonicalize(dir.path())?,
            dir: Some(dir),
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        sweep(&self.path);
        drop(self.dir.take());
    }
}

async fn run(options: Options) -> Result<()> {
    let p2f = std::fs::canonicalize(&options.p2f)?;
    std::fs::create_dir_all(&options.data_root)?;
    let scratch = Scratch::new(&options.data_root)?;
    println!(
        "data dirs under {} (load average before: {})",
        scratch.path().display(),
        load_average()
    );
    let mut report = Report::new("P2F", "baseline / anchor");
    if options.runs("failover") {
        let started = Instant::now();
        failover(
            &p2f,
            &scratch.path().join("failover"),
            &options,
            &mut report,
        )
        .await?;
        report.notes.push(format!(
            "failover part took {:.0} s; load average after it: {}",
            started.elapsed().as_secs_f64(),
            load_average()
        ));
    }
    if options.runs("propagation") {
        let started = Instant::now();
        propagation(&options, &mut report).await?;
        report.notes.push(format!(
            "propagation part took {:.0} s; load average after it: {}",
            started.elapsed().as_secs_f64(),
            load_average()
        ));
    }
    if options.runs("list") {
        let started = Instant::now();
        list_records(&p2f, &scratch.path().join("list"), &options, &mut report).await?;
        report.notes.push(format!(
            "list part took {:.0} s; load average after it: {}",
            started.elapsed().as_secs_f64(),
            load_average()
        ));
    }
    report.print();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Real agents

/// A root of a new cluster (`p2f init`) with the default settings, started, in `dir`.
async fn root_agent(p2f: &Path, dir: &Path, name: &str) -> Result<Agent> {
    Agent::builder(name)
        .p2f(p2f)
        .dir(dir)
        .init()?
        .started()
        .await
}

/// A member of `root`'s cluster listening on `ip`, with the default settings, started, in `dir`.
async fn member_agent(p2f: &Path, root: &Agent, dir: &Path, name: &str, ip: &str) -> Result<Agent> {
    Agent::builder(name)
        .p2f(p2f)
        .dir(dir)
        .ip(ip)
        .join(root)?
        .started()
        .await
}

/// Adds the end of every agent's log to an error.
fn with_logs<T>(result: Result<T>, agents: &[&Agent]) -> Result<T> {
    result.map_err(|e| {
        let logs: Vec<String> = agents.iter().map(|a| a.log_tail(25)).collect();
        e.context(logs.join("\n"))
    })
}

/// utime + stime of `pid` in clock ticks (10 ms).
fn cpu_ticks(pid: u32) -> Option<u64> {
    Stat::of(pid).map(|s| s.cpu_ticks)
}

fn node_name(name: &str) -> Result<NodeName> {
    NodeName::new(name).map_err(|e| anyhow!("node name {name}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// 1. Failover

/// What one failover trial saw, each from the SIGKILL.
#[derive(Debug, Default, Clone, Copy)]
struct Trial {
    /// The root's `nodes()` lists the killed node dead.
    dead: Option<Duration>,
    /// The root's `list_processes` shows the killed node's copy `Lost`.
    lost: Option<Duration>,
    /// The other member holds a record of the higher generation (the root's spin arrived).
    placed: Option<Duration>,
    /// The other member's own API shows it `Running`.
    member_running: Option<Duration>,
    /// The root's `list_processes` shows it `Running` on the other member: the figure.
    running: Option<Duration>,
}

async fn failover(p2f: &Path, dir: &Path, options: &Options, report: &mut Report) -> Result<()> {
    let root = root_agent(p2f, &dir.join("root"), "root").await?;
    let a = member_agent(p2f, &root, &dir.join("node-a"), "node-a", "127.0.0.2").await?;
    let b = member_agent(p2f, &root, &dir.join("node-b"), "node-b", "127.0.0.3").await?;
    let mut members = [a, b];
    let result = failover_on(&root, &mut members, options, report).await;
    with_logs(result, &[&root, &members[0], &members[1]])
}

/// Failover trials on a running root and two members: SIGKILL one, time each step until the
/// service runs on the other, bring the killed one back.
///
/// Longer than 100 lines on purpose: one benchmark's protocol, step by step (set up, measure
/// the figure and its parts interleaved, clean up), read top to bottom against BENCHMARKS.md;
/// split up, the order of the measurements would no longer be visible in one place.
async fn failover_on(
    root: &Agent,
    members: &mut [Agent; 2],
    options: &Options,
    report: &mut Report,
) -> Result<()> {
    let names = ["root", "node-a", "node-b"];
    for agent in [root, &members[0], &members[1]] {
        agent.all_alive(&names).await?;
    }
    spread_between_agents(root, members, options, report).await?;

    let spec = ProcessSpec::new("web", "exec sleep 100000")
        .with_pin([node_name("node-a")?, node_name("node-b")?])
        .with_health(Health::None);
    let desired = call(
        "deploy",
        root.try_network()?.deploy(std::slice::from_ref(&spec)),
    )
    .await?;
    let id = desired
        .services
        .first()
        .context("the root returned no service")?
        .id
        .clone();
    let root_net = root.try_network()?.clone();
    let first = wait_for(
        "the service to run",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || running_copy(&root_net, &id, 1),
    )
    .await?;
    println!(
        "failover: {id} runs on {} (generation {})",
        first.node.name, first.generation
    );

    let mut trials: Vec<Trial> = Vec::new();
    let mut settles = Vec::new();
    // Trials in which the restarted member listed its old copy, listed it Running, and ran
    // an OS process for it, before it fenced the copy.
    let (mut stale_listed, mut stale_running, mut stale_os) = (0, 0, 0);
    let mut once = 0;
    // Moves the root made by itself between two trials (no node was killed), with the root's
    // log lines about the service.
    let mut unplanned: Vec<String> = Vec::new();
    let mut trial = 0;
    while trials.len() < options.trials {
        ensure!(
            unplanned.len() <= 5,
            "the root moved {id} by itself {} times: {unplanned:?}",
            unplanned.len()
        );
        let current = wait_for(
            "the service to run",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || running_copy(&root_net, &id, 1),
        )
        .await?;
        let generation = current.generation;
        let victim = members
            .iter()
            .position(|m| m.name() == current.node.name.as_str())
            .with_context(|| format!("{id} runs on {}, not a member", current.node.name))?;
        let survivor = 1 - victim;
        let victim_name = members[victim].name().to_owned();
        let survivor_name = members[survivor].name().to_owned();
        let old_incarnation = call("nodes", root_net.nodes())
            .await?
            .iter()
            .find(|n| n.node.name.as_str() == victim_name)
            .map(|n| n.incarnation)
            .context("the root does not know the victim")?;
        // A different point of the gossip round each trial, as real failures come.
        let phase = DEFAULT_GOSSIP_INTERVAL.mul_f64(trial as f64 / options.trials as f64);
        tokio::time::sleep(PAUSE + phase).await;
        // The copy to kill must still be the one found before the pause.
        let now = running_copy(&root_net, &id, 1).await?;
        if now
            .as_ref()
            .is_none_or(|p| p.generation != generation || p.node.name != current.node.name)
        {
            let log = root.log();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(id.as_str()))
                .rev()
                .take(4)
                .collect();
            unplanned.push(format!(
                "before trial {trial}: generation {generation} on {} became {} (root log, newest \
                 first: {})",
                current.node.name,
                now.map_or("not running".into(), |p| format!(
                    "generation {} on {} ({})",
                    p.generation,
                    p.node.name,
                    p.status.name()
                )),
                lines.join(" | ")
            ));
            continue;
        }

        let survivor_net = members[survivor].try_network()?.clone();
        let Killed { at: killed, groups } = members[victim].kill_node()?;
        let mut seen = Trial::default();
        loop {
            let (nodes, all, local) = tokio::join!(
                call("root nodes", root_net.nodes()),
                call("root list", root_net.list_processes()),
                call("survivor list", survivor_net.list_local()),
            );
            let now = killed.elapsed();
            if nodes?
                .iter()
                .any(|n| n.node.name.as_str() == victim_name && !n.alive)
            {
                seen.dead.get_or_insert(now);
            }
            let local = local?;
            if local
                .iter()
                .any(|p| p.id == id && p.generation > generation)
            {
                seen.placed.get_or_insert(now);
            }
            if local
                .iter()
                .any(|p| p.id == id && p.generation > generation && p.is_running())
            {
                seen.member_running.get_or_insert(now);
            }
            let all = all?;
            if all.iter().any(|p| {
                p.id == id && p.node.name.as_str() == victim_name && p.status == Status::Lost
            }) {
                seen.lost.get_or_insert(now);
            }
            if all.iter().any(|p| {
                p.id == id
                    && p.node.name.as_str() == survivor_name
                    && p.generation > generation
                    && p.is_running()
            }) {
                seen.running = Some(now);
                break;
            }
            ensure!(
                now < FAILOVER_LIMIT,
                "trial {trial}: {id} not Running on {survivor_name} within {FAILOVER_LIMIT:?} \
                 of the SIGKILL of {victim_name}; seen so far {seen:?}"
            );
            tokio::time::sleep(POLL).await;
        }
        let copies = (
            members[survivor].os_copies(&id).len(),
            members[victim].os_copies(&id).len(),
        );
        if copies == (1, 0) {
            once += 1;
        }
        println!(
            "failover trial {trial}: SIGKILL {victim_name} (agent + {groups} group(s)) → dead {} \
             Lost {} placed {} running on member {} listed Running by the root {} s; OS copies \
             {copies:?}",
            opt_secs(seen.dead),
            opt_secs(seen.lost),
            opt_secs(seen.placed),
            opt_secs(seen.member_running),
            opt_secs(seen.running),
        );
        trials.push(seen);
        trial += 1;

        // The killed node comes back; wait until the network has settled.
        let restarted = Instant::now();
        members[victim].start().await?;
        let victim_net = members[victim].try_network()?.clone();
        let (mut listed, mut running, mut os_seen) = (false, false, false);
        let deadline = Instant::now() + SETTLE_LIMIT;
        loop {
            let (nodes, all, local) = tokio::join!(
                call("root nodes", root_net.nodes()),
                call("root list", root_net.list_processes()),
                call("victim list", victim_net.list_local()),
            );
            let back = nodes?.iter().any(|n| {
                n.node.name.as_str() == victim_name && n.alive && n.incarnation != old_incarnation
            });
            let all = all?;
            let records: Vec<&Process> = all.iter().filter(|p| p.id == id).collect();
            let one = records.len() == 1
                && records[0].is_running()
                && records[0].generation > generation
                && records[0].node.name.as_str() == survivor_name;
            let local = local?;
            if let Some(old) = local.iter().find(|p| p.id == id) {
                listed = true;
                running |= old.is_running();
            }
            let dropped = !local.iter().any(|p| p.id == id);
            let os = (
                members[survivor].os_copies(&id).len(),
                members[victim].os_copies(&id).len(),
            );
            os_seen |= os.1 > 0;
            if back && one && dropped && os == (1, 0) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "trial {trial}: not settled within {SETTLE_LIMIT:?} after {victim_name} \
                 restarted: back {back}, one record {one} ({} records), stale copy dropped \
                 {dropped}, OS copies {os:?}",
                records.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        settles.push(restarted.elapsed());
        stale_listed += usize::from(listed);
        stale_running += usize::from(running);
        stale_os += usize::from(os_seen);
    }

    let pick = |f: fn(&Trial) -> Option<Duration>| {
        Sample::new(trials.iter().filter_map(f).collect::<Vec<_>>())
    };
    let running = pick(|t| t.running);
    let anchors = "Nomad ≈ 20–30 s, Docker Swarm ≈ 15 s, fleet 30 s (documented defaults)";
    report.row(
        "failover: SIGKILL of a member (agent + its processes) → root lists the service Running \
         on the other member, higher generation (p50 / max)",
        running.secs(),
        anchors,
        "≤ 5 s p50 over 10 trials",
        verdict(running.pct(50.0) <= Duration::from_secs(5) && running.0.len() >= 10),
    );
    report.row(
        "  part: root's nodes() lists the member dead",
        pick(|t| t.dead).secs(),
        "",
        "",
        "",
    );
    report.row(
        "  part: root lists the killed copy Lost",
        pick(|t| t.lost).secs(),
        "",
        "",
        "",
    );
    report.row(
        "  part: the other member holds the new generation (root's spin arrived)",
        pick(|t| t.placed).secs(),
        "",
        "",
        "",
    );
    report.row(
        "  part: Running on the other member (its own API)",
        pick(|t| t.member_running).secs(),
        "",
        "",
        "",
    );
    let gap = |from: fn(&Trial) -> Option<Duration>, to: fn(&Trial) -> Option<Duration>| {
        Sample::new(
            trials
                .iter()
                .filter_map(|t| Some(to(t)?.saturating_sub(from(t)?)))
                .collect::<Vec<_>>(),
        )
    };
    report.row(
        "  step: dead in the root's mesh → root's spin arrived on the other member (replica \
         sync and reconcile, 250 ms rounds each, + the spin call)",
        gap(|t| t.dead, |t| t.placed).ms_max(),
        "",
        "",
        "",
    );
    report.row(
        "  step: Running on the other member → root lists it (gossip + replica sync)",
        gap(|t| t.member_running, |t| t.running).ms_max(),
        "",
        "",
        "",
    );
    report.notes.push(format!(
        "failover: the root moved the service by itself (no node killed) {} times{}",
        unplanned.len(),
        if unplanned.is_empty() {
            String::new()
        } else {
            format!(": {}", unplanned.join("; "))
        }
    ));
    report.notes.push(format!(
        "failover, every trial in seconds (sorted): Running on the other member per the root: \
         {}; dead: {}; Lost: {}",
        running.all_secs(),
        pick(|t| t.dead).all_secs(),
        pick(|t| t.lost).all_secs()
    ));
    report.notes.push(format!(
        "failover: exactly one OS copy (on the other member, none left on the killed one) when \
         the root first listed it Running: {once} of {} trials; settling after the restart \
         (agent start → one record, stale copy gone, node alive) took {}; once its API answered, \
         the restarted member still listed its old copy in {stale_listed}, listed it Running in \
         {stale_running}, and had an OS process for it in {stale_os} of the trials (read every \
         20 ms)",
        trials.len(),
        Sample::new(settles).secs()
    ));
    Ok(())
}

fn opt_secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64()))
}

/// The root's record of `id` that is `Running` with at least `generation`, if any.
async fn running_copy(net: &Network, id: &ProcessId, generation: u64) -> Result<Option<Process>> {
    let all = call("root list", net.list_processes()).await?;
    Ok(all
        .into_iter()
        .find(|p| &p.id == id && p.is_running() && p.generation >= generation))
}

/// A record spun on one member → listed `Running` by the root and the other member, on the
/// three real agents (gossip of the digest, then each node fetches the record over the API).
async fn spread_between_agents(
    root: &Agent,
    members: &[Agent; 2],
    options: &Options,
    report: &mut Report,
) -> Result<()> {
    let mut times = Vec::new();
    for trial in 0..options.trials {
        let owner = &members[trial % 2];
        let other = &members[1 - trial % 2];
        let phase = DEFAULT_GOSSIP_INTERVAL.mul_f64(trial as f64 / options.trials as f64);
        tokio::time::sleep(Duration::from_millis(500) + phase).await;
        let spec = ProcessSpec::new(format!("spread{trial}"), "exec sleep 100000")
            .with_health(Health::None);
        let request = SpinRequest {
            spec,
            id: None,
            generation: None,
            moved_from: None,
            external: None,
        };
        let process = call(
            "spin on a member",
            owner
                .try_network()?
                .spin(&request, SpinQuery { wait: true }),
        )
        .await?;
        ensure!(process.is_running(), "spin did not run: {process:?}");
        let written = Instant::now();
        let (root_net, other_net) = (root.try_network()?.clone(), other.try_network()?.clone());
        let id = process.id.clone();
        wait_for(
            "the record to be listed by the other two nodes",
            Duration::from_secs(20),
            Duration::from_millis(5),
            || {
                let (root_net, other_net, id) = (root_net.clone(), other_net.clone(), id.clone());
                async move {
                    let (on_root, on_other) = tokio::join!(
                        call("root list", root_net.list_processes()),
                        call("member list", other_net.list_processes()),
                    );
                    let listed =
                        |all: Vec<Process>| all.iter().any(|p| p.id == id && p.is_running());
                    Ok((listed(on_root?) && listed(on_other?)).then_some(()))
                }
            },
        )
        .await?;
        times.push(written.elapsed());
        call("remove", owner.try_network()?.remove_process(&process.id)).await?;
        wait_for(
            "the removed record to leave the root's list",
            Duration::from_secs(20),
            Duration::from_millis(50),
            || {
                let (root_net, id) = (root.try_network().cloned(), id.clone());
                async move {
                    let all = call("root list", root_net?.list_processes()).await?;
                    Ok((!all.iter().any(|p| p.id == id)).then_some(()))
                }
            },
        )
        .await?;
    }
    let times = Sample::new(times);
    report.row(
        "record spun on a member → listed Running by the root and the other member (3 real \
         agents; p50 / max)",
        times.ms_max(),
        "in-process meshes, 3 nodes (below)",
        "",
        "",
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Record propagation (in-process meshes)

/// A digest as a node publishes it for one of its processes.
fn digest(node: &NodeName, i: usize, generation: u64) -> Result<ProcessDigest> {
    Ok(ProcessDigest {
        id: ProcessId::new(format!("svc{i}-{}-3f9a1c", node.as_str()))
            .map_err(|e| anyhow!("{e}"))?,
        generation,
        status: Status::Running,
        restarts: 0,
        started_at: Some(Timestamp(1_795_000_000_000 + generation)),
        pid: Some(40_000 + i as u32),
        healthy: true,
        node: node.clone(),
        port: Some(10_000 + i as u16),
        domain: Some(format!("svc{i}.{}.home.arpa", node.as_str())),
        spec: format!("{:016x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
    })
}

/// The value `node` publishes under `key`, as `mesh` sees it now.
async fn value_on(mesh: &Mesh, node: &NodeName, key: &str) -> Option<String> {
    mesh.members()
        .await
        .into_iter()
        .find(|m| &m.node == node)
        .and_then(|m| m.values.get(key).cloned())
}

/// Record propagation through in-process meshes of each size.
///
/// Longer than 100 lines on purpose: one benchmark's protocol, step by step (set up, measure
/// the figure and its parts interleaved, clean up), read top to bottom against BENCHMARKS.md;
/// split up, the order of the measurements would no longer be visible in one place.
async fn propagation(options: &Options, report: &mut Report) -> Result<()> {
    for &n in &options.sizes {
        let secret = Secret::generate();
        let mut meshes: Vec<Mesh> = Vec::with_capacity(n);
        let mut seeds = Vec::new();
        for i in 0..n {
            let name = node_name(&format!("n{i:02}"))?;
            let mut config = MeshConfig::new(
                name.clone(),
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                secret.clone(),
            );
            config.seeds = seeds.clone();
            let mesh = Mesh::start(config).await?;
            for k in 0..DIGESTS_PER_NODE {
                let d = digest(&name, k, 1)?;
                mesh.set(&d.key(), &d.encode()).await?;
            }
            if seeds.is_empty() {
                seeds.push(mesh.gossip_addr());
            }
            meshes.push(mesh);
        }
        let started = Instant::now();
        let converged = wait_for(
            &format!("{n} meshes to converge"),
            Duration::from_secs(60),
            Duration::from_millis(50),
            || {
                let meshes = &meshes;
                async move {
                    for mesh in meshes {
                        let members = mesh.members().await;
                        if members.len() != n
                            || members.iter().any(|m| m.values.len() < DIGESTS_PER_NODE)
                        {
                            return Ok(None);
                        }
                    }
                    Ok(Some(()))
                }
            },
        )
        .await;
        if let Err(e) = converged {
            for mesh in meshes {
                mesh.stop().await;
            }
            return Err(e);
        }
        let converge_time = started.elapsed();
        // Let the failure detectors hear every node for a while, as in a running network.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before: Vec<_> = meshes.iter().map(Mesh::stats).collect();
        let window = Instant::now();
        let result = changes(&meshes, options.changes).await;
        let seconds = window.elapsed().as_secs_f64();
        let sent: u64 = meshes
            .iter()
            .zip(&before)
            .map(|(m, b)| m.stats().sent_bytes - b.sent_bytes)
            .sum();
        let rejected: u64 = meshes.iter().map(|m| m.stats().rejected).sum();
        for mesh in meshes {
            mesh.stop().await;
        }
        let (last, each, poll) = result?;
        let goal = match n {
            10 => "≤ 1 s",
            30 => "≤ 2 s",
            _ => "",
        };
        let met = match n {
            10 => verdict(last.pct(50.0) <= Duration::from_secs(1)),
            30 => verdict(last.pct(50.0) <= Duration::from_secs(2)),
            _ => "",
        };
        report.row(
            &format!(
                "record propagation, {n} nodes (in-process meshes): one digest changed on one \
                 node → every other node holds it (p50 / max)"
            ),
            last.ms_max(),
            "",
            goal,
            met,
        );
        report.row(
            &format!("  part: {n} nodes, one node's arrival (each node × change; p50 / max)"),
            each.ms_max(),
            "",
            "",
            "",
        );
        report.notes.push(format!(
            "propagation, {n} nodes: converged (all members, {DIGESTS_PER_NODE} digests each) {:.2} \
             s after the last start; gossip {:.1} KB/s per node during the changes; {rejected} \
             datagrams rejected; reading every mesh once took {} ms p50 ({} ms max), the \
             resolution of these times",
            converge_time.as_secs_f64(),
            sent as f64 / 1e3 / n as f64 / seconds,
            ms(poll.pct(50.0)),
            ms(poll.max()),
        ));
    }
    Ok(())
}

/// `count` changes, each of one digest on a rotating node, each at a different point of the
/// gossip round. Returns the time until the last node held each, every node's arrival, and the
/// time each read of the meshes took.
async fn changes(meshes: &[Mesh], count: usize) -> Result<(Sample, Sample, Sample)> {
    let n = meshes.len();
    let mut last = Vec::new();
    let mut each = Vec::new();
    let mut polls = Vec::new();
    for change in 0..count {
        let phase = DEFAULT_GOSSIP_INTERVAL.mul_f64(change as f64 / count as f64);
        tokio::time::sleep(Duration::from_millis(300) + phase).await;
        let owner = &meshes[change % n];
        let d = digest(owner.node(), change % DIGESTS_PER_NODE, 2 + change as u64)?;
        let (key, value) = (d.key(), d.encode());
        let started = Instant::now();
        owner.set(&key, &value).await?;
        let mut waiting: Vec<usize> = (0..n).filter(|&i| i != change % n).collect();
        while !waiting.is_empty() {
            let read = Instant::now();
            let mut still = Vec::new();
            for &i in &waiting {
                if value_on(&meshes[i], owner.node(), &key).await.as_deref() == Some(&value) {
                    each.push(started.elapsed());
                } else {
                    still.push(i);
                }
            }
            if waiting.len() == n - 1 {
                polls.push(read.elapsed());
            }
            waiting = still;
            ensure!(
                started.elapsed() < Duration::from_secs(20),
                "change {change}: {} of {} nodes did not get it within 20 s",
                waiting.len(),
                n - 1
            );
            if !waiting.is_empty() {
                tokio::time::sleep(MESH_POLL).await;
            }
        }
        last.push(started.elapsed());
    }
    Ok((Sample::new(last), Sample::new(each), Sample::new(polls)))
}

// ---------------------------------------------------------------------------------------------
// 3. list_processes with many records

async fn list_records(
    p2f: &Path,
    dir: &Path,
    options: &Options,
    report: &mut Report,
) -> Result<()> {
    let root = root_agent(p2f, &dir.join("root"), "lroot").await?;
    let member = member_agent(p2f, &root, &dir.join("member"), "lmember", "127.0.0.2").await?;
    let result = list_on(&root, &member, options, report).await;
    with_logs(result, &[&root, &member])
}

/// The parts of one raw `GET /v1/processes`.
#[derive(Debug, Clone, Copy)]
struct RawGet {
    /// Until the status line and headers arrived (the server built the whole JSON body by then).
    headers: Duration,
    /// Until the last byte of the body arrived.
    body: Duration,
    bytes: usize,
}

/// A plain HTTPS client with the cluster's trust and the agent's operator certificate, to time
/// a call's parts.
struct Raw {
    http: reqwest::Client,
}

impl Raw {
    fn new(agent: &Agent) -> Result<Raw> {
        let credentials = agent.credentials()?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(p2f::core::cluster::client_config_for(&credentials)?)
            .no_proxy()
            .tcp_nodelay(true)
            .build()?;
        Ok(Raw { http })
    }

    async fn get(&self, address: &str, path: &str) -> Result<(RawGet, Vec<u8>)> {
        let started = Instant::now();
        let work = async {
            let response = self
                .http
                .get(format!("https://{address}{path}"))
                .send()
                .await?;
            let headers = started.elapsed();
            ensure!(
                response.status().is_success(),
                "{path}: {}",
                response.status()
            );
            let body = response.bytes().await?;
            Ok((
                RawGet {
                    headers,
                    body: started.elapsed(),
                    bytes: body.len(),
                },
                body.to_vec(),
            ))
        };
        tokio::time::timeout(CALL_TIMEOUT, work)
            .await
            .with_context(|| format!("GET {path}: no answer within {CALL_TIMEOUT:?}"))?
    }
}

/// `list_processes` with many records on a member and on the root.
///
/// Longer than 100 lines on purpose: one benchmark's protocol, step by step (set up, measure
/// the figure and its parts interleaved, clean up), read top to bottom against BENCHMARKS.md;
/// split up, the order of the measurements would no longer be visible in one place.
async fn list_on(
    root: &Agent,
    member: &Agent,
    options: &Options,
    report: &mut Report,
) -> Result<()> {
    root.all_alive(&["lroot", "lmember"]).await?;
    let n = options.records;
    let member_net = member.try_network()?.clone();
    let root_net = root.try_network()?.clone();

    // Create the records: `exit 0`, never restarted, so each ends `Stopped` at once.
    let created = Instant::now();
    let mut done = 0usize;
    let (mut first_thousand, mut before_last_thousand) = (Duration::ZERO, Duration::ZERO);
    let mut spins = futures_util::stream::iter(0..n)
        .map(|i| {
            let net = member_net.clone();
            async move {
                let spec = ProcessSpec::new(format!("rec-{i:05}"), "exit 0")
                    .with_restart(RestartPolicy::Never)
                    .with_health(Health::None);
                let request = SpinRequest {
                    spec,
                    id: None,
                    generation: None,
                    moved_from: None,
                    external: None,
                };
                call("spin", net.spin(&request, SpinQuery { wait: false })).await
            }
        })
        .buffer_unordered(options.concurrency);
    let limit = Duration::from_secs(30 * 60);
    while let Some(spun) =
        tokio::time::timeout(limit.saturating_sub(created.elapsed()), spins.next())
            .await
            .with_context(|| format!("creating {n} records took more than {limit:?}"))?
    {
        spun?;
        done += 1;
        if done == 1000.min(n) {
            first_thousand = created.elapsed();
        }
        if done + 1000 == n {
            before_last_thousand = created.elapsed();
        }
        if done.is_multiple_of(1000) {
            println!(
                "list: {done} records spun in {:.0} s",
                created.elapsed().as_secs_f64()
            );
        }
    }
    let spun_in = created.elapsed();
    let last_thousand = spun_in.saturating_sub(before_last_thousand);
    let all_final = wait_for(
        "every record to be final on the member",
        Duration::from_secs(10 * 60),
        Duration::from_millis(500),
        || {
            let net = member_net.clone();
            async move {
                let local = call("member list", net.list_local()).await?;
                let finals = local.iter().filter(|p| p.status.is_final()).count();
                Ok((local.len() >= n && finals == local.len()).then_some(local))
            }
        },
    )
    .await?;
    let final_in = created.elapsed();
    let stopped = all_final
        .iter()
        .filter(|p| p.status == Status::Stopped)
        .count();
    let copied_in = wait_for(
        "the root to hold a copy of every record",
        Duration::from_secs(15 * 60),
        Duration::from_secs(1),
        || {
            let net = root_net.clone();
            async move {
                let all = call("root list", net.list_processes()).await?;
                Ok((all.len() >= n).then(|| created.elapsed()))
            }
        },
    )
    .await?;
    println!(
        "list: {n} records spun in {:.1} s, all final after {:.1} s, all copied to the root \
         after {:.1} s",
        spun_in.as_secs_f64(),
        final_in.as_secs_f64(),
        copied_in.as_secs_f64()
    );
    // Let the replica's sync and the mesh quiet down.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let raw = Raw::new(member)?;
    let (member_addr, root_addr) = (
        member_net.address().to_owned(),
        root_net.address().to_owned(),
    );
    const WARM_UP: usize = 3;
    let mut member_calls = Vec::new();
    let mut root_calls = Vec::new();
    let mut member_raw = Vec::new();
    let mut root_raw = Vec::new();
    let mut tiny = Vec::new();
    // What the client does (and what the agents did before), redone here on the same records.
    let mut full = Codec::default();
    let mut no_events = Codec::default();
    let mut summary = Codec::default();
    for i in 0..WARM_UP + options.calls {
        let counted = i >= WARM_UP;
        // The figure: the client's call, on the node that holds the records and on the root.
        let t = Instant::now();
        let list = call("member list", member_net.list_processes()).await?;
        let member_call = t.elapsed();
        ensure!(list.len() >= n, "the member lists {} records", list.len());
        drop(list);
        let t = Instant::now();
        let on_root = call("root list", root_net.list_processes()).await?;
        let root_call = t.elapsed();
        ensure!(
            on_root.len() >= n,
            "the root lists {} records",
            on_root.len()
        );
        drop(on_root);
        // Its parts.
        let (member_get, body) = raw.get(&member_addr, "/v1/processes").await?;
        let (root_get, _) = raw.get(&root_addr, "/v1/processes").await?;
        let (small, _) = raw.get(&member_addr, "/v1/node").await?;
        let parsed: Vec<Process> =
            full.measure_parse(|| serde_json::from_slice(&body), body.len(), counted)?;
        let copy = parsed;
        // What the agents no longer do per call: encode every record (they encode a record
        // once per change of it, and join the encodings).
        full.measure_encode(|| serde_json::to_vec(&copy), counted)?;
        // Smaller answers: the records without their event history, and summary rows (the
        // digest: id, generation, status, node, port, domain, restarts, start time).
        let mut lean = copy.clone();
        for p in &mut lean {
            p.events.clear();
        }
        let bytes = no_events.measure_encode(|| serde_json::to_vec(&lean), counted)?;
        let _: Vec<Process> =
            no_events.measure_parse(|| serde_json::from_slice(&bytes), bytes.len(), counted)?;
        let rows: Vec<ProcessDigest> = copy.iter().map(ProcessDigest::of).collect();
        let bytes = summary.measure_encode(|| serde_json::to_vec(&rows), counted)?;
        let _: Vec<ProcessDigest> =
            summary.measure_parse(|| serde_json::from_slice(&bytes), bytes.len(), counted)?;
        if counted {
            member_calls.push(member_call);
            root_calls.push(root_call);
            member_raw.push(member_get);
            root_raw.push(root_get);
            tiny.push(small.body);
        }
    }

    // The agents' CPU per call: back-to-back raw GETs, utime + stime before and after, less
    // what the agent uses in the same time without calls.
    let mut cpu = Vec::new();
    let rounds = options.calls.max(20);
    for (name, agent, address) in [("member", member, &member_addr), ("root", root, &root_addr)] {
        let pid = agent.pid().context("agent pid")?;
        let idle = Duration::from_secs(3);
        let before = cpu_ticks(pid).context("agent stat")?;
        tokio::time::sleep(idle).await;
        let background = (cpu_ticks(pid).context("agent stat")? - before) as f64 * 10.0
            / idle.as_secs_f64()
            / 1e3;
        let perf = match &options.perf {
            Some(prefix) => Some(Perf::attach(pid, &format!("{}-{name}", prefix.display()))?),
            None => None,
        };
        let before = cpu_ticks(pid).context("agent stat")?;
        let t = Instant::now();
        for _ in 0..rounds {
            raw.get(address, "/v1/processes").await?;
        }
        let wall = t.elapsed();
        let ticks = cpu_ticks(pid).context("agent stat")? - before;
        let busy_ms = ticks as f64 * 10.0 - background * 1e3 * wall.as_secs_f64();
        cpu.push((
            name,
            busy_ms / rounds as f64,
            wall.as_secs_f64() * 1e3 / rounds as f64,
            background * 100.0,
        ));
        if let Some(perf) = perf {
            let top = perf.finish()?;
            report.notes.push(format!(
                "list: perf profile of the {name} agent over {rounds} back-to-back GET \
                 /v1/processes: {top}"
            ));
        }
    }

    let member_calls = Sample::new(member_calls);
    let root_calls = Sample::new(root_calls);
    let pick = |v: &[RawGet], f: fn(&RawGet) -> Duration| Sample::new(v.iter().map(f).collect());
    let bytes = member_raw.first().map_or(0, |r| r.bytes);
    let root_bytes = root_raw.first().map_or(0, |r| r.bytes);
    report.row(
        &format!(
            "list_processes (Network::list_processes, GET /v1/processes) with {n} records, on the \
             node that holds them (p50 / p99 / max)"
        ),
        member_calls.ms_p99(),
        "",
        "≤ 50 ms",
        verdict(member_calls.pct(50.0) <= Duration::from_millis(50)),
    );
    report.row(
        "the same list on the root, which holds them as copies of another node's records",
        root_calls.ms_p99(),
        "",
        "≤ 50 ms",
        verdict(root_calls.pct(50.0) <= Duration::from_millis(50)),
    );
    report.row(
        "  part, member: request → headers (the agent joins its records' JSON, each encoded once \
         per change)",
        pick(&member_raw, |r| r.headers).ms_p99(),
        "",
        "",
        "",
    );
    report.row(
        "  part, member: request → last byte of the body",
        pick(&member_raw, |r| r.body).ms_p99(),
        format!(
            "{:.1} MB, {} B per record",
            bytes as f64 / 1e6,
            bytes / n.max(1)
        ),
        "",
        "",
    );
    report.row(
        "  part, root: request → headers",
        pick(&root_raw, |r| r.headers).ms_p99(),
        "",
        "",
        "",
    );
    report.row(
        "  part, root: request → last byte of the body",
        pick(&root_raw, |r| r.body).ms_p99(),
        format!("{:.1} MB", root_bytes as f64 / 1e6),
        "",
        "",
    );
    report.row(
        "  part, client: JSON body → Vec<Process> (serde_json; Network::list_processes does this)",
        full.parse().ms_p99(),
        "",
        "",
        "",
    );
    report.row(
        "  baseline: GET /v1/node (one small JSON object, same connection pool)",
        Sample::new(tiny).ms_p99(),
        "",
        "",
        "",
    );
    report.row(
        "  in the harness: encode every record to JSON (what each call cost before records were \
         encoded once per change)",
        full.encode().ms_p99(),
        "",
        "",
        "",
    );
    for (what, codec) in [
        ("records without their events", &no_events),
        (
            "summary rows (the mesh digest: id, generation, status, node, port, domain, \
             restarts, started_at)",
            &summary,
        ),
    ] {
        report.row(
            &format!("  a smaller answer, in the harness: {what}: encode + parse"),
            format!(
                "{} + {} ms p50",
                ms(codec.encode().pct(50.0)),
                ms(codec.parse().pct(50.0))
            ),
            format!(
                "{:.1} MB, {} B per record (full: {} + {} ms)",
                codec.bytes as f64 / 1e6,
                codec.bytes / n.max(1),
                ms(full.encode().pct(50.0)),
                ms(full.parse().pct(50.0))
            ),
            "",
            "",
        );
    }
    for (name, per_call, wall, background) in &cpu {
        report.notes.push(format!(
            "list: the {name} agent used {per_call:.1} ms of CPU per GET /v1/processes (utime + \
             stime over {rounds} back-to-back calls of {wall:.1} ms wall each, less its \
             background of {background:.1} % of a core measured just before)"
        ));
    }
    report.notes.push(format!(
        "list: {n} records ({stopped} Stopped) spun with {} in flight in {:.1} s ({:.0}/s; the \
         first 1000 took {:.1} s, the last 1000 {:.1} s), all final after {:.1} s, all copied \
         to the root after {:.1} s",
        options.concurrency,
        spun_in.as_secs_f64(),
        n as f64 / spun_in.as_secs_f64(),
        first_thousand.as_secs_f64(),
        last_thousand.as_secs_f64(),
        final_in.as_secs_f64(),
        copied_in.as_secs_f64()
    ));
    Ok(())
}

/// Encode and parse times of one kind of answer, and its size.
#[derive(Debug, Default)]
struct Codec {
    encode: Vec<Duration>,
    parse: Vec<Duration>,
    bytes: usize,
}

impl Codec {
    /// Times `encode` (a `serde_json::to_vec`); returns its bytes.
    fn measure_encode(
        &mut self,
        encode: impl FnOnce() -> serde_json::Result<Vec<u8>>,
        counted: bool,
    ) -> Result<Vec<u8>> {
        let t = Instant::now();
        let bytes = encode()?;
        if counted {
            self.encode.push(t.elapsed());
        }
        self.bytes = bytes.len();
        Ok(bytes)
    }

    /// Times `parse` (a `serde_json::from_slice` of `len` bytes).
    fn measure_parse<T>(
        &mut self,
        parse: impl FnOnce() -> serde_json::Result<T>,
        len: usize,
        counted: bool,
    ) -> Result<T> {
        let t = Instant::now();
        let value = parse()?;
        if counted {
            self.parse.push(t.elapsed());
        }
        self.bytes = len;
        Ok(value)
    }

    fn encode(&self) -> Sample {
        Sample::new(self.encode.clone())
    }

    fn parse(&self) -> Sample {
        Sample::new(self.parse.clone())
    }
}

/// `perf record` of one agent (`--perf`); killed on drop if not finished.
struct Perf {
    child: Option<Child>,
    data: PathBuf,
}

impl Perf {
    fn attach(pid: u32, prefix: &str) -> Result<Perf> {
        let data = PathBuf::from(format!("{prefix}.data"));
        let child = Command::new("perf")
            .args([
                "record",
                "-F",
                "999",
                "--call-graph",
                "dwarf,16384",
                "-q",
                "-o",
            ])
            .arg(&data)
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("run perf record")?;
        // Give it time to attach to every thread.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Perf {
            child: Some(child),
            data,
        })
    }

    /// Stops recording (SIGINT makes perf write its file) and returns the top symbols; the
    /// whole report goes next to the data file.
    fn finish(mut self) -> Result<String> {
        let mut child = self.child.take().context("perf already finished")?;
        procs::signal(child.id(), Signal::SIGINT);
        child.wait()?;
        let report = |args: &[&str]| -> Result<String> {
            let out = Command::new("perf")
                .args(["report", "--no-children", "--stdio", "-i"])
                .arg(&self.data)
                .args(args)
                .stderr(Stdio::null())
                .output()
                .context("run perf report")?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let text = report(&["--sort", "dso,symbol", "-g", "none"])?;
        let path = self.data.with_extension("txt");
        std::fs::write(&path, &text)?;
        // Who calls the hottest functions (memmove, malloc, ...): the call chains.
        let callers = report(&[
            "--sort",
            "symbol",
            "-g",
            "caller,0.5,callee,function,percent",
            "--percent-limit",
            "3",
        ])?;
        std::fs::write(self.data.with_extension("callers.txt"), callers)?;
        // Inclusive shares of the parts of a list call (and of the background sync).
        let inclusive = report(&["--children", "--sort", "symbol", "-g", "none"])?;
        std::fs::write(self.data.with_extension("children.txt"), &inclusive)?;
        let parts = [
            ("Supervisor::listed", "node::supervisor::Supervisor::listed"),
            ("Records::listed", "records::Records::listed"),
            ("json_array", "records::listing::json_array"),
            (
                "Process::clone",
                "p2f_model::process::Process as core::clone::Clone>::clone",
            ),
            ("sort", "driftsort_main"),
            (
                "Json encode",
                "axum::json::Json<T> as axum_core::response::into_response::IntoResponse",
            ),
            ("hyper write (TLS, socket)", "Buffered<T,B>::poll_flush"),
            ("digest decode", "ProcessDigest"),
            (
                "free",
                "drop_in_place<alloc::vec::Vec<p2f_model::process::Process>>",
            ),
            ("background: records::sync", "records::sync::sync"),
            ("background: records::publish", "records::publish::publish"),
        ];
        let shares: Vec<String> = parts
            .iter()
            .filter_map(|(name, pattern)| {
                let line = inclusive
                    .lines()
                    .find(|l| !l.starts_with('#') && l.contains(pattern))?;
                Some(format!("{name} {}", line.split_whitespace().next()?))
            })
            .collect();
        let top: Vec<String> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && l.contains('%'))
            .take(12)
            .map(|l| {
                let words: Vec<&str> = l.split_whitespace().filter(|w| *w != "-").collect();
                words.join(" ")
            })
            .collect();
        Ok(format!(
            "inclusive: {}; self: {}; the whole report is in {} (call chains in \
             *.callers.txt, inclusive in *.children.txt)",
            shares.join(", "),
            top.join("; "),
            path.display()
        ))
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
