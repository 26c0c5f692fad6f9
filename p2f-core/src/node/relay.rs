//! The log relay: one small process per running process, between it and its log files, that
//! outlives the agent (podman's conmon, s6-log).
//!
//! Why a process of its own: a process writing straight into its log file cannot have that file
//! rotated without losing lines (copy-and-truncate races its writes) or letting the file grow
//! past its limit (a renamed file keeps being written); a pipe read by the agent would end the
//! process with SIGPIPE when the agent stops. The relay holds the pipe's reading end, so the
//! process keeps its output while the agent is away; it rotates only between lines, so no line
//! is lost or split and no file grows past `log_max_bytes` by more than one line.
//!
//! It is also the process's keeper:
//! - a child subreaper (`PR_SET_CHILD_SUBREAPER`): whatever the process orphans — a `setsid`
//!   helper, a daemon — is re-parented to the relay and reaped by it;
//! - it puts the process into its cell (see [`crate::node::contain`]) before it runs anything;
//! - when the process's main pid ends, it kills what is left of the cell (as systemd does for
//!   a simple service), reaps, drains the pipe, and writes how the process ended to its exit
//!   file, which the agent reads — also after the agent restarted and re-adopted it.
//!
//! The relay is this same executable, started as `/proc/self/exe __p2f-relay OPTIONS -- PROGRAM
//! ARGS`: a constructor that runs before `main` in every binary linking `p2f-core` (the `p2f`
//! CLI, a deployment's binary, a test binary) turns such an invocation into the relay, so no
//! binary has to cooperate. The relay uses only blocking std and `nix`, no async runtime.
//!
//! Its protocol with the agent: it prints `pid N` (or `error MESSAGE`) as its first line of
//! standard output once the process runs; its own errors go to standard error, which the agent
//! points at the log file; its exit file holds `code N` or `signal N`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::node::contain::{self, Cell};
use crate::node::lifecycle::Exit;

/// The first argument that makes this executable a relay.
pub const MARK: &str = "__p2f-relay";

/// The longest a partial line is held back waiting for its end; a longer line is written in
/// pieces of this size.
const LINE_MAX: usize = 64 * 1024;
/// How long the relay waits for the last output after the process ended and its cell was
/// killed (a writer outside the cell could hold the pipe open).
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How long it reaps what is left before it gives up on stragglers.
const REAP_LIMIT: Duration = Duration::from_secs(5);

/// Set by the constructor in every process that links this crate: the relay can be started.
static HOOKED: AtomicBool = AtomicBool::new(false);

#[ctor::ctor(unsafe)]
fn enter() {
    HOOKED.store(true, Ordering::SeqCst);
    // Read from /proc rather than std::env::args, which is not set up before main everywhere.
    let Ok(cmdline) = std::fs::read("/proc/self/cmdline") else {
        return;
    };
    let mut argv = cmdline
        .split(|b| *b == 0)
        .map(|arg| OsStr::from_bytes(arg).to_os_string());
    argv.next();
    if argv.next().as_deref() != Some(OsStr::new(MARK)) {
        return;
    }
    let args: Vec<OsString> = argv.collect();
    // The last element of /proc/self/cmdline is followed by a NUL: drop the empty tail.
    let args = match args.split_last() {
        Some((last, rest)) if last.is_empty() => rest.to_vec(),
        _ => args,
    };
    let code = match Relay::parse(&args) {
        Ok(relay) => relay.run(),
        Err(e) => {
            println!("error {e}");
            2
        }
    };
    std::process::exit(code);
}

/// Whether this executable can be a relay (its constructor ran): checked when the agent starts.
pub fn available() -> bool {
    HOOKED.load(Ordering::SeqCst)
}

/// The executable to start relays with: this one, by its `/proc` link, so a rebuilt or moved
/// binary still starts the same code.
pub fn executable() -> &'static Path {
    Path::new("/proc/self/exe")
}

/// A user to become: uid, primary gid and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Every group it is in (`initgroups(3)`'s list, the primary one included).
    pub groups: Vec<u32>,
}

impl User {
    /// `UID:GID:G1,G2,...`, the relay's `--user`.
    fn to_arg(&self) -> String {
        let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
        format!("{}:{}:{}", self.uid, self.gid, groups.join(","))
    }

    fn parse(text: &str) -> Option<User> {
        let mut parts = text.splitn(3, ':');
        let uid = parts.next()?.parse().ok()?;
        let gid = parts.next()?.parse().ok()?;
        let groups = match parts.next() {
            None | Some("") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        Some(User { uid, gid, groups })
    }
}

/// Becomes `user` in a child between `fork` and `exec`: its supplementary groups (where this
/// process may set them: as root), its group, then its user — in that order, as `su` does. Only
/// system calls on memory prepared before the fork (async-signal-safe).
pub fn become_user(user: &User) -> io::Result<()> {
    use nix::libc;
    let check = |result: libc::c_int| {
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls; `groups` lives in memory the caller keeps.
    unsafe {
        if libc::geteuid() == 0 {
            check(libc::setgroups(user.groups.len(), user.groups.as_ptr()))?;
        }
        check(libc::setgid(user.gid))?;
        check(libc::setuid(user.uid))
    }
}

/// One relay's settings and the program it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    /// The current log file (`ID.log`); rotated files are `ID.log.1`, `.2`, ...
    pub log: PathBuf,
    /// Rotate before a file grows past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: u32,
    /// Where to write how the process ended.
    pub exit: PathBuf,
    /// The process's cgroup (none: the fallback, its tree under the relay).
    pub cgroup: Option<PathBuf>,
    /// The user to run the process as (none: the relay's own).
    pub user: Option<User>,
    /// The program and its arguments.
    pub command: Vec<OsString>,
}

impl Relay {
    /// The relay's arguments after [`MARK`].
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--log".into(),
            self.log.clone().into(),
            "--max-bytes".into(),
            self.max_bytes.to_string().into(),
            "--keep".into(),
            self.keep.to_string().into(),
            "--exit".into(),
            self.exit.clone().into(),
        ];
        if let Some(cgroup) = &self.cgroup {
            args.extend(["--cgroup".into(), cgroup.clone().into()]);
        }
        if let Some(user) = &self.user {
            args.extend(["--user".into(), user.to_arg().into()]);
        }
        args.push("--".into());
        args.extend(self.command.iter().cloned());
        args
    }

    /// Parses [`Relay::to_args`]'s output.
    pub fn parse(args: &[OsString]) -> Result<Relay, String> {
        let mut relay = Relay {
            log: PathBuf::new(),
            max_bytes: 0,
            keep: 0,
            exit: PathBuf::new(),
            cgroup: None,
            user: None,
            command: Vec::new(),
        };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            if flag == "--" {
                relay.command = args.cloned().collect();
                break;
            }
            let value = args
                .next()
                .ok_or_else(|| format!("{} needs a value", flag.to_string_lossy()))?;
            let number = || {
                value
                    .to_str()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| format!("{} is not a number", value.to_string_lossy()))
            };
            match flag.to_str() {
                Some("--log") => relay.log = value.into(),
                Some("--exit") => relay.exit = value.into(),
                Some("--cgroup") => relay.cgroup = Some(value.into()),
                Some("--max-bytes") => relay.max_bytes = number()?,
                Some("--keep") => {
                    relay.keep = u32::try_from(number()?).map_err(|e| e.to_string())?;
                }
                Some("--user") => {
                    let user = value
                        .to_str()
                        .and_then(User::parse)
                        .ok_or("--user takes UID:GID:GROUP,...")?;
                    relay.user = Some(user);
                }
                _ => return Err(format!("unknown option {}", flag.to_string_lossy())),
            }
        }
        if relay.command.is_empty() || relay.log.as_os_str().is_empty() {
            return Err("a relay needs --log and a command after --".into());
        }
        Ok(relay)
    }

    /// The relay's life; returns its exit code.
    fn run(self) -> i32 {
        match self.try_run() {
            Ok(()) => 0,
            Err(e) => {
                // Before the pid line: the agent reads this as why the start failed.
                println!("error {e}");
                eprintln!("p2f relay: {e}");
                1
            }
        }
    }

    fn try_run(self) -> io::Result<()> {
        let _ = std::fs::remove_file(&self.exit);
        nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)?;
        let pump = Pump::open(&self.log, self.max_bytes, self.keep)?;
        let (reader, writer) = std::io::pipe()?;
        let main = self.start(writer)?;
        println!("pid {main}");
        io::stdout().flush()?;
        // Nothing more goes to the agent: standard output points at /dev/null from now on.
        if let Ok(null) = File::open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(&null);
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            pump.run(reader);
            let _ = done_tx.send(());
        });
        let ended = wait_main(main);
        // What the process left behind ends with it; then every orphan is reaped.
        let cell = match &self.cgroup {
            Some(dir) => Cell::Cgroup(dir.clone()),
            None => Cell::Tree,
        };
        cell.kill(std::process::id());
        reap_all(REAP_LIMIT);
        let _ = done_rx.recv_timeout(DRAIN_LIMIT);
        write_exit(&self.exit, ended)
    }
}

impl Relay {
    /// Starts the process with `out` as its stdout and stderr, in a new process group, as its
    /// user, in its cell; returns its pid. In a cgroup, it is born there (`clone3` with
    /// `CLONE_INTO_CGROUP`, Linux 5.7+): moving a process in afterwards takes the kernel's
    /// cgroup lock for writing, and the first such move after a quiet spell waits a whole RCU
    /// grace period (16 ms on the machine of BENCHMARKS.md), on every spin and restart. Older
    /// kernels get that move, in a `pre_exec` hook.
    fn start(&self, out: std::io::PipeWriter) -> io::Result<u32> {
        if let Some(dir) = &self.cgroup
            && let Some(pid) = clone_into(dir, &self.command, &out, self.user.as_ref())?
        {
            return Ok(pid);
        }
        let door = match &self.cgroup {
            Some(dir) => Cell::Cgroup(dir.clone()).door()?,
            None => None,
        };
        let door_fd = door.as_ref().map(AsRawFd::as_raw_fd);
        let mut command = std::process::Command::new(&self.command[0]);
        command
            .args(&self.command[1..])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let user = self.user.clone();
        // SAFETY: the hook makes only system calls (`join_before_exec`, `become_user`) on
        // memory prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                if let Some(fd) = door_fd {
                    contain::join_before_exec(fd)?;
                }
                match &user {
                    Some(user) => become_user(user),
                    None => Ok(()),
                }
            });
        }
        let child = command.spawn()?;
        Ok(child.id())
    }
}

/// The kernel's `struct clone_args` up to `cgroup` (`CLONE_ARGS_SIZE_VER2`, Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (linux/sched.h).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Starts `command` born in the cgroup `dir`; `Ok(None)` when this kernel cannot (no `clone3`
/// or no `CLONE_INTO_CGROUP`), for the caller to start it another way. The caller must be
/// single-threaded (the relay before its copying thread starts): the child runs ordinary
/// code between the clone and `exec`.
fn clone_into(
    dir: &Path,
    command: &[OsString],
    out: &std::io::PipeWriter,
    user: Option<&User>,
) -> io::Result<Option<u32>> {
    use nix::libc;
    use std::ffi::CString;
    let argv: Vec<CString> = command
        .iter()
        .map(|arg| CString::new(arg.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let cgroup = File::open(dir)?;
    let null = File::open("/dev/null")?;
    let (errors_in, errors_out) = std::io::pipe()?;
    let mut args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    let (out_fd, null_fd, report_fd) = (out.as_raw_fd(), null.as_raw_fd(), errors_out.as_raw_fd());
    // SAFETY: clone3 with no CLONE_VM forks this (single-threaded) process; the child only
    // makes system calls on descriptors and buffers prepared above, then execs or exits.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid == 0 {
        // SAFETY: see above; every call is a plain system call wrapper.
        unsafe {
            let fail = || -> ! {
                let errno = io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO);
                libc::write(report_fd, (&errno as *const i32).cast(), 4);
                libc::_exit(127)
            };
            if libc::setpgid(0, 0) != 0
                || libc::dup2(null_fd, 0) < 0
                || libc::dup2(out_fd, 1) < 0
                || libc::dup2(out_fd, 2) < 0
            {
                fail();
            }
            if let Some(user) = user
                && become_user(user).is_err()
            {
                fail();
            }
            libc::execvp(argv_ptrs[0], argv_ptrs.as_ptr());
            fail();
        }
    }
    if pid < 0 {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL) => Ok(None),
            _ => Err(error),
        };
    }
    drop(errors_out);
    let pid = u32::try_from(pid).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // The exec closed the report pipe (it is close-on-exec), or the child wrote its errno.
    let mut errno = [0u8; 4];
    let mut errors_in = errors_in;
    match errors_in.read(&mut errno) {
        Ok(4) => {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
        }
        _ => Ok(Some(pid)),
    }
}

/// Waits for `main`, reaping every other child (orphans re-parented to this subreaper) meanwhile.
fn wait_main(main: u32) -> Exit {
    use nix::sys::wait::{WaitStatus, waitpid};
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() as u32 == main => {
                return Exit::Code(code);
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid.as_raw() as u32 == main => {
                return Exit::Signal(signal as i32);
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            // No child left at all: the main process was reaped already (cannot happen: only
            // this loop waits), so report it as killed rather than spin.
            Err(_) => return Exit::Signal(nix::sys::signal::Signal::SIGKILL as i32),
        }
    }
}

/// Reaps ended children until none is left, or `limit` passed.
fn reap_all(limit: Duration) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let until = Instant::now() + limit;
    while Instant::now() < until {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(10)),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// Writes `code N` or `signal N` to `path`, atomically.
fn write_exit(path: &Path, exit: Exit) -> io::Result<()> {
    let text = match exit {
        Exit::Code(code) => format!("code {code}\n"),
        Exit::Signal(signal) => format!("signal {signal}\n"),
    };
    let tmp = path.with_extension("exit.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// How the process ended, from its relay's exit file; `None` when the file is missing or
/// unreadable (the relay did not finish: it was killed).
pub fn read_exit(path: &Path) -> Option<Exit> {
    let text = std::fs::read_to_string(path).ok()?;
    let (kind, value) = text.trim().split_once(' ')?;
    let value: i32 = value.parse().ok()?;
    match kind {
        "code" => Some(Exit::Code(value)),
        "signal" => Some(Exit::Signal(value)),
        _ => None,
    }
}

/// Copies a pipe into a log file, rotating between lines.
#[derive(Debug)]
struct Pump {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    /// Bytes in the current file.
    size: u64,
    /// Whether a failed write was reported already (reported once, then dropped quietly:
    /// the process must never block on a full disk).
    failing: bool,
}

impl Pump {
    fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<Pump> {
        let file = open_log(path)?;
        let size = file.metadata()?.len();
        Ok(Pump {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1),
            keep,
            file,
            size,
            failing: false,
        })
    }

    /// Copies until every writer closed the pipe.
    fn run(mut self, mut input: impl Read) {
        let mut buf = vec![0u8; LINE_MAX];
        let mut pending: Vec<u8> = Vec::with_capacity(LINE_MAX);
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            pending.extend_from_slice(&buf[..n]);
            let whole = match pending.iter().rposition(|b| *b == b'\n') {
                Some(i) => i + 1,
                None if pending.len() >= LINE_MAX => pending.len(),
                None => continue,
            };
            self.write_lines(&pending[..whole]);
            pending.drain(..whole);
        }
        self.write_lines(&pending);
        let _ = self.file.sync_data();
    }

    /// Writes whole lines, rotating first whenever the next line would take the current file
    /// past its limit (a line longer than the limit gets a file of its own).
    fn write_lines(&mut self, text: &[u8]) {
        let mut start = 0;
        let mut batch = 0u64;
        for line in text.split_inclusive(|b| *b == b'\n') {
            let len = line.len() as u64;
            if self.size + batch > 0 && self.size + batch + len > self.max_bytes {
                self.write(&text[start..start + batch as usize]);
                start += batch as usize;
                batch = 0;
                self.rotate();
            }
            batch += len;
        }
        self.write(&text[start..start + batch as usize]);
    }

    fn write(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match self.file.write_all(bytes) {
            Ok(()) => self.size += bytes.len() as u64,
            Err(e) if !self.failing => {
                self.failing = true;
                eprintln!("p2f relay: cannot write {}: {e}", self.path.display());
            }
            Err(_) => {}
        }
    }

    /// `ID.log.N` becomes `.N+1` (the oldest is dropped), `ID.log` becomes `.1`, and a new
    /// `ID.log` is opened. With `keep = 0` the file is emptied instead.
    fn rotate(&mut self) {
        let rotated = if self.keep == 0 {
            self.file.set_len(0).map(|()| self.file.try_clone())
        } else {
            let numbered = |n: u32| PathBuf::from(format!("{}.{n}", self.path.display()));
            for n in (1..self.keep).rev() {
                let _ = std::fs::rename(numbered(n), numbered(n + 1));
            }
            std::fs::rename(&self.path, numbered(1)).map(|()| open_log(&self.path))
        };
        match rotated.and_then(|file| file) {
            Ok(file) => {
                self.file = file;
                self.size = 0;
                self.failing = false;
            }
            Err(e) => {
                eprintln!("p2f relay: cannot rotate {}: {e}", self.path.display());
                // Keep writing to the current file rather than lose lines.
                self.size = 0;
            }
        }
    }
}

/// Opens a log file for appending, private to the agent's user.
fn open_log(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay() -> Relay {
        Relay {
            log: "/tmp/x.log".into(),
            max_bytes: 65536,
            keep: 3,
            exit: "/tmp/x.exit".into(),
            cgroup: Some("/sys/fs/cgroup/p2f/x".into()),
            user: Some(User {
                uid: 1000,
                gid: 100,
                groups: vec![100, 27],
            }),
            command: vec!["sh".into(), "-c".into(), "echo -- hi".into()],
        }
    }

    #[test]
    fn arguments_round_trip_and_bad_ones_are_refused() {
        let relay = relay();
        assert_eq!(Relay::parse(&relay.to_args()), Ok(relay));
        let bad = |args: &[&str]| {
            let args: Vec<OsString> = args.iter().map(OsString::from).collect();
            Relay::parse(&args).expect_err("refused")
        };
        assert_eq!(bad(&["--log"]), "--log needs a value");
        assert_eq!(
            bad(&["--log", "x", "--keep", "many", "--", "a"]),
            "many is not a number"
        );
        assert_eq!(
            bad(&["--log", "x", "--bogus", "1", "--", "a"]),
            "unknown option --bogus"
        );
        assert_eq!(
            bad(&["--log", "x"]),
            "a relay needs --log and a command after --"
        );
    }

    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut all: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).expect("read"),
                )
            })
            .collect();
        all.sort();
        all
    }

    #[test]
    fn rotation_happens_between_lines_and_keeps_files_under_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.log");
        let pump = Pump::open(&path, 10, 5).expect("open");
        // Read in odd pieces, as a pipe delivers them.
        let input: &[u8] = b"aaaa\nbbbb\ncccc\ndddddddddddddd\ne\nun";
        pump.run(io::Cursor::new(input.to_vec()).chain(io::empty()));
        let got = files(dir.path());
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["p.log", "p.log.1", "p.log.2", "p.log.3"]);
        // Oldest first: .3, .2, .1, then the current file.
        assert_eq!(got[3].1, b"aaaa\nbbbb\n");
        assert_eq!(got[2].1, b"cccc\n");
        assert_eq!(
            got[1].1, b"dddddddddddddd\n",
            "an overlong line gets its own file"
        );
        assert_eq!(got[0].1, b"e\nun", "a last line without its end is kept");
    }

    #[test]
    fn with_keep_zero_the_file_is_emptied_between_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.log");
        Pump::open(&path, 6, 0)
            .expect("open")
            .run(io::Cursor::new(b"one\ntwo\nthree\n".to_vec()));
        assert_eq!(files(dir.path()), [("p.log".into(), b"three\n".to_vec())]);
    }

    #[test]
    fn exit_files_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.exit");
        assert_eq!(read_exit(&path), None);
        write_exit(&path, Exit::Code(70)).expect("write");
        assert_eq!(read_exit(&path), Some(Exit::Code(70)));
        write_exit(&path, Exit::Signal(9)).expect("write");
        assert_eq!(read_exit(&path), Some(Exit::Signal(9)));
        std::fs::write(&path, "garbage").expect("write");
        assert_eq!(read_exit(&path), None);
    }
}
