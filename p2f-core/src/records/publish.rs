//! Publishing this node's records: a digest of each local record (the one that wins, when two
//! sources have one id) whenever a source changes, then the `seq` marker.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::select_all;
use p2f_model::Process;

use super::Inner;
use super::precedence::{self, Candidate};
use crate::mesh::keys;
use crate::mesh::{ProcessDigest, spec_hash};

/// What was published under one key.
struct Sent {
    /// The local record it was made from.
    from: Arc<Process>,
    /// The spec hash in it (kept, so that a record whose spec did not change is not hashed
    /// again: a spec holds its bundle).
    spec: String,
    value: String,
}

/// Publishes a digest of every local record whenever one changes, then bumps [`keys::SEQ`].
pub(super) async fn publish(inner: Arc<Inner>) {
    let mut changes: Vec<_> = inner.sources.iter().map(|s| s.changes()).collect();
    let mut published: HashMap<String, Sent> = HashMap::new();
    let mut seq: u64 = 0;
    loop {
        // The copy that wins per id among the local sources.
        let mut current: HashMap<String, (Arc<Process>, precedence::Origin)> =
            HashMap::with_capacity(published.len());
        for (listed, origin) in inner.local() {
            let process = Arc::clone(listed.process());
            let key = ProcessDigest::key_for(&process.id);
            let keep = current.get(&key).is_none_or(|(other, other_origin)| {
                precedence::wins(
                    &Candidate::of(&process, origin),
                    &Candidate::of(other, *other_origin),
                )
            });
            if keep {
                current.insert(key, (process, origin));
            }
        }
        let mut now: HashMap<String, Sent> = HashMap::with_capacity(current.len());
        let mut changed = false;
        for (key, (process, _)) in current {
            let old = published.remove(&key);
            if old.as_ref().is_some_and(|o| Arc::ptr_eq(&o.from, &process)) {
                if let Some(old) = old {
                    now.insert(key, old);
                }
                continue;
            }
            let spec = match &old {
                Some(before) if before.from.spec == process.spec => before.spec.clone(),
                _ => spec_hash(&process.spec),
            };
            let value = ProcessDigest::with_spec_hash(&process, spec.clone()).encode();
            if old.as_ref().map(|o| &o.value) != Some(&value) {
                if let Err(e) = inner.mesh.set(&key, &value).await {
                    tracing::warn!("cannot publish {key}: {e}");
                }
                changed = true;
            }
            now.insert(
                key,
                Sent {
                    from: process,
                    spec,
                    value,
                },
            );
        }
        // What is left was published before and is gone now.
        for key in published.keys() {
            inner.mesh.delete(key).await;
            changed = true;
        }
        published = now;
        if changed || seq == 0 {
            seq += 1;
            if let Err(e) = inner.mesh.set(keys::SEQ, &seq.to_string()).await {
                tracing::warn!("cannot publish {}: {e}", keys::SEQ);
            }
        }
        inner.bump();
        if changes.is_empty() {
            return;
        }
        let (result, _, _) = select_all(changes.iter_mut().map(|c| Box::pin(c.changed()))).await;
        if result.is_err() {
            // A source went away: the node is stopping.
            return;
        }
    }
}
