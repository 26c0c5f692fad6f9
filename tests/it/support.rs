//! Test harness: real `p2f` agents as OS processes, each in its own temporary directory, and
//! the OS processes they started found by their `P2F_BUNDLE` (which lies in that directory).
//! Dropping a `TestAgent` kills the agent and every process group it started, by pid.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use p2f::core::Network;
use p2f::core::cluster::ClusterFiles;
use p2f::core::node::AgentConfig;
use p2f::model::{Process, ProcessId};

/// The `p2f` binary, built once per test run (it lives in another package of the workspace, so
/// cargo does not build it for this test binary by itself).
pub(crate) fn p2f_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/debug/deps/it-HASH -> target/debug
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/PROFILE directory")
            .to_owned();
        let target_dir = profile_dir.parent().expect("target directory").to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "p2f-cli", "--bin", "p2f"])
            .env("CARGO_TARGET_DIR", &target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for the p2f binary");
        assert!(status.success(), "building the p2f binary failed");
        profile_dir.join("p2f")
    })
}

/// An example binary of this package, built once per test run.
pub(crate) fn example_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let profile_dir = p2f_bin().parent().expect("target/PROFILE").to_owned();
    BUILT.get_or_init(|| {
        let target_dir = profile_dir.parent().expect("target directory").to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "p2f", "--examples"])
            .env("CARGO_TARGET_DIR", &target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for the examples");
        assert!(status.success(), "building the examples failed");
    });
    profile_dir.join("examples").join(name)
}

/// Processes (pid, environment) whose `P2F_BUNDLE` lies under `dir`.
pub(crate) fn processes_under(dir: &Path) -> Vec<u32> {
    started_by(dir).into_iter().map(|(pid, _)| pid).collect()
}

/// The process's log (through the API) once it contains `wanted`, within `timeout`.
pub(crate) async fn log_containing(
    net: &Network,
    id: &ProcessId,
    wanted: &str,
    timeout: Duration,
) -> String {
    use futures_util::StreamExt;
    eventually(&format!("{wanted:?} in the log"), timeout, || {
        let (net, id) = (net.clone(), id.clone());
        async move {
            let chunks: Vec<_> = net
                .logs(&id, p2f::core::wire::LogsQuery::default())
                .await
                .ok()?
                .collect()
                .await;
            let text: String = chunks
                .into_iter()
                .filter_map(Result::ok)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .collect();
            text.contains(wanted).then_some(text)
        }
    })
    .await
}

/// Held by tests that run the homelab example, whose ports (8480, 8481) are fixed.
pub(crate) static HOMELAB_PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A temporary directory made a node by `p2f ARGS --dir DIR/node` (`init` or `node join`);
/// returns it and the node's config path.
fn node_dir(args: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("p2f-it-")
        .tempdir()
        .expect("tempdir");
    let home = dir.path().join("node");
    let out = Command::new(p2f_bin())
        .args(args)
        .arg("--dir")
        .arg(&home)
        .output()
        .expect("run p2f");
    assert!(
        out.status.success(),
        "p2f {}: {}",
        args.first().copied().unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr)
    );
    (dir, home.join("node.toml"))
}

/// Starts `p2f node run --config CONFIG` through `p2f` (the binary, or `ip netns exec NS p2f`),
/// its output appended to `log`.
pub(crate) fn node_run(mut p2f: Command, config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("agent log");
    p2f.args(["node", "run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info,p2f_core=debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn p2f node run")
}

/// The API address the agent of `config` writes once it listens (`DATA/api.addr`); panics with
/// its `log` if it exits first.
pub(crate) async fn api_address(config: &AgentConfig, child: &mut Child, log: &Path) -> String {
    let addr_file = config.data_dir.join("api.addr");
    let address = eventually("the agent's api.addr", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&addr_file)
            .ok()
            .filter(|t| !t.trim().is_empty());
        if text.is_none()
            && let Ok(Some(status)) = child.try_wait()
        {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("the agent exited ({status}):\n{log}");
        }
        async move { text }
    })
    .await;
    address.trim().to_owned()
}

/// Polls `probe` every 20 ms until it returns `Some`, at most `timeout`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `p2f node run` process with its own cluster and data directory.
pub(crate) struct TestAgent {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) config_path: PathBuf,
    pub(crate) config: AgentConfig,
    child: Option<Child>,
    network: Option<Network>,
}

impl TestAgent {
    /// `p2f init` then `p2f node run`, with fast health checks for tests.
    pub(crate) async fn start(name: &str) -> TestAgent {
        TestAgent::start_with(name, |_| {}).await
    }

    /// Like `start`, with the config adjusted first.
    pub(crate) async fn start_with(name: &str, tweak: impl FnOnce(&mut AgentConfig)) -> TestAgent {
        let (dir, config_path) = node_dir(&["init", "--name", name, "--listen", "127.0.0.1:0"]);
        let mut config = AgentConfig::load(&config_path).expect("load the config init wrote");
        config.supervisor.health_interval = Duration::from_millis(200);
        config.supervisor.memory_interval = Duration::from_millis(500);
        tweak(&mut config);
        let mut written = config.clone();
        written.data_dir = PathBuf::from(".");
        written.cluster_dir = None;
        std::fs::write(&config_path, written.to_toml()).expect("write config");
        TestAgent::run(dir, config_path, config).await
    }

    /// A member of `root`'s cluster: `p2f node join` with the root's token, listening on
    /// `ip` (an address of 127.0.0.0/8), then `p2f node run`.
    pub(crate) async fn join(root: &TestAgent, name: &str, ip: &str) -> TestAgent {
        let token = std::fs::read_to_string(root.config.data_dir.join("join-token"))
            .expect("the root wrote its join token");
        let listen = format!("{ip}:0");
        let (dir, config_path) = node_dir(&[
            "node",
            "join",
            token.trim(),
            "--name",
            name,
            "--listen",
            &listen,
        ]);
        let config = AgentConfig::load(&config_path).expect("load the config join wrote");
        TestAgent::run(dir, config_path, config).await
    }

    /// `p2f node run` on a node directory made by hand: `DIR/node/node.toml` and what it names.
    pub(crate) async fn from_dir(dir: tempfile::TempDir) -> TestAgent {
        let config_path = dir.path().join("node/node.toml");
        let config = AgentConfig::load(&config_path).expect("load the config");
        TestAgent::run(dir, config_path, config).await
    }

    async fn run(dir: tempfile::TempDir, config_path: PathBuf, config: AgentConfig) -> TestAgent {
        let mut agent = TestAgent {
            dir,
            config_path,
            config,
            child: None,
            network: None,
        };
        agent.spawn().await;
        agent
    }

    /// Starts the agent process (again) and waits until its API answers.
    pub(crate) async fn spawn(&mut self) {
        assert!(self.child.is_none(), "the agent already runs");
        let _ = std::fs::remove_file(self.config.data_dir.join("api.addr"));
        let child = self.child.insert(node_run(
            Command::new(p2f_bin()),
            &self.config_path,
            &self.dir.path().join("agent.log"),
        ));
        let address = api_address(&self.config, child, &self.dir.path().join("agent.log")).await;
        let cluster = ClusterFiles::new(self.config.cluster_dir());
        let network =
            Network::with_cluster_files(address.trim(), &cluster).expect("client of the agent");
        eventually("the agent's API", Duration::from_secs(30), || {
            let network = network.clone();
            async move { network.list_processes().await.ok() }
        })
        .await;
        self.network = Some(network);
    }

    /// The agent's own log (for failure messages).
    pub(crate) fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Waits until this agent's node list shows `name` alive (within 10 s).
    pub(crate) async fn hears(&self, name: &str) {
        let net = self.network().clone();
        eventually(&format!("{name} alive"), Duration::from_secs(10), || {
            let net = net.clone();
            async move {
                let nodes = net.nodes().await.ok()?;
                nodes
                    .iter()
                    .any(|n| n.node.name.as_str() == name && n.alive)
                    .then_some(())
            }
        })
        .await;
    }

    /// A client of this agent.
    pub(crate) fn network(&self) -> &Network {
        self.network.as_ref().expect("the agent runs")
    }

    /// The agent's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent runs").id()
    }

    /// SIGKILLs the agent (its processes keep running).
    pub(crate) fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.network = None;
    }

    /// The whole node dies: SIGKILL to the agent and to every process group it started.
    pub(crate) fn kill_node(&mut self) {
        self.sigkill();
        for pgid in self.all_groups() {
            signal(pgid, -libc_signal::KILL);
        }
        // SIGKILL is delivered asynchronously: the node is dead once its processes are gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.all_groups().is_empty() {
            assert!(
                Instant::now() < deadline,
                "processes outlived SIGKILL for 5 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERMs the agent and waits for it to exit; returns its exit status.
    pub(crate) fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the agent runs");
        signal(child.id(), libc_signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.network = None;
                return status;
            }
            assert!(Instant::now() < deadline, "agent ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the record of `id` satisfies `done`.
    pub(crate) async fn wait_for(
        &self,
        id: &ProcessId,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Process) -> bool,
    ) -> Process {
        let network = self.network().clone();
        let key = p2f::model::ProcessKey::Id(id.clone());
        let last = std::sync::Mutex::new(None);
        let found = tokio::time::timeout(
            timeout,
            eventually(what, timeout + Duration::from_secs(1), || {
                let (network, key) = (network.clone(), key.clone());
                let last = &last;
                let done = &done;
                async move {
                    let process = network.process_information(key).await.ok().flatten()?;
                    let ok = done(&process);
                    *last.lock().expect("lock") = Some(process.clone());
                    ok.then_some(process)
                }
            }),
        )
        .await;
        match found {
            Ok(process) => process,
            Err(_) => panic!(
                "timed out waiting for {what}; last record: {:#?}\nagent log:\n{}",
                last.lock().expect("lock"),
                self.agent_log()
            ),
        }
    }

    /// Group leaders of the OS processes this agent started for `id` (by their environment).
    pub(crate) fn os_processes(&self, id: &ProcessId) -> Vec<u32> {
        started_by(self.dir.path())
            .into_iter()
            .filter(|(_, env)| env.iter().any(|v| v == &format!("P2F_PROCESS_ID={id}")))
            .map(|(pid, _)| pid)
            .filter(|pid| pgid_of(*pid) == Some(*pid))
            .collect()
    }

    /// Every OS process group this agent started.
    pub(crate) fn all_groups(&self) -> Vec<u32> {
        let mut groups: Vec<u32> = started_by(self.dir.path())
            .into_iter()
            .filter_map(|(pid, _)| pgid_of(pid))
            .collect();
        groups.sort_unstable();
        groups.dedup();
        groups
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.sigkill();
        for pgid in self.all_groups() {
            signal(pgid, -libc_signal::KILL);
        }
    }
}

/// Signal numbers, without a libc dependency.
pub(crate) mod libc_signal {
    pub(crate) const TERM: i32 = 15;
    pub(crate) const KILL: i32 = 9;
}

/// `kill(pid, sig)`; a negative `sig` signals the process group `pid`.
pub(crate) fn signal(pid: u32, sig: i32) {
    let (target, sig) = if sig < 0 {
        (format!("-{pid}"), -sig)
    } else {
        (pid.to_string(), sig)
    };
    let _ = Command::new("kill")
        .args([format!("-{sig}"), "--".into(), target])
        .stderr(Stdio::null())
        .status();
}

/// Processes whose `P2F_BUNDLE` lies under `dir`, with their environment.
fn started_by(dir: &Path) -> Vec<(u32, Vec<String>)> {
    let marker = format!("P2F_BUNDLE={}", dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let vars: Vec<String> = environ
                .split(|b| *b == 0)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            vars.iter()
                .any(|v| v.starts_with(&marker))
                .then_some((pid, vars))
        })
        .filter(|(pid, _)| !is_zombie(*pid))
        .collect()
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn is_zombie(pid: u32) -> bool {
    stat_fields(pid).is_none_or(|f| f.first().is_some_and(|s| s == "Z"))
}

/// The process group of `pid`.
pub(crate) fn pgid_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(2)?.parse().ok()
}
