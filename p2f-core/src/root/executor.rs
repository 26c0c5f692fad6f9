//! Carries out a pass's [`Action`]s: notes them in the book, keeps the unplaced records, and
//! sends placements and removals straight to the node concerned (over its control API, found
//! by name through the records). Calls run as the root's tracked tasks, so a slow node never
//! holds up a pass, and their outcomes go back into the book.

use std::sync::Arc;
use std::time::{Duration, Instant};

use p2f_model::{NodeName, ProcessId, ProcessSpec};

use super::Inner;
use super::plan::Action;
use crate::records::Origin;
use crate::wire::{SpinQuery, SpinRequest};

/// How long the root waits for a node to take a placement before it is in doubt.
pub(super) const PLACE_TIMEOUT: Duration = Duration::from_secs(3);

/// Carries out `actions`, in order.
pub(super) fn execute(inner: &Arc<Inner>, actions: Vec<Action>) {
    for action in actions {
        match action {
            Action::Settle { id, generation } => inner.book().entry(&id).settle(generation),
            Action::Abandon {
                id,
                generation,
                node,
            } => {
                tracing::warn!(%id, %node, generation, "placement did not show up: trying another node");
                let mut book = inner.book();
                let entry = book.entry(&id);
                entry.failed(generation, &node);
                entry.settle(generation);
            }
            Action::NoteFailure {
                id,
                generation,
                node,
            } => inner.book().entry(&id).failed(generation, &node),
            Action::Release { id } => inner.unplaced.release(&id),
            Action::Replace {
                id,
                superseded,
                node,
            } => {
                tracing::info!(%id, %node, "replacing: its spec or pins changed");
                {
                    let mut book = inner.book();
                    let entry = book.entry(&id);
                    entry.supersede(superseded);
                    entry.set_replacing(true);
                }
                let inner_ = inner.clone();
                inner.track(async move {
                    remove_at(&inner_, &id, &node).await;
                    inner_.book().entry(&id).set_replacing(false);
                });
            }
            Action::Place {
                id,
                generation,
                node,
                spec,
                moved_from,
            } => place(inner, id, generation, node, spec, moved_from),
            Action::Unplace {
                id,
                generation,
                spec,
                failure,
            } => {
                tracing::warn!(%id, generation, "unplaced: {failure}");
                inner.unplaced.hold(&id, generation, &spec, failure);
            }
        }
    }
}

/// Sends `generation` of `id` to `node`, noted in the book first so the next pass waits for
/// it. A refused placement is forgotten (tried again next pass, elsewhere when the node could
/// not be reached); one without an answer within [`PLACE_TIMEOUT`] is in doubt: it may still
/// land, so it stays noted until the plan's grace runs out.
fn place(
    inner: &Arc<Inner>,
    id: ProcessId,
    generation: u64,
    node: NodeName,
    spec: ProcessSpec,
    moved_from: Option<NodeName>,
) {
    inner
        .book()
        .entry(&id)
        .send(generation, &node, Instant::now());
    tracing::info!(%id, generation, %node, "placing");
    let Some(client) = inner.records.client_for(&node) else {
        tracing::warn!(%id, %node, "placement not sent: the node publishes no API address");
        let mut book = inner.book();
        let entry = book.entry(&id);
        entry.failed(generation, &node);
        entry.settle(generation);
        return;
    };
    let external = inner.external_for(&spec);
    let request = SpinRequest {
        spec,
        id: Some(id.clone()),
        generation: Some(generation),
        moved_from,
        external,
    };
    let inner_ = inner.clone();
    inner.track(async move {
        let inner = inner_;
        let spun = tokio::time::timeout(
            PLACE_TIMEOUT,
            client.spin(&request, SpinQuery { wait: false }),
        )
        .await;
        match spun {
            Ok(Ok(_)) => inner.unplaced.release(&id),
            Ok(Err(e)) => {
                let mut book = inner.book();
                let entry = book.entry(&id);
                entry.settle(generation);
                // A node the root cannot reach (behind NAT) is avoided while another is
                // allowed.
                if matches!(e, crate::ClientError::Unreachable { .. }) {
                    entry.failed(generation, &node);
                }
                tracing::warn!(%id, %node, generation, "placement refused: {e}");
            }
            Err(_) => {
                // The unplaced record (if it waited for a node) goes, so that the wait sees
                // the real copies.
                inner.unplaced.release(&id);
                tracing::warn!(
                    %id,
                    %node,
                    "placement not answered within {}: waiting for it to show up",
                    p2f_model::format_duration(PLACE_TIMEOUT)
                );
            }
        }
    });
}

/// Removes the copy of `id` on `node` through that node's API (a 404 is fine: it is gone).
async fn remove_at(inner: &Inner, id: &ProcessId, node: &NodeName) {
    let Some(client) = inner.records.client_for(node) else {
        tracing::warn!(%id, %node, "cannot remove the old copy: the node publishes no API address");
        return;
    };
    if let Err(e) = client.remove_process(id).await
        && e.status() != Some(404)
    {
        tracing::warn!(%id, %node, "cannot remove the old copy: {e}");
    }
}

/// Removes a service that left the deployment wherever it runs, and its unplaced record.
pub(super) fn remove_everywhere(inner: &Arc<Inner>, id: ProcessId) {
    inner.unplaced.release(&id);
    let copy = inner
        .records
        .view()
        .into_iter()
        .find(|c| c.process().id == id && c.origin != Origin::Unplaced);
    let Some(copy) = copy else {
        return;
    };
    let node = copy.process().node.name.clone();
    let inner_ = inner.clone();
    inner.track(async move {
        remove_at(&inner_, &id, &node).await;
    });
}
