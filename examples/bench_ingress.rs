//! Benchmark of the root's ingress (issue 12, "Benchmarks"), each figure beside its baseline
//! from the same run:
//!
//! - **throughput**: requests/s and p50/p99 latency of a small response (`hello from root`,
//!   from `bench_ingress backend PORT`, a one-thread hyper server on 127.0.0.1 that the root
//!   supervises) through the root's ingress, Debian's nginx and Debian's Caddy, each proxying
//!   that same backend, measured with Debian's `wrk` at the same connection count, plain HTTP
//!   and HTTPS, back to back. The ingress reaches the backend, a process of the root itself,
//!   directly on loopback (after checking it with the root's supervisor), as nginx and Caddy
//!   do; with `--tunnel on` (the default) a second root, started with `P2F_INGRESS_DIRECT=0`
//!   and a backend of its own, is measured too: its ingress goes through its agent's tunnel
//!   (TLS to the node's own API, `Upgrade: p2f-tunnel`, spliced to the port), the path every
//!   process took before the direct one and the one a process on another node takes; with
//!   `--shared on` (the default) another root, with `[ingress] workers = 0`, serves its
//!   connections on the agent's own runtime rather than on worker threads of its own; with
//!   `--variant PATH`, a root run by another `p2f` (a build of another commit, or a script
//!   running one with other settings) is measured beside them, as `ingress/variant`.
//! - **failover**: a client asks the domain (HTTPS) every 50 ms, each request on its own, while
//!   the member running the service is SIGKILLed (agent and processes); errors, and the time
//!   from the new copy's `Healthy` event to the first answer from the new node.
//! - **idle**: the root's RSS with N idle client connections (each made one request and stays
//!   open), TLS and plain, against the same root before them.
//!
//! Run it with `bash bench/ingress/run.sh`, which builds `p2f` and this example in release and
//! passes `--p2f`. By hand:
//!
//! ```text
//! cargo run --release --example bench_ingress -- --p2f target/release/p2f \
//!     [--data-root /var/tmp] [--conns 64] [--threads 2] [--secs 10] [--rounds 2] \
//!     [--trials 3] [--idle-conns 1000] [--tunnel on] [--shared on] [--variant PATH]
//!     [--only throughput,failover,idle]
//! ```
//!
//! For a look at the idle part's root: `BENCH_INGRESS_SMAPS=DIR` copies its
//! `/proc/PID/{smaps,smaps_rollup,status}` to `DIR` at each RSS reading, and
//! `BENCH_INGRESS_ROOT_WRAP="heaptrack -o FILE"` (any command prefix) runs its `p2f node run`
//! under that command; `BENCH_INGRESS_HOLD=SECS` keeps each root up that long after the reading
//! with the connections open (they stay open too).
//!
//! Everything the run starts is on loopback and carries `P2F_TESTKIT_RUN=<a dir under its
//! temp dir>`; agents and their processes are killed by pid when the run ends (also on error,
//! Ctrl-C or SIGTERM), nginx, Caddy and wrk run in process groups of their own, killed by
//! group, whose ids are also listed in `DIR/pgids` for the script to sweep if this example is
//! itself SIGKILLed (nginx overwrites its environment with its process title, so its workers
//! cannot be found by the marker). `bench_ingress sweep DIR` does that sweep.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures_util::StreamExt as _;
use p2f::core::cluster::client_config;
use p2f::core::wire::RouteInfo;
use p2f::model::{EventKind, Health, NodeName, ProcessId, ProcessKey, ProcessSpec};
use p2f_testkit::procs;
use p2f_testkit::{Agent, eventually, service_port};
use tokio::net::{TcpSocket, TcpStream};

mod bench_common;
/// The memory-inspection hooks (`BENCH_INGRESS_ROOT_WRAP`, `_SMAPS`, `_HOLD`).
const INSPECT: bench_common::memory::Inspect = bench_common::memory::Inspect("BENCH_INGRESS");
use bench_common::backend::{backend, get_once};
use bench_common::memory::{mib, open_fds, settled_rss};
use bench_common::spawned::{Cpu, Spawned, sweep};
use bench_common::wrk::{Wrk, WrkRun};
use bench_common::{Report, Sample, call, load_average, ms, run_interruptible, verdict};

/// The domain of the throughput and idle service: `localhost` resolves without touching
/// `/etc/hosts`, so wrk sends it as SNI, and the ingress certifies it from the cluster CA.
const DOMAIN: &str = "localhost";
/// The failover service's domain (the client resolves it itself).
const FAILOVER_DOMAIN: &str = "failover.home.arpa";
/// The longest a route may take to serve.
const ROUTE_LIMIT: Duration = Duration::from_secs(60);
/// The failover client's pace.
const TICK: Duration = Duration::from_millis(50);
/// The longest one failover request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Idle connections per source address (the ingress takes 256 from one address).
const PER_SOURCE: usize = 200;
/// The longest opening one idle connection (TCP, TLS, one GET) may take.
const OPEN_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Options {
    p2f: PathBuf,
    data_root: PathBuf,
    conns: usize,
    threads: usize,
    secs: u64,
    rounds: usize,
    trials: usize,
    idle_conns: usize,
    /// Whether the throughput part also measures a root whose ingress reaches its own
    /// processes through its agent's tunnel (`P2F_INGRESS_DIRECT=0`, the path before the
    /// direct one).
    tunnel: bool,
    /// Whether the throughput part also measures a root whose ingress serves its connections
    /// on the agent's own runtime (`[ingress] workers = 0`, as before the ingress had worker
    /// threads).
    shared: bool,
    /// Another `p2f` (a build of another commit, or a script that runs one with other
    /// settings) whose root's ingress is measured beside the others, as `ingress/variant`.
    variant: Option<PathBuf>,
    only: Vec<String>,
}

/// `on` or `off` (or yes/no, 1/0, true/false).
fn on_off(flag: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "yes" | "1" | "true" => Ok(true),
        "off" | "no" | "0" | "false" => Ok(false),
        other => bail!("{flag} on|off, not {other}"),
    }
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Options> {
        let mut options = Options {
            p2f: PathBuf::new(),
            data_root: PathBuf::from("/var/tmp"),
            conns: 64,
            threads: 2,
            secs: 10,
            rounds: 2,
            trials: 3,
            idle_conns: 1000,
            tunnel: true,
            shared: true,
            variant: None,
            only: vec!["throughput".into(), "failover".into(), "idle".into()],
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
                "--conns" => options.conns = number()?,
                "--threads" => options.threads = number()?,
                "--secs" => options.secs = number()? as u64,
                "--rounds" => options.rounds = number()?,
                "--trials" => options.trials = number()?,
                "--idle-conns" => options.idle_conns = number()?,
                "--tunnel" => options.tunnel = on_off(&flag, &value)?,
                "--shared" => options.shared = on_off(&flag, &value)?,
                "--variant" => options.variant = Some(PathBuf::from(&value)),
                "--only" => options.only = value.split(',').map(str::to_owned).collect(),
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
        Some("backend") => backend(
            std::net::Ipv4Addr::LOCALHOST.into(),
            args.next().context("backend PORT")?.parse()?,
        ),
        Some("sweep") => {
            let dir = PathBuf::from(args.next().context("sweep DIR")?);
            let killed = sweep(&dir);
            println!("killed {killed} leftover processes under {}", dir.display());
            Ok(())
        }
        first => {
            let options = Options::parse(first.map(str::to_owned).into_iter().chain(args))?;
            run_interruptible(run(options))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run

async fn run(options: Options) -> Result<()> {
    let temp = tempfile::Builder::new()
        .prefix("p2f-bench-ingress-")
        .tempdir_in(&options.data_root)?;
    let dir = temp.path().to_owned();
    let mut report = Report::new("P2F ingress", "baseline, same run");
    let result = async {
        if options.runs("throughput") {
            throughput(&options, &dir, &mut report).await?;
        }
        if options.runs("failover") {
            failover(&options, &dir, &mut report).await?;
        }
        if options.runs("idle") {
            idle(&options, &dir, &mut report).await?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    report.print();
    sweep(&dir);
    result
}

/// A root agent (defaults a user gets; plain HTTP served, not redirected) in `dir/name`.
async fn root(options: &Options, dir: &Path, name: &str) -> Result<Agent> {
    root_with(&options.p2f, dir, name, None).await
}

/// A root agent as [`root`], run by `p2f` (the binary, or a wrapper that sets its
/// environment), with `[ingress] workers` set when `workers` is.
async fn root_with(p2f: &Path, dir: &Path, name: &str, workers: Option<usize>) -> Result<Agent> {
    Agent::builder("root")
        .p2f(p2f)
        .dir(dir.join(name))
        .configure(move |config| {
            if let Some(ingress) = &mut config.ingress {
                ingress.redirect = false;
                if workers.is_some() {
                    ingress.workers = workers;
                }
            }
        })
        .init()?
        .started()
        .await
}

/// The backend as a service for `domain` on `pins`, checked over HTTP.
fn backend_spec(name: &str, domain: &str, pins: &[&str]) -> Result<ProcessSpec> {
    let exe = std::env::current_exe()?;
    let pins = pins
        .iter()
        .map(|n| NodeName::new(*n).map_err(|e| anyhow!("{e}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(
        ProcessSpec::new(name, format!("exec {} backend $PORT", exe.display()))
            .with_port(service_port())
            .with_domain(domain)
            .with_health(Health::Http("/health".into()))
            .with_pin(pins),
    )
}

/// The route of `domain` once `ready` holds; the ingress's HTTP and HTTPS addresses.
async fn route_when(
    root: &Agent,
    domain: &str,
    ready: impl Fn(&RouteInfo) -> bool,
) -> Result<(RouteInfo, SocketAddr, SocketAddr)> {
    eventually(&format!("a route for {domain}"), ROUTE_LIMIT, || {
        let network = root.network().clone();
        let ready = &ready;
        async move {
            let report = network.routes().await.ok()?;
            let route = report.routes.iter().find(|r| r.domain == domain)?.clone();
            let (http, https) = (report.http.parse().ok()?, report.https.parse().ok()?);
            ready(&route).then_some((route, http, https))
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Connections for checks and idle connections

/// A TCP connection to `to` from `from` (an address of 127.0.0.0/8).
async fn connect_from(from: std::net::IpAddr, to: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind((from, 0).into())?;
    Ok(socket.connect(to).await?)
}

/// TLS to `to` for `name`, trusting `ca_pem` (anything, for nginx and Caddy: they get a
/// certificate from the same CA).
async fn tls_to(
    connector: &tokio_rustls::TlsConnector,
    tcp: TcpStream,
    name: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls_pki_types::ServerName::try_from(name.to_owned())?;
    Ok(connector.connect(name, tcp).await?)
}

/// One GET to `addr` (TLS when `connector` is given) must answer `200` with `body`.
async fn check(
    what: &str,
    addr: SocketAddr,
    connector: Option<&tokio_rustls::TlsConnector>,
    body: &str,
) -> Result<()> {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await?;
        match connector {
            Some(c) => get_once(&mut tls_to(c, tcp, DOMAIN).await?, DOMAIN).await,
            None => get_once(&mut { tcp }, DOMAIN).await,
        }
    };
    let (status, got) = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("{what}: no answer"))?
        .with_context(|| what.to_owned())?;
    ensure!(
        status.contains(" 200") && got == body,
        "{what}: {status} {got:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Throughput and latency

/// One proxy under test: its URL base, the process groups whose CPU is its own, and its
/// backend's; a TLS client trusting its certificate (for the checks; wrk verifies nothing).
struct Proxy {
    name: &'static str,
    http: SocketAddr,
    https: SocketAddr,
    cpu: Cpu,
    backend: Cpu,
    verify: tokio_rustls::TlsConnector,
}

/// Runs wrk against `url` for `secs` (after a 2 s warm-up), with the CPU of `proxy` and
/// `backend` over the measured run.
async fn wrk(options: &Options, dir: &Path, url: &str, proxy: Cpu, backend: Cpu) -> Result<Wrk> {
    let run = WrkRun {
        threads: options.threads,
        conns: options.conns,
        secs: options.secs,
        extra: &[],
        netns: None,
    };
    bench_common::wrk::wrk(dir, &run, url, proxy, backend).await
}

fn nginx_conf(dir: &Path, backend: u16, http: u16, https: u16) -> String {
    let d = dir.display();
    format!(
        "worker_processes 2;\n\
         daemon off;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 client_body_temp_path {d}/nginx-tmp;\n\
         \x20 proxy_temp_path {d}/nginx-tmp;\n\
         \x20 upstream backend {{ server 127.0.0.1:{backend}; keepalive 128; }}\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{http};\n\
         \x20   listen 127.0.0.1:{https} ssl;\n\
         \x20   server_name {DOMAIN};\n\
         \x20   ssl_certificate {d}/site.pem;\n\
         \x20   ssl_certificate_key {d}/site.key;\n\
         \x20   location / {{\n\
         \x20     proxy_pass http://backend;\n\
         \x20     proxy_http_version 1.1;\n\
         \x20     proxy_set_header Connection \"\";\n\
         \x20     proxy_set_header Host $http_host;\n\
         \x20     proxy_set_header X-Forwarded-For $remote_addr;\n\
         \x20     proxy_set_header X-Forwarded-Proto $scheme;\n\
         \x20     proxy_set_header X-Forwarded-Host $http_host;\n\
         \x20   }}\n\
         \x20 }}\n\
         }}\n"
    )
}

fn caddyfile(dir: &Path, backend: u16, http: u16, https: u16) -> String {
    let d = dir.display();
    format!(
        "{{\n\
         \x20 admin off\n\
         \x20 auto_https off\n\
         \x20 storage file_system {d}/caddy-data\n\
         }}\n\
         http://{DOMAIN}:{http} {{\n\
         \x20 bind 127.0.0.1\n\
         \x20 reverse_proxy 127.0.0.1:{backend}\n\
         }}\n\
         https://{DOMAIN}:{https} {{\n\
         \x20 bind 127.0.0.1\n\
         \x20 tls {d}/site.pem {d}/site.key\n\
         \x20 reverse_proxy 127.0.0.1:{backend}\n\
         }}\n"
    )
}

/// A script in `dir` that runs `p2f` with `P2F_INGRESS_DIRECT=0`: its ingress reaches the
/// root's own processes through the agent's tunnel, as before the direct path.
fn through_agent_wrapper(p2f: &Path, dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let p2f = std::fs::canonicalize(p2f)?;
    let path = dir.join("p2f-through-agent");
    let quoted = p2f.display().to_string().replace('\'', "'\\''");
    std::fs::write(
        &path,
        format!("#!/bin/sh\nP2F_INGRESS_DIRECT=0 exec '{quoted}' \"$@\"\n"),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// A root serving the throughput backend: the agent, the backend's port and process group,
/// the ingress's HTTP and HTTPS addresses. `expect` is how its route must say the backend is
/// reached (`local →` or `agent root →`).
struct BenchRoot {
    agent: Agent,
    backend_port: u16,
    backend_pgid: u32,
    http: SocketAddr,
    https: SocketAddr,
}

async fn bench_root(
    p2f: &Path,
    dir: &Path,
    name: &str,
    expect: &str,
    workers: Option<usize>,
) -> Result<BenchRoot> {
    let agent = root_with(p2f, dir, name, workers).await?;
    let spec = backend_spec("bench", DOMAIN, &["root"])?;
    let backend_port = spec.port().context("port")?;
    let desired = call("deploy", agent.network().deploy(&[spec])).await?;
    let id = desired.services[0].id.clone();
    let (route, http, https) = route_when(&agent, DOMAIN, |r| r.upstream.is_some()).await?;
    let upstream = route.upstream.unwrap_or_default();
    println!("{name}: {DOMAIN} → {upstream}");
    ensure!(
        upstream.starts_with(expect),
        "{name}: the route says {upstream:?}, expected {expect}…"
    );
    let backend_pid = *agent.os_copies(&id).first().context("the backend's pid")?;
    let backend_pgid = procs::pgid_of(backend_pid).context("the backend's group")?;
    let root_pid = agent.pid().context("root pid")?;
    ensure!(
        procs::pgid_of(root_pid) != Some(backend_pgid),
        "the backend must not share the agent's process group"
    );
    Ok(BenchRoot {
        agent,
        backend_port,
        backend_pgid,
        http,
        https,
    })
}

/// A free port on 127.0.0.1 (bound and released: the proxies bind it right after).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn throughput(options: &Options, dir: &Path, report: &mut Report) -> Result<()> {
    println!("throughput: starting the root(s), the backend(s), nginx and Caddy");
    let direct = bench_root(&options.p2f, dir, "tp-root", "local →", None).await?;
    let shared = match options.shared {
        true => Some(bench_root(&options.p2f, dir, "tp-root-shared", "local →", Some(0)).await?),
        false => None,
    };
    let tunnel = match options.tunnel {
        true => {
            let wrapper = through_agent_wrapper(&options.p2f, dir)?;
            Some(bench_root(&wrapper, dir, "tp-root-tunnel", "agent root →", None).await?)
        }
        false => None,
    };
    let variant = match &options.variant {
        Some(p2f) => Some(bench_root(p2f, dir, "tp-root-variant", "local →", None).await?),
        None => None,
    };
    let (root, backend_port) = (&direct.agent, direct.backend_port);

    // nginx and Caddy get a certificate for the same name from the same CA (P-256, leaf only,
    // as the ingress presents).
    let (ca, _) = root.cluster().load()?;
    let site = ca.issue_site(DOMAIN, 30)?;
    std::fs::write(dir.join("site.pem"), &site.cert_pem)?;
    std::fs::write(dir.join("site.key"), &site.key_pem)?;
    std::fs::create_dir_all(dir.join("nginx-tmp"))?;
    let (nginx_http, nginx_https) = (free_port()?, free_port()?);
    std::fs::write(
        dir.join("nginx.conf"),
        nginx_conf(dir, backend_port, nginx_http, nginx_https),
    )?;
    let nginx = Spawned::start(
        dir,
        "nginx.log",
        Command::new("nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(dir),
    )?;
    let (caddy_http, caddy_https) = (free_port()?, free_port()?);
    std::fs::write(
        dir.join("Caddyfile"),
        caddyfile(dir, backend_port, caddy_http, caddy_https),
    )?;
    let caddy = Spawned::start(
        dir,
        "caddy.log",
        Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(dir.join("Caddyfile"))
            .env("HOME", dir)
            .env("XDG_DATA_HOME", dir.join("caddy-data"))
            .env("XDG_CONFIG_HOME", dir.join("caddy-config")),
    )?;
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    // Each root has a cluster CA of its own; nginx and Caddy have a certificate from the first.
    let verifier = |root: &Agent| -> Result<tokio_rustls::TlsConnector> {
        let (ca, _) = root.cluster().load()?;
        let config = client_config(ca.cert_pem())?;
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    };
    let ingress = |name, root: &BenchRoot| -> Result<Proxy> {
        Ok(Proxy {
            name,
            http: root.http,
            https: root.https,
            cpu: Cpu::Pid(root.agent.pid().context("root pid")?),
            backend: Cpu::Group(root.backend_pgid),
            verify: verifier(&root.agent)?,
        })
    };
    let backend = Cpu::Group(direct.backend_pgid);
    let mut proxies = vec![ingress("P2F ingress", &direct)?];
    if let Some(shared) = &shared {
        proxies.push(ingress("ingress/shared", shared)?);
    }
    if let Some(tunnel) = &tunnel {
        proxies.push(ingress("ingress/tunnel", tunnel)?);
    }
    if let Some(variant) = &variant {
        proxies.push(ingress("ingress/variant", variant)?);
    }
    proxies.push(Proxy {
        name: "nginx",
        http: loopback(nginx_http),
        https: loopback(nginx_https),
        cpu: Cpu::Group(nginx.pgid()),
        backend,
        verify: verifier(root)?,
    });
    proxies.push(Proxy {
        name: "Caddy",
        http: loopback(caddy_http),
        https: loopback(caddy_https),
        cpu: Cpu::Group(caddy.pgid()),
        backend,
        verify: verifier(root)?,
    });
    let nginx_at = proxies.len() - 2;

    // Each answers the backend's words over both protocols (nginx and Caddy may take a moment).
    let body = "hello from root\n";
    for proxy in &proxies {
        eventually(&format!("{} answers", proxy.name), ROUTE_LIMIT, || async {
            check(proxy.name, proxy.http, None, body).await.ok()?;
            check(proxy.name, proxy.https, Some(&proxy.verify), body)
                .await
                .ok()
        })
        .await?;
    }

    println!(
        "wrk -t{} -c{} -d{}s --latency, after a 2 s warm-up; {} round(s)",
        options.threads, options.conns, options.secs, options.rounds
    );
    // results[protocol][proxy] over rounds
    let mut results: Vec<Vec<Vec<Wrk>>> = vec![vec![Vec::new(); proxies.len()]; 2];
    for round in 1..=options.rounds {
        for (p, scheme) in ["http", "https"].into_iter().enumerate() {
            for (i, proxy) in proxies.iter().enumerate() {
                let addr = if p == 0 { proxy.http } else { proxy.https };
                let url = format!("{scheme}://{DOMAIN}:{}/", addr.port());
                let load_before = load_average();
                let figures = wrk(options, dir, &url, proxy.cpu, proxy.backend).await?;
                println!(
                    "round {round} {scheme:5} {:12} {:>9.0} req/s  p50 {:>6} ms  p99 {:>6} ms  errors {}  CPU/1k req: proxy {:.0} ms, backend {:.0} ms  (load {load_before} -> {})",
                    proxy.name,
                    figures.rps,
                    ms(figures.p50),
                    ms(figures.p99),
                    figures.errors,
                    figures.proxy_cpu,
                    figures.backend_cpu,
                    load_average()
                );
                ensure!(
                    figures.errors == 0,
                    "{} {scheme}: {} errors",
                    proxy.name,
                    figures.errors
                );
                results[p][i].push(figures);
            }
        }
    }

    let show = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.2}×"))
            .collect::<Vec<_>>()
            .join(" · ")
    };
    for (p, scheme) in ["HTTP", "HTTPS"].into_iter().enumerate() {
        let rounds = |i: usize, f: &dyn Fn(&Wrk) -> String| {
            results[p][i].iter().map(f).collect::<Vec<_>>().join(" · ")
        };
        let baselines = |f: &dyn Fn(&Wrk) -> String| {
            format!(
                "nginx {} · Caddy {}",
                rounds(nginx_at, f),
                rounds(nginx_at + 1, f)
            )
        };
        let rps = |w: &Wrk| format!("{:.0}", w.rps);
        let lat = |w: &Wrk| format!("{} / {}", ms(w.p50), ms(w.p99));
        let cpu = |w: &Wrk| format!("{:.0} (+{:.0})", w.proxy_cpu, w.backend_cpu);
        let c = options.conns;
        // The ingress's rows (direct, then through the tunnel), each against nginx and Caddy.
        for (i, proxy) in proxies[..nginx_at].iter().enumerate() {
            let name = proxy.name;
            report.row(
                &format!("{scheme}, c={c}: {name}, requests/s, per round"),
                rounds(i, &rps),
                baselines(&rps),
                "≥ 1.0× nginx",
                "",
            );
            report.row(
                &format!("{scheme}: {name}, p50 / p99 latency, ms"),
                rounds(i, &lat),
                baselines(&lat),
                "p99 ≤ 1.2× nginx",
                "",
            );
            report.row(
                &format!("{scheme}: {name}, CPU ms per 1 000 requests, proxy (+backend)"),
                rounds(i, &cpu),
                baselines(&cpu),
                "",
                "",
            );
            let ratios = |f: &dyn Fn(&Wrk) -> f64| {
                results[p][i]
                    .iter()
                    .zip(&results[p][nginx_at])
                    .map(|(ours, nginx)| f(ours) / f(nginx))
                    .collect::<Vec<f64>>()
            };
            let rps_ratio = ratios(&|w| w.rps);
            let p99_ratio = ratios(&|w| w.p99.as_secs_f64());
            report.row(
                &format!("{scheme}: {name} / nginx, requests/s"),
                show(&rps_ratio),
                "",
                "≥ 1.0×",
                verdict(rps_ratio.iter().all(|r| *r >= 1.0)),
            );
            report.row(
                &format!("{scheme}: {name} / nginx, p99"),
                show(&p99_ratio),
                "",
                "≤ 1.2×",
                verdict(p99_ratio.iter().all(|r| *r <= 1.2)),
            );
        }
    }
    report.notes.push(format!(
        "throughput: one backend (`bench_ingress backend`, 1 thread) on 127.0.0.1:{backend_port}, supervised by the root; the ingress (\"P2F ingress\") reaches it directly on loopback after checking it with the root's supervisor; nginx (2 workers, upstream keepalive 128, access_log off) and Caddy (reverse_proxy, default pool) connect to it directly"
    ));
    if let Some(shared) = &shared {
        report.notes.push(format!(
            "throughput: \"ingress/shared\" is a root with [ingress] workers = 0, whose ingress serves its connections on the agent's own runtime (2 threads shared with everything else the agent does) rather than on worker threads of its own, as before; its backend is the same program, on 127.0.0.1:{}",
            shared.backend_port
        ));
    }
    if let Some(tunnel) = &tunnel {
        report.notes.push(format!(
            "throughput: \"ingress/tunnel\" is a second root started with P2F_INGRESS_DIRECT=0, whose ingress reaches its own backend (the same program, on 127.0.0.1:{}) through its agent's tunnel (TLS to its API + Upgrade, spliced), as before the direct path",
            tunnel.backend_port
        ));
    }
    if let (Some(variant), Some(p2f)) = (&variant, &options.variant) {
        report.notes.push(format!(
            "throughput: \"ingress/variant\" is a root run by {} (--variant), with a backend of its own (the same program, on 127.0.0.1:{})",
            p2f.display(),
            variant.backend_port
        ));
    }
    drop((nginx, caddy));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Failover

/// One failover request's outcome.
#[derive(Debug)]
struct Outcome {
    sent: Instant,
    done: Instant,
    /// The node that answered, or the error.
    answer: Result<String, String>,
}

async fn failover(options: &Options, dir: &Path, report: &mut Report) -> Result<()> {
    let mut errors = Vec::new();
    let mut healthy_to_answer = Vec::new();
    let mut kill_to_answer = Vec::new();
    let mut gaps = Vec::new();
    let mut waits = Vec::new();
    let mut sent = 0;
    for trial in 1..=options.trials {
        let t = failover_trial(options, dir, trial).await?;
        println!(
            "failover trial {trial}: {} requests, {} errors; kill -> Healthy {} ms, Healthy -> first answer from root {} ms, old -> new answer gap {} ms, longest request {} ms (load {})",
            t.sent,
            t.errors.len(),
            ms(t.kill_to_healthy),
            ms(t.healthy_to_answer),
            ms(t.gap),
            ms(t.longest),
            load_average()
        );
        for e in t.errors.iter().take(5) {
            println!("  error: {e}");
        }
        sent += t.sent;
        errors.extend(t.errors);
        healthy_to_answer.push(t.healthy_to_answer);
        kill_to_answer.push(t.kill_to_healthy + t.healthy_to_answer);
        gaps.push(t.gap);
        waits.push(t.longest);
    }
    report.row(
        "failover: errors seen by the client (every 50 ms, HTTPS)",
        format!("{} of {sent}", errors.len()),
        "",
        "none (replacement healthy within the hold)",
        verdict(errors.is_empty()),
    );
    let healthy = Sample::new(healthy_to_answer);
    report.row(
        "failover: new copy Healthy → first answer from it, p50 / max",
        healthy.ms_max(),
        "",
        "≤ 250 ms",
        verdict(healthy.max() <= Duration::from_millis(250)),
    );
    report.row(
        "failover: SIGKILL → first answer from the new node, p50 / max",
        Sample::new(kill_to_answer).secs(),
        "",
        "",
        "",
    );
    report.row(
        "failover: last answer from the old node → first from the new, p50 / max",
        Sample::new(gaps).secs(),
        "",
        "",
        "",
    );
    report.row(
        "failover: longest request (held), p50 / max over trials",
        Sample::new(waits).secs(),
        "",
        "",
        "",
    );
    Ok(())
}

struct Trial {
    sent: usize,
    errors: Vec<String>,
    kill_to_healthy: Duration,
    healthy_to_answer: Duration,
    gap: Duration,
    longest: Duration,
}

async fn failover_trial(options: &Options, dir: &Path, trial: usize) -> Result<Trial> {
    let root = root(options, dir, &format!("fo{trial}-root")).await?;
    let mut member = Agent::builder("member")
        .p2f(&options.p2f)
        .dir(dir.join(format!("fo{trial}-member")))
        .ip("127.0.0.2")
        .join(&root)?
        .started()
        .await?;
    root.all_alive(&["member", "root"]).await?;
    let spec = backend_spec("failover", FAILOVER_DOMAIN, &["member", "root"])?;
    let desired = call("deploy", root.network().deploy(&[spec])).await?;
    let id: ProcessId = desired.services[0].id.clone();
    let (route, _, https) = route_when(&root, FAILOVER_DOMAIN, |r| r.upstream.is_some()).await?;
    if route.node.as_str() != "member" {
        let to = NodeName::new("member").map_err(|e| anyhow!("{e}"))?;
        call("move", root.network().move_process(&id, &to)).await?;
        route_when(&root, FAILOVER_DOMAIN, |r| {
            r.upstream.is_some() && r.node.as_str() == "member"
        })
        .await?;
    }
    let (ca, _) = root.cluster().load()?;
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(client_config(ca.cert_pem())?)
        .no_proxy()
        .resolve(FAILOVER_DOMAIN, https)
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let url = format!("https://{FAILOVER_DOMAIN}:{}/", https.port());
    let ask = |client: reqwest::Client, url: String| async move {
        let sent = Instant::now();
        let answer = async {
            let response = client.get(&url).send().await.map_err(|e| e.to_string())?;
            let status = response.status();
            let text = response.text().await.map_err(|e| e.to_string())?;
            if status != 200 {
                return Err(format!("{status}: {}", text.trim()));
            }
            text.trim()
                .strip_prefix("hello from ")
                .map(str::to_owned)
                .ok_or_else(|| format!("unexpected body {text:?}"))
        }
        .await;
        Outcome {
            sent,
            done: Instant::now(),
            answer,
        }
    };
    let first = ask(client.clone(), url.clone()).await;
    ensure!(
        first.answer.as_deref() == Ok("member"),
        "before the kill: {:?}",
        first.answer
    );

    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let ticker = tokio::spawn({
        let outcomes = Arc::clone(&outcomes);
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => break,
                    _ = tick.tick() => {
                        let (ask, client, url, outcomes) =
                            (ask, client.clone(), url.clone(), Arc::clone(&outcomes));
                        tasks.spawn(async move {
                            let outcome = ask(client, url).await;
                            outcomes.lock().unwrap_or_else(PoisonError::into_inner).push(outcome);
                        });
                    }
                }
            }
            while tasks.join_next().await.is_some() {}
        }
    });
    // Steady traffic first; the kill falls at a different point of the gossip round each trial.
    tokio::time::sleep(Duration::from_millis(2000 + 83 * trial as u64)).await;
    let killed_wall = SystemTime::now();
    let killed = member.kill_node()?;
    // Until the new node has answered for 2 s (or 60 s passed).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let settled = outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|o| {
                o.answer.as_deref() == Ok("root")
                    && o.done.elapsed() >= Duration::from_secs(2)
                    && o.sent > killed.at
            });
        if settled || Instant::now() > deadline {
            break;
        }
    }
    let _ = stop_tx.send(true);
    tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(5), ticker).await??;
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap_or_else(PoisonError::into_inner));

    // When the new copy turned healthy, by its record's event (ms since the epoch).
    let record = call(
        "the record",
        root.network()
            .process_information(ProcessKey::Id(id.clone())),
    )
    .await?
    .context("no record")?;
    ensure!(
        record.node.name.as_str() == "root",
        "the copy runs on {}",
        record.node.name
    );
    let killed_ms = killed_wall.duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let healthy_ms = record
        .events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Healthy) && e.at.0 >= killed_ms)
        .map(|e| e.at.0)
        .next_back()
        .context("no Healthy event after the kill")?;
    let kill_to_healthy = Duration::from_millis(healthy_ms - killed_ms);
    let after_kill = |o: &Outcome| o.done.saturating_duration_since(killed.at);
    let first_new = outcomes
        .iter()
        .filter(|o| o.answer.as_deref() == Ok("root"))
        .map(after_kill)
        .min()
        .context("no answer from the new node")?;
    let last_old = outcomes
        .iter()
        .filter(|o| o.answer.as_deref() == Ok("member"))
        .map(after_kill)
        .max()
        .unwrap_or_default();
    let errors = outcomes
        .iter()
        .filter_map(|o| o.answer.as_ref().err())
        .cloned()
        .collect();
    Ok(Trial {
        sent: outcomes.len(),
        errors,
        kill_to_healthy,
        healthy_to_answer: first_new.saturating_sub(kill_to_healthy),
        gap: first_new.saturating_sub(last_old),
        longest: outcomes
            .iter()
            .map(|o| o.done - o.sent)
            .max()
            .unwrap_or_default(),
    })
}

// ---------------------------------------------------------------------------------------------
// Idle connections

/// A connection kept open after its one request.
enum Open {
    Plain(#[allow(dead_code)] TcpStream),
    Tls(#[allow(dead_code)] Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

async fn idle(options: &Options, dir: &Path, report: &mut Report) -> Result<()> {
    for tls in [true, false] {
        let what = if tls { "TLS" } else { "plain HTTP" };
        println!("idle: {} {what} connections", options.idle_conns);
        let name = if tls { "idle-tls" } else { "idle-plain" };
        let p2f = INSPECT.root_program(&options.p2f, dir)?;
        let root = root_with(&p2f, dir, name, None).await?;
        let pid = root.pid().context("root pid")?;
        let spec = backend_spec("bench", DOMAIN, &["root"])?;
        call("deploy", root.network().deploy(&[spec])).await?;
        let (_, http, https) = route_when(&root, DOMAIN, |r| r.upstream.is_some()).await?;
        let (ca, _) = root.cluster().load()?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca.cert_pem())?));
        let target = if tls { https } else { http };
        // One request first: the certificate is issued, the upstream pool has a connection.
        check(
            "first request",
            target,
            tls.then_some(&connector),
            "hello from root\n",
        )
        .await?;
        let (before, before_anon) = settled_rss(pid).await;
        INSPECT.snapshot(pid, &format!("{name}-before"));
        let fds_before = open_fds(pid);
        let load_before = load_average();

        // N connections, 16 at a time, from 127.0.0.11, .12, ... (200 from each).
        let opened: Vec<Result<Open>> = futures_util::stream::iter(0..options.idle_conns)
            .map(|i| {
                let connector = connector.clone();
                let open = async move {
                    let from = std::net::IpAddr::from([127, 0, 0, 11 + (i / PER_SOURCE) as u8]);
                    let tcp = connect_from(from, target).await?;
                    if tls {
                        let mut stream = tls_to(&connector, tcp, DOMAIN).await?;
                        get_once(&mut stream, DOMAIN).await?;
                        Ok(Open::Tls(Box::new(stream)))
                    } else {
                        let mut stream = tcp;
                        get_once(&mut stream, DOMAIN).await?;
                        Ok(Open::Plain(stream))
                    }
                };
                async move {
                    tokio::time::timeout(OPEN_LIMIT, open)
                        .await
                        .unwrap_or_else(|_| Err(anyhow!("no answer within {OPEN_LIMIT:?}")))
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let failed = opened.iter().filter(|o| o.is_err()).count();
        if let Some(Err(e)) = opened.iter().find(|o| o.is_err()) {
            println!("  {failed} connections failed, e.g. {e:#}");
            report.notes.push(format!(
                "idle {what}: {failed} of {} connections got no answer to their GET, e.g. {e:#}",
                opened.len()
            ));
        }
        let (with, with_anon) = settled_rss(pid).await;
        INSPECT.snapshot(pid, &format!("{name}-with"));
        let fds_with = open_fds(pid);
        println!(
            "  root RSS {} (anon {}) -> {} (anon {}); root's open fds {fds_before} -> {fds_with}; load {load_before} -> {}",
            mib(before),
            mib(before_anon),
            mib(with),
            mib(with_anon),
            load_average()
        );
        let ok = opened.len() - failed;
        report.row(
            &format!("root RSS with {ok} idle {what} client connections (anon)"),
            format!("{} ({})", mib(with), mib(with_anon)),
            format!("same root before: {} ({})", mib(before), mib(before_anon)),
            "≤ 40 MB",
            verdict(with * 1024 <= 40_000_000),
        );
        report.notes.push(format!(
            "idle {what}: the root's open descriptors went {fds_before} -> {fds_with} with the connections open (each made one GET first)"
        ));
        INSPECT.hold().await;
        drop(opened);
    }
    Ok(())
}
