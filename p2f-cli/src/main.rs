//! `p2f`: the node agent daemon (`p2f node run`) and the operator's CLI.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use p2f_core::Network;
use p2f_core::cluster::ClusterFiles;
use p2f_core::cluster::Credentials;
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
    /// Creates a cluster: its CA, its secret, this machine's node config (the root), and an
    /// operator's certificate for this machine's user (`DIR/operator`).
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
    /// Cluster-wide operations, run by the root.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Manages operators: the people and tools that may administer the cluster.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
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
    /// P2PRC compatibility: import a P2PRC machine, list known P2PRC peers.
    P2prc {
        #[command(subcommand)]
        command: P2prcCommand,
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
    /// Makes this machine a member of a cluster, with a join token from `p2f node token` (read
    /// from `--token-file`, stdin with `--token-file -`, or the environment's `P2F_JOIN_TOKEN`;
    /// never from the command line, where other users could see it).
    Join {
        /// A file holding the join token (`-`: stdin).
        #[arg(long)]
        token_file: Option<PathBuf>,
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
    /// Makes a join token on the root (valid for `--ttl`, for `--uses` joins) and prints it.
    Token {
        /// How long it may be used: `30m`, `1h`, `2d` (at most 30 days).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many nodes may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        #[command(flatten)]
        target: Target,
    },
    /// Removes node NAME from the cluster (on the root): every node refuses its certificate,
    /// the gossip key is rotated without it, and its processes are placed elsewhere.
    Remove {
        /// The node's name.
        name: String,
        #[command(flatten)]
        target: Target,
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

#[derive(Debug, Subcommand)]
enum P2prcCommand {
    /// Turns this machine's P2PRC setup into this node's: `config.json` gives `[p2prc]`
    /// (P2PRC's API port, the SSH key), `bare_metal` and `unsafe_mode`; the IP table gives known
    /// P2PRC peers (never members). Prints what it took and what it could not.
    Import {
        /// P2PRC's `config.json`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// An IP table (default: the one `config.json` names).
        #[arg(long)]
        ip_table: Option<PathBuf>,
        /// This node's config file (made by `p2f init` or `p2f node join`).
        #[arg(long, default_value_os_t = default_dir().join("node.toml"))]
        node: PathBuf,
    },
    /// Lists the P2PRC peers a node knows: learned from P2PRC tables, known but not trusted.
    Peers {
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Replaces the gossip key on every live node (install, switch, retire the old one; no
    /// node is ever declared lost meanwhile). Nodes that are down must join again.
    RotateKey {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, Subcommand)]
enum OperatorCommand {
    /// Issues operator NAME's certificate (the root signs it; the key is made here) into a
    /// directory to copy to that person's machine; there, `P2F_OPERATOR=DIR p2f ps` uses it.
    Add {
        /// The operator's name (letters, digits, `-`).
        name: String,
        /// Where to write it (default: `./NAME`).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Revokes every certificate of operator NAME: every node refuses it from now on.
    Remove {
        /// The operator's name.
        name: String,
        #[command(flatten)]
        target: Target,
    },
}

/// Which node a client command talks to.
#[derive(Debug, clap::Args)]
struct Target {
    /// A node's config file: its API address, and its operator directory's certificate (or
    /// the node's own). `P2F_OPERATOR=DIR` uses that operator's certificate and root instead.
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
                    token_file,
                    dir,
                    name,
                    listen,
                    advertise,
                },
        } => {
            let token = read_token(token_file.as_deref())?;
            join(&token, &dir, name, &listen, advertise).await
        }
        Command::Node {
            command: NodeCommand::Token { ttl, uses, target },
        } => {
            let ttl = p2f_model::parse_duration(&ttl)
                .with_context(|| format!("invalid --ttl {ttl:?} (say 30m, 1h, 2d)"))?;
            let made = connect(&target)?
                .join_token(&p2f_core::wire::TokenRequest {
                    ttl_secs: ttl.as_secs(),
                    uses,
                })
                .await
                .context("the root refused to make a join token (ask the root, as an operator)")?;
            eprintln!(
                "A join token for {uses} node{}, valid for {}. On the new machine:",
                if uses == 1 { "" } else { "s" },
                p2f_model::format_duration(ttl)
            );
            eprintln!("  p2f node join --token-file FILE --listen THAT_MACHINE_IP:7440");
            println!("{}", made.token);
            Ok(())
        }
        Command::Node {
            command: NodeCommand::Remove { name, target },
        } => {
            let node =
                NodeName::new(&name).with_context(|| format!("invalid node name {name:?}"))?;
            let report = connect(&target)?
                .remove_node(&node)
                .await
                .context("the node was not removed")?;
            println!(
                "node {name} removed: {} certificate(s) revoked on every node, gossip key {} replaced by {}; its processes move once it is seen lost",
                report.revoked, report.rotation.old, report.rotation.new
            );
            Ok(())
        }
        Command::Operator {
            command: OperatorCommand::Add { name, out, target },
        } => operator_add(&name, out, &target).await,
        Command::Operator {
            command: OperatorCommand::Remove { name, target },
        } => {
            let list = connect(&target)?
                .remove_operator(&name)
                .await
                .context("the operator was not removed")?;
            println!(
                "operator {name} removed: every node refuses its certificates ({} revoked in all)",
                list.len()
            );
            Ok(())
        }
        Command::Cluster {
            command: ClusterCommand::RotateKey { target },
        } => {
            let report = connect(&target)?
                .rotate_gossip_key()
                .await
                .context("the gossip key was not rotated")?;
            println!(
                "gossip key {} replaced by {} on {}",
                report.old,
                report.new,
                names(&report.rotated)
            );
            if !report.skipped.is_empty() {
                println!(
                    "down, not rotated (join them again with a new token): {}",
                    names(&report.skipped)
                );
            }
            Ok(())
        }
        Command::P2prc {
            command:
                P2prcCommand::Import {
                    config,
                    ip_table,
                    node,
                },
        } => {
            let done = p2f_cli::import::import(&node, config.as_deref(), ip_table.as_deref())?;
            for line in &done.took {
                println!("took: {line}");
            }
            for line in &done.left {
                println!("not taken: {line}");
            }
            println!(
                "{} taken, {} not; restart the node to use it",
                done.took.len(),
                done.left.len()
            );
            Ok(())
        }
        Command::P2prc {
            command: P2prcCommand::Peers { target, json },
        } => {
            let peers = connect(&target)?.p2prc_peers().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&peers)?);
            } else {
                println!("{}", p2f_cli::render::peers_table(&peers));
            }
            Ok(())
        }
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
            let network = connect(&target)?;
            let nodes = network.nodes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                println!("{}", p2f_cli::render::nodes_table(&nodes));
                // Older nodes have no such list: then there is nothing to show.
                let peers = network.p2prc_peers().await.unwrap_or_default();
                if !peers.is_empty() {
                    println!("P2PRC peers (known, not members: they run no P2F process):");
                    println!("{}", p2f_cli::render::peers_table(&peers));
                }
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
    // Unsafe mode's SSH key mesh, on as P2PRC has it (`unsafe_mode = false` turns it off).
    config.p2prc = Some(p2f_core::p2prc::P2prcSettings::default());
    let operator = p2f_cli::access::operator_dir(dir);
    let operator_name = operator_name();
    p2f_cli::access::issue_operator(
        &cluster,
        &operator_name,
        &operator,
        &p2f_cli::access::local_address(&config),
    )?;
    // Whole or not at all: a node never starts from half a config.
    p2f_core::fsutil::write_atomic(&config_path, config.to_toml(), 0o644)?;
    println!("Created a cluster in {}", dir.display());
    println!("  CA and secret: {}", cluster.dir().display());
    println!("  node config:   {}", config_path.display());
    println!(
        "  operator:      {} ({operator_name}; `p2f` commands with this config use it)",
        operator.display()
    );
    println!();
    println!(
        "Start this node:  p2f node run --config {}",
        config_path.display()
    );
    println!("Then, for each other machine, make a join token and join with it there:");
    println!(
        "  p2f node token --config {} > token",
        config_path.display()
    );
    println!("  p2f node join --token-file token --listen THAT_MACHINE_IP:7440");
    println!();
    println!(
        "This node serves every service's domain on ports 80 and 443 ([ingress] in {});",
        config_path.display()
    );
    println!("`p2f ca` says how to trust the certificates of local names.");
    println!(
        "Unsafe mode is on, as in P2PRC: every member's SSH key goes into this user's ~/.ssh/authorized_keys (in a block P2F marks); set unsafe_mode = false in {} to turn it off.",
        config_path.display()
    );
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

/// Node names, comma-separated, for people.
fn names(nodes: &[NodeName]) -> String {
    nodes
        .iter()
        .map(NodeName::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The operator name `p2f init` gives this machine's user: the login name when it is a valid
/// name, else `operator`.
fn operator_name() -> String {
    std::env::var("USER")
        .ok()
        .map(|user| user.to_ascii_lowercase())
        .filter(|user| NodeName::new(user).is_ok())
        .unwrap_or_else(|| "operator".to_owned())
}

/// `p2f operator add`.
async fn operator_add(name: &str, out: Option<PathBuf>, target: &Target) -> Result<()> {
    let name = NodeName::new(name).with_context(|| format!("invalid operator name {name:?}"))?;
    let dir = out.unwrap_or_else(|| PathBuf::from(name.as_str()));
    if dir.exists() {
        bail!("{} exists already: choose another --out", dir.display());
    }
    let network = connect(target)?;
    // The address the new operator calls: the root's, as this command reached it.
    let root = network.address().to_owned();
    p2f_cli::access::add_operator(&network, &name, &dir, &root)
        .await
        .context("the root did not sign the operator (ask it as an operator)")?;
    println!("Operator {name}: {}", dir.display());
    println!("Copy it to {name}'s machine (it holds a private key: keep it private), then there:");
    println!("  P2F_OPERATOR={} p2f ps", dir.display());
    println!("If the root is reached at another address from there, set P2F_ROOT=HOST:PORT too.");
    Ok(())
}

/// The join token from `file` (`-`: stdin) or `P2F_JOIN_TOKEN`.
fn read_token(file: Option<&Path>) -> Result<String> {
    let text = match file {
        Some(path) if path == Path::new("-") => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("cannot read the join token from stdin")?;
            text
        }
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the join token from {}", path.display()))?,
        None => std::env::var(p2f_core::node::JOIN_TOKEN_ENV).map_err(|_| {
            anyhow::anyhow!(
                "no join token: pass --token-file FILE (or - for stdin), or set {} (make one on the root with `p2f node token`)",
                p2f_core::node::JOIN_TOKEN_ENV
            )
        })?,
    };
    Ok(text.trim().to_owned())
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
    // Unsafe mode's SSH key mesh, on as P2PRC has it (`unsafe_mode = false` turns it off).
    config.p2prc = Some(p2f_core::p2prc::P2prcSettings::default());
    let root = Network::connect(&token.root, &Credentials::new(token.ca_pem.clone(), None))?;
    // This node's key is made here and stays here; the root signs a request for it.
    let (cert, secret) = request_certificate(&root, &name, vec![config.advertised_host()], &token)
        .await
        .with_context(|| format!("the root at {} refused to sign this node", token.root))?;
    ClusterFiles::new(dir.join("cluster")).write_member(&token.ca_pem, &secret)?;
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
    let failed = agent.failed();
    let mut fault = None;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        why = failed => fault = Some(why),
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
    match fault {
        Some(why) => bail!("the agent stopped: {why}"),
        None => Ok(()),
    }
}

fn connect(target: &Target) -> Result<Network> {
    if let Some(client) = p2f_cli::access::operator_client() {
        return client.context("the operator P2F_OPERATOR names");
    }
    let config = AgentConfig::load(&target.config)
        .map_err(anyhow::Error::from)
        .context("which node? pass --config NODE.toml (or set P2F_CONFIG or P2F_OPERATOR)")?;
    let address = p2f_cli::access::local_address(&config);
    Ok(p2f_cli::access::client_for(&config, &address)?)
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
