//! Network namespaces for tests: a LAN made of one "switch" namespace (a bridge, and the test's
//! own client) and one namespace per node, each plugged into the bridge by a veth pair, with
//! real `p2f node run` agents inside (`ip netns exec`).
//!
//! Nothing is added to the namespace the test runs in: every link and address lives in a
//! namespace the test created. The test talks to the agents from a thread that entered the
//! switch namespace ([`block_on_in`]; `setns(2)` moves only the calling thread, and the sockets
//! and threads it creates stay there). Everything is removed on drop, also when an assertion
//! failed: the agents and their processes by pid, then every process left in a namespace (by
//! pid, from `ip netns pids`), then the namespaces themselves, which takes their links, bridge
//! and nftables tables with them.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use p2f::core::Network;
use p2f::core::cluster::ClusterFiles;
use p2f::core::node::AgentConfig;
use p2f::model::ProcessId;

use crate::support::{
    api_address, eventually, libc_signal, node_run, p2f_bin, pgid_of, processes_under, signal,
};

/// How long one `ip`/`nft`/`p2f init|join` command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Fails (naming the Debian package) unless `command` is on the PATH.
pub(crate) fn require(command: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()));
    assert!(
        found,
        "`{command}` is missing: install the Debian package {package} (scripts/test does)"
    );
}

/// Runs `command` to its end within [`COMMAND_TIMEOUT`] (killed after it); panics with its
/// output unless it succeeded.
fn run(command: &mut Command) -> Output {
    let what = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} took more than {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("collect the output");
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) -> Output {
    run(Command::new("ip").args(args))
}

/// Runs `make()`'s future to its end on a thread inside the network namespace `ns`, on a tokio
/// runtime built there (so its sockets and worker threads are in `ns` too); a panic in it is
/// raised again here.
pub(crate) fn block_on_in<T, Fut>(ns: &str, make: impl FnOnce() -> Fut + Send) -> T
where
    T: Send,
    Fut: Future<Output = T>,
{
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            let handle = std::fs::File::open(Path::new("/run/netns").join(ns))
                .unwrap_or_else(|e| panic!("open network namespace {ns}: {e}"));
            nix::sched::setns(handle, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("enter network namespace {ns}: {e}"));
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(make())
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A network namespace with its loopback up; on drop every process in it is killed (by pid) and
/// it is deleted.
#[derive(Debug)]
pub(crate) struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> Netns {
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Pids of the processes in this namespace (this test process never: its main thread is
    /// not in any namespace a test created).
    fn pids(&self) -> Vec<u32> {
        let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .stderr(Stdio::null())
            .output()
        else {
            return Vec::new();
        };
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .filter(|pid| *pid != std::process::id())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                signal(pid, libc_signal::KILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// One LAN: a switch namespace holding the bridge `br0` (address `.254`, where the test's
/// client sits) and one namespace per node, its `eth0` plugged into the bridge through the
/// switch port `p-ROLE`, with the address `10.231.SUBNET.N` (N = 1, 2, … in the order given).
#[derive(Debug)]
pub(crate) struct Lan {
    subnet: u8,
    roles: Vec<String>,
    // Dropped before the switch (fields drop in order).
    nodes: Vec<Netns>,
    switch: Netns,
}

impl Lan {
    /// Namespaces `p2f-it-PID-TAG-ROLE`, unique per test run and test (`tag`).
    pub(crate) fn new(tag: &str, subnet: u8, roles: &[&str]) -> Lan {
        require("ip", "iproute2");
        let prefix = format!("p2f-it-{}-{tag}", std::process::id());
        let switch = Netns::create(format!("{prefix}-switch"));
        let mut lan = Lan {
            subnet,
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            nodes: Vec::new(),
            switch,
        };
        let sw = lan.switch.name.clone();
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &sw,
            "addr",
            "add",
            &format!("{}/24", lan.addr(254)),
            "dev",
            "br0",
        ]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for (index, role) in roles.iter().enumerate() {
            let ns = Netns::create(format!("{prefix}-{role}"));
            let name = ns.name.clone();
            lan.nodes.push(ns);
            let port = format!("p-{role}");
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &name,
            ]);
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            let host = u8::try_from(index + 1).expect("fewer than 254 nodes");
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{}/24", lan.addr(host)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &name, "link", "set", "eth0", "up"]);
        }
        lan
    }

    fn addr(&self, host: u8) -> String {
        format!("10.231.{}.{host}", self.subnet)
    }

    fn index(&self, role: &str) -> usize {
        self.roles
            .iter()
            .position(|r| r == role)
            .unwrap_or_else(|| panic!("no node {role} in this LAN"))
    }

    /// The namespace of `role`.
    pub(crate) fn ns(&self, role: &str) -> &str {
        self.nodes[self.index(role)].name()
    }

    /// The address of `role`.
    pub(crate) fn ip(&self, role: &str) -> String {
        self.addr(u8::try_from(self.index(role) + 1).expect("fewer than 254 nodes"))
    }

    /// The switch namespace, where the test's client runs.
    pub(crate) fn switch(&self) -> &str {
        self.switch.name()
    }

    /// Unplugs `role` from the switch (its switch port goes down; its own `eth0` loses carrier).
    pub(crate) fn cut(&self, role: &str) {
        ip(&[
            "-n",
            self.switch(),
            "link",
            "set",
            &format!("p-{role}"),
            "down",
        ]);
    }

    /// Plugs `role` back in.
    pub(crate) fn heal(&self, role: &str) {
        ip(&[
            "-n",
            self.switch(),
            "link",
            "set",
            &format!("p-{role}"),
            "up",
        ]);
    }
}

/// An nftables table in a namespace that drops new inbound connections from outside (what a
/// home router's NAT or a default host firewall does): loopback and replies to what the node
/// sent itself pass. Deleted on drop.
#[derive(Debug)]
pub(crate) struct Firewall {
    ns: String,
}

const FIREWALL_TABLE: &str = "p2f_it_nat";

impl Firewall {
    pub(crate) fn drop_new_inbound(ns: &str) -> Firewall {
        require("nft", "nftables");
        let rules = format!(
            "table inet {FIREWALL_TABLE} {{
                chain input {{
                    type filter hook input priority filter; policy accept;
                    iif \"lo\" accept
                    ct state established,related accept
                    ct state new counter drop
                }}
            }}"
        );
        let firewall = Firewall { ns: ns.to_owned() };
        let mut nft = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nft");
        {
            use std::io::Write;
            let mut stdin = nft.stdin.take().expect("nft stdin");
            stdin.write_all(rules.as_bytes()).expect("write the rules");
        }
        let out = nft.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        firewall
    }

    /// Packets the `ct state new drop` rule dropped so far.
    pub(crate) fn dropped_packets(&self) -> u64 {
        let out = run(Command::new("ip").args([
            "netns",
            "exec",
            &self.ns,
            "nft",
            "list",
            "chain",
            "inet",
            FIREWALL_TABLE,
            "input",
        ]));
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find(|l| l.contains("ct state new") && l.contains("drop"))
            .and_then(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let at = words.iter().position(|w| *w == "packets")?;
                words.get(at + 1)?.parse().ok()
            })
            .unwrap_or_else(|| panic!("no counter on the drop rule:\n{text}"))
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "delete", "table", "inet"])
            .arg(FIREWALL_TABLE)
            .stderr(Stdio::null())
            .status();
    }
}

/// A `p2f node run` process inside a namespace, with its own temporary directory. Dropping it
/// kills the agent and every process group it started (found by `P2F_BUNDLE`), by pid.
pub(crate) struct NsAgent {
    ns: String,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    config: AgentConfig,
    child: Option<Child>,
    network: Option<Network>,
}

impl NsAgent {
    fn new_dir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::Builder::new()
            .prefix("p2f-it-")
            .tempdir()
            .expect("tempdir");
        let home = dir.path().join("node");
        (dir, home)
    }

    fn p2f(ns: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(p2f_bin());
        command
    }

    fn loaded(ns: &str, dir: tempfile::TempDir, home: &Path) -> NsAgent {
        let config_path = home.join("node.toml");
        let config = AgentConfig::load(&config_path).expect("load the node's config");
        NsAgent {
            ns: ns.to_owned(),
            dir,
            config_path,
            config,
            child: None,
            network: None,
        }
    }

    /// `p2f init` in `ns`, the API on `ip` (any port); not started yet.
    pub(crate) fn init(ns: &str, name: &str, ip: &str) -> NsAgent {
        let (dir, home) = NsAgent::new_dir();
        run(NsAgent::p2f(ns)
            .args(["init", "--name", name, "--listen"])
            .arg(format!("{ip}:0"))
            .arg("--dir")
            .arg(&home));
        NsAgent::loaded(ns, dir, &home)
    }

    /// `p2f node join` with the (started) root's token, run in `ns`: the join request goes from
    /// this namespace to the root's API. Not started yet.
    pub(crate) fn join(root: &NsAgent, ns: &str, name: &str, ip: &str) -> NsAgent {
        let token = std::fs::read_to_string(root.config.data_dir.join("join-token"))
            .expect("the root wrote its join token");
        let (dir, home) = NsAgent::new_dir();
        run(NsAgent::p2f(ns)
            .args(["node", "join", token.trim(), "--name", name, "--listen"])
            .arg(format!("{ip}:0"))
            .arg("--dir")
            .arg(&home));
        NsAgent::loaded(ns, dir, &home)
    }

    /// Starts `p2f node run` in its namespace and waits for its `api.addr`. With `check_api`,
    /// also waits until the API answers from where this runs.
    pub(crate) async fn start(&mut self, check_api: bool) {
        assert!(self.child.is_none(), "the agent already runs");
        let log = self.dir.path().join("agent.log");
        let child = self
            .child
            .insert(node_run(NsAgent::p2f(&self.ns), &self.config_path, &log));
        let address = api_address(&self.config, child, &log).await;
        let network =
            Network::with_cluster_files(&address, &self.cluster()).expect("client of the agent");
        if check_api {
            eventually("the agent's API", Duration::from_secs(30), || {
                let network = network.clone();
                async move { network.list_processes().await.ok() }
            })
            .await;
        }
        self.network = Some(network);
    }

    /// The cluster's trust files, as this node holds them.
    pub(crate) fn cluster(&self) -> ClusterFiles {
        ClusterFiles::new(self.config.cluster_dir())
    }

    /// A client of this agent (the connections it opens belong to the namespace of the thread
    /// that opens them).
    pub(crate) fn network(&self) -> &Network {
        self.network.as_ref().expect("the agent runs")
    }

    /// The agent's own log (for failure messages).
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Group leaders of the OS processes this agent started for `id` (by their environment).
    pub(crate) fn os_copies(&self, id: &ProcessId) -> Vec<u32> {
        let wanted = format!("P2F_PROCESS_ID={id}");
        processes_under(self.dir.path())
            .into_iter()
            .filter(|pid| pgid_of(*pid) == Some(*pid))
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == wanted.as_bytes()))
            })
            .collect()
    }
}

impl Drop for NsAgent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(80)..].join("\n");
            eprintln!(
                "--- {} ({}), last lines of its log:\n{tail}",
                self.config.name, self.ns
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut groups: Vec<u32> = processes_under(self.dir.path())
            .into_iter()
            .filter_map(pgid_of)
            .collect();
        groups.sort_unstable();
        groups.dedup();
        for pgid in groups {
            signal(pgid, -libc_signal::KILL);
        }
    }
}
