//! Waiting for a condition instead of sleeping: poll until it holds, bounded in time, each
//! probe bounded too (a probe that hangs cannot outlast the limit).

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::time::Instant;

/// How often [`eventually`] probes.
pub const EVERY: Duration = Duration::from_millis(20);

/// Probes every [`EVERY`] until `probe` returns `Some`, at most `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll(what, limit, EVERY, || {
        let probe = probe();
        async move { Ok(probe.await) }
    })
    .await
}

/// Probes every `every` until `probe` returns `Ok(Some)`, at most `limit`; an `Err` from the
/// probe ends the wait with it.
pub async fn poll<T, F, Fut>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut probe: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        // The last probe may take up to a second past the deadline, so that a slow answer
        // right at the end is still seen.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        if let Ok(found) = tokio::time::timeout(left, probe()).await
            && let Some(value) = found?
        {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// `node`'s entry in the list `network` gives (`GET /v1/nodes`), once `ready` holds for it,
/// within `limit`.
pub async fn node_when(
    network: &p2f_core::Network,
    node: &str,
    what: &str,
    limit: Duration,
    ready: impl Fn(&p2f_core::wire::NodeStatus) -> bool,
) -> Result<p2f_core::wire::NodeStatus> {
    eventually(&format!("{node} {what}"), limit, || {
        let network = network.clone();
        let ready = &ready;
        async move {
            let nodes = network.nodes().await.ok()?;
            let status = nodes.into_iter().find(|n| n.node.name.as_str() == node)?;
            ready(&status).then_some(status)
        }
    })
    .await
}
