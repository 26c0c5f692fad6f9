//! The one harness for a real agent: a `p2f node run` OS process with its own directory
//! (`DIR/node` is the node's home, `DIR/agent.log` its output), optionally inside a network
//! namespace (`ip netns exec`). The agent runs with [`MARKER`]`=DIR`, which every process it
//! starts inherits: that is how its processes are found, and killed by pid when the [`Agent`]
//! is dropped or its node "dies" ([`Agent::kill_node`]).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use p2f_testkit::Agent;
//! let root = Agent::builder("root").test_settings().init()?.started().await?;
//! let pi = Agent::builder("pi").test_settings().ip("127.0.0.2").join(&root)?.started().await?;
//! root.all_alive(&["pi", "root"]).await?;
//! # Ok(()) }
//! ```

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::signal::Signal;
use p2f_core::Network;
use p2f_core::cluster::ClusterFiles;
use p2f_core::cluster::Credentials;
use p2f_core::node::AgentConfig;
use p2f_model::{Process, ProcessId, ProcessKey};

use crate::procs::{self, MARKER, run};
use crate::wait::eventually;

/// The longest an agent may take to write its API address after it was started.
const START_LIMIT: Duration = Duration::from_secs(60);
/// The longest its API may take to answer once the address is written.
const API_LIMIT: Duration = Duration::from_secs(30);
/// How long an agent's `[mesh] phi_threshold` lets a node be silent before it is lost, under
/// [`AgentBuilder::test_settings`]: about 5 s, twice the default, so that a loaded CI machine
/// running several networks at once does not declare a live node dead by accident.
pub const TEST_PHI_THRESHOLD: f64 = 32.0;

/// How to make an agent: its name, where, with which binary and settings.
pub struct AgentBuilder {
    name: String,
    p2f: Option<PathBuf>,
    dir: Option<PathBuf>,
    ns: Option<String>,
    ip: String,
    log_filter: String,
    pid1: bool,
    tweaks: Vec<Tweak>,
}

/// A change to a node's config.
type Tweak = Box<dyn FnOnce(&mut AgentConfig) + Send>;

impl std::fmt::Debug for AgentBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentBuilder")
            .field("name", &self.name)
            .field("p2f", &self.p2f)
            .field("dir", &self.dir)
            .field("ns", &self.ns)
            .field("ip", &self.ip)
            .field("log_filter", &self.log_filter)
            .field("pid1", &self.pid1)
            .field("tweaks", &self.tweaks.len())
            .finish()
    }
}

impl AgentBuilder {
    /// The `p2f` binary to run (default: [`crate::p2f_bin`], built for the running test).
    pub fn p2f(mut self, path: impl Into<PathBuf>) -> AgentBuilder {
        self.p2f = Some(path.into());
        self
    }

    /// The agent's directory (created; left in place). Default: a temporary directory, deleted
    /// when the agent is dropped.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> AgentBuilder {
        self.dir = Some(dir.into());
        self
    }

    /// Runs `p2f` inside the network namespace `ns` (`ip netns exec`).
    pub fn netns(mut self, ns: &str) -> AgentBuilder {
        self.ns = Some(ns.to_owned());
        self
    }

    /// Runs the agent as PID 1 of a new PID namespace (`unshare --pid --fork --mount-proc`),
    /// as in a container: every orphan in it comes to the agent. Not with [`Self::netns`].
    pub fn pid_namespace(mut self) -> AgentBuilder {
        self.pid1 = true;
        self
    }

    /// The address its API and gossip listen on (any port); default `127.0.0.1`.
    pub fn ip(mut self, ip: &str) -> AgentBuilder {
        self.ip = ip.to_owned();
        self
    }

    /// The agent's `RUST_LOG` (default: `$AGENT_LOG`, else `info`).
    pub fn log_filter(mut self, filter: &str) -> AgentBuilder {
        self.log_filter = filter.to_owned();
        self
    }

    /// Changes the node's config before the agent first starts.
    pub fn configure(mut self, tweak: impl FnOnce(&mut AgentConfig) + Send + 'static) -> Self {
        self.tweaks.push(Box::new(tweak));
        self
    }

    /// Its API and gossip on these ports of `ip`, as a real root has, rather than on free ports
    /// picked at each start: after a restart, the members find it where it was.
    pub fn fixed_ports(self, ip: std::net::IpAddr, api: u16, gossip: u16) -> Self {
        self.configure(move |config| {
            config.listen = (ip, api).into();
            if let Some(mesh) = &mut config.mesh {
                mesh.listen = (ip, gossip).into();
            }
        })
    }

    /// Settings for tests: health checks every 200 ms and memory every 500 ms (so tests need
    /// not wait 5 s for them), failure detection at [`TEST_PHI_THRESHOLD`], debug logs.
    /// Benchmarks keep the defaults a user gets.
    pub fn test_settings(self) -> AgentBuilder {
        self.log_filter("info,p2f_core=debug").configure(|config| {
            config.supervisor.health_interval = Duration::from_millis(200);
            config.supervisor.memory_interval = Duration::from_millis(500);
            if let Some(mesh) = &mut config.mesh {
                mesh.phi_threshold = TEST_PHI_THRESHOLD;
            }
        })
    }

    /// `p2f init`: a new cluster whose root this node is. Not started yet.
    ///
    /// Many roots share one machine in tests: the `[ingress]` that `p2f init` writes is moved
    /// to free ports on the agent's address (before any other change, which may set its own).
    pub fn init(mut self) -> Result<Agent> {
        let ip: std::net::IpAddr = self
            .ip
            .parse()
            .with_context(|| format!("the agent's address {:?}", self.ip))?;
        self.tweaks.insert(
            0,
            Box::new(move |config: &mut AgentConfig| {
                if let Some(ingress) = &mut config.ingress {
                    ingress.http = (ip, 0).into();
                    ingress.https = (ip, 0).into();
                }
            }),
        );
        let (p2f, dir, temp) = self.prepare()?;
        let home = dir.join("node");
        let listen = format!("{}:0", self.ip);
        run(self
            .command(&p2f, &dir)
            .args(["init", "--name", &self.name, "--listen", &listen, "--dir"])
            .arg(&home))?;
        self.finish(p2f, dir, temp)
    }

    /// `p2f node join` with a new token of the (running) `root`, run where this agent will run
    /// (in its namespace, if any): the join request goes from there to the root's API. The
    /// root's operator directory is copied next to its config, so the test's client of this
    /// node acts as that operator, like a person with the CLI on that machine. Not started
    /// yet.
    pub fn join(self, root: &Agent) -> Result<Agent> {
        let token = root.join_token()?;
        let (p2f, dir, temp) = self.prepare()?;
        let home = dir.join("node");
        let listen = format!("{}:0", self.ip);
        run(self
            .command(&p2f, &dir)
            .env(p2f_core::node::JOIN_TOKEN_ENV, &token)
            .args(["node", "join", "--name", &self.name, "--listen", &listen])
            .arg("--dir")
            .arg(&home))?;
        root.copy_operator_to(&home.join("operator"))?;
        self.finish(p2f, dir, temp)
    }

    /// A node whose home (`DIR/node`, with `node.toml` and what it names) `write` makes, e.g.
    /// as a provisioning tool would. Not started yet.
    pub fn prepared(self, write: impl FnOnce(&Path) -> Result<()>) -> Result<Agent> {
        let (p2f, dir, temp) = self.prepare()?;
        let home = dir.join("node");
        std::fs::create_dir_all(&home)?;
        write(&home)?;
        self.finish(p2f, dir, temp)
    }

    fn prepare(&self) -> Result<(PathBuf, PathBuf, Option<tempfile::TempDir>)> {
        let p2f = match &self.p2f {
            Some(path) => std::fs::canonicalize(path)
                .with_context(|| format!("the p2f binary {}", path.display()))?,
            None => crate::p2f_bin()?,
        };
        let (dir, temp) = match &self.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                (std::fs::canonicalize(dir)?, None)
            }
            None => {
                let temp = tempfile::Builder::new().prefix("p2f-tk-").tempdir()?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        Ok((p2f, dir, temp))
    }

    fn command(&self, p2f: &Path, dir: &Path) -> Command {
        let mut command = match &self.ns {
            Some(ns) => crate::netns::exec_in(ns, p2f),
            None => Command::new(p2f),
        };
        command.env(MARKER, dir);
        command
    }

    /// Loads the config the node's home holds, applies the tweaks and writes it back.
    fn finish(
        mut self,
        p2f: PathBuf,
        dir: PathBuf,
        temp: Option<tempfile::TempDir>,
    ) -> Result<Agent> {
        let config_path = dir.join("node").join("node.toml");
        // `p2f init` and `join` turn unsafe mode's key mesh on; a test agent (often root) never
        // writes the machine's own authorized_keys, only one in its directory (a test may
        // point it elsewhere).
        let keys = dir.join("node").join("authorized_keys");
        self.tweaks.insert(
            0,
            Box::new(move |config: &mut AgentConfig| {
                if let Some(p2prc) = &mut config.p2prc
                    && p2prc.authorized_keys.is_none()
                {
                    p2prc.authorized_keys = Some(keys);
                }
            }),
        );
        let mut config = AgentConfig::load(&config_path)?;
        if !self.tweaks.is_empty() {
            // Written back with the directories as the file had them (relative, usually);
            // `load` made them absolute.
            let text = std::fs::read_to_string(&config_path)?;
            let as_written = AgentConfig::parse(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
            for tweak in self.tweaks {
                tweak(&mut config);
            }
            let mut written = config.clone();
            written.data_dir = as_written.data_dir;
            written.cluster_dir = as_written.cluster_dir;
            std::fs::write(&config_path, written.to_toml())?;
        }
        Ok(Agent {
            name: self.name,
            p2f,
            ns: self.ns,
            dir,
            config_path,
            config,
            log_filter: self.log_filter,
            pid1: self.pid1,
            child: None,
            network: None,
            _temp: temp,
        })
    }
}

/// What [`Agent::kill_node`] did.
#[derive(Debug, Clone, Copy)]
pub struct Killed {
    /// When the first SIGKILL was sent.
    pub at: Instant,
    /// How many process groups of the node were killed with the agent.
    pub groups: usize,
}

/// A `p2f node run` process (running or not) with its own directory. Dropping it kills the
/// agent and every process it started, by pid, and deletes a temporary directory.
#[derive(Debug)]
pub struct Agent {
    name: String,
    p2f: PathBuf,
    ns: Option<String>,
    dir: PathBuf,
    config_path: PathBuf,
    config: AgentConfig,
    log_filter: String,
    /// Run as PID 1 of a PID namespace of its own (`child` is then `unshare`).
    pid1: bool,
    child: Option<Child>,
    network: Option<Network>,
    // Last: deleted after the processes are gone (only held for that).
    _temp: Option<tempfile::TempDir>,
}

impl Agent {
    /// How to make one named `name`.
    pub fn builder(name: &str) -> AgentBuilder {
        AgentBuilder {
            name: name.to_owned(),
            p2f: None,
            dir: None,
            ns: None,
            ip: "127.0.0.1".to_owned(),
            log_filter: std::env::var("AGENT_LOG").unwrap_or_else(|_| "info".into()),
            pid1: false,
            // The marker reaches the agent's processes through its clean environment.
            tweaks: vec![Box::new(|config: &mut AgentConfig| {
                config.supervisor.pass_env.push(MARKER.to_owned());
            })],
        }
    }

    /// [`Agent::start`], then the agent itself.
    pub async fn started(mut self) -> Result<Agent> {
        self.start().await?;
        Ok(self)
    }

    /// Starts the agent process (again) and waits until its API answers from here.
    pub async fn start(&mut self) -> Result<()> {
        let network = self.spawn().await?;
        let answered = eventually(&format!("{}'s API", self.name), API_LIMIT, || {
            let network = network.clone();
            async move { network.list_local().await.ok() }
        })
        .await;
        if let Err(e) = answered {
            bail!("{e:#}\n{}", self.log_tail(40));
        }
        self.network = Some(network);
        Ok(())
    }

    /// Starts the agent process and waits only for its API address (for an agent whose API
    /// cannot be reached from here, e.g. behind a firewall).
    pub async fn start_unreachable(&mut self) -> Result<()> {
        let network = self.spawn().await?;
        self.network = Some(network);
        Ok(())
    }

    /// Starts `p2f node run`; a client of the address it writes.
    async fn spawn(&mut self) -> Result<Network> {
        ensure!(self.child.is_none(), "{} already runs", self.name);
        let addr_file = self.config.data_dir.join("api.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut command = match (&self.ns, self.pid1) {
            (Some(_), true) => bail!("an agent in a network namespace cannot be PID 1 here"),
            (Some(ns), false) => crate::netns::exec_in(ns, &self.p2f),
            (None, true) => {
                procs::require("unshare", "util-linux")?;
                let mut unshare = Command::new("unshare");
                unshare
                    .args(["--pid", "--fork", "--kill-child", "--mount-proc"])
                    .arg(&self.p2f);
                unshare
            }
            (None, false) => Command::new(&self.p2f),
        };
        let child = command
            .args(["node", "run", "--config"])
            .arg(&self.config_path)
            .env(MARKER, &self.dir)
            .env("RUST_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn p2f node run")?;
        let child = self.child.insert(child);
        let deadline = Instant::now() + START_LIMIT;
        let address = loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file)
                && !text.trim().is_empty()
            {
                break text.trim().to_owned();
            }
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!("{} exited ({status})\n{}", self.name, self.log_tail(40));
            }
            if Instant::now() > deadline {
                bail!(
                    "{} wrote no api.addr within {START_LIMIT:?}\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        Ok(Network::connect(&address, &self.credentials()?)?)
    }

    /// What its clients show: the operator's certificate in `DATA/operator` (the root's, or
    /// copied there when joining), else the node's own.
    pub fn credentials(&self) -> Result<Credentials> {
        let operator = self.config.data_dir.join("operator");
        if Credentials::is_operator_dir(&operator) {
            return Ok(Credentials::operator(&operator)?.0);
        }
        self.node_credentials()
    }

    /// The node's own credentials (its certificate: a member's acts as that member).
    pub fn node_credentials(&self) -> Result<Credentials> {
        Ok(Credentials::of_node(
            &self.config.cluster_dir(),
            &self.config.data_dir.join("tls"),
        )?)
    }

    /// Copies its operator directory (a root's) to `to`.
    fn copy_operator_to(&self, to: &Path) -> Result<()> {
        let from = self.config.data_dir.join("operator");
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(&from).with_context(|| format!("{}", from.display()))? {
            let entry = entry?;
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
        Ok(())
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its directory: the marker of its processes, its log, its home (`node/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its config (directories absolute).
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Where its config file is.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The network namespace it runs in, if any.
    pub fn netns(&self) -> Option<&str> {
        self.ns.as_deref()
    }

    /// The cluster's trust files, as this node holds them.
    pub fn cluster(&self) -> ClusterFiles {
        ClusterFiles::new(self.config.cluster_dir())
    }

    /// A new join token (single-use, valid one hour) from this running root, made with
    /// `p2f node token` as a person would.
    pub fn join_token(&self) -> Result<String> {
        self.join_token_with(&["--uses", "1"])
    }

    /// A new join token made with `p2f node token ARGS` (say `--ttl 2s`, `--uses 3`).
    pub fn join_token_with(&self, args: &[&str]) -> Result<String> {
        let mut command = match &self.ns {
            Some(ns) => crate::netns::exec_in(ns, &self.p2f),
            None => Command::new(&self.p2f),
        };
        command
            .env(MARKER, &self.dir)
            .env_remove("P2F_OPERATOR")
            .args(["node", "token"])
            .args(args)
            .arg("--config")
            .arg(&self.config_path);
        let output = run(&mut command)?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// A client of this agent. Panics when it does not run; see [`Agent::try_network`].
    /// (The connections a client opens belong to the network namespace of the thread that
    /// opens them.)
    pub fn network(&self) -> &Network {
        self.network
            .as_ref()
            .unwrap_or_else(|| panic!("{} does not run", self.name))
    }

    /// A new client of this agent, for another thread, runtime or network namespace than the
    /// one [`Agent::network`] was made on (a client's connections belong to the runtime and the
    /// namespace that opened them).
    pub fn client(&self) -> Result<Network> {
        let address = self.try_network()?.address().to_owned();
        Ok(Network::connect(&address, &self.credentials()?)?)
    }

    /// A client of this agent, or an error when it does not run.
    pub fn try_network(&self) -> Result<&Network> {
        self.network
            .as_ref()
            .with_context(|| format!("{} does not run", self.name))
    }

    /// The agent's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        let child = self.child.as_ref()?.id();
        if !self.pid1 {
            return Some(child);
        }
        // `unshare`'s one child: the agent, PID 1 inside.
        let entries = std::fs::read_dir("/proc").ok()?;
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| procs::Stat::of(*pid).is_some_and(|s| s.ppid == child))
    }

    /// Whether the agent process still runs (it did not exit or crash since it was started).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// The agent's whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `lines` lines of its log, under a heading naming it.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        format!(
            "--- {} agent log (last {} lines) ---\n{}",
            self.name,
            lines,
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }

    /// SIGKILLs the agent alone (its processes keep running) and reaps it.
    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.network = None;
    }

    /// The whole node dies: SIGKILL to the agent and to every process group it started, one
    /// right after the other (the groups are found first); then waits until none of its
    /// processes is left.
    pub fn kill_node(&mut self) -> Result<Killed> {
        let mut child = self
            .child
            .take()
            .with_context(|| format!("{} does not run", self.name))?;
        self.network = None;
        let groups = procs::started_groups(&procs::marked(&self.dir));
        let at = Instant::now();
        let _ = child.kill();
        for pgid in &groups {
            procs::signal_group(*pgid, Signal::SIGKILL);
        }
        let _ = child.wait();
        // Anything that was being started at that very moment.
        procs::kill_run(&self.dir);
        procs::wait_gone(&self.dir, Duration::from_secs(10))?;
        Ok(Killed {
            at,
            groups: groups.len(),
        })
    }

    /// SIGTERMs the agent and waits (at most 30 s) for it to exit.
    pub fn sigterm(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .with_context(|| format!("{} does not run", self.name))?;
        self.network = None;
        procs::signal(child.id(), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} ignored SIGTERM for 30 s", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Group leaders of the OS processes this agent started for `id` (by their environment).
    pub fn os_copies(&self, id: &ProcessId) -> Vec<u32> {
        procs::marked(&self.dir)
            .into_iter()
            .filter(|p| p.var("P2F_PROCESS_ID") == Some(id.as_str()) && !p.is_relay())
            .map(|p| p.pid)
            .filter(|pid| procs::pgid_of(*pid) == Some(*pid))
            .collect()
    }

    /// Every OS process group this agent started.
    pub fn started_groups(&self) -> Vec<u32> {
        procs::started_groups(&procs::marked(&self.dir))
    }

    /// Waits until this agent lists `name` alive.
    pub async fn hears(&self, name: &str) -> Result<()> {
        let net = self.try_network()?.clone();
        eventually(
            &format!("{} to hear {name}", self.name),
            Duration::from_secs(30),
            || {
                let net = net.clone();
                async move {
                    let nodes = net.nodes().await.ok()?;
                    nodes
                        .iter()
                        .any(|n| n.node.name.as_str() == name && n.alive)
                        .then_some(())
                }
            },
        )
        .await
    }

    /// Waits until this agent lists exactly the nodes `names`, every one alive.
    pub async fn all_alive(&self, names: &[&str]) -> Result<()> {
        let net = self.try_network()?.clone();
        let mut wanted = names.to_vec();
        wanted.sort_unstable();
        eventually(
            &format!("{} to see exactly {wanted:?} alive", self.name),
            Duration::from_secs(30),
            || {
                let net = net.clone();
                let wanted = wanted.clone();
                async move {
                    let nodes = net.nodes().await.ok()?;
                    let mut alive: Vec<&str> = nodes
                        .iter()
                        .filter(|n| n.alive)
                        .map(|n| n.node.name.as_str())
                        .collect();
                    alive.sort_unstable();
                    (alive == wanted && nodes.len() == wanted.len()).then_some(())
                }
            },
        )
        .await
    }

    /// Waits until this agent's record of `id` satisfies `done`; the error shows the last record
    /// seen and the end of the agent's log.
    pub async fn wait_for(
        &self,
        id: &ProcessId,
        limit: Duration,
        what: &str,
        done: impl Fn(&Process) -> bool,
    ) -> Result<Process> {
        let network = self.try_network()?.clone();
        let key = ProcessKey::Id(id.clone());
        let last = std::sync::Mutex::new(None);
        let found = eventually(what, limit, || {
            let (network, key) = (network.clone(), key.clone());
            let (last, done) = (&last, &done);
            async move {
                let process = network.process_information(key).await.ok().flatten()?;
                let ok = done(&process);
                if let Ok(mut last) = last.lock() {
                    *last = Some(process.clone());
                }
                ok.then_some(process)
            }
        })
        .await;
        found.map_err(|e| {
            let last = last.lock().ok().and_then(|mut l| l.take());
            anyhow::anyhow!("{e:#}; last record: {last:#?}\n{}", self.log_tail(60))
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(80));
        }
        self.sigkill();
        procs::kill_run(&self.dir);
        // The cgroups of its processes, empty now.
        if let Some(subtree) = p2f_core::node::contain::Containment::subtree_of(
            &self.config.name,
            &self.config.data_dir,
        ) {
            let _ = procs::wait_gone(&self.dir, Duration::from_secs(5));
            procs::remove_cgroups(&subtree);
        }
    }
}
