//! `p2f`: the node agent daemon (`p2f node run`) and the operator's CLI.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use p2f_core::Network;
use p2f_core::cluster::ClusterFiles;
use p2f_core::join::{JoinToken, request_certificate};
use p2f_core::node::{Agent, AgentConfig, IngressSettings, MeshSettings, Shutdown};
use p2f_core::wire::LogsQuery;
use p2f_model::{NodeName, ProcessId, ProcessKey};
use tokio::io::AsyncWriteExt;

/// P2F: your own machines as one self-healing server network.
#[derive(Debug, Parser)]
#[command(name = "p2f", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates a cluster: its CA, its secret, and this machine's node config (the root).
    Init {
        /// Where the node keeps its config, records and logs.
        #[arg(long, default_value_os_t = default_dir())]
        dir: PathBuf,
        /// This node's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// The control API's address.
        #[arg(long, default_value = "127.0.0.1:7440")]
        listen: String,
    },
    /// Runs or manages this machine's node agent.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Lists the nodes of the network (alive or not).
    Nodes {
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Lists every process.
    Ps {
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Shows one process, by id or domain.
    Info {
        /// A process id or a domain name.
        key: String,
        #[command(flatten)]
        target: Target,
    },
    /// Stops a process (its record stays, `Stopped`).
    Kill {
        /// A process id.
        id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Moves a process (deployed through the root) to another node.
    Move {
        /// A process id.
        id: String,
        /// The node to run it on.
        node: String,
        #[command(flatten)]
        target: Target,
    },
    /// Prints a process's output.
    Logs {
        /// A process id.
        id: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// How many of the last lines to print first.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Lists the root's ingress routes: domain, process, node, upstream, certificate, last error.
    Routes {
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Says where the cluster's CA certificate is and how to trust it (the ingress's
    /// certificates for local names come from it).
    Ca {
        #[command(flatten)]
        target: Target,
    },
    /// Prints a shell completion script (e.g. `p2f completions bash > /etc/bash_completion.d/p2f`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Runs the agent in the foreground (SIGTERM or Ctrl-C stops it; its processes keep running
    /// and are re-adopted when it starts again).
    Run {
        /// The node's config file.
        #[arg(long, short, default_value_os_t = default_dir().join("node.toml"))]
        config: PathBuf,
    },
    /// Makes this machine a member of a cluster: `p2f node join $(cat ROOT_DATA/join-token)`.
    Join {
        /// The root's join token (from its `DATA/join-token`, or what `p2f init` printed).
        token: String,
        /// Where this node keeps its config, records and logs.
        #[arg(long, default_value_os_t = default_dir())]
        dir: PathBuf,
        /// This node's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// The control API's address on this machine.
        #[arg(long, default_value = "127.0.0.1:7440")]
        listen: String,
        /// The address others reach this node at, if not the listen address's.
        #[arg(long)]
        advertise: Option<String>,
    },
    /// Writes a systemd unit that runs this node's agent at boot, and says how to enable it.
    Install {
        /// The node's config file.
        #[arg(long, short, default_value_os_t = default_dir().join("node.toml"))]
        config: PathBuf,
        /// Where to write the unit.
        #[arg(long, default_value = "/etc/systemd/system/p2f.service")]
        unit: PathBuf,
    },
}

/// Which node a client command talks to.
#[derive(Debug, clap::Args)]
struct Target {
    /// A node's config file: its API address and cluster files are used.
    #[arg(long, short, env = "P2F_CONFIG", default_value_os_t = default_dir().join("node.toml"))]
    config: PathBuf,
}

fn default_dir() -> PathBuf {
    if running_as_root() {
        return PathBuf::from("/var/lib/p2f");
    }
    match std::env::var_os("XDG_DATA_HOME") {
        Some(dir) => PathBuf::from(dir).join("p2f"),
        None => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".local/share/p2f"))
            .unwrap_or_else(|| PathBuf::from("p2f")),
    }
}

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, without repeating a cause its message already holds.
fn one_line(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Init { dir, name, listen } => init(&dir, name, &listen),
        Command::Node {
            command: NodeCommand::Run { config },
        } => run_node(&config).await,
        Command::Node {
            command: NodeCommand::Install { config, unit },
        } => install(&config, &unit),
        Command::Node {
            command:
                NodeCommand::Join {
                    token,
                    dir,
                    name,
                    listen,
                    advertise,
                },
        } => join(&token, &dir, name, &listen, advertise).await,
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "p2f", &mut std::io::stdout());
            Ok(())
        }
        Command::Move { id, node, target } => {
            let network = connect(&target)?;
            let id = ProcessId::new(id)?;
            let node =
                NodeName::new(&node).with_context(|| format!("invalid node name {node:?}"))?;
            let moved = network
                .move_process(&id, &node)
                .await
                .context("the root refused the move (send it to the root node's config)")?;
            println!(
                "{} now runs on {} (generation {}): {}",
                moved.id, moved.node.name, moved.generation, moved.status
            );
            Ok(())
        }
        Command::Nodes { target, json } => {
            let nodes = connect(&target)?.nodes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                println!("{}", p2f_cli::render::nodes_table(&nodes));
            }
            Ok(())
        }
        Command::Ps { target, json } => ps(&target, json).await,
        Command::Routes { target, json } => {
            let report = connect(&target)?
                .routes()
                .await
                .context("no routes (ask the root: its node.toml, with [ingress] enabled)")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", p2f_cli::render::routes_table(&report));
            }
            Ok(())
        }
        Command::Ca { target } => ca(&target),
        Command::Info { key, target } => info(&target, &key).await,
        Command::Kill { id, target } => {
            let network = connect(&target)?;
            let id = ProcessId::new(id)?;
            let process = network
                .process_information(ProcessKey::Id(id.clone()))
                .await?
                .with_context(|| format!("no process {id}"))?;
            let process = network.kill_process(&process).await?;
            println!("{} {}", process.id, process.status);
            Ok(())
        }
        Command::Logs {
            id,
            follow,
            lines,
            target,
        } => {
            let network = connect(&target)?;
            let id = ProcessId::new(id)?;
            let mut stream = Box::pin(network.logs(&id, LogsQuery { lines, follow }).await?);
            let mut stdout = tokio::io::stdout();
            while let Some(chunk) = stream.next().await {
                stdout.write_all(&chunk?).await?;
                stdout.flush().await?;
            }
            Ok(())
        }
    }
}

fn init(dir: &Path, name: Option<String>, listen: &str) -> Result<()> {
    let (name, listen, config_path) = new_node(dir, name, listen)?;
    let cluster = ClusterFiles::new(dir.join("cluster"));
    cluster.create(name.as_str())?;
    let mut config = AgentConfig::new(name, ".");
    config.listen = listen;
    config.mesh = Some(MeshSettings::new(gossip_address(listen), Vec::new()));
    config.ingress = Some(IngressSettings::default());
    // Whole or not at all: a node never starts from half a config.
    p2f_core::fsutil::write_atomic(&config_path, config.to_toml(), 0o644)?;
    println!("Created a cluster in {}", dir.display());
    println!("  CA and secret: {}", cluster.dir().display());
    println!("  node config:   {}", config_path.display());
    println!();
    println!(
        "Start this node:  p2f node run --config {}",
        config_path.display()
    );
    println!(
        "It writes its join token to {}; on each other machine run:",
        dir.join("join-token").display()
    );
    println!("  p2f node join TOKEN --listen THAT_MACHINE_IP:7440");
    println!();
    println!(
        "This node serves every service's domain on ports 80 and 443 ([ingress] in {});",
        config_path.display()
    );
    println!("`p2f ca` says how to trust the certificates of local names.");
    Ok(())
}

/// `p2f ca`: where the cluster CA is, and how to make a machine trust it.
fn ca(target: &Target) -> Result<()> {
    let config = AgentConfig::load(&target.config)
        .map_err(anyhow::Error::from)
        .context("which node? pass --config NODE.toml (or set P2F_CONFIG)")?;
    let path = ClusterFiles::new(config.cluster_dir()).ca_cert_path();
    if !path.exists() {
        bail!(
            "{} does not exist: is this a node of a cluster?",
            path.display()
        );
    }
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    let p = path.display();
    println!("The cluster CA: {p}");
    println!();
    println!("It signs the ingress's certificates for local names (.home.arpa, .internal, .lan,");
    println!(".local, .test, localhost, IP addresses). To trust them:");
    println!("  curl:             curl --cacert {p} https://wiki.home.arpa/");
    println!(
        "  Debian, Ubuntu:   sudo cp {p} /usr/local/share/ca-certificates/p2f-cluster.crt && sudo update-ca-certificates"
    );
    println!("  Fedora, Arch:     sudo trust anchor --store {p}");
    println!(
        "  macOS:            sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {p}"
    );
    println!("  Firefox:          Settings → Privacy & Security → Certificates → Import…");
    println!();
    println!("Only trust it on machines of people you would give the cluster to: its key (on the");
    println!("root) can sign a certificate for any name.");
    Ok(())
}

async fn join(
    token: &str,
    dir: &Path,
    name: Option<String>,
    listen: &str,
    advertise: Option<String>,
) -> Result<()> {
    let token = JoinToken::decode(token)?;
    let (name, listen, config_path) = new_node(dir, name, listen)?;
    let mut config = AgentConfig::new(name.clone(), ".");
    config.listen = listen;
    config.advertise = advertise;
    config.root = Some(token.root.clone());
    let seeds = match &token.gossip {
        Some(gossip) => vec![gossip.parse().with_context(|| {
            format!("the join token's gossip address {gossip:?} is not IP:PORT")
        })?],
        None => Vec::new(),
    };
    config.mesh = Some(MeshSettings::new(gossip_address(listen), seeds));
    let root = Network::connect(&token.root, token.secret.clone(), &token.ca_pem)?;
    // This node's key is made here and stays here; the root signs a request for it.
    let cert = request_certificate(&root, &name, vec![config.advertised_host()])
        .await
        .with_context(|| format!("the root at {} refused to sign this node", token.root))?;
    ClusterFiles::new(dir.join("cluster")).write_member(&token.ca_pem, &token.secret)?;
    cert.save(&dir.join("tls"))?;
    // Whole or not at all: a node never starts from half a config.
    p2f_core::fsutil::write_atomic(&config_path, config.to_toml(), 0o644)?;
    println!("Joined the cluster of {} as {name}", token.root);
    println!("  node config: {}", config_path.display());
    println!();
    println!(
        "Start this node:  p2f node run --config {}",
        config_path.display()
    );
    Ok(())
}

/// Checks that `dir` is not a node yet and reads the name and listen address of a new one.
fn new_node(
    dir: &Path,
    name: Option<String>,
    listen: &str,
) -> Result<(NodeName, std::net::SocketAddr, PathBuf)> {
    let name = match name {
        Some(name) => name,
        None => hostname().context("cannot read the host name; pass --name")?,
    };
    let name = NodeName::new(&name).with_context(|| format!("invalid node name {name:?}"))?;
    let listen = listen
        .parse()
        .with_context(|| format!("invalid listen address {listen:?} (expected IP:PORT)"))?;
    let config_path = dir.join("node.toml");
    if config_path.exists() {
        bail!(
            "{} already exists; this machine is already a node (remove {} to start over)",
            config_path.display(),
            dir.display()
        );
    }
    Ok((name, listen, config_path))
}

/// Gossip listens next to the API: on the same IP, one port up (or any port with port 0).
fn gossip_address(api: std::net::SocketAddr) -> std::net::SocketAddr {
    let port = match api.port() {
        0 => 0,
        port => port.saturating_add(1),
    };
    std::net::SocketAddr::new(api.ip(), port)
}

fn install(config: &Path, unit: &Path) -> Result<()> {
    let config = std::fs::canonicalize(config).with_context(|| {
        format!(
            "{} does not exist; create it with `p2f init`",
            config.display()
        )
    })?;
    AgentConfig::load(&config)?;
    let exe = std::env::current_exe().context("cannot find the p2f binary's path")?;
    let text = format!(
        "[Unit]
Description=P2F node agent
After=network-online.target
Wants=network-online.target

[Service]
ExecStart={exe} node run --config {config}
Restart=always
RestartSec=1
# Stopping the agent leaves its processes running: the next agent re-adopts them.
KillMode=process
# The unit's cgroup is the agent's to manage: each process gets a cgroup of its own below it
# (what it starts, however it detaches, is counted, stopped and killed with it).
Delegate=yes
Environment=RUST_LOG=info

[Install]
WantedBy=multi-user.target
",
        exe = exe.display(),
        config = config.display()
    );
    if unit.exists() {
        bail!(
            "{} already exists; remove it first to write a new one",
            unit.display()
        );
    }
    std::fs::write(unit, text).with_context(|| {
        format!(
            "cannot write {} (run as root, or pass --unit PATH)",
            unit.display()
        )
    })?;
    println!("Wrote {}", unit.display());
    println!("Enable and start it:  systemctl daemon-reload && systemctl enable --now p2f");
    println!("Follow its log:       journalctl -u p2f -f");
    Ok(())
}

fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(name.trim().to_owned())
}

async fn run_node(config_path: &Path) -> Result<()> {
    let config = AgentConfig::load(config_path)
        .map_err(anyhow::Error::from)
        .context("cannot start the agent (create a cluster with `p2f init`, or pass --config)")?;
    // This process is the agent and nothing else: orphans of its health checks, stop and
    // deploy commands come to it (and to PID 1 in a container) and are reaped here.
    p2f_core::node::os::adopt_orphans().context("cannot become a child subreaper")?;
    let agent = Agent::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    let running = agent
        .supervisor()
        .list()
        .iter()
        .filter(|p| p.is_running())
        .count();
    agent.shutdown(Shutdown::Detach).await;
    tracing::info!(
        "stopped; {running} processes keep running and are re-adopted at the next start"
    );
    Ok(())
}

fn connect(target: &Target) -> Result<Network> {
    let config = AgentConfig::load(&target.config)
        .map_err(anyhow::Error::from)
        .context("which node? pass --config NODE.toml (or set P2F_CONFIG)")?;
    let host = if config.listen.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        config.listen.ip().to_string()
    };
    let address = match std::fs::read_to_string(config.data_dir.join("api.addr")) {
        Ok(text) if config.listen.port() == 0 => text.trim().to_owned(),
        _ => format!("{host}:{}", config.listen.port()),
    };
    Ok(Network::with_cluster_files(
        &address,
        &ClusterFiles::new(config.cluster_dir()),
    )?)
}

async fn ps(target: &Target, json: bool) -> Result<()> {
    let processes = connect(target)?.list_processes().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&processes)?);
        return Ok(());
    }
    println!("{}", p2f_cli::render::status_table(&processes));
    Ok(())
}

async fn info(target: &Target, key: &str) -> Result<()> {
    let network = connect(target)?;
    let key = match ProcessId::new(key) {
        Ok(id) if !key.contains('.') => ProcessKey::Id(id),
        _ => ProcessKey::Domain(key.to_owned()),
    };
    match network.process_information(key.clone()).await? {
        Some(process) => {
            println!("{}", serde_json::to_string_pretty(&process)?);
            Ok(())
        }
        None => bail!("no process {key}"),
    }
}
