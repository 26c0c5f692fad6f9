//! What the test modules share on top of `p2f_testkit` (the one agent harness, namespaces,
//! ports, `/proc`): agents with test settings, and waits on what the API says.

use std::time::Duration;

use futures_util::StreamExt as _;
use p2f::core::Network;
use p2f::model::{Process, ProcessId};
use p2f_testkit::{Agent, AgentBuilder, eventually};

pub(crate) use p2f_testkit::service_port;

/// An agent named `name` with the test settings (fast health checks, failure detection a
/// loaded machine does not trip by accident).
pub(crate) fn agent(name: &str) -> AgentBuilder {
    Agent::builder(name).test_settings()
}

/// A started root of a new cluster, on 127.0.0.1.
pub(crate) async fn root(name: &str) -> anyhow::Result<Agent> {
    agent(name).init()?.started().await
}

/// A started member of `root`'s cluster, listening on `ip` (an address of 127.0.0.0/8).
pub(crate) async fn member(root: &Agent, name: &str, ip: &str) -> anyhow::Result<Agent> {
    agent(name).ip(ip).join(root)?.started().await
}

/// The process's log (through the API) once it contains `wanted`, within `limit`.
pub(crate) async fn log_containing(
    net: &Network,
    id: &ProcessId,
    wanted: &str,
    limit: Duration,
) -> anyhow::Result<String> {
    eventually(&format!("{wanted:?} in the log of {id}"), limit, || {
        let (net, id) = (net.clone(), id.clone());
        async move {
            let chunks: Vec<_> = net
                .logs(&id, p2f::core::wire::LogsQuery::default())
                .await
                .ok()?
                .collect()
                .await;
            let text: String = chunks
                .into_iter()
                .filter_map(Result::ok)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .collect();
            text.contains(wanted).then_some(text)
        }
    })
    .await
}

/// Waits until `network` lists each of `ids` `Running` with at least `generation`; returns them.
pub(crate) async fn running(
    network: &Network,
    ids: &[ProcessId],
    generation: u64,
) -> anyhow::Result<Vec<Process>> {
    eventually(
        &format!("{ids:?} Running with generation {generation} or more"),
        Duration::from_secs(30),
        || {
            let network = network.clone();
            async move {
                let all = network.list_processes().await.ok()?;
                ids.iter()
                    .map(|id| {
                        all.iter()
                            .find(|p| &p.id == id && p.is_running() && p.generation >= generation)
                            .cloned()
                    })
                    .collect::<Option<Vec<Process>>>()
            }
        },
    )
    .await
}
