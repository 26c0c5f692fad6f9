//! Containment: every process a service starts belongs to it — however it detaches (`setsid`,
//! a double fork, daemonizing), and every child of its stop command and of its `Cmd` health
//! checks. It is counted in the service's memory, signalled and stopped with it, and never
//! outlives it unnoticed (systemd's `KillMode=control-group`).
//!
//! The kernel's mechanism is a cgroup: one per process, `P2F_SUBTREE/PROCESS_ID`, under a
//! subtree the agent owns, `p2f-NODE-HASH` beside the agent in its own cgroup v2 (the unified
//! hierarchy, at `/sys/fs/cgroup` or, on a hybrid host, `/sys/fs/cgroup/unified`). A child
//! joins it before it runs anything (see [`Cell::join_before_exec`]), so nothing it forks can
//! be missed; membership is read from `cgroup.procs` and the whole cell is killed at once with
//! `cgroup.kill`. No controller is enabled: the cgroup is for membership, not limits.
//!
//! The stated fallback, where no cgroup v2 is mounted or the agent may not write to it (not
//! root and nothing delegated): the process's tree under its log relay, which is a child
//! subreaper (`PR_SET_CHILD_SUBREAPER`), so an orphan is re-parented to the relay and stays in
//! its tree. It is found by walking `/proc`, which can miss a process forked during the walk:
//! kills are repeated until the tree is empty.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use p2f_model::{NodeName, ProcessId};

use crate::node::config::ContainmentMode;
use crate::node::os;

/// How many times a kill is repeated while processes keep appearing (forks racing the kill).
const KILL_ROUNDS: u32 = 50;
/// The pause between two rounds.
const KILL_PAUSE: Duration = Duration::from_millis(10);

/// How a node contains its processes (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Containment {
    /// A cgroup v2 per process, under this subtree.
    Cgroup(PathBuf),
    /// The fallback: the tree under the process's relay (a child subreaper); `why` says why
    /// there is no cgroup.
    Tree { why: String },
}

impl Containment {
    /// The containment for the agent of `node` whose state is in `data_dir`: a subtree of its
    /// own cgroup v2, created (and checked writable) now, or the fallback with the reason.
    /// The subtree's name is stable across restarts of the agent (its processes are found
    /// again) and differs between agents of one machine (their data directories differ).
    pub fn detect(node: &NodeName, data_dir: &Path, mode: ContainmentMode) -> Containment {
        if mode == ContainmentMode::Tree {
            return Containment::Tree {
                why: "[supervisor] containment = \"tree\"".into(),
            };
        }
        match cgroup_subtree(node, data_dir) {
            Ok(dir) => Containment::Cgroup(dir),
            Err(why) => Containment::Tree { why },
        }
    }

    /// The cell of one process.
    pub fn cell(&self, id: &ProcessId) -> Cell {
        match self {
            Containment::Cgroup(subtree) => Cell::Cgroup(subtree.join(id.as_str())),
            Containment::Tree { .. } => Cell::Tree,
        }
    }

    /// Every cell under the subtree, by name (none in the fallback).
    pub fn cells(&self) -> Vec<(String, Cell)> {
        let Containment::Cgroup(subtree) = self else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(subtree) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_owned();
                Some((name, Cell::Cgroup(e.path())))
            })
            .collect()
    }

    /// One line for the agent's log.
    pub fn describe(&self) -> String {
        match self {
            Containment::Cgroup(dir) => format!("cgroup v2 at {}", dir.display()),
            Containment::Tree { why } => format!("process tree under each relay ({why})"),
        }
    }

    /// Removes the subtree when it holds no cell any more (at shutdown).
    pub fn remove_if_empty(&self) {
        if let Containment::Cgroup(dir) = self {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl Containment {
    /// Where the cgroup subtree of the agent of `node` with state in `data_dir` is (or would
    /// be), without creating it: for tools and tests that clean up after an agent.
    pub fn subtree_of(node: &NodeName, data_dir: &Path) -> Option<PathBuf> {
        subtree_path(node, data_dir).ok()
    }
}

/// Finds (and creates) the subtree; `Err` says why there is none.
fn cgroup_subtree(node: &NodeName, data_dir: &Path) -> Result<PathBuf, String> {
    let dir = subtree_path(node, data_dir)?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // Writable for this agent: processes can be moved in (needs write access to cgroup.procs).
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
        .map_err(|e| format!("cannot write to {}: {e}", dir.display()))?;
    Ok(dir)
}

/// The subtree's path: `MOUNT/OWN_CGROUP/p2f-NODE-HASH`.
fn subtree_path(node: &NodeName, data_dir: &Path) -> Result<PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mount = cgroup2_mount(&mounts).ok_or("no cgroup v2 hierarchy is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let own = own
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2")?;
    let data_dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let name = format!(
        "p2f-{node}-{:08x}",
        fnv32(data_dir.as_os_str().as_encoded_bytes())
    );
    Ok(Path::new(mount)
        .join(own.trim_start_matches('/'))
        .join(name))
}

/// The mount point of the cgroup v2 hierarchy in a `/proc/self/mountinfo` text (proc(5):
/// field 5 is the mount point; after the ` - ` separator comes the file system type).
fn cgroup2_mount(mountinfo: &str) -> Option<&str> {
    mountinfo.lines().find_map(|line| {
        let (fields, tail) = line.split_once(" - ")?;
        let fstype = tail.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| fields.split_whitespace().nth(4))?
    })
}

/// FNV-1a, 32 bits: a short stable name for a path.
fn fnv32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

/// Where the processes of one placement are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// Its cgroup's directory.
    Cgroup(PathBuf),
    /// The tree under its relay.
    Tree,
}

impl Cell {
    /// Makes the cgroup anew for a start: whatever an earlier run left in it is killed and the
    /// old cgroup removed first. Never reused: a process born into a cgroup (`clone3` with
    /// `CLONE_INTO_CGROUP`, see `relay`) that was once killed through `cgroup.kill` is killed
    /// at birth (seen on Linux 6.18: the kernel's kill sequence check). Fails when the old
    /// cgroup cannot be emptied.
    pub fn prepare(&self) -> io::Result<()> {
        if let Cell::Cgroup(dir) = self {
            if dir.exists() {
                self.kill(0);
                std::fs::remove_dir(dir)?;
            }
            std::fs::create_dir_all(dir)?;
        }
        Ok(())
    }

    /// The cgroup directory, if there is one.
    pub fn cgroup(&self) -> Option<&Path> {
        match self {
            Cell::Cgroup(dir) => Some(dir),
            Cell::Tree => None,
        }
    }

    /// An open `cgroup.procs` of this cell for [`join_before_exec`] (`None` in the fallback).
    pub fn door(&self) -> io::Result<Option<std::fs::File>> {
        match self {
            Cell::Cgroup(dir) => std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .map(Some),
            Cell::Tree => Ok(None),
        }
    }

    /// The living processes of the cell; in the fallback, those under `relay` (a pid of 0
    /// stands for no relay: nothing).
    pub fn members(&self, relay: u32) -> Vec<u32> {
        match self {
            Cell::Cgroup(dir) => std::fs::read_to_string(dir.join("cgroup.procs"))
                .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
                .unwrap_or_default(),
            Cell::Tree if relay > 1 => os::descendants(relay),
            Cell::Tree => Vec::new(),
        }
    }

    /// Whether any process of the cell lives.
    pub fn populated(&self, relay: u32) -> bool {
        !self.members(relay).is_empty()
    }

    /// Sends `signal` to every process of the cell; returns how many got it.
    pub fn signal(&self, relay: u32, signal: Signal) -> usize {
        self.members(relay)
            .into_iter()
            .filter(|pid| os::signal_pid(*pid, signal))
            .count()
    }

    /// Kills every process of the cell and returns once none is left (or after a bounded
    /// number of rounds): `cgroup.kill` where the kernel has it (5.14+), else SIGKILL to
    /// each member, repeated while forks race it.
    pub fn kill(&self, relay: u32) {
        if let Cell::Cgroup(dir) = self
            && std::fs::write(dir.join("cgroup.kill"), "1").is_ok()
        {
            wait_empty(|| self.populated(relay));
            return;
        }
        for _ in 0..KILL_ROUNDS {
            if self.signal(relay, Signal::SIGKILL) == 0 {
                return;
            }
            std::thread::sleep(KILL_PAUSE);
        }
    }

    /// Removes the cgroup (it must be empty; a cell still populated stays, and is reused).
    pub fn remove(&self) {
        if let Cell::Cgroup(dir) = self {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Waits (bounded) until `populated` turns false: killed processes leave the cgroup when the
/// kernel has torn them down, shortly after the kill.
fn wait_empty(populated: impl Fn() -> bool) {
    for _ in 0..KILL_ROUNDS {
        if !populated() {
            return;
        }
        std::thread::sleep(KILL_PAUSE);
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is open as `door`: for a
/// `pre_exec` hook, after `fork` and before `exec`, so the child is in the cell before it runs
/// anything. Only `write(2)`: async-signal-safe. The kernel checks permission against who
/// opened the file, so this works after the child dropped to the process's user.
pub fn join_before_exec(door: std::os::fd::RawFd) -> io::Result<()> {
    // "0" means "the writing process".
    // SAFETY: writes one byte from a static buffer to a descriptor the caller keeps open.
    let written = unsafe { nix::libc::write(door, b"0".as_ptr().cast(), 1) };
    if written == 1 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_beside_v1_controllers() {
        let hybrid = "\
35 25 0:30 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
36 35 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
44 35 0:39 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_mount(hybrid), Some("/sys/fs/cgroup/unified"));
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(unified), Some("/sys/fs/cgroup"));
        assert_eq!(cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn subtree_names_are_stable_and_differ_per_data_directory() {
        assert_eq!(fnv32(b"/var/lib/p2f"), fnv32(b"/var/lib/p2f"));
        assert_ne!(fnv32(b"/var/lib/p2f"), fnv32(b"/var/lib/p2f2"));
    }

    /// A real cell on this machine (cgroup v2 where writable, else the tree): a child that
    /// joins it before exec and detaches with `setsid` is a member, and dies with the cell.
    #[test]
    fn a_detached_grandchild_is_a_member_and_dies_with_the_cell() {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let node = NodeName::from_static("contain-test");
        let containment = Containment::detect(&node, dir.path(), ContainmentMode::Cgroup);
        let id = ProcessId::for_service("detach", u64::from(std::process::id()));
        let cell = containment.cell(&id);
        cell.prepare().expect("prepare");
        let door = cell.door().expect("door");
        let fd = door.as_ref().map(AsRawFd::as_raw_fd);
        let mut command = std::process::Command::new("sh");
        command.args(["-c", "setsid sleep 60 & exec sleep 60"]);
        // SAFETY: the hook only calls join_before_exec (one write(2)).
        unsafe {
            command.pre_exec(move || fd.map_or(Ok(()), join_before_exec));
        }
        let mut child = command.spawn().expect("spawn");
        let relay = std::process::id();
        let members = || {
            let mut all = cell.members(relay);
            if cell == Cell::Tree {
                // Under the test, the tree is every child of the test process: keep ours.
                all.retain(|pid| *pid == child.id() || os::descendants(child.id()).contains(pid));
            }
            all
        };
        let mut seen = 0;
        for _ in 0..200 {
            seen = members().len();
            if seen >= 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            seen >= 2,
            "both sleeps are members ({})",
            containment.describe()
        );
        if let Cell::Cgroup(_) = &cell {
            cell.kill(relay);
            assert!(
                !cell.populated(relay),
                "the detached sleep died with the cell"
            );
        } else {
            for pid in os::descendants(child.id()) {
                os::signal_pid(pid, Signal::SIGKILL);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        cell.remove();
        containment.remove_if_empty();
    }
}
