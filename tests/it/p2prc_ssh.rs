//! Unsafe mode's SSH key mesh, done safely (issue 15), against a real `sshd` (Debian's
//! openssh-server) that the test starts on a loopback port with its own config and host key:
//! after a member joins, its key logs in to the root's user with `ssh -p PORT -i KEY`; the
//! lines of `authorized_keys` that are not P2F's stay byte for byte; a key in a table posted
//! to `/IpTable` is never installed; after `p2f node remove` the member's key is gone (from the
//! root's file and the other member's) and the login fails; with unsafe mode off the block is
//! gone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use p2f_testkit::procs::{self, require};
use p2f_testkit::{eventually, service_port};

use crate::support::agent;

/// An sshd this test started; killed (by its pid) when dropped.
struct Sshd {
    child: Child,
    port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        procs::signal(self.child.id(), procs::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Starts `sshd -D` on 127.0.0.1:PORT with a config and host key of its own in `dir`, keys
/// from `authorized_keys`, root allowed with a key only.
fn start_sshd(dir: &Path, authorized_keys: &Path) -> Result<Sshd> {
    require("sshd", "openssh-server")?;
    require("ssh-keygen", "openssh-client")?;
    let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context(
            "`sshd` is missing: install the Debian package openssh-server (scripts/test does)",
        )?;
    let host_key = dir.join("host_ed25519");
    procs::run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key),
    )?;
    // sshd's privilege separation needs its empty directory.
    std::fs::create_dir_all("/run/sshd")?;
    let port = service_port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
             StrictModes no\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\n\
             LogLevel VERBOSE\n",
            host_key.display(),
            dir.join("sshd.pid").display(),
            authorized_keys.display()
        ),
    )?;
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log"))?)
        .spawn()
        .context("start sshd")?;
    let sshd = Sshd { child, port };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(sshd);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "sshd did not listen: {}",
        std::fs::read_to_string(dir.join("sshd.log"))?
    )
}

/// `ssh -p PORT -i KEY root@127.0.0.1 echo logged-in`: whether that logged in.
fn logs_in(port: u16, key: &Path) -> Result<bool> {
    require("ssh", "openssh-client")?;
    let out = Command::new("ssh")
        .args(["-p", &port.to_string(), "-i"])
        .arg(key)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
            "-F",
            "/dev/null",
            "root@127.0.0.1",
            "echo logged-in",
        ])
        .stdin(Stdio::null())
        .output()?;
    Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("logged-in"))
}

fn p2prc(listen: Option<SocketAddr>, keys: PathBuf) -> p2f::core::p2prc::P2prcSettings {
    p2f::core::p2prc::P2prcSettings {
        listen,
        ssh_user: Some("root".into()),
        authorized_keys: Some(keys),
        ..Default::default()
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The test's own lines: options, comments, a blank line, a key of someone else.
fn own_lines(dir: &Path) -> Result<String> {
    let other = dir.join("someone");
    procs::run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "someone@else", "-f"])
            .arg(&other),
    )?;
    let public = read(&other.with_extension("pub"));
    Ok(format!(
        "# keys of people, kept by hand\nfrom=\"10.9.9.9\",no-pty,no-port-forwarding {}\n   \n# end of mine",
        public.trim_end()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2prc_members_keys_log_in_and_leave_with_them() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let dir = scratch.path();
    let root_keys = dir.join("root_authorized_keys");
    let mine = own_lines(dir)?;
    std::fs::write(&root_keys, &mine)?;
    let sshd = start_sshd(dir, &root_keys)?;

    let listen: SocketAddr = ([127, 0, 0, 1], service_port()).into();
    let settings = p2prc(Some(listen), root_keys.clone());
    let mut root = agent("ssh-root")
        .configure(move |c| c.p2prc = Some(settings))
        .init()?
        .started()
        .await?;
    let member_keys = dir.join("member_authorized_keys");
    let settings = p2prc(None, member_keys.clone());
    let a = agent("ssh-a")
        .ip("127.0.0.2")
        .configure(move |c| c.p2prc = Some(settings))
        .join(&root)?
        .started()
        .await?;
    let b_keys = dir.join("b_authorized_keys");
    let settings = p2prc(None, b_keys.clone());
    let b = agent("ssh-b")
        .ip("127.0.0.3")
        .configure(move |c| c.p2prc = Some(settings))
        .join(&root)?
        .started()
        .await?;
    root.all_alive(&["ssh-a", "ssh-b", "ssh-root"]).await?;
    let a_key = a.config().data_dir.join("ssh").join("id_ed25519");

    // The member's key reaches the root's file, in the block; the member gets the root's.
    let block = eventually(
        "ssh-a's key in the root's file",
        Duration::from_secs(30),
        || async {
            let text = read(&root_keys);
            text.contains(" p2f:ssh-a\n").then_some(text)
        },
    )
    .await?;
    assert!(
        block.starts_with(&format!("{mine}\n# BEGIN p2f cluster ssh-root, CA ")),
        "{block}"
    );
    assert!(block.contains(" p2f:ssh-root\n"), "{block}");
    eventually(
        "the root's key in ssh-a's file",
        Duration::from_secs(30),
        || async { read(&member_keys).contains(" p2f:ssh-root\n").then_some(()) },
    )
    .await?;
    // Every member has every member's key, its own too.
    eventually(
        "every key in ssh-b's file",
        Duration::from_secs(30),
        || async {
            let text = read(&b_keys);
            ["ssh-a", "ssh-b", "ssh-root"]
                .iter()
                .all(|n| text.contains(&format!(" p2f:{n}\n")))
                .then_some(())
        },
    )
    .await?;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let meta = std::fs::metadata(&root_keys)?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);
    assert!(
        logs_in(sshd.port, &a_key)?,
        "ssh-a's key logs in: {}",
        read(&dir.join("sshd.log"))
    );
    // The node's entry says how to reach it.
    let entry = a.network().node().await?;
    assert_eq!(
        (entry.machine_username.as_str(), entry.bare_metal_ssh_port),
        ("root", Some(22))
    );

    // A key posted in a P2PRC table is never installed.
    let stranger = dir.join("stranger");
    procs::run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&stranger),
    )?;
    let stranger_public = read(&stranger.with_extension("pub"));
    let table = dir.join("table.json");
    let entry = serde_json::json!({ "ip_address": [{
        "Name": "stranger-Zz9", "IPV4": "127.0.0.9", "ServerPort": "8088",
        "UnSafeMode": true, "PublicKey": stranger_public,
    }, {
        "Name": "ssh-a", "IPV4": "127.0.0.9", "ServerPort": "8088", "PublicKey": stranger_public,
    }]});
    std::fs::write(&table, entry.to_string())?;
    let posted = Command::new("curl")
        .args(["-sS", "-m", "20", "-F"])
        .arg(format!("json=@{}", table.display()))
        .arg(format!("http://{listen}/IpTable"))
        .output()?;
    assert!(posted.status.success(), "{posted:?}");
    let before = read(&root_keys);
    // Several rounds of the key mesh (it looks again at least every 5 s).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = read(&root_keys);
    assert_eq!(after, before);
    let stranger_key = stranger_public.split_whitespace().nth(1).unwrap_or("?");
    assert!(!after.contains(stranger_key), "{after}");
    assert!(!logs_in(sshd.port, &stranger)?);

    // The member is removed: its key leaves the file, its login fails; my lines stay.
    let removed = root
        .network()
        .remove_node(&p2f::model::NodeName::new("ssh-a")?)
        .await?;
    assert!(removed.revoked >= 1);
    let text = eventually("ssh-a's key gone", Duration::from_secs(30), || async {
        let text = read(&root_keys);
        (!text.contains("p2f:ssh-a")).then_some(text)
    })
    .await?;
    assert!(text.starts_with(&format!("{mine}\n")), "{text}");
    assert!(text.contains(" p2f:ssh-root\n"), "{text}");
    assert!(
        !logs_in(sshd.port, &a_key)?,
        "a removed member's key no longer logs in"
    );
    // The other member drops it too, once the revocation reaches it.
    eventually(
        "ssh-a's key gone from ssh-b's file",
        Duration::from_secs(45),
        || async {
            let text = read(&b_keys);
            (!text.contains("p2f:ssh-a") && text.contains(" p2f:ssh-root\n")).then_some(())
        },
    )
    .await?;

    // Unsafe mode off: the block is gone, the file is mine again (plus the newline the block
    // needed after my last line).
    root.sigterm()?;
    let path = root.config_path().to_owned();
    let text = read(&path);
    let mut config = p2f::core::node::AgentConfig::parse(&text).map_err(anyhow::Error::msg)?;
    config.unsafe_mode = false;
    std::fs::write(&path, config.to_toml())?;
    root.start().await?;
    eventually("the block removed", Duration::from_secs(30), || async {
        (read(&root_keys) == format!("{mine}\n")).then_some(())
    })
    .await?;
    drop((a, b));
    drop(sshd);
    Ok(())
}
