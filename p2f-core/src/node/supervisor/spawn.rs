//! The one way a process's commands run: `sh -c COMMAND` in its bundle directory, with its
//! variables (DESIGN §2), as its user, in its cell (`contain`), with `pipefail`. The start command, the stop command and a `Cmd` health
//! check are all built by [`Shell::command`]; the user is looked up once per launch
//! ([`Identity::of`]), not on every health tick or stop.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nix::unistd::{Gid, Uid};
use p2f_model::{Failure, Process};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::node::contain::{self, Cell};
use crate::node::os;
use crate::node::relay::{self, Relay};
use crate::node::strategy::{self, Prepared};

/// Who a process's commands run as (its spec's `user`), resolved once per launch: uid, gid,
/// supplementary groups (as `initgroups(3)`, what `su` and systemd give), and the variables
/// that name the user (`HOME`, `USER`, `LOGNAME`, `SHELL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
    name: String,
    home: PathBuf,
    shell: PathBuf,
}

impl Identity {
    /// The identity of `process`'s spec `user`, or `None` for the agent's own. Fails when the
    /// user does not exist, or is another user and the agent does not run as root.
    pub(crate) fn of(process: &Process) -> Result<Option<Identity>, Failure> {
        let Some(user) = process.spec.user() else {
            return Ok(None);
        };
        let found = nix::unistd::User::from_name(user)
            .map_err(|e| failed(format!("cannot look up user {user}: {e}")))?
            .ok_or_else(|| failed(format!("no such user: {user}")))?;
        let me = nix::unistd::geteuid();
        if !me.is_root() && me != found.uid {
            return Err(failed(format!(
                "cannot run as {user}: the agent does not run as root"
            )));
        }
        let name = std::ffi::CString::new(found.name.as_bytes())
            .map_err(|e| failed(format!("user name {user}: {e}")))?;
        let groups = nix::unistd::getgrouplist(&name, found.gid)
            .map_err(|e| failed(format!("cannot look up the groups of {user}: {e}")))?;
        Ok(Some(Identity {
            uid: found.uid,
            gid: found.gid,
            groups,
            name: found.name,
            home: found.dir,
            shell: found.shell,
        }))
    }

    /// The uid, for the relay and for adoption checks.
    pub(crate) fn uid(&self) -> u32 {
        self.uid.as_raw()
    }

    /// The variables that name the user, replacing the agent's.
    fn variables(&self) -> [(String, String); 4] {
        [
            ("HOME".into(), self.home.to_string_lossy().into_owned()),
            ("USER".into(), self.name.clone()),
            ("LOGNAME".into(), self.name.clone()),
            ("SHELL".into(), self.shell.to_string_lossy().into_owned()),
        ]
    }

    /// The relay's `--user`: uid, gid and supplementary groups.
    fn relay_user(&self) -> relay::User {
        relay::User {
            uid: self.uid.as_raw(),
            gid: self.gid.as_raw(),
            groups: self.groups.iter().map(|g| g.as_raw()).collect(),
        }
    }

    /// Gives `dir` and everything in it to this identity: the process owns its bundle
    /// directory, as with systemd's `StateDirectory=`. Walked by descriptor, bottom-up, `dir`
    /// given last and made 0700, symbolic links chowned as links and never followed; files
    /// with other hard links and device nodes stay as they are (see
    /// [`strategy::bundle::hand_over`]), which is logged.
    pub(crate) fn chown_tree(&self, dir: &Path) -> std::io::Result<()> {
        let done = strategy::bundle::hand_over(dir, self.uid, self.gid)?;
        if !done.kept.is_empty() {
            let some: Vec<String> = done
                .kept
                .iter()
                .take(5)
                .map(|p| p.display().to_string())
                .collect();
            tracing::warn!(
                user = %self.name,
                "{} entries of {} keep their owner (hard-linked, devices, mounts): {}{}",
                done.kept.len(),
                dir.display(),
                some.join(", "),
                if done.kept.len() > some.len() { ", ..." } else { "" },
            );
        }
        Ok(())
    }
}

fn failed(message: String) -> Failure {
    Failure::DeployFailed {
        exit: None,
        stderr_tail: message,
    }
}

/// Where and as whom one placement's commands run: made once per launch (or re-adoption).
#[derive(Debug, Clone)]
pub(crate) struct Shell {
    dir: PathBuf,
    /// The agent's variables a command gets (see [`base_environment`]); the rest is cleared.
    base: Vec<(String, String)>,
    env: Vec<(String, String)>,
    /// Who the commands run as (none: the agent's user), as the relay and `pre_exec` take it.
    who: Option<relay::User>,
    /// The spec's `user`, for messages.
    user: Option<String>,
    /// Why no command may run (its user could not be resolved for a re-adopted process):
    /// never run it as the agent's user instead.
    refused: Option<String>,
    /// The process's cell, open for joining: its stop command and health checks run inside it
    /// (none in the fallback containment).
    door: Option<Arc<std::fs::File>>,
}

/// A started process: its relay (our child) and the process's own pid.
#[derive(Debug)]
pub(crate) struct Launched {
    pub(crate) relay: Child,
    pub(crate) pid: u32,
}

/// How long a relay may take to report the process's pid.
const RELAY_START: Duration = Duration::from_secs(10);

impl Shell {
    /// The shell of `process` deployed as `prepared`, run as `who` (from [`Identity::of`]:
    /// `Err` when its user could not be resolved, and then no command runs), its commands
    /// joining `cell`. With a user, `HOME`, `USER`, `LOGNAME` and `SHELL` are the user's.
    pub(crate) fn new(
        process: &Process,
        prepared: &Prepared,
        who: Result<Option<&Identity>, Failure>,
        cell: &Cell,
        pass_env: &[String],
    ) -> Shell {
        let door = match cell.door() {
            Ok(door) => door.map(Arc::new),
            Err(e) => {
                tracing::warn!(id = %process.id, "cannot open the process's cgroup: {e}; its commands run outside it");
                None
            }
        };
        let mut env = strategy::environment(process, prepared);
        let (who, refused) = match who {
            Ok(Some(identity)) => {
                env.extend(identity.variables());
                (Some(identity.relay_user()), None)
            }
            Ok(None) => (None, None),
            Err(failure) => (None, Some(failure.to_string())),
        };
        Shell {
            dir: prepared.bundle_dir.clone(),
            base: base_environment(pass_env),
            env,
            who,
            user: process.spec.user().map(str::to_owned),
            refused,
            door,
        }
    }

    /// Why its commands may not run, if they may not.
    pub(crate) fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// A shell for commands outside any process: in `dir`, with `env`, as the agent's user.
    #[cfg(test)]
    pub(crate) fn plain(dir: &Path, env: &[(String, String)]) -> Shell {
        Shell {
            dir: dir.to_path_buf(),
            base: base_environment(&[]),
            env: env.to_vec(),
            who: None,
            user: None,
            refused: None,
            door: None,
        }
    }

    /// The shell's command line for `command` (see [`shell_for`]).
    fn argv(command: &str) -> Vec<OsString> {
        let (program, pipefail) = shell_for(command);
        let mut argv: Vec<OsString> = vec![program.into()];
        if pipefail {
            argv.extend(["-o".into(), "pipefail".into()]);
        }
        argv.extend(["-c".into(), command.into()]);
        argv
    }

    /// `sh -c command` in the bundle directory, with the process's variables, as its user,
    /// inside its cell, reading nothing; where its output goes and what happens on drop is
    /// the caller's.
    pub(crate) fn command(&self, command: &str) -> Command {
        let argv = Shell::argv(command);
        let mut sh = Command::new(&argv[0]);
        sh.args(&argv[1..]);
        self.place(&mut sh);
        let door = self.door.as_ref().map(|door| door.as_raw_fd());
        let who = self.who.clone();
        if door.is_some() || who.is_some() {
            // SAFETY: the hook makes only system calls (`join_before_exec`, `become_user`) on
            // memory prepared before the fork; `self.door` keeps the descriptor open while the
            // command is spawned. The cell is joined first, while still privileged.
            unsafe {
                sh.pre_exec(move || {
                    if let Some(fd) = door {
                        contain::join_before_exec(fd)?;
                    }
                    match &who {
                        Some(user) => relay::become_user(user),
                        None => Ok(()),
                    }
                });
            }
        }
        sh
    }

    /// Directory, variables and no input: what every command of the process shares.
    fn place(&self, command: &mut Command) {
        command
            .current_dir(&self.dir)
            .env_clear()
            .envs(self.base.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null());
    }

    /// A command whose output nobody reads, killed if it is dropped before it ends (a stop
    /// command, a health check).
    pub(crate) fn quiet(&self, command: &str) -> Command {
        let mut sh = self.command(command);
        sh.stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        sh
    }

    /// Starts the start command under its log relay (see [`crate::node::relay`]), which puts
    /// it in its cell, runs it as its user and copies its output into its log files. The relay
    /// leads a new process group, outside the cell, and outlives the agent; its own messages
    /// go to `log`. `relay` gives the log and exit files and the cgroup; its command and user
    /// are filled in here.
    pub(crate) async fn start(
        &self,
        command: &str,
        log: std::fs::File,
        mut relay: Relay,
    ) -> Result<Launched, Failure> {
        let who = self
            .user
            .as_deref()
            .map(|u| format!(" as {u}"))
            .unwrap_or_default();
        let cannot = |e: String| {
            failed(format!(
                "cannot start sh{who} in {}: {e}",
                self.dir.display()
            ))
        };
        relay.command = Shell::argv(command);
        relay.user = self.who.clone();
        let mut cmd = Command::new(relay::executable());
        cmd.arg(relay::MARK).args(relay.to_args());
        self.place(&mut cmd);
        cmd.stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = os::spawn(&mut cmd).map_err(|e| cannot(e.to_string()))?;
        let Some(stdout) = child.stdout.take() else {
            return Err(cannot("the relay has no output".into()));
        };
        let mut line = String::new();
        let read =
            tokio::time::timeout(RELAY_START, BufReader::new(stdout).read_line(&mut line)).await;
        let answer = line.trim_end();
        if let Some(pid) = answer.strip_prefix("pid ").and_then(|p| p.parse().ok()) {
            return Ok(Launched { relay: child, pid });
        }
        let why = match (read, answer.strip_prefix("error ")) {
            (_, Some(why)) => why.to_owned(),
            (Err(_), None) => "the relay did not report a pid in time".to_owned(),
            (Ok(_), None) => format!("the relay ended without a pid ({answer:?})"),
        };
        let _ = child.start_kill();
        let _ = child.wait().await;
        Err(cannot(why))
    }

    /// Starts the stop command of the process whose main pid is `pid` (which it gets as `PID`),
    /// in a process group of its own (and in the process's cell).
    pub(crate) async fn stop(&self, command: &str, pid: u32) -> std::io::Result<Child> {
        if let Some(why) = &self.refused {
            return Err(std::io::Error::other(why.clone()));
        }
        let mut stop = self.quiet(command);
        stop.env("PID", pid.to_string()).process_group(0);
        os::spawn_off(stop).await
    }
}

/// What a process's commands get of the agent's own environment: `PATH` (a standard one when
/// the agent has none), the locale (`LANG`, `LANGUAGE`, `LC_*`), `TZ` and `TERM`, the variables
/// that name its user (replaced by the service user's when it has one), and the names listed in
/// `[supervisor] pass_env` — nothing else, so the agent's settings and secrets (`RUST_LOG`, a
/// token in its environment) never reach a service (systemd's clean environment plus
/// `PassEnvironment=`).
fn base_environment(pass: &[String]) -> Vec<(String, String)> {
    const ALWAYS: [&str; 9] = [
        "PATH", "LANG", "LANGUAGE", "TZ", "TERM", "HOME", "USER", "LOGNAME", "SHELL",
    ];
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .filter(|(name, _)| {
            ALWAYS.contains(&name.as_str())
                || name.starts_with("LC_")
                || pass.iter().any(|p| p == name)
        })
        .collect();
    if !vars.iter().any(|(name, _)| name == "PATH") {
        vars.push((
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ));
    }
    vars
}

/// The shell that runs `command`, and whether with `-o pipefail` (a pipeline fails when any of
/// its commands fails, so `app | tee log` does not hide the app's crash): `sh` where it has the
/// option (bash, dash 0.5.13+, busybox); where it does not (dash before 0.5.13, e.g. Debian 12),
/// a command with a pipeline runs under `bash -o pipefail` when bash is installed, anything
/// else under plain `sh`.
fn shell_for(command: &str) -> (&'static str, bool) {
    static SH_PIPEFAIL: OnceLock<bool> = OnceLock::new();
    static BASH: OnceLock<bool> = OnceLock::new();
    let works = |program: &str| {
        std::process::Command::new(program)
            .args(["-o", "pipefail", "-c", ":"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if *SH_PIPEFAIL.get_or_init(|| works("sh")) {
        ("sh", true)
    } else if has_pipeline(command) && *BASH.get_or_init(|| works("bash")) {
        ("bash", true)
    } else {
        ("sh", false)
    }
}

/// Whether `command` holds a pipe (`|`, not `||`) outside quotes. A `|` that the shell would
/// not read as a pipe (inside `$(...)` with quotes, say) only makes this say yes: harmless.
fn has_pipeline(command: &str) -> bool {
    let bytes = command.as_bytes();
    let (mut single, mut double, mut escaped) = (false, false, false);
    for (i, byte) in bytes.iter().enumerate() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' if !single => escaped = true,
            b'\'' if !double => single = !single,
            b'"' if !single => double = !double,
            b'|' if !single && !double => {
                let before = i > 0 && bytes[i - 1] == b'|';
                let after = bytes.get(i + 1) == Some(&b'|');
                if !before && !after {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use p2f_model::{NodeName, NodeRef, ProcessId, ProcessSpec, Timestamp};

    use super::*;

    fn process(spec: ProcessSpec) -> Process {
        let node = NodeRef {
            name: NodeName::from_static("n1"),
            address: "127.0.0.1".into(),
        };
        Process::placed(
            ProcessId::for_service(spec.name(), 1),
            3,
            spec,
            node,
            Timestamp(0),
        )
    }

    #[test]
    fn identity_is_none_without_a_user_and_says_why_it_fails() {
        assert_eq!(
            Identity::of(&process(ProcessSpec::new("a", "true"))),
            Ok(None)
        );
        let missing = ProcessSpec::new("a", "true").with_user("p2f-no-such-user");
        assert_eq!(
            Identity::of(&process(missing)),
            Err(failed("no such user: p2f-no-such-user".to_owned()))
        );
    }

    #[tokio::test]
    async fn every_command_sees_the_process_variables_in_its_bundle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = ProcessSpec::new("web", "true")
            .with_port(8123)
            .with_env("GREETING", "hi");
        let p = process(spec);
        let prepared = Prepared {
            bundle_dir: dir.path().to_path_buf(),
            nix_out: None,
        };
        let shell = Shell::new(&p, &prepared, Ok(None), &Cell::Tree, &[]);
        let script = "test \"$PWD\" = \"$P2F_BUNDLE\" && test \"$PORT\" = 8123 \
                      && test \"$P2F_GENERATION\" = 3 && test \"$GREETING\" = hi \
                      && test \"$PID\" = 77";
        let status = shell.stop(script, 77).await.expect("spawn").wait().await;
        assert!(status.expect("wait").success());
        let log_path = dir.path().join("log");
        let log = std::fs::File::create(&log_path).expect("log");
        let relay = Relay {
            log: log_path.clone(),
            max_bytes: 1 << 20,
            keep: 1,
            exit: dir.path().join("exit"),
            cgroup: None,
            user: None,
            command: Vec::new(),
        };
        let mut launched = shell
            .start("echo started $P2F_SERVICE", log, relay)
            .await
            .expect("start");
        assert!(launched.pid > 1);
        assert!(launched.relay.wait().await.expect("wait").success());
        assert_eq!(
            relay::read_exit(&dir.path().join("exit")),
            Some(crate::node::lifecycle::Exit::Code(0))
        );
        let written = std::fs::read_to_string(log_path).expect("read");
        assert_eq!(written, "started web\n");
    }

    #[test]
    fn pipelines_are_found_outside_quotes_only() {
        let cases = [
            ("app | tee out.log", true),
            ("app|tee", true),
            ("a || b", false),
            ("echo 'a | b'", false),
            ("echo \"a | b\"", false),
            ("echo a \\| b", false),
            ("true && echo x", false),
        ];
        for (command, pipe) in cases {
            assert_eq!(has_pipeline(command), pipe, "{command}");
        }
    }

    #[tokio::test]
    async fn a_crash_before_a_pipe_is_not_hidden() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shell = Shell::plain(dir.path(), &[]);
        let status = shell.quiet("exit 3 | cat").status().await.expect("run");
        assert_eq!(status.code(), Some(3));
    }
}
