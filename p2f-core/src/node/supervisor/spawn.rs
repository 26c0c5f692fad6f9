//! The one way a process's commands run: `sh -c COMMAND` in its bundle directory, with its
//! variables (DESIGN §2), as its user. The start command, the stop command and a `Cmd` health
//! check are all built by [`Shell::command`]; the user is looked up once per launch
//! ([`Identity::of`]), not on every health tick or stop.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::unistd::{Gid, Uid};
use p2f_model::{Failure, Process};
use tokio::process::{Child, Command};

use crate::node::strategy::{self, Prepared};

/// The uid and gid a process's commands run as (its spec's `user`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    uid: Uid,
    gid: Gid,
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
        Ok(Some(Identity {
            uid: found.uid,
            gid: found.gid,
        }))
    }

    /// Gives `dir` and everything in it to this identity (not following symlinks): the process
    /// owns its bundle directory, as with systemd's `StateDirectory=`.
    pub(crate) fn chown_tree(&self, dir: &Path) -> std::io::Result<()> {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(path) = stack.pop() {
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &path,
                Some(self.uid),
                Some(self.gid),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(std::io::Error::from)?;
            if path.is_dir() && !path.is_symlink() {
                for entry in std::fs::read_dir(&path)? {
                    stack.push(entry?.path());
                }
            }
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
    env: Vec<(String, String)>,
    who: Option<Identity>,
    /// The spec's `user`, for messages.
    user: Option<String>,
}

impl Shell {
    /// The shell of `process` deployed as `prepared`, run as `who` (from [`Identity::of`]).
    pub(crate) fn new(process: &Process, prepared: &Prepared, who: Option<Identity>) -> Shell {
        Shell {
            dir: prepared.bundle_dir.clone(),
            env: strategy::environment(process, prepared),
            who,
            user: process.spec.user().map(str::to_owned),
        }
    }

    /// A shell for commands outside any process: in `dir`, with `env`, as the agent's user.
    #[cfg(test)]
    pub(crate) fn plain(dir: &Path, env: &[(String, String)]) -> Shell {
        Shell {
            dir: dir.to_path_buf(),
            env: env.to_vec(),
            who: None,
            user: None,
        }
    }

    /// `sh -c command` in the bundle directory, with the process's variables, as its user,
    /// reading nothing; where its output goes and what happens on drop is the caller's.
    pub(crate) fn command(&self, command: &str) -> Command {
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(command)
            .current_dir(&self.dir)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null());
        if let Some(who) = self.who {
            sh.uid(who.uid.as_raw()).gid(who.gid.as_raw());
        }
        sh
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

    /// Starts the start command as the leader of a new process group, output appended to
    /// `log`. It outlives the agent (it is not killed on drop).
    pub(crate) fn start(&self, command: &str, log: std::fs::File) -> Result<Child, Failure> {
        let stderr = log
            .try_clone()
            .map_err(|e| failed(format!("cannot open the log file: {e}")))?;
        self.command(command)
            .stdout(log)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| {
                let who = self
                    .user
                    .as_deref()
                    .map(|u| format!(" as {u}"))
                    .unwrap_or_default();
                failed(format!(
                    "cannot start sh{who} in {}: {e}",
                    self.dir.display()
                ))
            })
    }

    /// Starts the stop command of the process group `pgid` (which it gets as `PID`).
    pub(crate) fn stop(&self, command: &str, pgid: u32) -> std::io::Result<Child> {
        // A group of its own: whatever it starts is killed with it.
        self.quiet(command)
            .env("PID", pgid.to_string())
            .process_group(0)
            .spawn()
    }
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
        let shell = Shell::new(&p, &prepared, None);
        let script = "test \"$PWD\" = \"$P2F_BUNDLE\" && test \"$PORT\" = 8123 \
                      && test \"$P2F_GENERATION\" = 3 && test \"$GREETING\" = hi \
                      && test \"$PID\" = 77";
        let status = shell.stop(script, 77).expect("spawn").wait().await;
        assert!(status.expect("wait").success());
        let log = std::fs::File::create(dir.path().join("log")).expect("log");
        let mut child = shell
            .start("echo started $P2F_SERVICE", log)
            .expect("start");
        assert!(child.wait().await.expect("wait").success());
        let written = std::fs::read_to_string(dir.path().join("log")).expect("read");
        assert_eq!(written, "started web\n");
    }
}
