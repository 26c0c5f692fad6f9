//! Programs a benchmark runs beside the agents (proxies, wrk, rathole): each in a process group
//! of its own, listed in `DIR/pgids` so that a sweep finds them even if the example itself is
//! SIGKILLed (nginx overwrites its environment, so the marker alone does not find its workers);
//! and the CPU time a process or a group used.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use p2f_testkit::procs::{self, MARKER, Signal, Stat};

/// Kills what a run under `dir` left: its agents' processes (by the marker) and the process
/// groups listed in `dir/pgids`.
pub(crate) fn sweep(dir: &Path) -> usize {
    let mut killed = procs::sweep(dir);
    if let Ok(text) = std::fs::read_to_string(dir.join("pgids")) {
        for pgid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if pgid > 1 && Stat::of(pgid).is_some_and(|s| s.pgrp == pgid) {
                procs::signal_group(pgid, Signal::SIGKILL);
                killed += 1;
            }
        }
    }
    killed
}

/// A process group of its own: killed by group when dropped.
pub(crate) struct Spawned {
    child: Child,
}

impl Spawned {
    /// Starts `command` with its output in `dir/log`.
    pub(crate) fn start(dir: &Path, log: &str, command: &mut Command) -> Result<Spawned> {
        let out = std::fs::File::create(dir.join(log))?;
        let child = command
            .env(MARKER, dir)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {command:?}"))?;
        let mut pgids = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("pgids"))?;
        writeln!(pgids, "{}", child.id())?;
        Ok(Spawned { child })
    }

    pub(crate) fn pgid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (polling) for the group leader to end, at most `limit`.
    pub(crate) async fn wait(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(Instant::now() < deadline, "still running after {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        procs::signal_group(self.child.id(), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Whose CPU time counts: one process (with all its threads), or a process group.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cpu {
    Pid(u32),
    Group(u32),
}

impl Cpu {
    /// utime + stime, in clock ticks.
    pub(crate) fn ticks(self) -> u64 {
        match self {
            Cpu::Pid(pid) => Stat::of(pid).map_or(0, |s| s.cpu_ticks),
            Cpu::Group(pgid) => group_ticks(pgid),
        }
    }
}

/// CPU ticks (utime + stime) of every process in process group `pgid`.
fn group_ticks(pgid: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(Stat::of)
        .filter(|s| s.pgrp == pgid)
        .map(|s| s.cpu_ticks)
        .sum()
}
