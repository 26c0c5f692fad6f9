//! The P2PRC peers this node knows: entries learned from P2PRC tables (posted to `/IpTable`,
//! answers of the table exchange, `p2f p2prc import`), kept in `DATA/p2prc/peers.json` (written
//! whole through a rename). Known, never trusted: a peer is no member (an entry naming a member
//! or this node is refused), runs no P2F process, and its `PublicKey` is never installed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use p2f_model::{Node, NodeName};

pub use crate::wire::P2prcPeer;

/// The most peers a node keeps; entries beyond are refused (known ones are still updated).
pub const MAX_PEERS: usize = 1024;
/// A peer no table has named for this long is forgotten (P2PRC drops entries that stop
/// answering; here any table naming it again keeps it).
pub const FORGET_AFTER: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// What a merge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    /// Peers not known before.
    pub added: Vec<String>,
    /// Known peers whose entry changed.
    pub updated: Vec<String>,
    /// Entries refused, each with why.
    pub refused: Vec<(String, &'static str)>,
}

impl Merged {
    /// Whether anything changed.
    pub fn changed(&self) -> bool {
        !self.added.is_empty() || !self.updated.is_empty()
    }
}

/// Pure: merges `nodes` into `known`. An entry naming a member (`is_member`) is refused; one
/// with the address and server port of a peer of another name replaces it (P2PRC takes them
/// for one machine); beyond [`MAX_PEERS`] new names are refused.
pub fn merge(
    known: &mut BTreeMap<String, P2prcPeer>,
    nodes: &[Node],
    is_member: &dyn Fn(&NodeName) -> bool,
    via: &str,
    now: u64,
) -> Merged {
    let mut merged = Merged::default();
    let cutoff = now.saturating_sub(FORGET_AFTER.as_secs());
    known.retain(|_, p| p.learned_at >= cutoff);
    for node in nodes {
        let name = node.name.as_str().to_owned();
        if is_member(&node.name) {
            merged.refused.push((name, "a member of this cluster"));
            continue;
        }
        let same_machine = |p: &P2prcPeer| {
            p.node.name != node.name
                && p.node.server_port == node.server_port
                && ((p.node.ipv4.is_some() && p.node.ipv4 == node.ipv4)
                    || (p.node.ipv6.is_some() && p.node.ipv6 == node.ipv6))
        };
        known.retain(|_, p| !same_machine(p));
        let full = known.len() >= MAX_PEERS;
        match known.get_mut(&name) {
            Some(peer) => {
                if peer.node != *node {
                    peer.node = node.clone();
                    merged.updated.push(name);
                }
                peer.learned_at = now;
                peer.via = via.to_owned();
            }
            None if full => merged.refused.push((name, "too many peers")),
            None => {
                known.insert(
                    name.clone(),
                    P2prcPeer {
                        node: node.clone(),
                        learned_at: now,
                        via: via.to_owned(),
                    },
                );
                merged.added.push(name);
            }
        }
    }
    merged
}

/// The known peers, durable (see the module's documentation).
#[derive(Debug)]
pub struct Peers {
    path: PathBuf,
    known: Mutex<BTreeMap<String, P2prcPeer>>,
}

impl Peers {
    /// The peers saved in `path` (none when there is no file; a damaged one is ignored with a
    /// warning, and replaced at the next change).
    pub fn load(path: PathBuf) -> Peers {
        let list: Vec<P2prcPeer> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), "unreadable P2PRC peers: {e}");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let known = list
            .into_iter()
            .take(MAX_PEERS)
            .map(|p| (p.node.name.as_str().to_owned(), p))
            .collect();
        Peers {
            path,
            known: Mutex::new(known),
        }
    }

    /// Every known peer, by name.
    pub fn list(&self) -> Vec<P2prcPeer> {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Whether a known peer has this address.
    pub fn has_address(&self, ip: std::net::IpAddr) -> bool {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .any(|p| match ip {
                std::net::IpAddr::V4(v4) => p.node.ipv4 == Some(v4),
                std::net::IpAddr::V6(v6) => p.node.ipv6 == Some(v6),
            })
    }

    /// Merges `nodes` ([`merge`]) and saves the peers when anything changed; on a failed
    /// write nothing changes.
    pub fn merge(
        &self,
        nodes: &[Node],
        is_member: &dyn Fn(&NodeName) -> bool,
        via: &str,
    ) -> Result<Merged, crate::fsutil::WriteError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = known.clone();
        let merged = merge(&mut next, nodes, is_member, via, now);
        if merged.changed() || next.len() != known.len() {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let list: Vec<&P2prcPeer> = next.values().collect();
            let json = serde_json::to_vec_pretty(&list).unwrap_or_default();
            crate::fsutil::write_atomic(&self.path, json, 0o644)?;
        }
        *known = next;
        Ok(merged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str, port: u16) -> Node {
        let mut node = Node::named(NodeName::new(name).expect("name"));
        node.ipv4 = ip.parse().ok();
        node.server_port = Some(port);
        node
    }

    #[test]
    fn merging_adds_updates_refuses_members_and_replaces_the_same_machine() {
        let mut known = BTreeMap::new();
        let member = |n: &NodeName| n.as_str() == "root";
        let got = merge(
            &mut known,
            &[
                node("a", "192.0.2.1", 8088),
                node("root", "192.0.2.9", 8088),
            ],
            &member,
            "import",
            1,
        );
        assert_eq!(got.added, ["a"]);
        assert_eq!(
            got.refused,
            [("root".to_owned(), "a member of this cluster")]
        );
        let got = merge(&mut known, &[node("a", "192.0.2.1", 8088)], &member, "x", 2);
        assert!(!got.changed() && known["a"].learned_at == 2);
        let got = merge(&mut known, &[node("a", "192.0.2.1", 9000)], &member, "x", 3);
        assert_eq!(got.updated, ["a"]);
        // Same address and port, another name: the same machine renamed.
        let got = merge(&mut known, &[node("b", "192.0.2.1", 9000)], &member, "x", 4);
        assert_eq!(got.added, ["b"]);
        assert_eq!(known.keys().collect::<Vec<_>>(), ["b"]);
        // Not named by any table for a week: forgotten at the next merge.
        let later = 4 + FORGET_AFTER.as_secs() + 1;
        merge(
            &mut known,
            &[node("c", "192.0.2.3", 1)],
            &member,
            "x",
            later,
        );
        assert_eq!(known.keys().collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn the_number_of_peers_is_bounded_and_they_survive_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("p2prc/peers.json");
        let peers = Peers::load(path.clone());
        let many: Vec<Node> = (0..MAX_PEERS + 5)
            .map(|i| node(&format!("n{i}"), "", 8088))
            .collect();
        let got = peers.merge(&many, &|_| false, "import").expect("merge");
        assert_eq!((got.added.len(), got.refused.len()), (MAX_PEERS, 5));
        assert_eq!(Peers::load(path).list().len(), MAX_PEERS);
    }
}
