//! Network namespaces for tests (root and iproute2 needed; nftables for [`Firewall`]):
//!
//! - [`Netns`]: one namespace with its loopback up: private addresses and ports, so a program
//!   with fixed ports (the homelab example) runs there without meeting anything on the host;
//! - [`Lan`]: one "switch" namespace (a bridge, where the test's own client sits) and one
//!   namespace per node, each plugged into the bridge by a veth pair;
//! - [`Firewall`]: an nftables table dropping new inbound connections, like a home router.
//!
//! Nothing is added to the namespace the test runs in. Code that must run inside a namespace
//! runs on a thread that entered it ([`within`], [`block_on_in`]; `setns(2)` moves only the
//! calling thread, and the sockets, threads and child processes it creates stay there).
//! Everything is removed on drop, also when an assertion failed: every process left in a
//! namespace is killed by pid (from `ip netns pids`), then the namespace is deleted, which
//! takes its links, bridge and nftables tables with it.

use std::future::Future;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::Signal;

use crate::procs::{require, run, signal};

unsafe extern "C" {
    /// `setns(2)` from the C library std already links: moves the calling thread into the
    /// namespace `fd` refers to. (Safe: a bad descriptor is an error, nothing more.)
    safe fn setns(fd: std::os::raw::c_int, nstype: std::os::raw::c_int) -> std::os::raw::c_int;
}

/// `CLONE_NEWNET` from `<sched.h>`.
const CLONE_NEWNET: std::os::raw::c_int = 0x4000_0000;

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// Runs `f` to its end on a thread inside the network namespace `ns`; a panic in it is raised
/// again here.
pub fn within<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            use std::os::fd::AsRawFd as _;
            let handle = std::fs::File::open(Path::new("/run/netns").join(ns))
                .unwrap_or_else(|e| panic!("open network namespace {ns}: {e}"));
            if setns(handle.as_raw_fd(), CLONE_NEWNET) != 0 {
                let e = std::io::Error::last_os_error();
                panic!("enter network namespace {ns}: {e}");
            }
            f()
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Runs `make()`'s future to its end on a thread inside the network namespace `ns`, on a tokio
/// runtime built there (so its sockets and worker threads are in `ns` too); a panic in it is
/// raised again here.
pub fn block_on_in<T, Fut>(ns: &str, make: impl FnOnce() -> Fut + Send) -> T
where
    T: Send,
    Fut: Future<Output = T>,
{
    within(ns, || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        runtime.block_on(make())
    })
}

/// A network namespace with its loopback up; on drop every process in it is killed (by pid) and
/// it is deleted.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace `p2f-tk-PID-TAG` (unique per test process and `tag`).
    pub fn new(tag: &str) -> Result<Netns> {
        Netns::create(format!("p2f-tk-{}-{tag}", std::process::id()))
    }

    fn create(name: String) -> Result<Netns> {
        require("ip", "iproute2")?;
        ip(&["netns", "add", &name]).context(
            "creating a network namespace (needs root: CAP_SYS_ADMIN and CAP_NET_ADMIN)",
        )?;
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name (for `ip netns exec NAME`, [`within`], [`block_on_in`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME program`: a command that runs `program` inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        exec_in(&self.name, program)
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

/// `ip netns exec NS program`.
pub fn exec_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns]).arg(program);
    command
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
                signal(pid, Signal::SIGKILL);
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
pub struct Lan {
    subnet: u8,
    roles: Vec<String>,
    // Dropped before the switch (fields drop in order).
    nodes: Vec<Netns>,
    switch: Netns,
}

impl Lan {
    /// Namespaces `p2f-tk-PID-TAG-ROLE`, unique per test process and test (`tag`).
    pub fn new(tag: &str, subnet: u8, roles: &[&str]) -> Result<Lan> {
        let prefix = format!("p2f-tk-{}-{tag}", std::process::id());
        let switch = Netns::create(format!("{prefix}-switch"))?;
        let mut lan = Lan {
            subnet,
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            nodes: Vec::new(),
            switch,
        };
        let sw = lan.switch.name.clone();
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        let bridge_address = format!("{}/24", lan.addr(254));
        ip(&["-n", &sw, "addr", "add", &bridge_address, "dev", "br0"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for (index, role) in roles.iter().enumerate() {
            let ns = Netns::create(format!("{prefix}-{role}"))?;
            let name = ns.name.clone();
            lan.nodes.push(ns);
            let port = format!("p-{role}");
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &name,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            let host = u8::try_from(index + 1).context("at most 253 nodes")?;
            let address = format!("{}/24", lan.addr(host));
            ip(&["-n", &name, "addr", "add", &address, "dev", "eth0"])?;
            ip(&["-n", &name, "link", "set", "eth0", "up"])?;
        }
        Ok(lan)
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
    pub fn ns(&self, role: &str) -> &str {
        self.nodes[self.index(role)].name()
    }

    /// The address of `role`.
    pub fn ip(&self, role: &str) -> String {
        self.addr(u8::try_from(self.index(role) + 1).unwrap_or(u8::MAX))
    }

    /// The switch namespace, where the test's client runs.
    pub fn switch(&self) -> &str {
        self.switch.name()
    }

    /// Unplugs `role` from the switch (its switch port goes down; its own `eth0` loses carrier).
    pub fn cut(&self, role: &str) -> Result<()> {
        let port = format!("p-{role}");
        ip(&["-n", self.switch(), "link", "set", &port, "down"]).map(drop)
    }

    /// Plugs `role` back in.
    pub fn heal(&self, role: &str) -> Result<()> {
        let port = format!("p-{role}");
        ip(&["-n", self.switch(), "link", "set", &port, "up"]).map(drop)
    }
}

/// Loads `rules` (an nftables script) into namespace `ns` with `nft -f -`.
fn nft_apply(ns: &str, rules: &str) -> Result<()> {
    let mut nft = exec_in(ns, "nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run nft")?;
    nft.stdin
        .take()
        .context("nft's stdin")?
        .write_all(rules.as_bytes())
        .context("write the rules to nft")?;
    let out = nft.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// An nftables table in a namespace that drops new inbound connections from outside (what a
/// home router's NAT or a default host firewall does): loopback and replies to what the node
/// sent itself pass. Deleted on drop.
#[derive(Debug)]
pub struct Firewall {
    ns: String,
}

const FIREWALL_TABLE: &str = "p2f_tk_nat";

impl Firewall {
    /// Installs the table in `ns`.
    pub fn drop_new_inbound(ns: &str) -> Result<Firewall> {
        require("nft", "nftables")?;
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
        nft_apply(ns, &rules)?;
        Ok(firewall)
    }

    /// Packets the `ct state new drop` rule dropped so far.
    pub fn dropped_packets(&self) -> Result<u64> {
        let out =
            run(exec_in(&self.ns, "nft").args(["list", "chain", "inet", FIREWALL_TABLE, "input"]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find(|l| l.contains("ct state new") && l.contains("drop"))
            .and_then(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let at = words.iter().position(|w| *w == "packets")?;
                words.get(at + 1)?.parse().ok()
            })
            .with_context(|| format!("no counter on the drop rule:\n{text}"))
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = exec_in(&self.ns, "nft")
            .args(["delete", "table", "inet", FIREWALL_TABLE])
            .stderr(Stdio::null())
            .status();
    }
}

/// A home network behind a NAT router: a namespace `…-TAG-home` (address `192.168.SUBNET.2`,
/// its default route through the router) plugged into the namespace of a [`Lan`] node that
/// acts as its router (`192.168.SUBNET.1` on its side). The router forwards and masquerades
/// what the home sends out and drops every new connection from the LAN towards the home, as a
/// home router without port forwarding does: nothing on the LAN has a route in.
#[derive(Debug)]
pub struct Nat {
    home: Netns,
    router: String,
    subnet: u8,
}

const NAT_TABLE: &str = "p2f_tk_masquerade";

impl Nat {
    /// A home behind the LAN node `router` of `lan`.
    pub fn behind(lan: &Lan, router: &str, tag: &str, subnet: u8) -> Result<Nat> {
        require("nft", "nftables")?;
        let home = Netns::create(format!("p2f-tk-{}-{tag}-home", std::process::id()))?;
        let router_ns = lan.ns(router).to_owned();
        let nat = Nat {
            home,
            router: router_ns.clone(),
            subnet,
        };
        let home_ns = nat.home.name.clone();
        ip(&[
            "-n", &router_ns, "link", "add", "home0", "type", "veth", "peer", "name", "eth0",
            "netns", &home_ns,
        ])?;
        let router_address = format!("192.168.{subnet}.1/24");
        ip(&[
            "-n",
            &router_ns,
            "addr",
            "add",
            &router_address,
            "dev",
            "home0",
        ])?;
        ip(&["-n", &router_ns, "link", "set", "home0", "up"])?;
        let home_address = format!("{}/24", nat.ip());
        ip(&["-n", &home_ns, "addr", "add", &home_address, "dev", "eth0"])?;
        ip(&["-n", &home_ns, "link", "set", "eth0", "up"])?;
        let gateway = format!("192.168.{subnet}.1");
        ip(&["-n", &home_ns, "route", "add", "default", "via", &gateway])?;
        run(exec_in(&router_ns, "sysctl").args(["-qw", "net.ipv4.ip_forward=1"]))?;
        let rules = format!(
            "table ip {NAT_TABLE} {{
                chain postrouting {{
                    type nat hook postrouting priority srcnat; policy accept;
                    oifname \"eth0\" masquerade
                }}
                chain forward {{
                    type filter hook forward priority filter; policy drop;
                    iifname \"home0\" accept
                    ct state established,related accept
                    counter drop
                }}
            }}"
        );
        nft_apply(&router_ns, &rules)?;
        Ok(nat)
    }

    /// The home's namespace.
    pub fn ns(&self) -> &str {
        self.home.name()
    }

    /// The home's address (`192.168.SUBNET.2`), private: nothing outside routes to it.
    pub fn ip(&self) -> String {
        format!("192.168.{}.2", self.subnet)
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        let _ = exec_in(&self.router, "nft")
            .args(["delete", "table", "ip", NAT_TABLE])
            .stderr(Stdio::null())
            .status();
    }
}
