//! Unsafe mode's SSH key mesh, done safely. The seed's unsafe mode lets every node SSH to every
//! node; P2PRC does it by installing the `PublicKey` of every table it receives, from anyone.
//! P2F installs only keys of authenticated members:
//!
//! - each node publishes its public key in its P2PRC entry (the gossiped `node` key-value,
//!   whose datagrams carry the cluster's HMAC);
//! - a key is taken only once the node it names showed the same key over its control API
//!   (mutual TLS, dialed by name: the certificate names the node), and never for a node whose
//!   certificate was revoked after it started (`p2f node remove`);
//! - the keys go into a block of `authorized_keys` that P2F owns ([`block`]): begin and end
//!   lines naming the cluster, lines outside kept byte for byte, mode 0600, the file's owner
//!   kept, written atomically; with unsafe mode off the block is removed.
//!
//! A node that cannot be asked (down) keeps the key already confirmed in the block as long as
//! the mesh still lists it and its gossiped key is the same. Nothing from P2PRC tables is ever
//! read here.

pub mod block;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use p2f_model::{Node, NodeName};

use crate::identity::Role;
use crate::records::Records;
use crate::trust::revoked::Revoked;

/// How often the block is checked even when nothing changed (a revocation, a node back).
pub const RECHECK_EVERY: Duration = Duration::from_secs(5);
/// How long asking one node for its key may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the key mesh could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshKeyError {
    /// A key file could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A key file is not an OpenSSH key.
    #[error("{} is not an OpenSSH public key: {message}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A new key could not be made or saved.
    #[error("cannot make this node's SSH key: {0}")]
    Generate(String),
    /// The user named by `ssh_user` does not exist.
    #[error("p2prc.ssh_user: no user {0:?} on this machine")]
    NoUser(String),
    /// A file of the key pair could not be written.
    #[error(transparent)]
    Write(#[from] crate::fsutil::WriteError),
}

/// This node's SSH public key as one OpenSSH line (with a newline, as P2PRC writes it): read
/// from `configured`, or from `DATA/ssh/id_ed25519.pub`, made there (with its private key,
/// mode 0600) when missing.
pub fn own_key(
    data_dir: &Path,
    configured: Option<&Path>,
    node: &NodeName,
) -> Result<String, SshKeyError> {
    let path = match configured {
        Some(path) => path.to_owned(),
        None => {
            let dir = data_dir.join("ssh");
            let public = dir.join("id_ed25519.pub");
            if !public.exists() {
                generate(&dir, node)?;
            }
            public
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|source| SshKeyError::Io {
        what: "cannot read the SSH public key",
        path: path.clone(),
        source,
    })?;
    let key = ssh_key::PublicKey::from_openssh(text.trim()).map_err(|e| SshKeyError::Format {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let line = key.to_openssh().map_err(|e| SshKeyError::Format {
        path,
        message: e.to_string(),
    })?;
    Ok(format!("{line}\n"))
}

/// Makes an Ed25519 key pair in `dir` (0700): `id_ed25519` (0600) and `id_ed25519.pub`.
fn generate(dir: &Path, node: &NodeName) -> Result<(), SshKeyError> {
    use rand::Rng as _;
    std::fs::create_dir_all(dir).map_err(|source| SshKeyError::Io {
        what: "cannot create",
        path: dir.to_owned(),
        source,
    })?;
    let _ = std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    let pair = ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let mut private = ssh_key::PrivateKey::from(pair);
    private.set_comment(format!("p2f@{node}"));
    let pem = private
        .to_openssh(ssh_key::LineEnding::LF)
        .map_err(|e| SshKeyError::Generate(e.to_string()))?;
    let public = private
        .public_key()
        .to_openssh()
        .map_err(|e| SshKeyError::Generate(e.to_string()))?;
    // The private key first: a public key alone is never taken for a pair.
    crate::fsutil::write_private(&dir.join("id_ed25519"), pem.as_bytes())?;
    crate::fsutil::write_atomic(&dir.join("id_ed25519.pub"), format!("{public}\n"), 0o644)?;
    tracing::info!(path = %dir.join("id_ed25519").display(), "made this node's SSH key");
    Ok(())
}

/// Where the block goes, and who owns a file made anew.
#[derive(Debug, Clone)]
pub struct Target {
    /// The `authorized_keys` file.
    pub file: PathBuf,
    /// The uid and gid a new file (and its `.ssh` directory) gets; an existing file keeps its
    /// owner.
    pub owner: (u32, u32),
    /// The user's name (the node's `MachineUsername`).
    pub user: String,
}

/// The target for `user` (default: the user the agent runs as) and `file` (default:
/// `~USER/.ssh/authorized_keys`).
pub fn target(user: Option<&str>, file: Option<&Path>) -> Result<Target, SshKeyError> {
    let found = match user {
        Some(name) => nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .ok_or_else(|| SshKeyError::NoUser(name.to_owned()))?,
        None => {
            let uid = nix::unistd::geteuid();
            nix::unistd::User::from_uid(uid)
                .ok()
                .flatten()
                .ok_or_else(|| SshKeyError::NoUser(uid.to_string()))?
        }
    };
    Ok(Target {
        file: file
            .map(Path::to_owned)
            .unwrap_or_else(|| found.dir.join(".ssh").join("authorized_keys")),
        owner: (found.uid.as_raw(), found.gid.as_raw()),
        user: found.name,
    })
}

/// What the key mesh of one node works with.
#[derive(Debug, Clone)]
pub struct KeyMesh {
    /// The cluster's label, named by the block's lines (`ClusterCa::label`).
    pub label: String,
    /// Where the block goes.
    pub target: Target,
    /// This node's name and key line.
    pub own: (NodeName, String),
    /// Unsafe mode: keys in the block; off, no block.
    pub enabled: bool,
}

impl KeyMesh {
    /// Makes the block hold `keys` (node → key line); writes only when that changes the file.
    /// Errors are the caller's to log; the file is then as it was.
    pub fn write(&self, keys: &BTreeMap<String, String>) -> Result<bool, String> {
        let file = &self.target.file;
        let (text, owner) = match std::fs::read(file) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes)
                    .map_err(|_| format!("{} is not UTF-8: left alone", file.display()))?;
                let meta = std::fs::metadata(file).map_err(|e| e.to_string())?;
                use std::os::unix::fs::MetadataExt as _;
                (text, (meta.uid(), meta.gid()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if keys.is_empty() {
                    return Ok(false);
                }
                self.make_dir()?;
                (String::new(), self.target.owner)
            }
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        };
        let next = block::apply(&text, &self.label, keys).map_err(|e| e.to_string())?;
        if next == text && file.exists() {
            return Ok(false);
        }
        crate::fsutil::write_atomic_owned(file, next, crate::fsutil::PRIVATE, Some(owner))
            .map_err(|e| e.to_string())?;
        Ok(true)
    }

    /// The `.ssh` directory of a file made anew: 0700, the user's.
    fn make_dir(&self) -> Result<(), String> {
        let Some(dir) = self.target.file.parent() else {
            return Ok(());
        };
        if dir.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let (uid, gid) = self.target.owner;
        let _ = std::os::unix::fs::chown(dir, Some(uid), Some(gid));
        let _ = std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
        Ok(())
    }

    /// The keys in the block now.
    fn current(&self) -> BTreeMap<String, String> {
        std::fs::read_to_string(&self.target.file)
            .ok()
            .and_then(|text| block::members(&text, &self.label).ok())
            .unwrap_or_default()
    }
}

/// Pure: whether a node that started at `incarnation` (ms since the epoch) is refused by a
/// revocation of its name at `at` (s since the epoch): its certificate was revoked after it
/// started. A node that joined again since (a later start) is not.
pub fn revoked_since_start(
    revocations: &[crate::wire::Revocation],
    name: &str,
    incarnation: u64,
) -> bool {
    revocations.iter().any(|r| {
        r.role != Role::Operator && r.name == name && r.at.saturating_mul(1000) >= incarnation
    })
}

/// Keeps the block right, on every change of the records and every [`RECHECK_EVERY`]; with
/// unsafe mode off, removes it once and ends.
pub async fn run(mesh: KeyMesh, records: Records, revoked: Arc<Revoked>) {
    if !mesh.enabled {
        match mesh.write(&BTreeMap::new()) {
            Ok(true) => {
                tracing::info!(file = %mesh.target.file.display(), "unsafe mode is off: removed the cluster's SSH keys")
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot remove the cluster's SSH keys: {e}"),
        }
        return;
    }
    // Confirmed over the node's API: node → the key line it showed.
    let mut confirmed: HashMap<NodeName, String> = HashMap::new();
    let mut changes = records.changes();
    loop {
        let keys = wanted(&mesh, &records, &revoked, &mut confirmed).await;
        match mesh.write(&keys) {
            Ok(true) => tracing::info!(
                file = %mesh.target.file.display(),
                nodes = ?keys.keys().collect::<Vec<_>>(),
                "SSH keys of the members written"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot write the members' SSH keys: {e}"),
        }
        let _ = tokio::time::timeout(RECHECK_EVERY, changes.changed()).await;
        // Changes come in bursts (every gossip round): look again at most once a second.
        tokio::time::sleep(Duration::from_secs(1)).await;
        changes.borrow_and_update();
    }
}

/// The keys the block should hold now (see the module's documentation).
async fn wanted(
    mesh: &KeyMesh,
    records: &Records,
    revoked: &Revoked,
    confirmed: &mut HashMap<NodeName, String>,
) -> BTreeMap<String, String> {
    let revocations = revoked.list();
    let in_block = mesh.current();
    let mut keys = BTreeMap::new();
    let (own_name, own_key) = &mesh.own;
    if let Ok(line) = block::key_line(own_name.as_str(), own_key) {
        keys.insert(own_name.to_string(), line);
    }
    for status in records.nodes() {
        let node: &Node = &status.node;
        if node.name == *own_name || node.public_key.trim().is_empty() {
            continue;
        }
        if revoked_since_start(&revocations, node.name.as_str(), status.incarnation) {
            confirmed.remove(&node.name);
            continue;
        }
        let Ok(gossiped) = block::key_line(node.name.as_str(), &node.public_key) else {
            continue;
        };
        if confirmed.get(&node.name) == Some(&gossiped) {
            keys.insert(node.name.to_string(), gossiped);
            continue;
        }
        // Asked of the node itself, over mutual TLS (a node the mesh hears, so a dead one
        // costs no timeout).
        let client = status
            .alive
            .then(|| records.client_for(&node.name))
            .flatten();
        let shown = match client {
            Some(client) => tokio::time::timeout(ASK_TIMEOUT, client.node())
                .await
                .ok()
                .and_then(Result::ok),
            None => None,
        };
        match shown {
            Some(shown) if shown.name == node.name => {
                if let Ok(line) = block::key_line(node.name.as_str(), &shown.public_key) {
                    confirmed.insert(node.name.clone(), line.clone());
                    if line == gossiped {
                        keys.insert(node.name.to_string(), line);
                    }
                }
            }
            // Not reachable now: what the block holds, when the gossip still says so.
            _ => {
                if in_block.get(node.name.as_str()) == Some(&gossiped) {
                    keys.insert(node.name.to_string(), gossiped);
                }
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Revocation;

    #[test]
    fn a_revocation_refuses_a_node_that_started_before_it() {
        let r = |name: &str, role, at| Revocation {
            serial: "01".into(),
            role,
            name: name.into(),
            at,
        };
        let list = [
            r("pi", Role::Member, 1_000),
            r("ops", Role::Operator, 1_000),
        ];
        let check = |name, incarnation, want| {
            assert_eq!(
                revoked_since_start(&list, name, incarnation),
                want,
                "{name} {incarnation}"
            );
        };
        check("pi", 999_000, true);
        check("pi", 1_000_000, true);
        check("pi", 1_000_001, false);
        check("nas", 1, false);
        check("ops", 1, false);
    }

    #[test]
    fn a_made_key_is_read_back_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().expect("dir");
        let node = NodeName::from_static("pi");
        let key = own_key(dir.path(), None, &node).expect("made");
        assert!(
            key.starts_with("ssh-ed25519 ") && key.ends_with(" p2f@pi\n"),
            "{key}"
        );
        assert_eq!(own_key(dir.path(), None, &node).expect("again"), key);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("ssh/id_ed25519"))
            .expect("private")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let bad = dir.path().join("bad.pub");
        std::fs::write(&bad, "not a key").expect("write");
        let err = own_key(dir.path(), Some(&bad), &node).expect_err("bad");
        assert!(err.to_string().contains("bad.pub"), "{err}");
    }

    #[test]
    fn the_file_keeps_its_owner_mode_and_other_lines() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("home/.ssh/authorized_keys");
        let mesh = KeyMesh {
            label: "home, CA 01020304".into(),
            target: Target {
                file: file.clone(),
                owner: (
                    nix::unistd::geteuid().as_raw(),
                    nix::unistd::getegid().as_raw(),
                ),
                user: "me".into(),
            },
            own: (NodeName::from_static("pi"), String::new()),
            enabled: true,
        };
        let key = own_key(dir.path(), None, &NodeName::from_static("pi")).expect("key");
        let keys: BTreeMap<String, String> =
            [("pi".to_owned(), block::key_line("pi", &key).expect("line"))].into();
        assert!(
            !mesh.write(&BTreeMap::new()).expect("nothing"),
            "no file for no keys"
        );
        assert!(mesh.write(&keys).expect("made"));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(
            (mode(&file), mode(file.parent().expect("dir"))),
            (0o600, 0o700)
        );
        let mine = "# mine\nssh-rsa AAAA me\n";
        std::fs::write(
            &file,
            format!("{mine}{}", std::fs::read_to_string(&file).expect("read")),
        )
        .expect("edit");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(!mesh.write(&keys).expect("same"), "unchanged: not written");
        assert!(mesh.write(&BTreeMap::new()).expect("removed"));
        assert_eq!(std::fs::read_to_string(&file).expect("read"), mine);
        assert_eq!(mode(&file), 0o600);
    }
}
