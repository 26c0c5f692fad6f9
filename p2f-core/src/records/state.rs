//! What this node knows of the other nodes, updated from the mesh a change at a time: their
//! directory entries (decoded once per change), the digests they publish and the full records
//! fetched for them. Pure: no IO, no clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use p2f_model::{EventKind, Node, NodeName, Process, ProcessId, Status, Timestamp};

use super::listing::Listed;
use super::precedence::{self, Candidate, Origin};
use crate::mesh::keys::{self, PROCESS_PREFIX};
use crate::mesh::{Member, ProcessDigest};

/// A remote record held here, with the spec hash it was fetched for.
#[derive(Debug, Clone)]
pub(super) struct Copy {
    pub(super) record: Process,
    pub(super) spec: String,
}

/// A digest another node publishes, decoded once per change.
pub(super) struct Published {
    pub(super) node: NodeName,
    pub(super) alive: bool,
    pub(super) digest: ProcessDigest,
    /// The held copy merged with this digest, made when first listed after a change.
    pub(super) listed: Option<Listed>,
}

impl Published {
    fn candidate(&self) -> Candidate<'_> {
        Candidate {
            generation: self.digest.generation,
            status: &self.digest.status,
            origin: Origin::Remote,
            node: &self.node,
            alive: self.alive,
        }
    }
}

/// What this node knows of the others.
#[derive(Default)]
pub(super) struct State {
    /// Every other node as last seen (its key-values are shared with the mesh's snapshot),
    /// and whether it is alive.
    pub(super) members: Vec<(Member, bool)>,
    /// Each other node's directory entry, decoded when its key-values change.
    pub(super) directory: HashMap<NodeName, Node>,
    /// This node as the mesh shows it (its own published values).
    pub(super) own: Option<Member>,
    /// Every digest other nodes publish, by process id (usually one node per id; two while
    /// a returning node still publishes the copy the network replaced).
    pub(super) published: BTreeMap<ProcessId, Vec<Published>>,
    /// Full records fetched from their nodes, by id.
    pub(super) copies: HashMap<ProcessId, Copy>,
}

/// A record to fetch: from which API, which id, for which spec hash.
pub(super) struct Wanted {
    /// The node that publishes it, and its API address.
    pub(super) node: NodeName,
    pub(super) api: String,
    pub(super) id: ProcessId,
    pub(super) spec: String,
}

impl State {
    /// A copy of `id` on a live node other than `own` that wins over `local` (see
    /// [`precedence`]): the node and its generation.
    pub(super) fn winner_elsewhere(
        &self,
        id: &ProcessId,
        local: &Candidate<'_>,
        own: &NodeName,
    ) -> Option<(NodeName, u64)> {
        self.published
            .get(id)?
            .iter()
            .filter(|e| e.alive && e.node != *own)
            .filter(|e| precedence::wins(&e.candidate(), local))
            .min_by(|a, b| precedence::order(&a.candidate(), &b.candidate()))
            .map(|e| (e.node.clone(), e.digest.generation))
    }

    /// The member `node`'s API address, if it publishes one.
    pub(super) fn api_of(&self, node: &NodeName) -> Option<&String> {
        let (member, _) = self.members.iter().find(|(m, _)| &m.node == node)?;
        member.values.get(keys::API)
    }

    /// The published entry of `id` that wins (see [`precedence`]).
    pub(super) fn winning_entry(&self, id: &ProcessId) -> Option<&Published> {
        self.published
            .get(id)?
            .iter()
            .min_by(|a, b| precedence::order(&a.candidate(), &b.candidate()))
    }

    /// Every remote record this node holds a copy of, merged with its digest (listed once per
    /// change).
    pub(super) fn remote_listed(&mut self, out: &mut Vec<(Listed, Origin)>) {
        let State {
            published, copies, ..
        } = self;
        for (id, entries) in published.iter_mut() {
            let Some(copy) = copies.get(id) else {
                continue;
            };
            for entry in entries {
                let listed = entry.listed.get_or_insert_with(|| {
                    Listed::new(merge(&copy.record, &entry.digest, entry.alive))
                });
                out.push((listed.clone(), Origin::Remote));
            }
        }
    }
    /// Takes in the other nodes as the mesh shows them now. Only nodes whose key-values or
    /// liveness changed are looked at, and of those only the digests that changed are decoded
    /// (and their listed records made again).
    /// Returns whether anything changed.
    pub(super) fn absorb(&mut self, others: Vec<(Member, bool)>) -> bool {
        let mut changed = false;
        let mut before: HashMap<NodeName, (Member, bool)> = std::mem::take(&mut self.members)
            .into_iter()
            .map(|(m, alive)| (m.node.clone(), (m, alive)))
            .collect();
        for (member, alive) in &others {
            let old = before.remove(&member.node);
            let same_incarnation = old
                .as_ref()
                .is_some_and(|(o, a)| o.incarnation == member.incarnation && a == alive);
            if same_incarnation
                && old
                    .as_ref()
                    .is_some_and(|(o, _)| Arc::ptr_eq(&o.values, &member.values))
            {
                continue;
            }
            changed = true;
            let same_entry = old
                .as_ref()
                .is_some_and(|(o, _)| o.values.get(keys::NODE) == member.values.get(keys::NODE));
            if !same_entry || !self.directory.contains_key(&member.node) {
                let entry = member
                    .values
                    .get(keys::NODE)
                    .and_then(|json| serde_json::from_str::<Node>(json).ok())
                    .unwrap_or_else(|| Node::named(member.node.clone()));
                self.directory.insert(member.node.clone(), entry);
            }
            let old_values = old.map(|(o, _)| o.values);
            // Digests this node no longer publishes.
            if let Some(old_values) = &old_values {
                for (key, _) in digests_of(old_values) {
                    if !member.values.contains_key(key) {
                        forget(&mut self.published, key, &member.node);
                    }
                }
            }
            for (key, value) in digests_of(&member.values) {
                let unchanged = same_incarnation
                    && old_values
                        .as_ref()
                        .and_then(|v| v.get(key))
                        .is_some_and(|old| old == value);
                if unchanged {
                    continue;
                }
                let Ok(digest) = ProcessDigest::decode(value) else {
                    forget(&mut self.published, key, &member.node);
                    continue;
                };
                let entries = self.published.entry(digest.id.clone()).or_default();
                entries.retain(|e| e.node != member.node);
                entries.push(Published {
                    node: member.node.clone(),
                    alive: *alive,
                    digest,
                    listed: None,
                });
            }
        }
        // Nodes the mesh forgot.
        for (node, (member, _)) in &before {
            changed = true;
            self.directory.remove(node);
            for (key, _) in digests_of(&member.values) {
                forget(&mut self.published, key, node);
            }
        }
        self.members = others;
        if changed {
            // Keep copies only of records some node still publishes.
            let published = &self.published;
            self.copies.retain(|id, _| published.contains_key(id));
        }
        changed
    }

    /// The records of live nodes not held yet, or held for another spec.
    pub(super) fn wanted(&self) -> Vec<Wanted> {
        let apis: HashMap<&NodeName, &String> = self
            .members
            .iter()
            .filter_map(|(m, _)| m.values.get(keys::API).map(|api| (&m.node, api)))
            .collect();
        let mut wanted = Vec::new();
        for (id, entries) in &self.published {
            for entry in entries.iter().filter(|e| e.alive) {
                let held = self
                    .copies
                    .get(id)
                    .is_some_and(|c| c.spec == entry.digest.spec);
                if let (false, Some(api)) = (held, apis.get(&entry.node)) {
                    wanted.push(Wanted {
                        node: entry.node.clone(),
                        api: (*api).clone(),
                        id: id.clone(),
                        spec: entry.digest.spec.clone(),
                    });
                }
            }
        }
        wanted
    }
}

/// The process digests among `values`.
pub(super) fn digests_of(
    values: &BTreeMap<String, String>,
) -> impl Iterator<Item = (&String, &String)> {
    values
        .range::<str, _>((
            std::ops::Bound::Included(PROCESS_PREFIX),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|(key, _)| key.starts_with(PROCESS_PREFIX))
}

/// Drops `node`'s digest under mesh key `key`.
fn forget(published: &mut BTreeMap<ProcessId, Vec<Published>>, key: &str, node: &NodeName) {
    let Some(id) = key
        .strip_prefix(PROCESS_PREFIX)
        .and_then(|id| ProcessId::new(id).ok())
    else {
        return;
    };
    if let Some(entries) = published.get_mut(&id) {
        entries.retain(|e| &e.node != node);
        if entries.is_empty() {
            published.remove(&id);
        }
    }
}

/// A remote record as its digest says it is now.
pub(super) fn merge(copy: &Process, digest: &ProcessDigest, alive: bool) -> Process {
    let mut record = copy.clone();
    record.generation = digest.generation;
    record.node.name = digest.node.clone();
    record.port = digest.port;
    record.restarts = digest.restarts;
    record.started_at = digest.started_at;
    record.status = if alive {
        digest.status.clone()
    } else {
        Status::Lost
    };
    if let Status::Failed(failure) = &record.status {
        record.last_failure = Some(failure.clone());
    }
    // The copy's history is as of its fetch; the digest says what happened since.
    record.pid = digest.pid;
    if let (Some(at), Some(pid)) = (digest.started_at, digest.pid)
        && digest.started_at != copy.started_at
    {
        record.record(at, EventKind::Started { pid });
    }
    if digest.healthy && !record.passed_health_check() {
        let at = digest.started_at.unwrap_or(Timestamp(0));
        record.record(at, EventKind::Healthy);
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2f_model::{NodeRef, ProcessSpec};

    fn name(n: &str) -> NodeName {
        NodeName::new(n).expect("name")
    }

    fn digest(id: &str, generation: u64, node: &str) -> (String, String) {
        digest_in(id, generation, node, Status::Pending)
    }

    fn digest_in(id: &str, generation: u64, node: &str, status: Status) -> (String, String) {
        let mut process = Process::placed(
            ProcessId::new(id).expect("id"),
            generation,
            ProcessSpec::new("web", "exec sleep 1"),
            NodeRef {
                name: name(node),
                address: "127.0.0.1".into(),
            },
            Timestamp(1),
        );
        process.status = status;
        let digest = ProcessDigest::of(&process);
        (digest.key(), digest.encode())
    }

    fn member(node: &str, incarnation: u64, values: &[(String, String)]) -> Member {
        let mut all: BTreeMap<String, String> = values.iter().cloned().collect();
        all.insert(keys::API.into(), format!("{node}:1"));
        Member {
            node: name(node),
            incarnation,
            gossip_addr: ([127, 0, 0, 1], 1).into(),
            values: Arc::new(all),
        }
    }

    /// (id, node, generation, alive) of every digest held.
    fn held(state: &State) -> Vec<(String, String, u64, bool)> {
        state
            .published
            .iter()
            .flat_map(|(id, entries)| {
                entries.iter().map(move |e| {
                    (
                        id.to_string(),
                        e.node.to_string(),
                        e.digest.generation,
                        e.alive,
                    )
                })
            })
            .collect()
    }

    /// Marks every digest as listed, so that a test can see which ones a change made again.
    fn list_all(state: &mut State) {
        for entries in state.published.values_mut() {
            for e in entries {
                e.listed = Some(Listed::new(Process::placed(
                    e.digest.id.clone(),
                    e.digest.generation,
                    ProcessSpec::new("web", "exec sleep 1"),
                    NodeRef {
                        name: e.node.clone(),
                        address: String::new(),
                    },
                    Timestamp(1),
                )));
            }
        }
    }

    fn relisted(state: &State) -> Vec<String> {
        state
            .published
            .values()
            .flatten()
            .filter(|e| e.listed.is_none())
            .map(|e| e.digest.id.to_string())
            .collect()
    }

    #[test]
    fn only_what_changed_is_taken_in_again() {
        let mut state = State::default();
        let a = member("a", 1, &[digest("web-1", 1, "a"), digest("db-1", 1, "a")]);
        let b = member("b", 1, &[digest("cron-1", 2, "b")]);
        state.absorb(vec![(a.clone(), true), (b.clone(), true)]);
        assert_eq!(
            held(&state),
            [
                ("cron-1".into(), "b".into(), 2, true),
                ("db-1".into(), "a".into(), 1, true),
                ("web-1".into(), "a".into(), 1, true),
            ]
        );
        let wanted: Vec<(String, String)> = state
            .wanted()
            .into_iter()
            .map(|w| (w.api, w.id.to_string()))
            .collect();
        assert_eq!(
            wanted,
            [
                ("b:1".into(), "cron-1".into()),
                ("a:1".into(), "db-1".into()),
                ("a:1".into(), "web-1".into()),
            ]
        );

        // Nothing changed: the same shared values, nothing made again.
        list_all(&mut state);
        state.absorb(vec![(a.clone(), true), (b.clone(), true)]);
        assert!(relisted(&state).is_empty());

        // a restarts web-1 (a new digest) and drops db-1: only web-1 is made again.
        let a2 = member("a", 1, &[digest("web-1", 1, "a")]);
        let mut changed = (*a2.values).clone();
        let (key, mut value) = digest("web-1", 1, "a");
        value = value.replace("\"restarts\":0", "\"restarts\":1");
        changed.insert(key, value);
        let a2 = Member {
            values: Arc::new(changed),
            ..a2
        };
        state.absorb(vec![(a2.clone(), true), (b.clone(), true)]);
        assert_eq!(relisted(&state), ["web-1"]);
        assert_eq!(held(&state).len(), 2, "db-1 is gone");

        // b is declared dead: its digests are taken in again, not alive; no fetch from it.
        list_all(&mut state);
        state.absorb(vec![(a2.clone(), true), (b.clone(), false)]);
        assert_eq!(relisted(&state), ["cron-1"]);
        assert!(!state.published[&ProcessId::new("cron-1").expect("id")][0].alive);
        assert!(state.wanted().iter().all(|w| w.id.as_str() != "cron-1"));

        // The mesh forgets b: its digests go, and so does the copy of its record.
        state.copies.insert(
            ProcessId::new("cron-1").expect("id"),
            Copy {
                record: Process::placed(
                    ProcessId::new("cron-1").expect("id"),
                    2,
                    ProcessSpec::new("cron", "exec sleep 1"),
                    NodeRef {
                        name: name("b"),
                        address: String::new(),
                    },
                    Timestamp(1),
                ),
                spec: String::new(),
            },
        );
        state.absorb(vec![(a2, true)]);
        assert_eq!(held(&state), [("web-1".into(), "a".into(), 1, true)]);
        assert!(state.copies.is_empty());
    }

    #[test]
    fn a_new_incarnation_replaces_the_old_ones_digests_and_two_nodes_may_hold_one_id() {
        let mut state = State::default();
        let a = member("a", 1, &[digest("web-1", 1, "a"), digest("db-1", 1, "a")]);
        let b = member("b", 1, &[digest("web-1", 2, "b")]);
        state.absorb(vec![(a, true), (b.clone(), true)]);
        // While a still publishes its stale copy, both are held; the newer one is on b.
        let web = ProcessId::new("web-1").expect("id");
        assert_eq!(
            elsewhere(&state, &web, 1, Status::Running, "a"),
            Some((name("b"), 2))
        );
        assert_eq!(elsewhere(&state, &web, 2, Status::Running, "a"), None);
        // a comes back as a new incarnation that publishes only db-1.
        let a2 = member("a", 2, &[digest("db-1", 1, "a")]);
        state.absorb(vec![(a2, true), (b, true)]);
        assert_eq!(
            held(&state),
            [
                ("db-1".into(), "a".into(), 1, true),
                ("web-1".into(), "b".into(), 2, true),
            ]
        );
    }

    /// The copy elsewhere that wins over `own`'s copy of `id` (`generation`, `status`).
    fn elsewhere(
        state: &State,
        id: &ProcessId,
        generation: u64,
        status: Status,
        own: &str,
    ) -> Option<(NodeName, u64)> {
        let own = name(own);
        let local = Candidate {
            generation,
            status: &status,
            origin: Origin::Local,
            node: &own,
            alive: true,
        };
        state.winner_elsewhere(id, &local, &own)
    }

    #[test]
    fn a_copy_elsewhere_wins_by_precedence_and_an_unplaced_record_only_by_generation() {
        let web = ProcessId::new("web-1").expect("id");
        let mut state = State::default();
        let with = |node, status| {
            (
                member(node, 1, &[digest_in("web-1", 2, node, status)]),
                true,
            )
        };
        state.absorb(vec![
            // The root's record of web waiting for a node: the generation it will place.
            with("a", Status::Unplaced),
            with("b", Status::Running),
            with("b0", Status::Deploying),
            with("bb", Status::Stopped),
        ]);
        let wins = |generation, status, own| elsewhere(&state, &web, generation, status, own);
        // c runs generation 2 too: b's copy wins (b sorts first).
        assert_eq!(wins(2, Status::Running, "c"), Some((name("b"), 2)));
        assert_eq!(wins(2, Status::Running, "b"), None);
        assert_eq!(wins(2, Status::Running, "0"), None);
        // A stopped copy gives way to b's running one, and so does a parked one.
        assert_eq!(wins(2, Status::Stopped, "bb"), Some((name("b"), 2)));
        assert_eq!(wins(2, Status::Parked, "0"), Some((name("b"), 2)));
        // Still deploying here: b's running copy wins, b0's deploying one does not come first.
        assert_eq!(wins(2, Status::Deploying, "c"), Some((name("b"), 2)));
        // Generation 3 here wins over all of them.
        assert_eq!(wins(3, Status::Parked, "c"), None);
        // The unplaced record wins over a lower generation only.
        state.absorb(vec![with("a", Status::Unplaced)]);
        let wins = |generation, status, own| elsewhere(&state, &web, generation, status, own);
        assert_eq!(wins(1, Status::Running, "c"), Some((name("a"), 2)));
        assert_eq!(wins(2, Status::Pending, "c"), None);
    }

    #[test]
    fn an_undecodable_digest_is_skipped() {
        let mut state = State::default();
        let mut values = vec![digest("web-1", 1, "a")];
        values.push(("p/junk".into(), "{not json".into()));
        state.absorb(vec![(member("a", 1, &values), true)]);
        assert_eq!(held(&state), [("web-1".into(), "a".into(), 1, true)]);
    }
}
