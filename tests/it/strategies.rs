//! The deploy strategies that call real tools (DESIGN §2, §8): a local flake built offline by
//! Debian's Nix 2.8 and a playbook run on localhost by `ansible-playbook`, before the start
//! command, and both failing with `DeployFailed` and the tool's own error in the tail.

use std::time::Duration;

use p2f::core::node::AgentConfig;
use p2f::core::wire::{SpinQuery, SpinRequest};
use p2f::model::{
    Bundle, BundleFile, EventKind, Failure, Health, Process, ProcessSpec, RestartPolicy, Status,
    Strategy,
};

use p2f_testkit::Agent;
use p2f_testkit::procs::require;

use crate::support::{agent, log_containing};

/// Generous: the first `nix build` on a machine creates /nix/store and its database (measured
/// at well under a second here, but CI disks vary), a playbook takes a second or two.
const DEPLOY_WAIT: Duration = Duration::from_secs(180);

/// A flake with no inputs (nothing to fetch: it builds offline) whose package is made by the
/// host's `/bin/sh` with absolute paths only (a build has no `PATH`): `$out/bin/hello` prints a
/// line and becomes `sleep`. Flakes evaluate purely, so `builtins.currentSystem` is not there:
/// the package is defined for each Linux system this may run on.
const HELLO_FLAKE: &str = r##"{
  description = "p2f test: a package built with /bin/sh alone, no inputs";
  outputs = { self }:
    let
      hello = system: derivation {
        name = "p2f-hello";
        inherit system;
        builder = "/bin/sh";
        args = [ "-c" ''
          /bin/mkdir -p $out/bin
          printf '#!/bin/sh\necho hello from the nix store\nexec /bin/sleep 1000\n' > $out/bin/hello
          /bin/chmod 755 $out/bin/hello
        '' ];
      };
      systems = [ "x86_64-linux" "aarch64-linux" ];
    in {
      packages = builtins.listToAttrs (map (system: {
        name = system;
        value.default = hello system;
      }) systems);
    };
}
"##;

/// A flake Nix cannot parse.
const BROKEN_FLAKE: &str =
    "{\n  outputs = { self }: {\n    packages.x86_64-linux.default = ;\n  };\n}\n";

/// Writes `configured.txt` into the bundle directory (the start command's working directory).
const SITE_PLAYBOOK: &str = r#"- hosts: localhost
  gather_facts: false
  tasks:
    - name: write the configuration
      ansible.builtin.copy:
        content: "configured by ansible for {{ lookup('env', 'P2F_SERVICE') }}\n"
        dest: "{{ lookup('env', 'P2F_BUNDLE') }}/configured.txt"
"#;

/// Refuses to deploy.
const FAILING_PLAYBOOK: &str = r#"- hosts: localhost
  gather_facts: false
  tasks:
    - name: check the node
      ansible.builtin.fail:
        msg: "this node is not ready: no disk for the cache"
"#;

/// `nix build` offline as root with Debian's Nix 2.8 (`nix-bin`), whether or not its
/// recommended `nix-setup-systemd` (which writes /etc/nix/nix.conf and creates the build users)
/// is installed.
fn build_offline(config: &mut AgentConfig) {
    let options = &mut config.supervisor.nix_options;
    // No binary cache: offline, the default https://cache.nixos.org costs seconds of retries
    // (about 4 s here, where DNS fails at once) before every build, and could hang longer.
    options.insert("substituters".into(), String::new());
    // The builder is the host's /bin/sh, which the sandbox hides ("executing '/bin/sh': No such
    // file or directory"), and a container may not allow its namespaces at all (DESIGN §8).
    // Debian's /etc/nix/nix.conf says the same, but only nix-setup-systemd installs it.
    options.insert("sandbox".into(), "false".into());
    // As root, Nix builds as the `nixbld` users by default; only nix-setup-systemd's postinst
    // creates them, and without them every build fails with "the group 'nixbld' specified in
    // 'build-users-group' does not exist". Empty: root builds as itself.
    options.insert("build-users-group".into(), String::new());
    // A stuck step fails its deploy instead of hanging the test.
    config.supervisor.deploy_timeout = DEPLOY_WAIT;
}

/// Spins `spec` on the agent without waiting, then waits until it runs or has failed for good.
async fn spin_and_settle(agent: &Agent, spec: &ProcessSpec, what: &str) -> anyhow::Result<Process> {
    let request = SpinRequest {
        spec: spec.clone(),
        id: None,
        generation: None,
        moved_from: None,
        external: None,
    };
    let recorded = agent
        .network()
        .spin(&request, SpinQuery { wait: false })
        .await
        .expect("spin");
    agent
        .wait_for(&recorded.id, DEPLOY_WAIT, what, |p| {
            p.is_running() || p.status.is_final()
        })
        .await
}

/// The environment of a running OS process.
fn environ(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("read the environment");
    raw.split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// The deploy failure of a record that failed for good.
fn deploy_failure(p: &Process) -> (Option<i32>, &str) {
    match &p.status {
        Status::Failed(Failure::DeployFailed { exit, stderr_tail }) => (*exit, stderr_tail),
        other => panic!("expected a failed deploy, got {other}: {p:#?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_flake_is_built_offline_and_its_output_runs() -> anyhow::Result<()> {
    require("nix", "nix-bin")?;
    let agent = agent("nixer")
        .configure(build_offline)
        .init()?
        .started()
        .await?;
    let spec = ProcessSpec::new("hello", "exec $P2F_NIX_OUT/bin/hello")
        .with_strategy(Strategy::Nix("./flake".into()))
        .with_bundle(Bundle::owned(vec![BundleFile::owned(
            "flake/flake.nix",
            HELLO_FLAKE.as_bytes().to_vec(),
        )]))
        .with_health(Health::None);
    let started = std::time::Instant::now();
    let p = spin_and_settle(&agent, &spec, "the flake to build and run").await?;
    let took = started.elapsed();
    assert!(p.is_running(), "{p:#?}\nagent log:\n{}", agent.log());
    eprintln!("nix build and start took {took:?}");
    assert!(
        p.events.iter().any(|e| e.kind == EventKind::Deployed),
        "{p:#?}"
    );
    log_containing(
        agent.network(),
        &p.id,
        "hello from the nix store",
        DEPLOY_WAIT,
    )
    .await?;

    // The running process is the built script, now `sleep`, with its output in the store.
    let pid = p.pid.expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("read the command line");
    assert_eq!(cmdline, b"/bin/sleep\x001000\x00");
    let env = environ(pid);
    let out = env
        .iter()
        .find_map(|v| v.strip_prefix("P2F_NIX_OUT="))
        .unwrap_or_else(|| panic!("no P2F_NIX_OUT in {env:#?}"));
    assert!(out.starts_with("/nix/store/"), "{out}");
    assert!(out.ends_with("-p2f-hello"), "{out}");
    assert!(
        std::path::Path::new(out).join("bin/hello").is_file(),
        "{out}"
    );
    assert_eq!(agent.os_copies(&p.id), vec![pid]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_playbook_runs_before_start() -> anyhow::Result<()> {
    require("ansible-playbook", "ansible-core")?;
    let agent = agent("ansibler")
        .configure(|config| config.supervisor.deploy_timeout = DEPLOY_WAIT)
        .init()?
        .started()
        .await?;
    let spec = ProcessSpec::new("configured", "cat configured.txt; exec sleep 1000")
        .with_strategy(Strategy::Ansible("deploy/site.yml".into()))
        .with_bundle(Bundle::owned(vec![BundleFile::owned(
            "deploy/site.yml",
            SITE_PLAYBOOK.as_bytes().to_vec(),
        )]))
        .with_health(Health::None)
        // Plain text in the log; no interpreter discovery, modules piped instead of copied.
        .with_env("ANSIBLE_NOCOLOR", "1")
        .with_env("ANSIBLE_PYTHON_INTERPRETER", "/usr/bin/python3")
        .with_env("ANSIBLE_PIPELINING", "1");
    let started = std::time::Instant::now();
    let p = spin_and_settle(&agent, &spec, "the playbook to run").await?;
    let took = started.elapsed();
    assert!(p.is_running(), "{p:#?}\nagent log:\n{}", agent.log());
    eprintln!("ansible-playbook and start took {took:?}");
    assert!(
        p.events.iter().any(|e| e.kind == EventKind::Deployed),
        "{p:#?}"
    );
    let log = log_containing(
        agent.network(),
        &p.id,
        "configured by ansible for configured",
        DEPLOY_WAIT,
    )
    .await?;
    // The playbook's own output comes first, in the same log.
    assert!(log.contains("TASK [write the configuration]"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_flake_fails_with_deploy_failed() -> anyhow::Result<()> {
    require("nix", "nix-bin")?;
    let agent = agent("broken-nix")
        .configure(build_offline)
        .init()?
        .started()
        .await?;
    let spec = ProcessSpec::new("broken", "exec $P2F_NIX_OUT/bin/hello")
        .with_strategy(Strategy::Nix("./flake".into()))
        .with_bundle(Bundle::owned(vec![BundleFile::owned(
            "flake/flake.nix",
            BROKEN_FLAKE.as_bytes().to_vec(),
        )]))
        .with_restart(RestartPolicy::Never);
    let p = spin_and_settle(&agent, &spec, "the broken flake to fail").await?;
    let (exit, tail) = deploy_failure(&p);
    assert_eq!(exit, Some(1), "{tail}");
    assert!(
        tail.contains("error: syntax error, unexpected ';'"),
        "{tail}"
    );
    assert!(tail.contains("flake.nix:3:"), "{tail}");
    assert!(
        !p.events.iter().any(|e| e.kind == EventKind::Deployed),
        "{p:#?}"
    );
    assert_eq!(p.pid, None, "{p:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_playbook_fails_with_deploy_failed() -> anyhow::Result<()> {
    require("ansible-playbook", "ansible-core")?;
    let agent = agent("broken-ansible")
        .configure(|config| config.supervisor.deploy_timeout = DEPLOY_WAIT)
        .init()?
        .started()
        .await?;
    let spec = ProcessSpec::new("refused", "exec sleep 1000")
        .with_strategy(Strategy::Ansible("deploy/site.yml".into()))
        .with_bundle(Bundle::owned(vec![BundleFile::owned(
            "deploy/site.yml",
            FAILING_PLAYBOOK.as_bytes().to_vec(),
        )]))
        .with_restart(RestartPolicy::Never)
        .with_env("ANSIBLE_NOCOLOR", "1");
    let p = spin_and_settle(&agent, &spec, "the failing playbook to fail").await?;
    let (exit, tail) = deploy_failure(&p);
    // ansible-playbook exits 2 when a task failed on a host.
    assert_eq!(exit, Some(2), "{tail}");
    assert!(
        tail.contains("this node is not ready: no disk for the cache"),
        "{tail}"
    );
    assert_eq!(p.pid, None, "{p:#?}");
    Ok(())
}
