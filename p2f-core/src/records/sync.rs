//! Keeping up with the other nodes: every sync round the membership is read and taken in,
//! stale local copies are fenced, and records not held yet are fetched from their nodes.

use std::sync::Arc;
use std::time::Duration;

use p2f_model::{NodeName, Status};

use super::precedence::{Candidate, Origin};
use super::state::{Copy, Wanted};
use super::{Inner, lock};
use crate::mesh::{Member, spec_hash};

/// How often other nodes' digests are compared with the copies held here.
const SYNC_EVERY: Duration = Duration::from_millis(250);
/// How long fetching one record from its node may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Keeps the membership and a copy of every other node's records (fetched when a digest
/// names a record or spec not held yet), and fences stale local copies.
pub(super) async fn sync(inner: Arc<Inner>) {
    let mut ticker = tokio::time::interval(SYNC_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let wanted = refresh(&inner).await;
        fence(&inner);
        for Wanted {
            node,
            api,
            id,
            spec,
        } in wanted
        {
            // Only node `node` itself can answer (its certificate names it).
            let client = inner.client.peer(&node, &api);
            // One slow node must not hold up copying the others' records for long.
            let fetched = tokio::time::timeout(FETCH_TIMEOUT, client.local_record(&id))
                .await
                .unwrap_or_else(|_| {
                    Err(crate::ClientError::Unreachable {
                        address: api.clone(),
                        detail: format!(
                            "no answer within {}",
                            p2f_model::format_duration(FETCH_TIMEOUT)
                        ),
                    })
                });
            match fetched {
                // Only a record of what was asked for, on the node that was asked: a node may
                // not hand out records in another node's name.
                Ok(Some(record)) if record.id != id || record.node.name != node => {
                    tracing::warn!(%id, %node, got = %record.id, on = %record.node.name, "a node answered with a record that is not its own: ignored");
                }
                Ok(Some(record)) => {
                    let spec = if spec_hash(&record.spec) == spec {
                        spec
                    } else {
                        spec_hash(&record.spec)
                    };
                    let mut state = lock(&inner.state);
                    if let Some(entries) = state.published.get_mut(&id) {
                        for entry in entries {
                            entry.listed = None;
                        }
                    }
                    state.copies.insert(id, Copy { record, spec });
                    drop(state);
                    inner.bump();
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(%id, "cannot fetch the record from {api}: {e}"),
            }
        }
    }
}

/// Stops and forgets local copies that the network has replaced: a copy on a live node wins
/// over them ([`super::precedence`]; in practice a higher generation: this node was lost, and
/// the root placed the process elsewhere). A parked copy is decided when it is unparked.
///
/// Gossip only says so; anyone holding the gossip key could say it. So the winning copy is
/// first asked for over the owner's API, reached by name (only the holder of that node's
/// certificate can answer): a local copy is fenced only when that node itself shows a record
/// that wins.
fn fence(inner: &Arc<Inner>) {
    if lock(&inner.state).published.is_empty() {
        return;
    }
    // Only copies that run here are fenced (the root decides about its unplaced records).
    // Never with the state lock held: a source's lock is taken first elsewhere.
    let local: Vec<(usize, Arc<p2f_model::Process>)> = inner
        .sources
        .iter()
        .enumerate()
        .filter(|(_, source)| source.origin() == Origin::Local)
        .flat_map(|(i, source)| {
            source
                .listed()
                .into_iter()
                .map(move |l| (i, Arc::clone(l.process())))
        })
        .filter(|(_, p)| p.status != Status::Parked)
        .collect();
    let stale: Vec<Stale> = {
        let state = lock(&inner.state);
        local
            .iter()
            .filter_map(|(i, local)| {
                state
                    .winner_elsewhere(&local.id, &Candidate::of(local, Origin::Local), &inner.node)
                    .map(|(node, newer)| Stale {
                        source: *i,
                        local: Arc::clone(local),
                        api: state.api_of(&node).cloned(),
                        node,
                        newer,
                    })
            })
            .collect()
    };
    for Stale {
        source: i,
        local,
        node,
        newer,
        api,
    } in stale
    {
        let id = local.id.clone();
        if !lock(&inner.fencing).insert(id.clone()) {
            continue;
        }
        let inner = inner.clone();
        tokio::spawn(async move {
            if confirmed(&inner, &local, &node, api.as_deref()).await {
                tracing::warn!(%id, generation = local.generation, %node, newer, "a copy that wins runs elsewhere: stopping this stale one");
                inner.sources[i].fence(&id).await;
            }
            lock(&inner.fencing).remove(&id);
        });
    }
}

/// A local copy the gossip says another copy wins over.
struct Stale {
    /// The index of the source that runs it.
    source: usize,
    local: Arc<p2f_model::Process>,
    /// The node of the winning copy, its generation, and its API address.
    node: NodeName,
    newer: u64,
    api: Option<String>,
}

/// Whether node `node` itself (over its API, by name) shows a copy of `local`'s process that
/// wins over it.
pub(super) async fn confirmed(
    inner: &Inner,
    local: &p2f_model::Process,
    node: &NodeName,
    api: Option<&str>,
) -> bool {
    let Some(api) = api else {
        tracing::debug!(id = %local.id, %node, "cannot confirm a newer copy: the node publishes no API");
        return false;
    };
    let client = inner.client.peer(node, api);
    let fetched = tokio::time::timeout(FETCH_TIMEOUT, client.local_record(&local.id)).await;
    match fetched {
        Ok(Ok(Some(theirs))) => {
            let wins = theirs.node.name == *node
                && theirs.id == local.id
                && super::precedence::wins(
                    &Candidate::of(&theirs, Origin::Remote),
                    &Candidate::of(local, Origin::Local),
                );
            if !wins {
                tracing::warn!(id = %local.id, %node, "the gossip says a newer copy runs on {node}, but {node} does not show one: keeping this copy");
            }
            wins
        }
        Ok(Ok(None)) => {
            tracing::warn!(id = %local.id, %node, "the gossip says a newer copy runs on {node}, but {node} has none: keeping this copy");
            false
        }
        Ok(Err(e)) => {
            tracing::debug!(id = %local.id, %node, "cannot confirm a newer copy: {e}");
            false
        }
        Err(_) => false,
    }
}

/// Reads the membership and applies what changed since the last time (see
/// [`State::absorb`]); returns the records to fetch.
pub(super) async fn refresh(inner: &Arc<Inner>) -> Vec<Wanted> {
    let _one_at_a_time = inner.refreshing.lock().await;
    let membership = inner.mesh.membership().await;
    let others: Vec<(Member, bool)> = membership
        .live
        .into_iter()
        .map(|m| (m, true))
        .chain(membership.dead.into_iter().map(|m| (m, false)))
        .collect();
    let (own, others): (Vec<_>, Vec<_>) =
        others.into_iter().partition(|(m, _)| m.node == inner.node);
    let mut state = lock(&inner.state);
    state.own = own.into_iter().next().map(|(m, _)| m);
    let changed = state.absorb(others);
    let wanted = state.wanted();
    drop(state);
    if changed {
        inner.bump();
    }
    wanted
}
