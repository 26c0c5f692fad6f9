//! The embedded network: with nothing configured, `cargo run` runs the deployment on this
//! machine in the foreground, like `docker compose up` — a real agent (same supervisor, store
//! and TLS API) inside the user's binary, its state under the project's `target/p2f/NAME/`, a
//! live status table, and Ctrl-C stopping every process it started.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use p2f_core::Network;
use p2f_core::cluster::ClusterFiles;
use p2f_core::cluster::Credentials;
use p2f_core::node::{Agent, AgentConfig, IngressSettings, Shutdown};
use p2f_model::{Deployment, NodeName, Process};

use crate::{Result, converge, render};

/// How often the live status table is refreshed.
const REFRESH: Duration = Duration::from_secs(1);

/// Where the embedded network of this binary keeps its state: `P2F_STATE_DIR`, else
/// `target/p2f/BINARY` of the project the binary was built in, else `.p2f/BINARY`.
pub fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("P2F_STATE_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let name = exe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "deployment".into());
    let target = exe
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|n| n == "target"))
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from));
    match target {
        Some(target) => target.join("p2f").join(name),
        None => PathBuf::from(".p2f").join(name),
    }
}

/// A client of the embedded network in `dir`, if its agent answers.
pub fn connect(dir: &Path) -> Result<Option<Network>> {
    let Ok(address) = std::fs::read_to_string(dir.join("api.addr")) else {
        return Ok(None);
    };
    let address = address.trim();
    let answers = address.parse().ok().is_some_and(|addr| {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
    });
    if !answers {
        return Ok(None);
    }
    let credentials = operator(dir, address)?;
    Ok(Some(Network::connect(address, &credentials)?))
}

/// The embedded network's operator credentials (`DIR/operator`), issued on first use: this
/// process holds the embedded cluster's CA key anyway.
fn operator(dir: &Path, address: &str) -> Result<Credentials> {
    let operator = crate::access::operator_dir(dir);
    if Credentials::is_operator_dir(&operator) {
        return Ok(Credentials::operator(&operator)?.0);
    }
    let cluster = ClusterFiles::new(dir.join("cluster"));
    Ok(crate::access::issue_operator(
        &cluster, "operator", &operator, address,
    )?)
}

/// A local network of one agent running inside this process.
#[derive(Debug)]
pub struct Embedded {
    agent: Agent,
    network: Network,
}

impl Embedded {
    /// Starts the agent with its state in `dir` (creating a private cluster there at first).
    pub async fn start(dir: &Path) -> Result<Embedded> {
        let cluster = ClusterFiles::new(dir.join("cluster"));
        if !cluster.exists() {
            cluster.create("embedded")?;
        }
        let mut config = AgentConfig::new(local_name(), dir);
        config.listen = ([127, 0, 0, 1], 0).into();
        // Processes get a clean environment; `P2F_PASS_ENV=A,B` names more of this one's.
        if let Ok(names) = std::env::var("P2F_PASS_ENV") {
            config.supervisor.pass_env = names
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect();
        }
        // The front door on high local ports; plain HTTP serves too (nobody trusts this
        // private CA yet, so a redirect to HTTPS would only stand in the way).
        config.ingress = Some(IngressSettings {
            http: ([127, 0, 0, 1], 0).into(),
            https: ([127, 0, 0, 1], 0).into(),
            redirect: false,
            ..IngressSettings::default()
        });
        let agent = Agent::start(config).await?;
        let address = agent.address().to_string();
        let network = Network::connect(&address, &operator(dir, &address)?)?;
        Ok(Embedded { agent, network })
    }

    /// A client of it.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// How to reach each service of `deployment` with a domain through the ingress, one line
    /// per way, for people; empty without domains.
    pub fn front_door(&self, deployment: &Deployment, dir: &Path) -> Vec<String> {
        let Some(ingress) = self.agent.ingress() else {
            return Vec::new();
        };
        let (http, https) = (ingress.http_address(), ingress.https_address());
        let ca = dir.join("cluster").join("ca.pem");
        let mut lines = Vec::new();
        for domain in deployment.services().iter().filter_map(|s| s.domain()) {
            let port = https.port();
            lines.push(format!("{domain}: https://{domain}:{port}/"));
            lines.push(format!(
                "    curl --cacert {} --resolve {domain}:{port}:{} https://{domain}:{port}/",
                ca.display(),
                https.ip()
            ));
            lines.push(format!("    curl -H 'Host: {domain}' http://{http}/"));
        }
        lines
    }

    /// Stops every process and the agent.
    pub async fn stop(self) {
        self.agent.shutdown(Shutdown::StopAll).await;
    }
}

fn local_name() -> NodeName {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .and_then(|name| NodeName::new(name.trim()).ok())
        .unwrap_or_else(|| NodeName::from_static("local"))
}

/// `cargo run` with nothing configured: start the deployment here, show it, stop it on Ctrl-C.
pub async fn up(deployment: &Deployment) -> Result<()> {
    let dir = state_dir();
    eprintln!("Starting a local P2F network (state in {})", dir.display());
    let stop = StopSignal::listen()?;
    let embedded = Embedded::start(&dir).await?;
    let network = embedded.network().clone();
    let applied = tokio::select! {
        applied = start_fresh(&network, deployment) => Some(applied),
        () = stop.requested() => None,
    };
    let outcome = match applied {
        None => Ok(()),
        Some(Err(e @ crate::Error::Failed { .. })) => {
            eprintln!("\n{e}");
            watch(&network, deployment, &stop).await;
            Err(e)
        }
        Some(Err(e)) => Err(e),
        Some(Ok(_)) => {
            let front_door = embedded.front_door(deployment, &dir);
            if !front_door.is_empty() {
                eprintln!("\nThe front door (the root's ingress):");
                for line in front_door {
                    eprintln!("  {line}");
                }
            }
            eprintln!("\nAll services run. Ctrl-C stops them.");
            watch(&network, deployment, &stop).await;
            Ok(())
        }
    };
    eprintln!("Stopping…");
    let count = network
        .list_processes()
        .await
        .map(|all| all.iter().filter(|p| !p.status.is_final()).count())
        .unwrap_or(0);
    embedded.stop().await;
    eprintln!(
        "Stopped {count} process{}; nothing is left running.",
        if count == 1 { "" } else { "es" }
    );
    outcome
}

/// Forgets the records of earlier runs that ended, then applies the deployment.
async fn start_fresh(network: &Network, deployment: &Deployment) -> Result<Vec<Process>> {
    for old in network.list_processes().await? {
        if old.status.is_final() {
            network.remove_process(&old.id).await?;
        }
    }
    converge::apply(network, deployment).await
}

/// Ctrl-C or SIGTERM, caught from the moment `StopSignal::listen` returns: a signal that
/// arrives between two waits is not lost.
#[derive(Debug, Clone)]
struct StopSignal(tokio::sync::watch::Receiver<bool>);

impl StopSignal {
    fn listen() -> std::io::Result<StopSignal> {
        use tokio::signal::unix::{SignalKind, signal};
        // Registered here, before anything else runs, so no signal can slip by.
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            let _ = tx.send(true);
        });
        Ok(StopSignal(rx))
    }

    /// Resolves once a stop signal came (at once if it already did).
    async fn requested(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Shows the live status until Ctrl-C: a table redrawn in place on a terminal, otherwise the
/// table once and then one line per status change.
async fn watch(network: &Network, deployment: &Deployment, stop: &StopSignal) {
    let tty = std::io::stdout().is_terminal();
    let stop = stop.requested();
    tokio::pin!(stop);
    let mut drawn_lines = 0;
    let mut last: HashMap<String, String> = HashMap::new();
    let mut ticker = tokio::time::interval(REFRESH);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticker.tick() => {}
        }
        let Ok(all) = network.list_processes().await else {
            continue;
        };
        let processes: Vec<Process> = all
            .into_iter()
            .filter(|p| deployment.service(p.name()).is_some())
            .collect();
        let mut out = std::io::stdout().lock();
        if tty {
            let table = render::status_table(&processes).to_string();
            if drawn_lines > 0 {
                let _ = write!(out, "\x1b[{drawn_lines}A\x1b[J");
            }
            let _ = writeln!(out, "{table}");
            drawn_lines = table.lines().count();
        } else if last.is_empty() {
            let _ = writeln!(out, "{}", render::status_table(&processes));
        }
        for p in &processes {
            let status = p.status.to_string();
            let before = last.insert(p.name().to_owned(), status.clone());
            if !tty && before.as_ref().is_some_and(|b| b != &status) {
                let _ = writeln!(
                    out,
                    "{}: {} → {status}",
                    p.name(),
                    before.unwrap_or_default()
                );
            }
        }
        let _ = out.flush();
    }
}
