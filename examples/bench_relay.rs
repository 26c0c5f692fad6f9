//! Benchmark of the relay for NAT'd members (issue 14, "Benchmarks"), each figure beside its
//! baselines from the same run. The network is made of namespaces (root needed): a LAN (a
//! switch, where this client sits, the root, a LAN member `node-lan`, and a router) and a home
//! behind the router, which masquerades and lets nothing in (`p2f_testkit::netns::Nat`); the
//! member `node-nat` lives in the home and keeps its link to the root (yamux over TLS).
//!
//! One backend program (`bench_relay backend 0.0.0.0 PORT`, see `bench_common::backend`: HTTP,
//! a raw echo and a raw download on one port) runs as a service on `node-nat` (domain
//! `nat.test`) and another on `node-lan` (`lan.test`). The paths compared:
//!
//! - **relay**: from the switch to the root's ingress (plain HTTP, so the only encryption is
//!   the link's TLS), which reaches the process through the link; raw bytes get through it by
//!   `Upgrade: p2f-bench` (the ingress splices upgraded connections), and through public
//!   ports on the root (`public: [Tcp(P => PORT), Udp(Q => PORT)]`), raw TCP and UDP;
//! - **direct**: from the router's namespace straight to the backend (one veth hop, no NAT);
//! - **rathole** (`--rathole PATH`, plain TCP transport): its server in the root's namespace,
//!   its client in the home, relaying the same backend; the client connects from the switch;
//! - **ingress → LAN node**: the same ingress reaching `node-lan`'s copy through its agent's
//!   tunnel (the path a reachable member gets), for HTTP.
//!
//! Figures: 64-byte UDP echo round trips through the public UDP port and direct; download throughput (`--bytes`, 1 GiB) and 64-byte echo round trips
//! (`--pings`) per path, alternating paths in each of `--rounds`; wrk (`--conns`,
//! `--threads`, `--secs`) against the small HTTP answer; the root's RSS without a link, with
//! one idle link, and with `--idle-streams` idle streams through the link (upgraded
//! connections through the ingress, each one a yamux stream) beside rathole's server with the
//! same number; reconnect time after the root's SIGTERM and restart (`--restarts` trials),
//! from its API answering until `GET /v1/nodes` shows `node-nat`'s link up.
//!
//! Run it with `bash bench/relay/run.sh`, which builds `p2f` and this example in release. By
//! hand (as root):
//!
//! ```text
//! cargo run --release --example bench_relay -- --p2f target/release/p2f \
//!     [--rathole /work/rathole-bin/bin/rathole] [--data-root /var/tmp] [--bytes 1073741824] \
//!     [--rounds 2] [--pings 10000] [--conns 16] [--threads 2] [--secs 5] \
//!     [--idle-streams 1000] [--restarts 5] [--only raw,http,idle,reconnect]
//! ```
//!
//! `--only link` stops after the root's RSS with one idle link. For a look at the root's memory:
//! `BENCH_RELAY_SMAPS=DIR` copies its `/proc/PID/{smaps,smaps_rollup,status}` to `DIR` at each
//! RSS reading, `BENCH_RELAY_ROOT_WRAP="heaptrack -o FILE"` (any command prefix) runs its
//! `p2f node run` under that command, and `BENCH_RELAY_HOLD=SECS` keeps the agents up that long
//! after `--only link`'s reading.
//!
//! Everything the run starts is in its namespaces, which are deleted (every process in them
//! killed by pid) when the run ends, also on error, Ctrl-C or SIGTERM; agents and their
//! processes also carry `P2F_TESTKIT_RUN=<the run's temp dir>`, and rathole and wrk lead
//! process groups listed in `DIR/pgids` (`bench_relay sweep DIR` kills both, for the script).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures_util::StreamExt as _;
use p2f::core::wire::NodeStatus;
use p2f::model::{Health, NodeName, ProcessId, ProcessSpec, Protocol, PublicPort};
use p2f_testkit::netns::{Lan, Nat, exec_in, within};
use p2f_testkit::{Agent, eventually, procs, service_port};
use tokio::net::{TcpSocket, TcpStream};

mod bench_common;
/// The memory-inspection hooks (`BENCH_RELAY_ROOT_WRAP`, `_SMAPS`, `_HOLD`).
const INSPECT: bench_common::memory::Inspect = bench_common::memory::Inspect("BENCH_RELAY");
use bench_common::backend::{backend, download, ping_pong, start_echo, udp_ping_pong, upgrade};
use bench_common::memory::{mib, open_fds, settled_rss};
use bench_common::spawned::{Cpu, Spawned, sweep};
use bench_common::wrk::{Wrk, WrkRun, wrk};
use bench_common::{Report, Sample, call, load_average, ms, run_interruptible, verdict};

/// The NAT'd member's service.
const NAT_DOMAIN: &str = "nat.test";
/// The LAN member's service.
const LAN_DOMAIN: &str = "lan.test";
/// The LAN is 10.231.SUBNET.0/24, the home 192.168.HOME_SUBNET.0/24.
const SUBNET: u8 = 61;
const HOME_SUBNET: u8 = 161;
/// How long a converging network may take.
const CONVERGE: Duration = Duration::from_secs(60);
/// Idle connections per source address (the ingress takes 256 from one address).
const PER_SOURCE: usize = 200;
/// The echo's message.
const PING_SIZE: usize = 64;
/// The longest one connection may take to open (TCP, upgrade, one echo).
const OPEN_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Options {
    p2f: PathBuf,
    rathole: Option<PathBuf>,
    data_root: PathBuf,
    bytes: u64,
    rounds: usize,
    pings: usize,
    conns: usize,
    threads: usize,
    secs: u64,
    idle_streams: usize,
    restarts: usize,
    only: Vec<String>,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Options> {
        let mut options = Options {
            p2f: PathBuf::new(),
            rathole: None,
            data_root: PathBuf::from("/var/tmp"),
            bytes: 1 << 30,
            rounds: 2,
            pings: 10_000,
            conns: 16,
            threads: 2,
            secs: 5,
            idle_streams: 1000,
            restarts: 5,
            only: ["raw", "udp", "http", "idle", "reconnect"]
                .map(str::to_owned)
                .into(),
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
                "--rathole" => options.rathole = Some(PathBuf::from(&value)),
                "--data-root" => options.data_root = PathBuf::from(&value),
                "--bytes" => options.bytes = number()? as u64,
                "--rounds" => options.rounds = number()?,
                "--pings" => options.pings = number()?,
                "--conns" => options.conns = number()?,
                "--threads" => options.threads = number()?,
                "--secs" => options.secs = number()? as u64,
                "--idle-streams" => options.idle_streams = number()?,
                "--restarts" => options.restarts = number()?,
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
        Some("backend") => {
            let addr: IpAddr = args.next().context("backend ADDR PORT")?.parse()?;
            backend(addr, args.next().context("backend ADDR PORT")?.parse()?)
        }
        Some("sweep") => {
            let dir = PathBuf::from(args.next().context("sweep DIR")?);
            let killed = sweep(&dir);
            println!("killed {killed} leftover processes under {}", dir.display());
            Ok(())
        }
        first => {
            let options = Options::parse(first.map(str::to_owned).into_iter().chain(args))?;
            let lan = Lan::new("brelay", SUBNET, &["root", "lan", "router"])?;
            let home = Nat::behind(&lan, "router", "brelay", HOME_SUBNET)?;
            // This client sits on the switch: its sockets (and the agents' clients) are there.
            let net = Net {
                lan: &lan,
                home: &home,
            };
            within(lan.switch(), || run_interruptible(run(&options, net)))
        }
    }
}

/// The namespaces.
#[derive(Clone, Copy)]
struct Net<'a> {
    lan: &'a Lan,
    home: &'a Nat,
}

async fn run(options: &Options, net: Net<'_>) -> Result<()> {
    let temp = tempfile::Builder::new()
        .prefix("p2f-bench-relay-")
        .tempdir_in(&options.data_root)?;
    let dir = temp.path().to_owned();
    let mut report = Report::new("P2F relay", "baselines, same run");
    let result = bench(options, net, &dir, &mut report).await;
    report.print();
    sweep(&dir);
    result
}

fn node_name(name: &str) -> Result<NodeName> {
    NodeName::new(name).map_err(|e| anyhow!("{e}"))
}

fn linked(status: &NodeStatus) -> bool {
    status.link.as_ref().is_some_and(|l| l.linked)
}

/// The backend as a service for `domain` on `pin`, listening on every address.
fn backend_spec(name: &str, domain: &str, pin: &str) -> Result<ProcessSpec> {
    let exe = std::env::current_exe()?;
    Ok(ProcessSpec::new(
        name,
        format!("exec {} backend 0.0.0.0 $PORT", exe.display()),
    )
    .with_port(service_port())
    .with_domain(domain)
    .with_health(Health::Http("/health".into()))
    .with_pin([node_name(pin)?]))
}

/// How a client reaches the backend.
#[derive(Debug, Clone)]
enum Via {
    /// Straight to it, from the namespace `ns`.
    Direct { ns: String, to: SocketAddr },
    /// Through the root's ingress (plain HTTP), upgraded to raw bytes.
    Ingress { to: SocketAddr, host: &'static str },
    /// A plain TCP port that forwards to it (rathole's, the root's public port).
    Port(SocketAddr),
}

#[derive(Debug, Clone)]
struct Path_ {
    name: &'static str,
    via: Via,
    /// The relaying processes, whose CPU time a download costs.
    relays: Vec<Cpu>,
}

fn cpu_ticks(relays: &[Cpu]) -> u64 {
    relays.iter().map(|c| c.ticks()).sum()
}

/// The path the goals are checked on: raw TCP through a public port on the root.
const RELAY: &str = "P2F relay (public TCP port)";

/// A TCP connection from this namespace (bound to `from`, if given) or from `ns`.
async fn connect(via: &Via, from: Option<IpAddr>) -> Result<TcpStream> {
    let stream = match via {
        Via::Direct { ns, to } => {
            let (ns, to) = (ns.clone(), *to);
            let std = tokio::task::spawn_blocking(move || {
                within(&ns, || {
                    std::net::TcpStream::connect_timeout(&to, OPEN_LIMIT)
                })
            })
            .await??;
            std.set_nonblocking(true)?;
            TcpStream::from_std(std)?
        }
        Via::Ingress { to, .. } | Via::Port(to) => match from {
            Some(from) => {
                let socket = TcpSocket::new_v4()?;
                socket.bind((from, 0).into())?;
                socket.connect(*to).await?
            }
            None => TcpStream::connect(to).await?,
        },
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A connection speaking the backend's raw protocol.
async fn open(via: &Via, from: Option<IpAddr>) -> Result<TcpStream> {
    let mut stream = connect(via, from).await?;
    if let Via::Ingress { host, .. } = via {
        upgrade(&mut stream, host).await?;
    }
    Ok(stream)
}

/// What the raw part measured on one path, over the rounds.
#[derive(Debug, Default, Clone)]
struct RawFigures {
    /// MB/s (10^6 bytes) per round.
    mbps: Vec<f64>,
    /// CPU ms of the relaying processes per GiB, per round.
    cpu: Vec<f64>,
    pings: Vec<Duration>,
}

async fn bench(options: &Options, net: Net<'_>, dir: &Path, report: &mut Report) -> Result<()> {
    let lan = net.lan;
    let root_ip: IpAddr = lan.ip("root").parse()?;
    println!("starting the root, node-lan and (behind the NAT) node-nat");
    let mut root = Agent::builder("root")
        .p2f(INSPECT.root_program(&options.p2f, dir)?)
        .dir(dir.join("root"))
        .netns(lan.ns("root"))
        .ip(&lan.ip("root"))
        .fixed_ports(root_ip, service_port(), service_port())
        .configure(move |config| {
            if let Some(ingress) = &mut config.ingress {
                ingress.redirect = false;
            }
        })
        .init()?
        .started()
        .await?;
    let root_pid = root.pid().context("root pid")?;
    let alone = settled_rss(root_pid).await;
    INSPECT.snapshot(root_pid, "alone");
    let lan_node = Agent::builder("node-lan")
        .p2f(&options.p2f)
        .dir(dir.join("node-lan"))
        .netns(lan.ns("lan"))
        .ip(&lan.ip("lan"))
        .join(&root)?
        .started()
        .await?;
    root.all_alive(&["node-lan", "root"]).await?;
    let no_link = settled_rss(root_pid).await;
    INSPECT.snapshot(root_pid, "no-link");

    let mut nat = Agent::builder("node-nat")
        .p2f(&options.p2f)
        .dir(dir.join("node-nat"))
        .netns(net.home.ns())
        .ip(&net.home.ip())
        .join(&root)?;
    nat.start_unreachable().await?;
    let status =
        p2f_testkit::node_when(root.network(), "node-nat", "linked", CONVERGE, linked).await?;
    println!("node-nat: reach {:?}, link {:?}", status.reach, status.link);
    let one_link = settled_rss(root_pid).await;
    INSPECT.snapshot(root_pid, "one-link");
    report.row(
        "root RSS (anon), one idle link",
        format!("{} ({})", mib(one_link.0), mib(one_link.1)),
        format!(
            "same root before node-nat joined (node-lan joined): {} ({}); alone: {} ({})",
            mib(no_link.0),
            mib(no_link.1),
            mib(alone.0),
            mib(alone.1)
        ),
        "",
        "",
    );

    if options.runs("link") && options.only.len() == 1 {
        // `--only link`: the link's memory alone (keeps the agents for BENCH_RELAY_HOLD secs).
        INSPECT.hold().await;
        drop((lan_node, nat));
        return Ok(());
    }

    // The services.
    let nat_spec = backend_spec("bench-nat", NAT_DOMAIN, "node-nat")?;
    let nat_port = nat_spec.port().context("port")?;
    // Public ports on the root for the same process: raw TCP and UDP through the link.
    let (public_tcp, public_udp) = (service_port(), service_port());
    let nat_spec = nat_spec.with_public([
        PublicPort::new(Protocol::Tcp, public_tcp, nat_port),
        PublicPort::new(Protocol::Udp, public_udp, nat_port),
    ]);
    let lan_spec = backend_spec("bench-lan", LAN_DOMAIN, "node-lan")?;
    let desired = call("deploy", root.network().deploy(&[nat_spec, lan_spec])).await?;
    let nat_id: ProcessId = desired
        .services
        .iter()
        .find(|s| s.spec.name() == "bench-nat")
        .context("bench-nat deployed")?
        .id
        .clone();
    let mut ingress = None;
    for domain in [NAT_DOMAIN, LAN_DOMAIN] {
        let (upstream, http) = eventually(&format!("a route for {domain}"), CONVERGE, || {
            let network = root.network().clone();
            async move {
                let report = network.routes().await.ok()?;
                let route = report.routes.iter().find(|r| r.domain == domain)?;
                Some((
                    route.upstream.clone()?,
                    report.http.parse::<SocketAddr>().ok()?,
                ))
            }
        })
        .await?;
        println!("{domain} → {upstream}");
        ingress = Some(http);
    }
    let ingress = ingress.context("the ingress's address")?;
    let ports = eventually("the public ports served", CONVERGE, || {
        let network = root.network().clone();
        async move {
            let report = network.routes().await.ok()?;
            let served: Vec<String> = report
                .ports
                .iter()
                .filter_map(|p| {
                    Some(format!(
                        "{} {} → {}",
                        p.protocol,
                        p.address,
                        p.upstream.as_ref()?
                    ))
                })
                .collect();
            (served.len() == 2).then_some(served)
        }
    })
    .await?;
    for port in ports {
        println!("public port {port}");
    }
    let public_tcp = SocketAddr::new(root_ip, public_tcp);
    let public_udp = SocketAddr::new(root_ip, public_udp);
    let backend_pid = *nat
        .os_copies(&nat_id)
        .first()
        .context("the backend's pid")?;
    let backend_cpu = Cpu::Group(procs::pgid_of(backend_pid).context("the backend's group")?);
    let home_backend = SocketAddr::new(net.home.ip().parse()?, nat_port);
    let router_ns = lan.ns("router").to_owned();

    // rathole, relaying the same backend.
    let rathole = match &options.rathole {
        Some(bin) => Some(start_rathole(bin, dir, net, root_ip, nat_port).await?),
        None => None,
    };

    let mut paths = vec![
        Path_ {
            name: "direct",
            via: Via::Direct {
                ns: router_ns.clone(),
                to: home_backend,
            },
            relays: Vec::new(),
        },
        Path_ {
            name: RELAY,
            via: Via::Port(public_tcp),
            relays: vec![
                Cpu::Pid(root_pid),
                Cpu::Pid(nat.pid().context("node-nat's pid")?),
            ],
        },
        Path_ {
            name: "P2F relay (ingress, upgraded)",
            via: Via::Ingress {
                to: ingress,
                host: NAT_DOMAIN,
            },
            relays: vec![
                Cpu::Pid(root_pid),
                Cpu::Pid(nat.pid().context("node-nat's pid")?),
            ],
        },
    ];
    if let Some(rathole) = &rathole {
        paths.push(Path_ {
            name: "rathole",
            via: Via::Port(rathole.service),
            relays: vec![
                Cpu::Group(rathole.server.pgid()),
                Cpu::Group(rathole.client.pgid()),
            ],
        });
    }
    for path in &paths {
        let mut stream = tokio::time::timeout(OPEN_LIMIT, open(&path.via, None))
            .await
            .with_context(|| format!("{}: no connection", path.name))??;
        start_echo(&mut stream).await?;
        ping_pong(&mut stream, PING_SIZE, 1)
            .await
            .with_context(|| format!("{}: echo", path.name))?;
    }

    if options.runs("raw") {
        raw(options, &paths, report).await?;
    }
    if options.runs("udp") {
        udp(options, &router_ns, home_backend, public_udp, report).await?;
    }
    if options.runs("http") {
        let mut http = vec![
            (
                "direct",
                Some(router_ns.as_str()),
                format!("http://{home_backend}/"),
                None,
            ),
            (RELAY, None, format!("http://{public_tcp}/"), None),
            (
                "P2F relay (ingress)",
                None,
                format!("http://{ingress}/"),
                Some(NAT_DOMAIN),
            ),
            (
                "ingress → LAN node (agent tunnel)",
                None,
                format!("http://{ingress}/"),
                Some(LAN_DOMAIN),
            ),
        ];
        if let Some(rathole) = &rathole {
            http.push((
                "rathole",
                None,
                format!("http://{}/", rathole.service),
                None,
            ));
        }
        let root_cpu = Cpu::Pid(root_pid);
        let mut results: Vec<Vec<Wrk>> = vec![Vec::new(); http.len()];
        for round in 1..=options.rounds {
            for (i, (name, ns, url, host)) in http.iter().enumerate() {
                let extra: Vec<String> = host
                    .map(|h| vec!["-H".to_owned(), format!("Host: {h}")])
                    .unwrap_or_default();
                let run = WrkRun {
                    threads: options.threads,
                    conns: options.conns,
                    secs: options.secs,
                    extra: &extra,
                    netns: *ns,
                };
                let load = load_average();
                let w = wrk(dir, &run, url, root_cpu, backend_cpu).await?;
                println!(
                    "http round {round} {name:36} {:>8.0} req/s  p50 {} ms  p99 {} ms  errors {}  (load {load} -> {})",
                    w.rps,
                    ms(w.p50),
                    ms(w.p99),
                    w.errors,
                    load_average()
                );
                ensure!(w.errors == 0, "{name}: {} errors", w.errors);
                results[i].push(w);
            }
        }
        let rounds = |i: usize, f: &dyn Fn(&Wrk) -> String| {
            results[i].iter().map(f).collect::<Vec<_>>().join(" · ")
        };
        let others = |f: &dyn Fn(&Wrk) -> String| {
            (0..http.len())
                .filter(|i| *i != 1)
                .map(|i| format!("{}: {}", http[i].0, rounds(i, f)))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let rps = |w: &Wrk| format!("{:.0}", w.rps);
        let lat = |w: &Wrk| format!("{} / {}", ms(w.p50), ms(w.p99));
        let c = options.conns;
        report.row(
            &format!("HTTP small answer, wrk c={c}: requests/s per round"),
            rounds(1, &rps),
            others(&rps),
            "",
            "",
        );
        let within = results[1]
            .iter()
            .zip(&results[0])
            .all(|(ours, direct)| ours.p99 <= direct.p99.mul_f64(1.2) + Duration::from_millis(1));
        report.row(
            &format!("HTTP small answer, wrk c={c}: p50 / p99 ms per round"),
            rounds(1, &lat),
            others(&lat),
            "p99 ≤ 1.2× direct + 1 ms",
            verdict(within),
        );
    }
    if options.runs("idle") {
        idle(options, net, &paths, root_pid, rathole.as_ref(), report).await?;
    }
    if options.runs("reconnect") {
        reconnect(options, &mut root, report).await?;
    }
    drop((rathole, lan_node, nat));
    Ok(())
}

/// Throughput and echo round trips, each path in turn in every round.
async fn raw(options: &Options, paths: &[Path_], report: &mut Report) -> Result<()> {
    let mut figures = vec![RawFigures::default(); paths.len()];
    for round in 1..=options.rounds {
        for (i, path) in paths.iter().enumerate() {
            let load = load_average();
            let mut stream = open(&path.via, None).await?;
            let ticks = cpu_ticks(&path.relays);
            let took = download(&mut stream, options.bytes)
                .await
                .with_context(|| format!("{}: download", path.name))?;
            let ticks = cpu_ticks(&path.relays) - ticks;
            drop(stream);
            let mbps = options.bytes as f64 / took.as_secs_f64() / 1e6;
            let cpu = ticks as f64 * 10.0 / (options.bytes as f64 / (1u64 << 30) as f64);
            let mut stream = open(&path.via, None).await?;
            start_echo(&mut stream).await?;
            ping_pong(&mut stream, PING_SIZE, 200).await?;
            let pings = Sample::new(ping_pong(&mut stream, PING_SIZE, options.pings).await?);
            println!(
                "raw round {round} {:32} {mbps:>8.1} MB/s  relays' CPU {cpu:.0} ms/GiB  echo {PING_SIZE} B p50/p99/max {}  (load {load} -> {})",
                path.name,
                pings.ms_p99(),
                load_average()
            );
            figures[i].mbps.push(mbps);
            figures[i].cpu.push(cpu);
            figures[i].pings.extend(pings.0);
        }
    }
    let at = |name: &str| paths.iter().position(|p| p.name == name);
    let relay = at(RELAY).context("relay path")?;
    let direct = at("direct").context("direct path")?;
    let mbps = |f: &RawFigures| {
        f.mbps
            .iter()
            .map(|m| format!("{m:.0}"))
            .collect::<Vec<_>>()
            .join(" · ")
    };
    let others = |f: &dyn Fn(&RawFigures) -> String| {
        paths
            .iter()
            .zip(&figures)
            .enumerate()
            .filter(|(i, _)| *i != relay)
            .map(|(_, (p, fig))| format!("{}: {}", p.name, f(fig)))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let gib = options.bytes as f64 / (1u64 << 30) as f64;
    let (goal, verdict_tp) = match at("rathole") {
        Some(r) => {
            let ratios: Vec<f64> = figures[relay]
                .mbps
                .iter()
                .zip(&figures[r].mbps)
                .map(|(ours, theirs)| ours / theirs)
                .collect();
            let shown = ratios
                .iter()
                .map(|r| format!("{r:.2}×"))
                .collect::<Vec<_>>()
                .join(" · ");
            report
                .notes
                .push(format!("throughput relay / rathole per round: {shown}"));
            ("≥ 0.9× rathole", verdict(ratios.iter().all(|r| *r >= 0.9)))
        }
        None => ("≥ 0.9× rathole", "not measured (no --rathole)"),
    };
    report.row(
        &format!("TCP download {gib:.2} GiB, MB/s per round"),
        mbps(&figures[relay]),
        others(&mbps),
        goal,
        verdict_tp,
    );
    let cpu = |f: &RawFigures| {
        f.cpu
            .iter()
            .map(|m| format!("{m:.0}"))
            .collect::<Vec<_>>()
            .join(" · ")
    };
    report.row(
        "— CPU of the relaying processes per GiB downloaded, ms (P2F: root + node-nat agents; rathole: server + client)",
        cpu(&figures[relay]),
        others(&cpu),
        "",
        "",
    );
    let samples: Vec<Sample> = figures
        .iter()
        .map(|f| Sample::new(f.pings.clone()))
        .collect();
    let lat = |s: &Sample| format!("{} / {}", ms(s.pct(50.0)), ms(s.pct(99.0)));
    let limit = samples[direct].pct(99.0).mul_f64(1.2) + Duration::from_millis(1);
    report.row(
        &format!(
            "{PING_SIZE}-byte echo over one connection, p50 / p99 ms (n={} per path)",
            samples[relay].0.len()
        ),
        lat(&samples[relay]),
        paths
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != relay)
            .map(|(i, p)| format!("{}: {}", p.name, lat(&samples[i])))
            .collect::<Vec<_>>()
            .join("; "),
        &format!("p99 ≤ 1.2× direct + 1 ms = {} ms", ms(limit)),
        verdict(samples[relay].pct(99.0) <= limit),
    );
    Ok(())
}

/// 64-byte UDP echo round trips through the root's public UDP port and straight to the
/// backend from the router's namespace, alternating in each round.
async fn udp(
    options: &Options,
    router_ns: &str,
    backend: SocketAddr,
    public: SocketAddr,
    report: &mut Report,
) -> Result<()> {
    let wait = Duration::from_secs(1);
    let direct = {
        let ns = router_ns.to_owned();
        let std = tokio::task::spawn_blocking(move || {
            within(&ns, || {
                let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
                socket.connect(backend)?;
                socket.set_nonblocking(true)?;
                std::io::Result::Ok(socket)
            })
        })
        .await??;
        tokio::net::UdpSocket::from_std(std)?
    };
    let relay = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    relay.connect(public).await?;
    let mut times = [Vec::new(), Vec::new()];
    let mut lost = [0, 0];
    for round in 1..=options.rounds {
        for (i, (name, socket)) in [("direct", &direct), ("P2F relay (public UDP port)", &relay)]
            .into_iter()
            .enumerate()
        {
            udp_ping_pong(socket, PING_SIZE, 200, wait).await?;
            let (t, l) = udp_ping_pong(socket, PING_SIZE, options.pings, wait).await?;
            let sample = Sample::new(t.clone());
            println!(
                "udp round {round} {name:32} echo {PING_SIZE} B p50/p99/max {}, {l} lost (load {})",
                sample.ms_p99(),
                load_average()
            );
            times[i].extend(t);
            lost[i] += l;
        }
    }
    let [direct, relay] = times.map(Sample::new);
    let limit = direct.pct(99.0).mul_f64(1.2) + Duration::from_millis(1);
    report.row(
        &format!(
            "UDP {PING_SIZE}-byte echo, p50 / p99 ms (n={}), lost",
            relay.0.len()
        ),
        format!(
            "{} / {}, {} lost",
            ms(relay.pct(50.0)),
            ms(relay.pct(99.0)),
            lost[1]
        ),
        format!(
            "direct: {} / {}, {} lost",
            ms(direct.pct(50.0)),
            ms(direct.pct(99.0)),
            lost[0]
        ),
        &format!("p99 ≤ 1.2× direct + 1 ms = {} ms", ms(limit)),
        verdict(relay.pct(99.0) <= limit && lost[1] == 0),
    );
    Ok(())
}

/// rathole's server (root's namespace) and client (the home), and the port it serves.
struct Rathole {
    service: SocketAddr,
    server: Spawned,
    client: Spawned,
}

async fn start_rathole(
    bin: &Path,
    dir: &Path,
    net: Net<'_>,
    root_ip: IpAddr,
    backend_port: u16,
) -> Result<Rathole> {
    let (control, service) = (
        SocketAddr::new(root_ip, service_port()),
        SocketAddr::new(root_ip, service_port()),
    );
    // Plain TCP transport (rathole's default; it also has tls and noise), nodelay on both
    // ends as the relay and the backend set it.
    std::fs::write(
        dir.join("rathole-server.toml"),
        format!(
            "[server]\nbind_addr = \"{control}\"\ndefault_token = \"bench\"\n\
             [server.transport]\ntype = \"tcp\"\n[server.transport.tcp]\nnodelay = true\n\
             [server.services.bench]\nbind_addr = \"{service}\"\nnodelay = true\n"
        ),
    )?;
    std::fs::write(
        dir.join("rathole-client.toml"),
        format!(
            "[client]\nremote_addr = \"{control}\"\ndefault_token = \"bench\"\n\
             [client.transport]\ntype = \"tcp\"\n[client.transport.tcp]\nnodelay = true\n\
             [client.services.bench]\nlocal_addr = \"127.0.0.1:{backend_port}\"\nnodelay = true\n"
        ),
    )?;
    let server = Spawned::start(
        dir,
        "rathole-server.log",
        exec_in(net.lan.ns("root"), bin)
            .arg("--server")
            .arg(dir.join("rathole-server.toml")),
    )?;
    let client = Spawned::start(
        dir,
        "rathole-client.log",
        exec_in(net.home.ns(), bin)
            .arg("--client")
            .arg(dir.join("rathole-client.toml")),
    )?;
    let via = Via::Port(service);
    let answered = eventually("rathole relays the backend", CONVERGE, || {
        let via = via.clone();
        async move {
            let mut stream = tokio::time::timeout(Duration::from_secs(2), open(&via, None))
                .await
                .ok()?
                .ok()?;
            start_echo(&mut stream).await.ok()?;
            tokio::time::timeout(Duration::from_secs(2), ping_pong(&mut stream, 8, 1))
                .await
                .ok()?
                .ok()
        }
    })
    .await;
    if let Err(e) = answered {
        let log = |name| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        bail!(
            "{e:#}\nserver:\n{}\nclient:\n{}",
            log("rathole-server.log"),
            log("rathole-client.log")
        );
    }
    Ok(Rathole {
        service,
        server,
        client,
    })
}

/// The root's RSS with N idle streams through the link (connections to the public TCP port,
/// each echoed once), and rathole's server with N idle connections.
async fn idle(
    options: &Options,
    net: Net<'_>,
    paths: &[Path_],
    root_pid: u32,
    rathole: Option<&Rathole>,
    report: &mut Report,
) -> Result<()> {
    let n = options.idle_streams;
    // Source addresses on the switch: the ingress takes at most 256 connections from one.
    let sources: Vec<IpAddr> = (0..n.div_ceil(PER_SOURCE))
        .map(|i| format!("10.231.{SUBNET}.{}", 100 + i).parse())
        .collect::<Result<_, _>>()?;
    for source in &sources {
        procs::run(std::process::Command::new("ip").args([
            "-n",
            net.lan.switch(),
            "addr",
            "add",
            &format!("{source}/24"),
            "dev",
            "br0",
        ]))?;
    }
    let mut measured: Vec<(&str, &Via, u32)> = Vec::new();
    let relay = paths
        .iter()
        .find(|p| p.name == RELAY)
        .context("relay path")?;
    measured.push(("root", &relay.via, root_pid));
    let rathole_via;
    if let Some(rathole) = rathole {
        rathole_via = Via::Port(rathole.service);
        measured.push(("rathole server", &rathole_via, rathole.server.pgid()));
    }
    for (name, via, pid) in measured {
        let before = settled_rss(pid).await;
        let fds_before = open_fds(pid);
        let load = load_average();
        let opened: Vec<Result<TcpStream>> = futures_util::stream::iter(0..n)
            .map(|i| {
                let from = sources[i / PER_SOURCE];
                async move {
                    let open = async {
                        let mut stream = open(via, Some(from)).await?;
                        start_echo(&mut stream).await?;
                        ping_pong(&mut stream, PING_SIZE, 1).await?;
                        Ok(stream)
                    };
                    tokio::time::timeout(OPEN_LIMIT, open)
                        .await
                        .unwrap_or_else(|_| Err(anyhow!("not open within {OPEN_LIMIT:?}")))
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let failed = opened.iter().filter(|o| o.is_err()).count();
        if let Some(Err(e)) = opened.iter().find(|o| o.is_err()) {
            report.notes.push(format!(
                "idle {name}: {failed} of {n} connections did not open, e.g. {e:#}"
            ));
        }
        let with = settled_rss(pid).await;
        let fds_with = open_fds(pid);
        println!(
            "idle: {name} RSS {} (anon {}) -> {} (anon {}) with {} idle streams; fds {fds_before} -> {fds_with}; load {load} -> {}",
            mib(before.0),
            mib(before.1),
            mib(with.0),
            mib(with.1),
            n - failed,
            load_average()
        );
        report.row(
            &format!("{name} RSS (anon) with {} idle streams", n - failed),
            format!("{} ({})", mib(with.0), mib(with.1)),
            format!("before: {} ({})", mib(before.0), mib(before.1)),
            "",
            "",
        );
        drop(opened);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// The root SIGTERMed and started again (same ports): from its API answering until its
/// `/v1/nodes` shows node-nat's link up.
async fn reconnect(options: &Options, root: &mut Agent, report: &mut Report) -> Result<()> {
    let mut after_api = Vec::new();
    let mut after_term = Vec::new();
    for trial in 1..=options.restarts {
        let term = Instant::now();
        root.sigterm()?;
        root.start().await?;
        let api = Instant::now();
        let network = root.network().clone();
        let deadline = api + CONVERGE;
        loop {
            let nodes = network.nodes().await.unwrap_or_default();
            if nodes
                .iter()
                .any(|n| n.node.name.as_str() == "node-nat" && linked(n))
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "node-nat not linked again within {CONVERGE:?}\n{}",
                root.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (a, t) = (api.elapsed(), term.elapsed());
        println!(
            "reconnect trial {trial}: API answering -> linked {} ms; SIGTERM -> linked {} ms (load {})",
            ms(a),
            ms(t),
            load_average()
        );
        after_api.push(a);
        after_term.push(t);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    report.row(
        "reconnect after the root's restart: its API answering → link up, p50 / max",
        Sample::new(after_api).ms_max(),
        "",
        "",
        "",
    );
    report.row(
        "the same from the SIGTERM (stop + start + relink), p50 / max",
        Sample::new(after_term).ms_max(),
        "",
        "",
        "",
    );
    Ok(())
}
