//! Benchmark of the node agent (DESIGN.md §9): spin latency (API call → `Running`) against
//! spawning the same command directly, the first restart after a crash, and the agent's idle
//! RSS and CPU with 0 and with 50 supervised processes — each against a real release
//! `p2f node run` process on 127.0.0.1, each beside its baseline from the same run.
//!
//! Run it with `bash bench/agent/run.sh`, which builds `p2f` and this example in release and
//! passes `--p2f`. By hand:
//!
//! ```text
//! cargo run --release --example bench_agent -- --p2f target/release/p2f \
//!     [--data-root /var/tmp] [--spins 200] [--restarts 20] [--procs 50] [--idle-secs 30] \
//!     [--only spin,restart,idle] [--strace FILE]
//! ```
//!
//! The agents are `p2f_testkit::Agent`s, the harness the integration tests use, with the
//! default settings a user gets. Every process the run starts carries
//! `P2F_TESTKIT_RUN=<a dir under its temp dir>` in its environment (the agent's children inherit
//! it) and is killed by pid when the run ends, also on error, panic, Ctrl-C or SIGTERM.
//! `bench_agent sweep DIR` kills whatever a SIGKILLed run left under `DIR`.
//! `bench_agent listen PORT` is the tiny TCP listener the idle benchmark supervises.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use p2f::core::wire::{SpinQuery, SpinRequest};
use p2f::model::{EventKind, Health, Process, ProcessId, ProcessKey, ProcessSpec, Status};
use p2f_testkit::procs::{self, MARKER, Signal, Stat, sweep};
use p2f_testkit::{Agent, service_port};

mod bench_common;
use bench_common::{
    CALL_TIMEOUT, Report, Sample, call, load_average, ms, run_interruptible, verdict,
};

/// Spins (and direct spawns) done first and not counted: TLS handshake, page cache, allocator.
const WARM_UP: usize = 5;
/// The longest a restart may take before the trial counts as failed.
const RESTART_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the restart trial polls the record.
const POLL: Duration = Duration::from_millis(1);
#[derive(Debug, Clone)]
struct Options {
    p2f: PathBuf,
    data_root: PathBuf,
    spins: usize,
    restarts: usize,
    procs: usize,
    idle: Duration,
    only: Vec<String>,
    /// Where `--strace` writes the agent's syscall table; `None`: no strace.
    strace: Option<PathBuf>,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Options> {
        let mut options = Options {
            p2f: PathBuf::new(),
            data_root: PathBuf::from("/var/tmp"),
            spins: 200,
            restarts: 20,
            procs: 50,
            idle: Duration::from_secs(30),
            only: vec!["spin".into(), "restart".into(), "idle".into()],
            strace: None,
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
                "--spins" => options.spins = number()?,
                "--restarts" => options.restarts = number()?,
                "--procs" => options.procs = number()?,
                "--idle-secs" => options.idle = Duration::from_secs(number()? as u64),
                "--only" => options.only = value.split(',').map(str::to_owned).collect(),
                "--strace" => options.strace = Some(PathBuf::from(&value)),
                other => bail!("unknown option {other}"),
            }
        }
        ensure!(
            options.p2f.is_file(),
            "--p2f must name the p2f binary (got {:?})",
            options.p2f
        );
        Ok(options)
    }

    fn runs(&self, part: &str) -> bool {
        self.only.iter().any(|p| p == part)
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("listen") => listen(&args.next().context("listen PORT")?),
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

/// `listen PORT`: accepts and drops TCP connections on 127.0.0.1:PORT until killed.
fn listen(port: &str) -> Result<()> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port.parse::<u16>()?))?;
    for stream in listener.incoming() {
        drop(stream);
    }
    Ok(())
}

async fn run(options: Options) -> Result<()> {
    let p2f = std::fs::canonicalize(&options.p2f)?;
    std::fs::create_dir_all(&options.data_root)?;
    let scratch = tempfile::Builder::new()
        .prefix("p2f-bench-agent-")
        .tempdir_in(&options.data_root)?;
    println!(
        "data dirs under {} (load average before: {})",
        scratch.path().display(),
        load_average()
    );
    let mut report = Report::new("agent", "baseline (same run)");

    if options.runs("spin") || options.runs("restart") {
        let agent = start_agent(&p2f, &scratch.path().join("spin")).await?;
        if options.runs("spin") {
            let result = spin_latency(&agent, &options, &mut report).await;
            with_log(&agent, result)?;
        }
        if options.runs("restart") {
            let result = restart(&agent, &options, &mut report).await;
            with_log(&agent, result)?;
        }
        let rss = usage(&agent).map(|u| u.rss_kib).unwrap_or(0);
        report.notes.push(format!(
            "agent RSS after the spin and restart runs (0 processes left): {}",
            mib(rss)
        ));
    }
    if options.runs("idle") {
        // A fresh agent, so its 0-process figure is the agent as a user starts it.
        let agent = start_agent(&p2f, &scratch.path().join("idle")).await?;
        let result = idle(&agent, &options, &mut report).await;
        with_log(&agent, result)?;
    }
    report
        .notes
        .push(format!("load average after: {}", load_average()));
    report.print();
    Ok(())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// `p2f init` then `p2f node run` with the default configuration in `dir`; its API answers.
/// Dropping it SIGKILLs the agent and every process it started.
async fn start_agent(p2f: &Path, dir: &Path) -> Result<Agent> {
    Agent::builder("bench")
        .p2f(p2f)
        .dir(dir)
        .init()?
        .started()
        .await
}

/// The agent's pid (it runs).
fn pid(agent: &Agent) -> Result<u32> {
    agent.pid().context("the agent does not run")
}

/// Spins `spec` and waits until it runs; fails unless it does.
async fn spin_running(agent: &Agent, spec: &ProcessSpec) -> Result<Process> {
    let process = call(
        "spin",
        agent
            .try_network()?
            .spin(&spin_request(spec), SpinQuery { wait: true }),
    )
    .await?;
    ensure!(
        process.status == Status::Running && process.pid.is_some(),
        "spin did not reach Running: {process:?}"
    );
    Ok(process)
}

async fn remove(agent: &Agent, id: &ProcessId) -> Result<()> {
    call("remove", agent.try_network()?.remove_process(id)).await
}

async fn info(agent: &Agent, id: &ProcessId) -> Result<Option<Process>> {
    call(
        "info",
        agent
            .try_network()?
            .process_information(ProcessKey::Id(id.clone())),
    )
    .await
}

/// The agent's RSS and CPU time now.
fn usage(agent: &Agent) -> Result<Usage> {
    Usage::of(pid(agent)?)
}

/// `result`, with the end of the agent's log added to an error.
fn with_log<T>(agent: &Agent, result: Result<T>) -> Result<T> {
    result.map_err(|e| e.context(agent.log_tail(30)))
}

fn spin_request(spec: &ProcessSpec) -> SpinRequest {
    SpinRequest {
        spec: spec.clone(),
        id: None,
        generation: None,
        moved_from: None,
        external: None,
    }
}

/// Children this run spawned itself (the direct-spawn baseline): each is killed (its whole
/// group) and reaped on drop.
#[derive(Default)]
struct Children(Vec<Child>);

impl Children {
    fn reap_all(&mut self) {
        for mut child in self.0.drain(..) {
            procs::signal_group(child.id(), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.reap_all();
    }
}

/// Figure 1: API call → `Running`, against spawning `sh -c 'exec sleep 1000'` directly, with
/// the parts it is made of measured in the same loop (interleaved, so load hits all alike).
///
/// Longer than 100 lines on purpose: one benchmark's protocol, step by step (set up, measure
/// the figure and its parts interleaved, clean up), read top to bottom against BENCHMARKS.md;
/// split up, the order of the measurements would no longer be visible in one place.
async fn spin_latency(agent: &Agent, options: &Options, report: &mut Report) -> Result<()> {
    let spec = ProcessSpec::new("spin", "exec sleep 1000").with_health(Health::None);
    let missing = ProcessId::for_service("absent", 1);
    let probe_path = agent.config().data_dir.join("fsync-probe");
    let mut probe = File::create(&probe_path)?;
    let block = vec![7u8; 4096];
    let mut children = Children::default();
    let direct_log = File::create(agent.dir().join("direct.log"))?;

    let mut wait = Vec::new();
    let mut no_wait = Vec::new();
    let mut round_trip = Vec::new();
    let mut direct = Vec::new();
    let mut fsync = Vec::new();
    let (mut agent_cpu, mut agent_wait, mut agent_slices) = (Vec::new(), Vec::new(), Vec::new());
    let (mut client_wait, mut child_wait, mut direct_child_wait) =
        (Vec::new(), Vec::new(), Vec::new());
    let me = std::process::id();
    let mut strace: Option<Child> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    for i in 0..WARM_UP + options.spins {
        ensure!(Instant::now() < deadline, "spin loop exceeded 10 minutes");
        let counted = i >= WARM_UP;
        if i == WARM_UP
            && let Some(out) = &options.strace
        {
            strace = Some(attach_strace(agent, out)?);
        }

        // An API round trip that touches no record: GET of an id that does not exist (404).
        let t = Instant::now();
        let found = info(agent, &missing).await?;
        let rtt = t.elapsed();
        ensure!(found.is_none(), "{missing} exists");

        // The record is on disk (`Pending`): spin without `wait`.
        let t = Instant::now();
        let pending = call(
            "spin",
            agent
                .try_network()?
                .spin(&spin_request(&spec), SpinQuery { wait: false }),
        )
        .await?;
        let recorded = t.elapsed();
        wait_running(agent, &pending.id).await?;
        remove(agent, &pending.id).await?;

        // The figure: API call → `Running`, with what the scheduler saw meanwhile (read
        // outside the timed span).
        let (agent_before, me_before) = (Sched::of_process(pid(agent)?), Sched::of_process(me));
        let t = Instant::now();
        let running = spin_running(agent, &spec).await?;
        let spun = t.elapsed();
        let (agent_sched, me_sched) = (
            Sched::of_process(pid(agent)?).since(agent_before),
            Sched::of_process(me).since(me_before),
        );
        let child_sched = Sched::of_thread(running.pid.context("no pid")?);
        remove(agent, &running.id).await?;

        // Baseline: the same command spawned directly, the way the agent does it.
        let t = Instant::now();
        let child = Command::new("sh")
            .args(["-c", "exec sleep 1000"])
            .env(MARKER, agent.dir())
            .stdin(Stdio::null())
            .stdout(direct_log.try_clone()?)
            .stderr(direct_log.try_clone()?)
            .process_group(0)
            .spawn()?;
        let spawned = t.elapsed();
        let direct_child_sched = Sched::of_thread(child.id());
        children.0.push(child);
        children.reap_all();

        // One durable 4 KiB write on the data dir's filesystem.
        let t = Instant::now();
        probe.rewind()?;
        probe.write_all(&block)?;
        probe.sync_data()?;
        let synced = t.elapsed();

        if counted {
            round_trip.push(rtt);
            no_wait.push(recorded);
            wait.push(spun);
            direct.push(spawned);
            fsync.push(synced);
            agent_cpu.push(agent_sched.cpu);
            agent_wait.push(agent_sched.wait);
            agent_slices.push(agent_sched.slices);
            client_wait.push(me_sched.wait);
            child_wait.push(child_sched.wait);
            direct_child_wait.push(direct_child_sched.wait);
        }
    }
    if let Some(strace) = strace {
        report.notes.push(detach_strace(
            strace,
            options.strace.as_deref().context("strace")?,
            options.spins,
        )?);
    }
    let _ = std::fs::remove_file(&probe_path);

    let (wait, direct) = (Sample::new(wait), Sample::new(direct));
    let overhead = wait.pct(50.0).saturating_sub(direct.pct(50.0));
    report.row(
        "spin latency, API call → Running (p50 / p99 / max)",
        wait.ms_p99(),
        format!("direct spawn: {}", direct.ms_p99()),
        "overhead ≤ 5 ms p50",
        &format!(
            "{} (overhead {} ms)",
            verdict(overhead <= Duration::from_millis(5)),
            ms(overhead)
        ),
    );
    report.row(
        "  part: spin without wait (record Pending on disk)",
        Sample::new(no_wait).ms_p99(),
        String::new(),
        "",
        "",
    );
    report.row(
        "  part: API round trip, no write (GET, 404)",
        Sample::new(round_trip).ms_p99(),
        String::new(),
        "",
        "",
    );
    report.row(
        "  part: one 4 KiB write + fdatasync in the data dir",
        Sample::new(fsync).ms_p99(),
        String::new(),
        "",
        "",
    );
    report.row(
        "  during a spin: agent threads on a CPU",
        Sample::new(agent_cpu).ms_p99(),
        String::new(),
        "",
        "",
    );
    report.row(
        "  during a spin: agent threads runnable, waiting for a CPU",
        Sample::new(agent_wait).ms_p99(),
        String::new(),
        "",
        "",
    );
    report.row(
        "  during a spin: the new sh waiting for a CPU (before it ran)",
        Sample::new(child_wait).ms_p99(),
        format!("direct: {}", Sample::new(direct_child_wait).ms_p99()),
        "",
        "",
    );
    report.row(
        "  during a spin: this client's threads waiting for a CPU",
        Sample::new(client_wait).ms_p99(),
        String::new(),
        "",
        "",
    );
    agent_slices.sort_unstable();
    report.notes.push(format!(
        "agent threads were put on a CPU {} times per spin (median; {} at p99)",
        agent_slices
            .get(agent_slices.len() / 2)
            .copied()
            .unwrap_or(0),
        agent_slices
            .get((agent_slices.len() * 99).div_ceil(100).saturating_sub(1))
            .copied()
            .unwrap_or(0)
    ));
    Ok(())
}

/// Polls the record until it is `Running`.
async fn wait_running(agent: &Agent, id: &ProcessId) -> Result<Process> {
    let deadline = Instant::now() + CALL_TIMEOUT;
    loop {
        if let Some(process) = info(agent, id).await?
            && process.status == Status::Running
        {
            return Ok(process);
        }
        ensure!(Instant::now() < deadline, "{id} did not reach Running");
        tokio::time::sleep(POLL).await;
    }
}

/// `strace -f -c` on the agent, for a count and time of its system calls during the spins
/// (it slows the agent down: the latencies of such a run are not the benchmark's).
fn attach_strace(agent: &Agent, out: &Path) -> Result<Child> {
    let child = Command::new("strace")
        .args(["-f", "-c", "-w", "-o"])
        .arg(out)
        .args(["-p", &pid(agent)?.to_string()])
        .env(MARKER, agent.dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("run strace")?;
    // Give it time to attach to every thread.
    std::thread::sleep(Duration::from_millis(500));
    Ok(child)
}

/// Stops strace (SIGINT makes it write its table) and sums up the calls that make a spin
/// durable and start its process.
fn detach_strace(mut strace: Child, out: &Path, iterations: usize) -> Result<String> {
    procs::signal(strace.id(), Signal::SIGINT);
    strace.wait()?;
    let text = std::fs::read_to_string(out)?;
    let calls = |name: &str| -> Option<(u64, f64)> {
        // % time, seconds, usecs/call, calls, [errors,] syscall
        let line = text
            .lines()
            .find(|l| l.split_whitespace().last() == Some(name))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        Some((fields.get(3)?.parse().ok()?, fields.get(1)?.parse().ok()?))
    };
    let per = |name: &str| match calls(name) {
        Some((n, seconds)) => format!(
            "{name} {:.1} calls ({:.0} µs each)",
            n as f64 / iterations as f64,
            seconds * 1e6 / n.max(1) as f64
        ),
        None => format!("{name} 0 calls"),
    };
    Ok(format!(
        "strace -f -c -w of the agent, per loop iteration (a spin without wait and its removal, a \
         spin with wait and its removal, a GET): {}, {}, {}; the table is in {}",
        per("fdatasync"),
        per("fsync"),
        per("clone3"),
        out.display()
    ))
}

/// Figure 2: SIGKILL a running process; time until its record is `Running` with a new pid.
async fn restart(agent: &Agent, options: &Options, report: &mut Report) -> Result<()> {
    let spec = ProcessSpec::new("crashy", "exec sleep 1000").with_health(Health::None);
    let mut noticed = Vec::new();
    let mut back = Vec::new();
    let mut delays = BTreeMap::<u64, usize>::new();
    let mut agent_side = Vec::new();
    for _ in 0..options.restarts {
        let process = spin_running(agent, &spec).await?;
        let old = process.pid.context("no pid")?;
        let t = Instant::now();
        procs::signal(old, Signal::SIGKILL);
        let mut seen_down = None;
        let record = loop {
            let record = info(agent, &process.id).await?.context("record vanished")?;
            if record.status != Status::Running && seen_down.is_none() {
                seen_down = Some(t.elapsed());
            }
            if record.status == Status::Running && record.pid.is_some_and(|p| p != old) {
                break record;
            }
            ensure!(
                t.elapsed() < RESTART_TIMEOUT,
                "no restart within {RESTART_TIMEOUT:?}: {record:?}"
            );
            tokio::time::sleep(POLL).await;
        };
        back.push(t.elapsed());
        noticed.push(seen_down.unwrap_or_default());
        for event in &record.events {
            if let EventKind::Restarted { delay_ms, .. } = event.kind {
                *delays.entry(delay_ms).or_default() += 1;
            }
        }
        // The agent's own account: from the recorded exit to the recorded start, less the delay.
        let at = |want: fn(&EventKind) -> bool| {
            record
                .events
                .iter()
                .rev()
                .find(|e| want(&e.kind))
                .map(|e| e.at.0)
        };
        if let (Some(exited), Some(started)) = (
            at(|k| matches!(k, EventKind::Exited { .. })),
            at(|k| matches!(k, EventKind::Started { .. })),
        ) {
            agent_side.push(Duration::from_millis(started.saturating_sub(exited)));
        }
        remove(agent, &process.id).await?;
    }
    let back = Sample::new(back);
    let noticed = Sample::new(noticed);
    report.row(
        "restart after SIGKILL → Running, new pid (p50 / p99 / max)",
        back.ms_p99(),
        String::new(),
        "first restart ≤ 150 ms",
        verdict(back.max() <= Duration::from_millis(150)),
    );
    report.row(
        "  part: SIGKILL → record no longer Running",
        noticed.ms_p99(),
        String::new(),
        "",
        "",
    );
    if !agent_side.is_empty() {
        report.row(
            "  part: the record's exit event → its start event (ms clock)",
            Sample::new(agent_side).ms_p99(),
            String::new(),
            "",
            "",
        );
    }
    report.notes.push(format!(
        "restart delays the agent recorded (ms → count): {delays:?}; each trial is a fresh \
         process's first restart (later restarts in a row wait 200, 400, … ms)"
    ));
    Ok(())
}

/// The agent's memory and CPU time, from `/proc/PID/status` and `/proc/PID/stat`.
#[derive(Debug, Clone, Copy)]
struct Usage {
    rss_kib: u64,
    /// The anonymous part of it (heap, stacks): what the agent itself allocated.
    anon_kib: u64,
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    threads: u64,
}

impl Usage {
    fn of(pid: u32) -> Result<Usage> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
            Ok(line
                .split_whitespace()
                .nth(1)
                .context("empty field")?
                .parse()?)
        };
        let stat = Stat::of(pid).with_context(|| format!("no /proc/{pid}/stat"))?;
        Ok(Usage {
            rss_kib: field("VmRSS:")?,
            anon_kib: field("RssAnon:")?,
            cpu_ticks: stat.cpu_ticks,
            threads: field("Threads:")?,
        })
    }
}

/// Scheduler accounting of a process (summed over its threads) from `/proc/PID/task/*/schedstat`:
/// time on a CPU, time runnable but waiting for one, and how many times it was put on one.
#[derive(Debug, Clone, Copy, Default)]
struct Sched {
    cpu: Duration,
    wait: Duration,
    slices: u64,
}

impl Sched {
    /// Every thread of `pid` (threads that exit take their share with them).
    fn of_process(pid: u32) -> Sched {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Sched::default();
        };
        tasks
            .filter_map(|task| Sched::read(&task.ok()?.path().join("schedstat")))
            .fold(Sched::default(), |a, b| Sched {
                cpu: a.cpu + b.cpu,
                wait: a.wait + b.wait,
                slices: a.slices + b.slices,
            })
    }

    /// The main thread of `pid` only (a child that is still single-threaded).
    fn of_thread(pid: u32) -> Sched {
        Sched::read(Path::new(&format!("/proc/{pid}/schedstat"))).unwrap_or_default()
    }

    fn read(path: &Path) -> Option<Sched> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
        Some(Sched {
            cpu: Duration::from_nanos(fields.next()??),
            wait: Duration::from_nanos(fields.next()??),
            slices: fields.next()??,
        })
    }

    fn since(self, before: Sched) -> Sched {
        Sched {
            cpu: self.cpu.saturating_sub(before.cpu),
            wait: self.wait.saturating_sub(before.wait),
            slices: self.slices.saturating_sub(before.slices),
        }
    }
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100)
}

/// What one idle window measured.
#[derive(Debug)]
struct Idle {
    rss_end_kib: u64,
    rss_max_kib: u64,
    anon_end_kib: u64,
    cpu_percent: f64,
    ticks: u64,
    threads: u64,
}

/// Samples the agent every second for `length` without calling its API.
async fn idle_window(agent: &Agent, length: Duration) -> Result<Idle> {
    let start = usage(agent)?;
    let t = Instant::now();
    let mut rss_max = start.rss_kib;
    let mut last = start;
    while t.elapsed() < length {
        tokio::time::sleep(Duration::from_secs(1).min(length)).await;
        last = usage(agent)?;
        rss_max = rss_max.max(last.rss_kib);
    }
    let elapsed = t.elapsed().as_secs_f64();
    let ticks = last.cpu_ticks - start.cpu_ticks;
    Ok(Idle {
        rss_end_kib: last.rss_kib,
        rss_max_kib: rss_max,
        anon_end_kib: last.anon_kib,
        cpu_percent: ticks as f64 / clock_ticks() as f64 / elapsed * 100.0,
        ticks,
        threads: last.threads,
    })
}

/// Figure 3: the agent's RSS and CPU with 0 processes (baseline), then with `procs` of them,
/// half of them TCP listeners checked by the default Tcp health check.
///
/// Longer than 100 lines on purpose: one benchmark's protocol, step by step (set up, measure
/// the figure and its parts interleaved, clean up), read top to bottom against BENCHMARKS.md;
/// split up, the order of the measurements would no longer be visible in one place.
async fn idle(agent: &Agent, options: &Options, report: &mut Report) -> Result<()> {
    let settings = &agent.config().supervisor;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let empty = idle_window(agent, options.idle).await?;

    let me = std::fs::canonicalize(std::env::current_exe()?)?;
    let mut ids = Vec::new();
    let mut listeners = Vec::new();
    let t = Instant::now();
    for i in 0..options.procs {
        let spec = if i % 2 == 0 {
            ProcessSpec::new(format!("idle{i}"), "exec sleep 1000").with_health(Health::None)
        } else {
            // The default health check of a process with a port is Tcp.
            ProcessSpec::new(
                format!("listener{i}"),
                format!("exec '{}' listen $PORT", me.display()),
            )
            .with_port(service_port())
        };
        let process = spin_running(agent, &spec).await?;
        if spec.port().is_some() {
            listeners.push(process.id.clone());
        }
        ids.push(process.id);
    }
    let spin_all = t.elapsed();
    // Settle: every listener passed a health check, every process has a memory figure.
    let deadline = Instant::now() + settings.health_interval * 4 + Duration::from_secs(10);
    loop {
        let all = call("list", agent.try_network()?.list_processes()).await?;
        let healthy = all
            .iter()
            .filter(|p| p.events.iter().any(|e| e.kind == EventKind::Healthy))
            .count();
        let measured = all.iter().filter(|p| p.memory_bytes > 0).count();
        let running = all.iter().filter(|p| p.is_running()).count();
        ensure!(
            running == ids.len(),
            "only {running} of {} processes run",
            ids.len()
        );
        if healthy == listeners.len() && measured == ids.len() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "not settled: {healthy}/{} healthy, {measured}/{} measured",
            listeners.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let busy = idle_window(agent, options.idle).await?;
    let all = call("list", agent.try_network()?.list_processes()).await?;
    ensure!(
        all.iter().filter(|p| p.is_running()).count() == ids.len(),
        "a process stopped running during the idle window"
    );
    let t = Instant::now();
    for id in &ids {
        remove(agent, id).await?;
    }
    let remove_all = t.elapsed();

    let intervals = format!(
        "health every {}, memory every {}",
        p2f::model::format_duration(settings.health_interval),
        p2f::model::format_duration(settings.memory_interval)
    );
    report.row(
        &format!(
            "agent idle RSS, {} processes ({} Tcp-checked listeners)",
            ids.len(),
            listeners.len()
        ),
        format!(
            "{} (max {} over {} s)",
            mib(busy.rss_end_kib),
            mib(busy.rss_max_kib),
            options.idle.as_secs()
        ),
        format!(
            "0 processes: {} (max {})",
            mib(empty.rss_end_kib),
            mib(empty.rss_max_kib)
        ),
        "≤ 20 MB (k3s agent ≈ 275 MB, Nomad ≈ 50 MB+)",
        verdict(busy.rss_max_kib * 1024 <= 20_000_000),
    );
    report.row(
        &format!("agent idle CPU, {} processes ({intervals})", ids.len()),
        format!(
            "{:.2} % of a core ({} ticks in {} s)",
            busy.cpu_percent,
            busy.ticks,
            options.idle.as_secs()
        ),
        format!(
            "0 processes: {:.2} % ({} ticks)",
            empty.cpu_percent, empty.ticks
        ),
        "~0 %",
        verdict(busy.cpu_percent < 0.5),
    );
    report.notes.push(format!(
        "idle agent: RssAnon (its heap and stacks; the rest of VmRSS is the mapped binary and \
         libraries) {} with 0 processes, {} with {}",
        mib(empty.anon_end_kib),
        mib(busy.anon_end_kib),
        ids.len()
    ));
    report.notes.push(format!(
        "idle agent: {} threads with 0 processes, {} with {}; spinning the {} took {:.1} s \
         (sequential, wait=true), removing them {:.1} s",
        empty.threads,
        busy.threads,
        ids.len(),
        ids.len(),
        spin_all.as_secs_f64(),
        remove_all.as_secs_f64()
    ));
    Ok(())
}
