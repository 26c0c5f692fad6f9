//! Strategies: how a process's bundle is unpacked and deployed on this node before its command
//! starts (`Shell` nothing, `Script` runs the embedded file, `Nix` builds the flake, `Ansible`
//! runs the playbook on localhost, `Custom` runs its command). A deploy step runs once per
//! placement (generation); a marker file next to the bundle directory remembers that it
//! succeeded. How the bundle directory is made, laid out and handed to the process's user:
//! its `bundle` module.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use p2f_model::{Failure, Process, Strategy, is_local_nix_path, normalize_bundle_path, shebang};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::os;

pub(crate) mod bundle;

/// The marker a successful deploy step leaves in the bundle directory.
const MARKER: &str = ".deployed";
/// Where `nix build` links its output.
const NIX_LINK: &str = ".p2f-nix-result";
/// How much of a failed deploy step's output the failure keeps.
const TAIL_BYTES: usize = 2048;

/// What a deploy step leaves for the start command.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Prepared {
    /// The unpacked bundle (`P2F_BUNDLE`, and the command's working directory).
    pub bundle_dir: PathBuf,
    /// The built Nix output (`P2F_NIX_OUT`).
    pub nix_out: Option<PathBuf>,
}

/// Settings of the deploy steps.
#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    /// `--option NAME VALUE` pairs for `nix build` (e.g. `substituters = ""` offline).
    pub nix_options: BTreeMap<String, String>,
    /// The longest a deploy step may take.
    pub timeout: Duration,
}

/// The variables every command of a process sees (DESIGN §2).
pub fn environment(process: &Process, prepared: &Prepared) -> Vec<(String, String)> {
    let mut vars = vec![
        ("P2F_SERVICE".to_owned(), process.name().to_owned()),
        ("P2F_NODE".to_owned(), process.node.name.to_string()),
        ("P2F_PROCESS_ID".to_owned(), process.id.to_string()),
        ("P2F_GENERATION".to_owned(), process.generation.to_string()),
        (
            "P2F_BUNDLE".to_owned(),
            prepared.bundle_dir.display().to_string(),
        ),
    ];
    if let Some(port) = process.port {
        vars.push(("PORT".to_owned(), port.to_string()));
    }
    if let Some(out) = &prepared.nix_out {
        vars.push(("P2F_NIX_OUT".to_owned(), out.display().to_string()));
    }
    for var in process.spec.env() {
        vars.push((var.name().to_owned(), var.value().to_owned()));
    }
    vars
}

/// The bundle directory of a placement.
pub fn bundle_dir(root: &Path, process: &Process) -> PathBuf {
    root.join(process.id.as_str())
        .join(format!("g{}", process.generation))
}

/// The marker of a placement's finished deploy step: next to its bundle directory, not in it,
/// so a process running as another user (which owns its bundle directory) cannot forge it.
fn marker(root: &Path, process: &Process) -> PathBuf {
    root.join(process.id.as_str())
        .join(format!("g{}{MARKER}", process.generation))
}

/// A deploy step already done for this placement, if its marker is there.
pub fn already_deployed(root: &Path, process: &Process) -> Option<Prepared> {
    let text = std::fs::read(marker(root, process)).ok()?;
    let recorded: Prepared = serde_json::from_slice(&text).ok()?;
    // Only the Nix output is taken from the marker; the directory is always recomputed.
    Some(Prepared {
        bundle_dir: bundle_dir(root, process),
        nix_out: recorded.nix_out,
    })
}

/// Forgets that this placement's deploy step was done (its marker), so the next launch deploys
/// again: after a hand-over that failed, the directory is not the user's and must be made anew.
pub fn forget_deployed(root: &Path, process: &Process) {
    let _ = std::fs::remove_file(marker(root, process));
}

/// Unpacks the bundle and runs the strategy's deploy step, writing its output to `log`.
pub async fn deploy(
    root: &Path,
    process: &Process,
    log: &std::fs::File,
    options: &DeployOptions,
) -> Result<Prepared, Failure> {
    let dir = bundle::unpack(root, process)
        .map_err(|e| deploy_failed(None, format!("cannot unpack the bundle: {e}")))?;
    let mut prepared = Prepared {
        bundle_dir: dir.clone(),
        nix_out: None,
    };
    let step: Option<Vec<String>> = match process.spec.strategy() {
        Strategy::Shell => None,
        Strategy::Script(file) => {
            // Its `#!` line is honoured (a bash script runs under bash); without one, `sh`.
            let path = normalize_bundle_path(file);
            let interpreter = process
                .spec
                .bundle()
                .file(&path)
                .and_then(|f| shebang(f.contents()))
                .unwrap_or_else(|| vec!["sh".into()]);
            let mut step = interpreter;
            step.push(dir.join(&path).display().to_string());
            Some(step)
        }
        Strategy::Custom(command) => Some(vec!["sh".into(), "-c".into(), command.to_string()]),
        Strategy::Ansible(playbook) => Some(vec![
            "ansible-playbook".into(),
            "-i".into(),
            "localhost,".into(),
            "-c".into(),
            "local".into(),
            dir.join(normalize_bundle_path(playbook))
                .display()
                .to_string(),
        ]),
        Strategy::Nix(installable) => {
            let target = if is_local_nix_path(installable) {
                format!(
                    "path:{}",
                    dir.join(normalize_bundle_path(installable)).display()
                )
            } else {
                installable.to_string()
            };
            let mut args: Vec<String> = vec![
                "nix".into(),
                "--extra-experimental-features".into(),
                "nix-command flakes".into(),
                "build".into(),
                target,
                "--out-link".into(),
                dir.join(NIX_LINK).display().to_string(),
            ];
            for (name, value) in &options.nix_options {
                args.extend(["--option".into(), name.clone(), value.clone()]);
            }
            Some(args)
        }
    };
    if let Some(argv) = step {
        let mut env = environment(process, &prepared);
        if matches!(process.spec.strategy(), Strategy::Ansible(_)) {
            // Task failures go to stderr, so they end up in the failure's tail.
            env.push(("ANSIBLE_DISPLAY_FAILED_STDERR".into(), "1".into()));
        }
        run_step(&argv, &dir, &env, log, options.timeout).await?;
    }
    if matches!(process.spec.strategy(), Strategy::Nix(_)) {
        let out = std::fs::read_link(dir.join(NIX_LINK))
            .map_err(|e| deploy_failed(Some(0), format!("nix build left no result link: {e}")))?;
        prepared.nix_out = Some(out);
    }
    // The step ran as root in the bundle directory: it stays the agent's, and private.
    bundle::seal(&dir).map_err(|e| {
        deploy_failed(
            None,
            format!("the bundle directory after the deploy step: {e}"),
        )
    })?;
    let marker = serde_json::to_vec(&prepared).unwrap_or_default();
    std::fs::write(self::marker(root, process), marker)
        .map_err(|e| deploy_failed(None, format!("cannot write {MARKER}: {e}")))?;
    Ok(prepared)
}

/// Runs one deploy command in its own process group, output to the log and the last bytes of
/// it kept for the failure; killed (the whole group) after `timeout`.
async fn run_step(
    argv: &[String],
    dir: &Path,
    env: &[(String, String)],
    log: &std::fs::File,
    timeout: Duration,
) -> Result<(), Failure> {
    let Some((program, args)) = argv.split_first() else {
        return Ok(());
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = os::spawn(&mut command).map_err(|e| {
        let hint = match program.as_str() {
            "nix" => " (install Debian's nix-bin)",
            "ansible-playbook" => " (install Debian's ansible-core)",
            _ => "",
        };
        deploy_failed(None, format!("cannot run {program}: {e}{hint}"))
    })?;
    let pgid = child.id();
    // Whatever happens to this step (done, timed out, cancelled by a stop), nothing it started
    // outlives it.
    let _group = GroupGuard(pgid);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (log_a, log_b) = match (log.try_clone(), log.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return Err(deploy_failed(None, e.to_string())),
    };
    let copy_out = tokio::spawn(copy_tail(stdout, log_a));
    let copy_err = tokio::spawn(copy_tail(stderr, log_b));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        Ok(Err(e)) => return Err(deploy_failed(None, e.to_string())),
        Err(_elapsed) => {
            if let Some(pgid) = pgid {
                let _ = os::signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = child.wait().await;
            None
        }
    };
    if let Some(pgid) = pgid {
        // A background child of the step would hold the pipes open forever.
        let _ = os::signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
    }
    let out_tail = tail_of(copy_out).await;
    let err_tail = tail_of(copy_err).await;
    match status {
        Some(status) if status.success() => Ok(()),
        Some(status) => {
            let tail = if err_tail.trim().is_empty() {
                out_tail
            } else {
                err_tail
            };
            Err(deploy_failed(status.code(), tail))
        }
        None => Err(deploy_failed(
            None,
            format!(
                "{program} did not finish within {}",
                p2f_model::format_duration(timeout)
            ),
        )),
    }
}

/// Kills a deploy step's process group when dropped.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = os::signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// What a copy task kept, waiting at most a few seconds (a process that left the group may still
/// hold the pipe).
async fn tail_of(copy: tokio::task::JoinHandle<String>) -> String {
    match tokio::time::timeout(Duration::from_secs(5), copy).await {
        Ok(Ok(tail)) => tail,
        _ => String::new(),
    }
}

/// Copies a pipe to the log file and returns its last [`TAIL_BYTES`] as text.
async fn copy_tail(pipe: Option<impl AsyncRead + Unpin>, mut log: std::fs::File) -> String {
    let Some(mut pipe) = pipe else {
        return String::new();
    };
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let _ = log.write_all(&buf[..n]);
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > TAIL_BYTES {
                    tail.drain(..tail.len() - TAIL_BYTES);
                }
            }
        }
    }
    String::from_utf8_lossy(&tail).into_owned()
}

fn deploy_failed(exit: Option<i32>, stderr_tail: impl Into<String>) -> Failure {
    Failure::DeployFailed {
        exit,
        stderr_tail: stderr_tail.into(),
    }
}
