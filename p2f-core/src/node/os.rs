//! The OS edge under the supervisor (Linux): facts read from `/proc` and `/sys`, and signals.
//!
//! Nothing here decides; the lifecycle does. Every reader tolerates processes vanishing while it
//! looks, and reports "not there" rather than an error for them.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, SysconfVar, sysconf};

/// The fields P2F reads from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    /// Field 3: `R`, `S`, `Z`, ...
    state: char,
    /// Field 4: the parent's pid.
    ppid: u32,
    /// Field 5: the process group.
    pgrp: u32,
    /// Field 22: start time in clock ticks since boot.
    start_ticks: u64,
    /// Field 24: resident set size in pages.
    rss_pages: u64,
}

impl Stat {
    /// Whether the process has ended (a zombie waiting to be reaped, or dead).
    fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// The fields of a `/proc/PID/stat` line from field 3 on (see proc(5)): the command name
/// (field 2) may hold spaces and parentheses, so they are counted from after the last `)`.
/// Field N (N ≥ 3) is at index N - 3.
pub fn stat_fields(text: &str) -> Option<Vec<&str>> {
    let (_, rest) = text.rsplit_once(')')?;
    Some(rest.split_ascii_whitespace().collect())
}

/// Parses a `/proc/PID/stat` line.
fn parse_stat(text: &str) -> Option<Stat> {
    let fields = stat_fields(text)?;
    let field = |n: usize| fields.get(n - 3).copied();
    let mut state = field(3)?.chars();
    let (Some(state), None) = (state.next(), state.next()) else {
        return None;
    };
    Some(Stat {
        state,
        ppid: field(4)?.parse().ok()?,
        pgrp: field(5)?.parse().ok()?,
        start_ticks: field(22)?.parse().ok()?,
        rss_pages: field(24)?.parse().ok()?,
    })
}

fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The pids in `/proc`, in no particular order.
fn pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// A process group id that may be signalled: 0 and 1 would mean "my own group" and "every
/// process" to `kill(2)`.
fn group(pgid: u32) -> Option<Pid> {
    match i32::try_from(pgid) {
        Ok(raw) if raw > 1 => Some(Pid::from_raw(raw)),
        _ => None,
    }
}

/// The start time of `pid` in clock ticks since boot (field 22 of `/proc/PID/stat`), if it exists.
pub fn start_ticks(pid: u32) -> Option<u64> {
    read_stat(pid).map(|stat| stat.start_ticks)
}

/// Whether `pid` is still the process that started at `start_ticks` and has not ended (a zombie
/// is not it: it has ended and only waits to be reaped).
pub fn is_same_process(pid: u32, start_ticks: u64) -> bool {
    read_stat(pid).is_some_and(|stat| stat.start_ticks == start_ticks && !stat.is_dead())
}

/// Whether any process of group `pgid` exists (zombies included); `false` for 0 and 1.
pub fn group_alive(pgid: u32) -> bool {
    let Some(group) = group(pgid) else {
        return false;
    };
    // kill(-pgid, 0) checks for existence; EPERM means it exists but is not ours.
    match kill(Pid::from_raw(-group.as_raw()), None) {
        Ok(()) | Err(Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// Sends `signal` to every process of group `pgid`; `Ok(false)` when the group is already gone.
/// Refuses 0 and 1, which `kill(2)` reads as "my own group" and "every process".
pub fn signal_group(pgid: u32, signal: Signal) -> io::Result<bool> {
    let Some(group) = group(pgid) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{pgid} is not a process group that may be signalled"),
        ));
    };
    match killpg(group, signal) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The resident memory in bytes of each group in `pgids`, summed over its living members, in one
/// scan of `/proc`. Groups without a living member are absent from the map.
pub fn group_rss(pgids: &[u32]) -> HashMap<u32, u64> {
    let wanted: HashSet<u32> = pgids.iter().copied().collect();
    let page = page_size();
    let mut rss = HashMap::new();
    if wanted.is_empty() {
        return rss;
    }
    for pid in pids() {
        // A pid that vanished since the listing has no stat: skip it.
        let Some(stat) = read_stat(pid) else { continue };
        if stat.is_dead() || !wanted.contains(&stat.pgrp) {
            continue;
        }
        let bytes = stat.rss_pages.saturating_mul(page);
        let total: &mut u64 = rss.entry(stat.pgrp).or_default();
        *total = total.saturating_add(bytes);
    }
    rss
}

/// The page size in bytes.
fn page_size() -> u64 {
    match sysconf(SysconfVar::PAGE_SIZE) {
        Ok(Some(size)) => u64::try_from(size).unwrap_or(4096),
        _ => 4096,
    }
}

/// The resident memory in bytes of `pids` together (those that ended count nothing).
pub fn rss_of(pids: &[u32]) -> u64 {
    let page = page_size();
    pids.iter()
        .filter_map(|pid| read_stat(*pid))
        .filter(|stat| !stat.is_dead())
        .map(|stat| stat.rss_pages.saturating_mul(page))
        .fold(0, u64::saturating_add)
}

/// Every living descendant of `root` (children, their children, ...), not `root` itself, in one
/// scan of `/proc`. Under a child subreaper this is every process it started, however they
/// detached: an orphan is re-parented to the nearest subreaper, never out of its tree.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for pid in pids() {
        if let Some(stat) = read_stat(pid)
            && !stat.is_dead()
        {
            children.entry(stat.ppid).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut next = vec![root];
    while let Some(pid) = next.pop() {
        if let Some(kids) = children.remove(&pid) {
            found.extend_from_slice(&kids);
            next.extend(kids);
        }
    }
    found
}

/// Sends `signal` to `pid`; `false` when it is gone. Refuses 0 and 1.
pub fn signal_pid(pid: u32, signal: Signal) -> bool {
    match i32::try_from(pid) {
        Ok(raw) if raw > 1 => kill(Pid::from_raw(raw), signal).is_ok(),
        _ => false,
    }
}

/// The children this process spawned itself and waits for through tokio (pid and start time),
/// which the orphan reaper must leave alone: reaping one would take its exit status from the
/// task that waits for it.
static SPAWNED: std::sync::Mutex<Vec<(u32, u64)>> = std::sync::Mutex::new(Vec::new());

/// Spawns `command` and registers the child as one this process waits for itself (see
/// [`reap_orphans`]). Every child the agent starts goes through here.
pub fn spawn(command: &mut tokio::process::Command) -> io::Result<tokio::process::Child> {
    if !REAPING.load(std::sync::atomic::Ordering::SeqCst) {
        return command.spawn();
    }
    let mut spawned = SPAWNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let child = command.spawn()?;
    if let Some(pid) = child.id() {
        spawned.push((pid, start_ticks(pid).unwrap_or(0)));
    }
    if spawned.len() > SPAWNED_PRUNE_AT {
        // Between two reaper looks (a burst of spawns): forget the children that are gone.
        spawned.retain(|(pid, _)| fs::metadata(format!("/proc/{pid}")).is_ok());
    }
    Ok(child)
}

/// [`spawn`] off the async threads: a child that joins a cgroup before it execs (a check or a
/// stop command joining its service's cell) keeps the spawning thread waiting for its exec, and
/// the kernel's first cgroup move after a quiet spell waits a whole RCU grace period (~16 ms).
pub async fn spawn_off(mut command: tokio::process::Command) -> io::Result<tokio::process::Child> {
    tokio::task::spawn_blocking(move || spawn(&mut command))
        .await
        .map_err(io::Error::other)?
}

/// Whether [`adopt_orphans`] runs in this process (only then is [`SPAWNED`] kept).
static REAPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Past this many entries, [`spawn`] prunes the registry itself.
const SPAWNED_PRUNE_AT: usize = 4096;

/// Makes this process a child subreaper (`PR_SET_CHILD_SUBREAPER`, see prctl(2)): a process
/// that any of its descendants orphans is re-parented here rather than to PID 1.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Makes this process a child subreaper and, for as long as its tokio runtime runs, reaps every
/// orphan re-parented to it (also as PID 1 of a container), on each SIGCHLD (and once a minute,
/// in case one was missed: each look reads every process's `/proc/PID/stat`).
/// Only for a process that is the agent and nothing else (`p2f node run`): a binary that also
/// waits for children it did not start through [`spawn`] would have them reaped from under it.
pub fn adopt_orphans() -> io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    become_subreaper()?;
    REAPING.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut sigchld = signal(SignalKind::child())?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tick.tick() => {}
            }
            let reaped = tokio::task::spawn_blocking(reap_orphans).await.unwrap_or(0);
            if reaped > 0 {
                tracing::debug!(reaped, "reaped orphans");
            }
            // A burst of exits is handled by one look.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    Ok(())
}

/// Reaps every ended child of this process that it did not [`spawn`] itself: orphans
/// re-parented to it as a subreaper or as PID 1. Returns how many were reaped.
///
/// `/proc` is read without the registry's lock (a look takes milliseconds, and a spawn must not
/// wait for it); each ended child found is then checked against the registry under the lock,
/// which [`spawn`] holds from before its child exists until it is registered.
pub fn reap_orphans() -> usize {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let me = std::process::id();
    let children: Vec<(u32, Stat)> = pids()
        .into_iter()
        .filter_map(|pid| Some((pid, read_stat(pid)?)))
        .filter(|(_, stat)| stat.ppid == me)
        .collect();
    let mut spawned = SPAWNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut reaped = 0;
    for (pid, stat) in &children {
        if !stat.is_dead() || spawned.contains(&(*pid, stat.start_ticks)) {
            continue;
        }
        if let Ok(raw) = i32::try_from(*pid)
            && waitpid(Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG)).is_ok()
        {
            reaped += 1;
        }
    }
    // Children that were waited for are gone: forget them (those spawned since the look stay).
    let listed: HashSet<u32> = pids().into_iter().collect();
    spawned.retain(|(pid, _)| listed.contains(pid));
    reaped
}

/// The real uid of `pid` (`Uid:` in `/proc/PID/status`).
pub fn uid_of(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` is a log relay (its second argument is [`crate::node::relay::MARK`]).
pub fn is_relay(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        cmdline.split(|b| *b == 0).nth(1) == Some(crate::node::relay::MARK.as_bytes())
    })
}

/// Whether a `/proc/PID/environ` block (NUL-separated `NAME=value`) holds every one of `wanted`.
fn environ_has(environ: &[u8], wanted: &[&[u8]]) -> bool {
    wanted
        .iter()
        .all(|want| environ.split(|&b| b == 0).any(|var| var == *want))
}

/// The processes started with `P2F_PROCESS_ID=<id>` and `P2F_GENERATION=<generation>` in their
/// environment, as `(pid, pgid)` sorted by pid. Processes whose environment cannot be read
/// (another user's, or vanished) are skipped.
pub fn find_by_env(id: &str, generation: u64) -> Vec<(u32, u32)> {
    let id_var = format!("P2F_PROCESS_ID={id}");
    let generation_var = format!("P2F_GENERATION={generation}");
    let wanted = [id_var.as_bytes(), generation_var.as_bytes()];
    let mut found: Vec<(u32, u32)> = pids()
        .into_iter()
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|environ| environ_has(&environ, &wanted))
        })
        .filter_map(|pid| {
            let stat = read_stat(pid)?;
            (!stat.is_dead()).then_some((pid, stat.pgrp))
        })
        .collect();
    found.sort_unstable();
    found
}

/// The kernel's TCP socket tables, `/proc/net/tcp` and `/proc/net/tcp6` (see proc(5)), read
/// once for the lookups of one pass ([`Listening::address`]).
#[derive(Debug)]
pub struct Listening {
    /// Each table's text, and whether it is the IPv6 one.
    tables: Vec<(String, bool)>,
}

impl Listening {
    /// Reads both tables (one missing, as without IPv6, counts as empty).
    pub fn read() -> Listening {
        let tables = [("/proc/net/tcp", false), ("/proc/net/tcp6", true)]
            .into_iter()
            .filter_map(|(file, v6)| Some((fs::read_to_string(file).ok()?, v6)))
            .collect();
        Listening { tables }
    }

    /// Where TCP `port` is bound for listening: the unspecified address (`0.0.0.0:P`,
    /// `[::]:P`) when any socket listens on every address, else a non-loopback address when
    /// there is one, else a loopback one; `None` when nothing listens on it.
    pub fn address(&self, port: u16) -> Option<std::net::SocketAddr> {
        let found: Vec<std::net::IpAddr> = self
            .tables
            .iter()
            .flat_map(|(table, v6)| listening_on(table, port, *v6))
            .collect();
        let pick = found
            .iter()
            .find(|ip| ip.is_unspecified())
            .or_else(|| found.iter().find(|ip| !ip.is_loopback()))
            .or_else(|| found.first())?;
        Some(std::net::SocketAddr::new(*pick, port))
    }
}

/// [`Listening::address`] of `port`, reading the tables for it alone.
pub fn listen_address(port: u16) -> Option<std::net::SocketAddr> {
    Listening::read().address(port)
}

/// The local addresses of the sockets in LISTEN state (`0A`) on `port` in a `/proc/net/tcp`
/// (`v6 = false`) or `/proc/net/tcp6` table. Addresses are hex words in the kernel's byte order.
fn listening_on(table: &str, port: u16, v6: bool) -> Vec<std::net::IpAddr> {
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            let (address, local_port) = local.split_once(':')?;
            if state != "0A" || u16::from_str_radix(local_port, 16).ok()? != port {
                return None;
            }
            if v6 {
                if address.len() != 32 {
                    return None;
                }
                let mut bytes = [0u8; 16];
                for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                    chunk.copy_from_slice(&word(address.get(i * 8..i * 8 + 8)?)?);
                }
                let ip = Ipv6Addr::from(bytes);
                Some(
                    ip.to_ipv4_mapped()
                        .map_or(std::net::IpAddr::V6(ip), std::net::IpAddr::V4),
                )
            } else {
                Some(std::net::IpAddr::V4(Ipv4Addr::from(word(address)?)))
            }
        })
        .collect()
}

/// Whether something holds TCP `port`: binding it on `0.0.0.0` (and on `[::]` where IPv6
/// exists) fails with "address in use". The probe holds the port for an instant when it is free.
/// Any other bind error (no permission for a port below 1024, no IPv6) counts as "not in use".
pub fn port_in_use(port: u16) -> bool {
    let taken = |result: io::Result<TcpListener>| matches!(result, Err(e) if e.kind() == io::ErrorKind::AddrInUse);
    taken(TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
        || taken(TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)))
}

/// The path of this process's cgroup v2 (`0::/path`) or of its cgroup v1 `memory` controller
/// (`N:memory:/path`) in a `/proc/self/cgroup` text.
fn cgroup_path<'a>(cgroup: &'a str, controller: &str) -> Option<&'a str> {
    cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        matches.then_some(path)
    })
}

/// The `oom_kill N` counter in a `memory.events` (v2) or `memory.oom_control` (v1) text.
fn oom_kill_field(events: &str) -> Option<u64> {
    events.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == "oom_kill").then(|| value.trim().parse().ok())?
    })
}

/// `MemAvailable` of /proc/meminfo, in bytes: what the kernel can give new processes.
pub fn memory_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// How many processes the kernel's OOM killer has ended in this process's cgroup (and below it),
/// from cgroup v2's `memory.events`, or from v1's `memory.oom_control` on a v1 or hybrid
/// host; `None` when neither is available.
pub fn oom_kill_count() -> Option<u64> {
    let cgroup = fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |file: String| oom_kill_field(&fs::read_to_string(file).ok()?);
    let v2 = || {
        let path = cgroup_path(&cgroup, "")?.trim_end_matches('/');
        read(format!("/sys/fs/cgroup{path}/memory.events"))
    };
    let v1 = || {
        let path = cgroup_path(&cgroup, "memory")?.trim_end_matches('/');
        read(format!("/sys/fs/cgroup/memory{path}/memory.oom_control"))
    };
    v2().or_else(v1)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command};
    use std::time::{Duration, Instant};

    use super::*;

    /// A child in its own process group, killed (the whole group) and reaped on drop.
    struct Group(Child);

    impl Group {
        fn spawn(command: &mut Command) -> Group {
            Group(command.process_group(0).spawn().expect("spawn child"))
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }

        /// Waits up to 5 s for the child to exit; whether it did.
        fn exited_within_5s(&mut self) -> bool {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if self.0.try_wait().expect("try_wait").is_some() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            false
        }
    }

    impl Drop for Group {
        fn drop(&mut self) {
            if let Ok(pgid) = i32::try_from(self.0.id()) {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn sleep_30() -> Command {
        let mut command = Command::new("sleep");
        command.arg("30");
        command
    }

    /// Polls `ready` every 10 ms for up to 5 s.
    fn eventually(mut ready: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if ready() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn stat_lines_parse_after_the_last_parenthesis() {
        let tail = "3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26";
        let check = |text: String, expected: Option<(char, u32, u64, u64)>| {
            let got = parse_stat(&text).map(|s| (s.state, s.pgrp, s.start_ticks, s.rss_pages));
            assert_eq!(got, expected, "{text}");
        };
        let line = |comm: &str, state: &str| {
            let rest = tail.replacen('3', state, 1);
            format!("42 ({comm}) {rest}")
        };
        check(line("sleep", "S"), Some(('S', 5, 22, 24)));
        check(line("a b) (c", "Z"), Some(('Z', 5, 22, 24)));
        check(line(")", "R"), Some(('R', 5, 22, 24)));
        check("42 (x) S 1 2".to_owned(), None);
        check("no parenthesis".to_owned(), None);
        check(line("x", "SS"), None);
    }

    #[test]
    fn a_running_child_is_recognised_by_its_start_time() {
        let mut child = Group::spawn(&mut sleep_30());
        let pid = child.pid();
        let ticks = start_ticks(pid).expect("a running child has a start time");
        assert!(start_ticks(std::process::id()).is_some_and(|own| own <= ticks));
        assert!(is_same_process(pid, ticks));
        assert!(!is_same_process(pid, ticks + 1));

        child.0.kill().expect("SIGKILL");
        // Killed but not reaped: a zombie is not the process any more.
        assert!(eventually(|| read_stat(pid).is_some_and(|s| s.state == 'Z')));
        assert!(!is_same_process(pid, ticks));
        child.0.wait().expect("reap");
        assert_eq!(start_ticks(pid), None);
        assert!(!is_same_process(pid, ticks));
    }

    #[test]
    fn a_group_is_alive_until_signalled() {
        let mut child = Group::spawn(&mut sleep_30());
        let pgid = child.pid();
        assert!(group_alive(pgid));
        assert!(signal_group(pgid, Signal::SIGTERM).expect("signal"));
        assert!(child.exited_within_5s(), "sleep ignored SIGTERM");
        assert!(!group_alive(pgid));
        assert!(!signal_group(pgid, Signal::SIGTERM).expect("signal a gone group"));
    }

    #[test]
    fn groups_0_and_1_are_never_signalled() {
        assert!(!group_alive(0));
        assert!(!group_alive(1));
        assert!(!group_alive(u32::MAX));
        for pgid in [0, 1, u32::MAX] {
            let err = signal_group(pgid, Signal::SIGTERM).expect_err("refused");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn group_rss_sums_every_member() {
        let child = Group::spawn(Command::new("sh").args(["-c", "sleep 30 & sleep 30; wait"]));
        let pgid = child.pid();
        let members = || -> Vec<Stat> {
            pids()
                .into_iter()
                .filter_map(read_stat)
                .filter(|s| s.pgrp == pgid && !s.is_dead())
                .collect()
        };
        assert!(
            eventually(|| members().len() >= 3),
            "sh and its two sleeps should share group {pgid}"
        );
        let largest = members().iter().map(|s| s.rss_pages).max().unwrap_or(0);
        let page = u64::try_from(
            sysconf(SysconfVar::PAGE_SIZE)
                .ok()
                .flatten()
                .unwrap_or(4096),
        )
        .unwrap_or(4096);

        let rss = group_rss(&[pgid, 1_999_999_999]);
        let total = rss.get(&pgid).copied().unwrap_or(0);
        assert!(
            total > largest * page,
            "{total} bytes is one member's worth"
        );
        assert_eq!(rss.len(), 1, "a group without members is absent");
        assert!(group_rss(&[]).is_empty());
        drop(child);
    }

    #[test]
    fn find_by_env_matches_id_and_generation() {
        let id = format!("os-test-{}", std::process::id());
        let started = |generation: &str| {
            let mut command = sleep_30();
            command
                .env("P2F_PROCESS_ID", &id)
                .env("P2F_GENERATION", generation);
            Group::spawn(&mut command)
        };
        let third = started("3");
        let fourth = started("4");
        let also_third_but_other_id = Group::spawn(
            sleep_30()
                .env("P2F_PROCESS_ID", format!("{id}-other"))
                .env("P2F_GENERATION", "3"),
        );

        assert_eq!(find_by_env(&id, 3), vec![(third.pid(), third.pid())]);
        assert_eq!(find_by_env(&id, 4), vec![(fourth.pid(), fourth.pid())]);
        assert_eq!(find_by_env(&id, 5), Vec::new());
        drop((third, fourth, also_third_but_other_id));
    }

    #[test]
    fn environ_blocks_match_whole_variables() {
        let environ = b"A=1\0P2F_PROCESS_ID=wiki-1\0P2F_GENERATION=12\0";
        let check = |wanted: &[&[u8]], expected: bool| {
            assert_eq!(environ_has(environ, wanted), expected, "{wanted:?}");
        };
        check(&[b"P2F_PROCESS_ID=wiki-1", b"P2F_GENERATION=12"], true);
        check(&[b"P2F_PROCESS_ID=wiki-1", b"P2F_GENERATION=1"], false);
        check(&[b"P2F_PROCESS_ID=wiki", b"P2F_GENERATION=12"], false);
        check(&[b"A=1"], true);
        check(&[], true);
    }

    #[test]
    fn listening_sockets_are_read_from_the_kernels_tables() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2120 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:2121 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:2121 0100007F:9999 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:2120 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
";
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        assert_eq!(listening_on(v4, 0x2120, false), [ip("127.0.0.1")]);
        assert_eq!(
            listening_on(v4, 0x2121, false),
            [ip("0.0.0.0")],
            "the established one is not"
        );
        assert_eq!(listening_on(v6, 0x2120, true), [ip("::1")]);
        assert!(listening_on(v4, 80, false).is_empty());
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert_eq!(
            listen_address(port),
            Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        );
    }

    #[test]
    fn ports_held_by_a_listener_are_in_use() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("addr").port();
        assert!(port_in_use(port), "127.0.0.1:{port} is held");
        drop(listener);
        assert!(!port_in_use(port), "{port} was released");

        let wildcard = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind 0.0.0.0");
        assert!(port_in_use(wildcard.local_addr().expect("addr").port()));

        // Only where the host has IPv6.
        if let Ok(v6) = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) {
            let port = v6.local_addr().expect("addr").port();
            assert!(port_in_use(port), "[::1]:{port} is held");
        }
    }

    #[test]
    fn cgroup_files_parse() {
        let hybrid = "9:name=systemd:/\n4:memory:/jobs/a1\n1:cpu,cpuacct:/\n0::/user.slice/x\n";
        assert_eq!(cgroup_path(hybrid, ""), Some("/user.slice/x"));
        assert_eq!(cgroup_path(hybrid, "memory"), Some("/jobs/a1"));
        assert_eq!(cgroup_path(hybrid, "cpuacct"), Some("/"));
        assert_eq!(cgroup_path("0::/\n", "memory"), None);

        let v2 = "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(oom_kill_field(v2), Some(2));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n";
        assert_eq!(oom_kill_field(v1), Some(7));
        assert_eq!(oom_kill_field("oom 1\n"), None);
        assert_eq!(oom_kill_field("oom_kill x\n"), None);
    }

    #[test]
    fn the_oom_kill_counter_only_grows() {
        let first = oom_kill_count();
        eprintln!("oom_kill_count() on this host: {first:?}");
        let second = oom_kill_count();
        assert!(second >= first, "{first:?} then {second:?}");
    }

    #[test]
    fn available_memory_is_read_from_meminfo() {
        let available = memory_available().expect("MemAvailable");
        assert!(available > 1024 * 1024, "{available}");
    }
}
