//! The OS processes of a run: every process a harness starts carries [`MARKER`]`=DIR` in its
//! environment, and so does everything it starts in turn (the agent's processes inherit the
//! agent's environment), so a run's processes are found by their marker and killed by pid —
//! also those of an agent that was SIGKILLed. Plus `/proc/PID/stat`, signals, and running a
//! short command with a time limit.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::signal::{kill, killpg};
use nix::unistd::Pid;

pub use nix::sys::signal::Signal;

/// The environment variable that marks every process of a run; its value is a directory of the
/// run (an agent's own directory, a benchmark's scratch directory, a homelab's state directory).
pub const MARKER: &str = "P2F_TESTKIT_RUN";

/// The variable the agent sets for each process it starts (and its deploy step and health
/// commands): what tells them from the agent itself.
const PROCESS_ID_VAR: &str = "P2F_PROCESS_ID";

/// A process found in `/proc`, with its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its pid.
    pub pid: u32,
    /// `NAME=value` strings.
    pub env: Vec<String>,
}

impl Found {
    /// The value of `name` in its environment.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find_map(|v| v.strip_prefix(name)?.strip_prefix('='))
    }

    /// Whether an agent started it for a process (not the agent itself, nor a harness).
    pub fn is_started_for_a_process(&self) -> bool {
        self.var(PROCESS_ID_VAR).is_some()
    }

    /// Whether it is a process's log relay (which carries the process's variables too).
    pub fn is_relay(&self) -> bool {
        std::fs::read(format!("/proc/{}/cmdline", self.pid)).is_ok_and(|cmdline| {
            cmdline.split(|b| *b == 0).nth(1) == Some(p2f_core::node::relay::MARK.as_bytes())
        })
    }
}

/// Processes (not zombies, not this one) with an environment variable for which `test` holds.
pub fn processes_where(test: impl Fn(&[u8]) -> bool) -> Vec<Found> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mine = std::process::id();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != mine)
        .filter_map(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            if !environ.split(|b| *b == 0).any(&test) {
                return None;
            }
            let env = environ
                .split(|b| *b == 0)
                .filter(|v| !v.is_empty())
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            Some(Found { pid, env })
        })
        .filter(|found| !is_zombie(found.pid))
        .collect()
}

/// Processes whose marker is exactly `dir`.
pub fn marked(dir: &Path) -> Vec<Found> {
    let marker = format!("{MARKER}={}", dir.display());
    processes_where(|var| var == marker.as_bytes())
}

/// Processes whose marker is `dir` or lies under it.
pub fn marked_under(dir: &Path) -> Vec<Found> {
    let exact = format!("{MARKER}={}", dir.display());
    let below = format!("{exact}/");
    processes_where(|var| var == exact.as_bytes() || var.starts_with(below.as_bytes()))
}

/// SIGKILLs every process marked `dir` exactly; returns how many.
pub fn sweep_exact(dir: &Path) -> usize {
    kill_all(&marked(dir))
}

/// SIGKILLs every process marked `dir` or a directory under it; returns how many.
pub fn sweep(dir: &Path) -> usize {
    kill_all(&marked_under(dir))
}

fn kill_all(found: &[Found]) -> usize {
    for process in found {
        signal(process.pid, Signal::SIGKILL);
    }
    found.len()
}

/// Process groups led by processes an agent started for its processes, among `found` (never
/// this process's own group, nor 0 or 1).
pub fn started_groups(found: &[Found]) -> Vec<u32> {
    let own = pgid_of(std::process::id());
    let mut groups: Vec<u32> = found
        .iter()
        .filter(|p| p.is_started_for_a_process())
        .filter_map(|p| pgid_of(p.pid))
        .filter(|pgid| *pgid > 1 && Some(*pgid) != own)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// SIGKILLs every process group an agent started under the marker `dir`, then every process
/// still marked `dir`; returns how many groups.
pub fn kill_run(dir: &Path) -> usize {
    let groups = started_groups(&marked(dir));
    for pgid in &groups {
        signal_group(*pgid, Signal::SIGKILL);
    }
    sweep_exact(dir);
    groups.len()
}

/// Removes the cgroup directory `dir` and every cgroup under it, deepest first, killing what is
/// still in them (processes of the run): a cgroup whose killed processes the kernel has not
/// torn down yet is tried again, for up to 2 s.
pub fn remove_cgroups(dir: &Path) {
    for _ in 0..40 {
        remove_cgroup_tree(dir);
        if !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    if std::fs::remove_dir(dir).is_err() {
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    }
}

/// Waits until no process is marked `dir`, at most `limit`.
pub fn wait_gone(dir: &Path, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let left = marked(dir);
        if left.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "processes marked {} outlived SIGKILL for {limit:?}: {:?}",
            dir.display(),
            left.iter().map(|p| p.pid).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `kill(pid, signal)`; a process that is already gone is not an error. Refuses pids 0 and 1.
pub fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 1
    {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// `killpg(pgid, signal)`; refuses groups 0 and 1, and this process's own group.
pub fn signal_group(pgid: u32, signal: Signal) {
    if Some(pgid) == pgid_of(std::process::id()) {
        return;
    }
    if let Ok(pgid) = i32::try_from(pgid)
        && pgid > 1
    {
        let _ = killpg(Pid::from_raw(pgid), signal);
    }
}

/// The fields of `/proc/PID/stat` the harness reads (split by `p2f_core`'s
/// `os::stat_fields`, as the agent splits them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: `R`, `S`, `Z`, ...
    pub state: char,
    /// Field 4: the parent's pid.
    pub ppid: u32,
    /// Field 5: the process group.
    pub pgrp: u32,
    /// Fields 14 and 15: user and system CPU time, in clock ticks.
    pub cpu_ticks: u64,
}

impl Stat {
    /// Parses a `/proc/PID/stat` line (fields split as the agent splits them).
    pub fn parse(text: &str) -> Option<Stat> {
        let fields = p2f_core::node::os::stat_fields(text)?;
        let field = |n: usize| fields.get(n - 3).copied();
        let mut state = field(3)?.chars();
        let (Some(state), None) = (state.next(), state.next()) else {
            return None;
        };
        let utime: u64 = field(14)?.parse().ok()?;
        let stime: u64 = field(15)?.parse().ok()?;
        Some(Stat {
            state,
            ppid: field(4)?.parse().ok()?,
            pgrp: field(5)?.parse().ok()?,
            cpu_ticks: utime + stime,
        })
    }

    /// The stat of `pid`, if it exists.
    pub fn of(pid: u32) -> Option<Stat> {
        Stat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }
}

/// The zombies (ended, not yet reaped) whose parent is `parent`.
pub fn zombies_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| Stat::of(*pid).is_some_and(|s| s.ppid == parent && s.state == 'Z'))
        .collect()
}

/// Whether `pid` is gone or a zombie.
pub fn is_zombie(pid: u32) -> bool {
    Stat::of(pid).is_none_or(|s| matches!(s.state, 'Z' | 'X' | 'x'))
}

/// The process group of `pid`.
pub fn pgid_of(pid: u32) -> Option<u32> {
    Stat::of(pid).map(|s| s.pgrp)
}

/// Fails (naming the Debian package) unless `command` is an executable on the PATH (agents
/// and the commands a test runs inherit this process's PATH, so they find the same tools).
pub fn require(command: &str, package: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(command))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    ensure!(
        found,
        "`{command}` is missing: install the Debian package {package} (scripts/test does)"
    );
    Ok(())
}

/// How long one short command ([`run`]) may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `command` to its end within [`COMMAND_TIMEOUT`] (killed after it); its output, or an
/// error with that output unless it succeeded.
pub fn run(command: &mut Command) -> Result<Output> {
    let what = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} took more than {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_whatever_the_command_name() {
        let line = |comm: &str| {
            format!("42 ({comm}) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 555 0 0")
        };
        for comm in ["sleep", "a b", "x) R 9 (y", ""] {
            assert_eq!(
                Stat::parse(&line(comm)),
                Some(Stat {
                    state: 'S',
                    ppid: 1,
                    pgrp: 4242,
                    cpu_ticks: 10
                }),
                "{comm:?}"
            );
        }
        assert_eq!(Stat::parse("42 (x) SS 1 2"), None);
        assert_eq!(Stat::parse("garbage"), None);
    }

    #[test]
    fn this_process_is_found_alive_in_its_own_group() {
        let me = std::process::id();
        assert!(!is_zombie(me));
        assert!(pgid_of(me).is_some());
    }
}
