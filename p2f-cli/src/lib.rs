//! The command line of a user's deployment binary, `p2f::cli::run(&DEPLOYMENT)`: `up` (the
//! default: run the deployment on this machine in the foreground), `plan`, `apply`, `status`,
//! `logs`, `kill`, `down`. With no network configured, it uses the embedded network, a local
//! agent whose state lives under the project's `target/p2f/`; with a network configured — an
//! operator's directory in `P2F_OPERATOR` (from `p2f init` or `p2f operator add`; `P2F_ROOT`
//! overrides the root address it names), or a node's config file in `P2F_CONFIG` — it talks to
//! that network.

pub mod access;
pub mod converge;
pub mod embedded;
pub mod import;
pub mod render;

use std::time::Duration;

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use p2f_core::Network;
use p2f_core::wire::{DesiredState, LogsQuery};
use p2f_model::{Deployment, NodeRole, Process};
use tokio::io::AsyncWriteExt;

pub use embedded::Embedded;

/// Why a command failed. Each has a one-line message; [`Error::hint`] says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The network answered with an error, or could not be reached.
    #[error(transparent)]
    Client(#[from] p2f_core::ClientError),
    /// The embedded network could not start.
    #[error(transparent)]
    Agent(#[from] p2f_core::node::AgentError),
    /// The cluster's trust files.
    #[error(transparent)]
    Cluster(#[from] p2f_core::cluster::ClusterError),
    /// The deployment breaks rules (only possible for deployments built at run time).
    #[error(transparent)]
    Invalid(#[from] p2f_model::Invalid),
    /// Nothing answers where the network should be.
    #[error("no network is running: {0}")]
    NotRunning(String),
    /// The command names a service the deployment does not have.
    #[error("no service {name} in this deployment{}", hint_names(.known))]
    UnknownService { name: String, known: Vec<String> },
    /// Some services did not reach `Running`.
    #[error("{} of {total} services failed: {}", .failed.len(), .failed.join("; "))]
    Failed { failed: Vec<String>, total: usize },
    /// The node this binary talks to is not the root (only the root takes a deployment).
    #[error("the node at {address} is {role}, not the root: deployments go to the root")]
    NotRoot { address: String, role: String },
    /// Writing to the terminal or a file.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn hint_names(known: &[String]) -> String {
    if known.is_empty() {
        String::new()
    } else {
        format!(" (it has: {})", known.join(", "))
    }
}

impl Error {
    /// What to do about it, if there is something to say.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Error::NotRunning(_) => {
                Some("start it with `cargo run` (no arguments) in another terminal")
            }
            Error::Failed { .. } => {
                Some("see why with `cargo run -- status` and `cargo run -- logs SERVICE`")
            }
            Error::NotRoot { .. } => Some(
                "point P2F_ROOT at the root's API address (or P2F_CONFIG at a node.toml that names its root)",
            ),
            Error::Client(p2f_core::ClientError::Api {
                status: 401 | 403, ..
            }) => Some(
                "this needs an operator's certificate: set P2F_OPERATOR to a directory from `p2f operator add NAME` (run on the root)",
            ),
            _ => None,
        }
    }

    /// The process exit code: 2 for usage mistakes, 3 when services failed, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::UnknownService { .. } | Error::Invalid(_) => 2,
            Error::Failed { .. } => 3,
            _ => 1,
        }
    }
}

/// `Result` with this crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The commands of a deployment binary.
#[derive(Debug, Parser)]
#[command(about = "Run this deployment: on this machine (the default), or on your P2F network")]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// One command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the deployment on this machine in the foreground; Ctrl-C stops everything.
    Up,
    /// Shows what `apply` would change: create, update, delete. Touches nothing.
    Plan {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Makes the network run the deployment, and waits until every service runs.
    Apply,
    /// A table of the deployment's processes.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Prints a service's output.
    Logs {
        /// The service.
        service: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// How many of the last lines to print first.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
    },
    /// Stops a service (its record stays).
    Kill {
        /// The service.
        service: String,
    },
    /// Stops every service of the deployment and forgets them.
    Down,
}

/// Parses the process's arguments and runs the command. On failure it prints the error (and a
/// hint) on one line to stderr and exits the process with [`Error::exit_code`], like clap does
/// for usage errors.
pub async fn run(deployment: &Deployment) -> Result<()> {
    let args = Args::parse();
    match execute(deployment, args).await {
        Ok(()) => Ok(()),
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            std::process::exit(e.exit_code());
        }
    }
}

/// Runs one command (without printing errors or exiting).
pub async fn execute(deployment: &Deployment, args: Args) -> Result<()> {
    deployment.validate()?;
    match args.command.unwrap_or(Command::Up) {
        Command::Up => embedded::up(deployment).await,
        Command::Plan { json } => {
            let plan = match target()? {
                None => converge::plan(deployment, &DesiredState::default(), &[]),
                Some(network) => {
                    let root = root_of(network).await?;
                    let desired = root.desired().await?;
                    converge::plan(deployment, &desired, &root.list_processes().await?)
                }
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&plan).unwrap_or_default()
                );
            } else {
                print!("{}", render::plan(&plan, render::colours()));
            }
            Ok(())
        }
        Command::Apply => {
            let Some(network) = target()? else {
                return embedded::up(deployment).await;
            };
            let root = root_of(network).await?;
            converge::apply(&root, deployment).await.map(drop)
        }
        Command::Status { json } => {
            let network = require_target()?;
            let processes = of_deployment(deployment, network.list_processes().await?);
            if json {
                let rows: Vec<render::StatusRow> =
                    processes.iter().map(render::StatusRow::of).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&rows).unwrap_or_default()
                );
            } else {
                println!("{}", render::status_table(&processes));
            }
            Ok(())
        }
        Command::Logs {
            service,
            follow,
            lines,
        } => {
            let network = require_target()?;
            let process = find_service(deployment, &network, &service).await?;
            let mut stream = Box::pin(
                network
                    .logs(&process.id, LogsQuery { lines, follow })
                    .await?,
            );
            let mut stdout = tokio::io::stdout();
            while let Some(chunk) = stream.next().await {
                stdout.write_all(&chunk?).await?;
                stdout.flush().await?;
            }
            Ok(())
        }
        Command::Kill { service } => {
            let network = require_target()?;
            let process = find_service(deployment, &network, &service).await?;
            let process = network.kill_process(&process).await?;
            println!("{}: {}", process.name(), process.status);
            Ok(())
        }
        Command::Down => {
            // An empty deployment stops and forgets every service the root placed.
            let root = root_of(require_target()?).await?;
            let desired = root.desired().await?;
            root.deploy(&[]).await?;
            for service in &desired.services {
                println!("{}: removed", service.spec.name());
            }
            if desired.services.is_empty() {
                println!("nothing to stop");
            }
            Ok(())
        }
    }
}

/// `network` if it talks to the root (its node says so in `GET /v1/node`), else why not.
async fn root_of(network: Network) -> Result<Network> {
    let node = network.node().await?;
    match node.p2f_info().and_then(|info| info.role) {
        Some(NodeRole::Root) => Ok(network),
        role => Err(Error::NotRoot {
            address: network.address().to_owned(),
            role: role.map_or_else(
                || "a node of an older version".to_owned(),
                |r| r.to_string(),
            ),
        }),
    }
}

/// The deployment's records: those whose service it declares.
fn of_deployment(deployment: &Deployment, processes: Vec<Process>) -> Vec<Process> {
    processes
        .into_iter()
        .filter(|p| deployment.service(p.name()).is_some())
        .collect()
}

/// The live record of `service` (or its latest one).
async fn find_service(
    deployment: &Deployment,
    network: &Network,
    service: &str,
) -> Result<Process> {
    let known = || {
        deployment
            .services()
            .iter()
            .map(|s| s.name().to_owned())
            .collect()
    };
    if deployment.service(service).is_none() {
        return Err(Error::UnknownService {
            name: service.to_owned(),
            known: known(),
        });
    }
    let mut records: Vec<Process> = network
        .list_processes()
        .await?
        .into_iter()
        .filter(|p| p.name() == service)
        .collect();
    records.sort_by_key(|p| (!p.status.is_final(), p.started_at));
    records.pop().ok_or_else(|| {
        Error::NotRunning(format!(
            "service {service} has no process yet; run `cargo run -- apply`"
        ))
    })
}

/// The network this binary talks to: an operator's directory (`P2F_OPERATOR`, its root or
/// `P2F_ROOT`), a node's config file (`P2F_CONFIG`: its root, or itself), or the embedded
/// network if it runs; `None` when neither is there.
fn target() -> Result<Option<Network>> {
    if let Some(client) = access::operator_client() {
        return Ok(Some(client?));
    }
    if let Some(path) = std::env::var_os("P2F_CONFIG") {
        let config = p2f_core::node::AgentConfig::load(std::path::Path::new(&path))
            .map_err(|e| Error::NotRunning(e.to_string()))?;
        let address = config
            .root
            .clone()
            .unwrap_or_else(|| access::local_address(&config));
        return Ok(Some(access::client_for(&config, &address)?));
    }
    if std::env::var_os("P2F_ROOT").is_some() || std::env::var_os("P2F_NODE").is_some() {
        return Err(Error::NotRunning(format!(
            "P2F_ROOT needs an operator's certificate: set {} to a directory from `p2f operator add NAME` (run on the root)",
            access::OPERATOR_ENV
        )));
    }
    embedded::connect(&embedded::state_dir())
}

fn require_target() -> Result<Network> {
    target()?.ok_or_else(|| {
        Error::NotRunning(format!(
            "the embedded network's state in {} has no running agent, and P2F_NODE is not set",
            embedded::state_dir().display()
        ))
    })
}

/// How long `apply` waits for one service to run and turn healthy.
pub const SERVICE_TIMEOUT: Duration = Duration::from_secs(120);
