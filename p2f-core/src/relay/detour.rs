//! On members: nodes reached through the root (they publish `reach = root`) are dialed at a
//! loopback forwarder of this node, which carries each connection to the root's
//! `GET /v1/relay/nodes/{name}` (TLS with this node's certificate, upgraded to
//! `p2f-via-root`). The caller still speaks TLS to the node itself inside it, so the root
//! relays bytes it cannot read.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use p2f_model::{NodeName, NodeRole};
use tokio::net::TcpListener;
use tokio_rustls::TlsConnector;

use super::VIA_ROOT_PROTOCOL;
use crate::cluster::{Credentials, client_config_for};
use crate::identity::node_server_name;
use crate::records::Records;

/// How often the directory is read for nodes reached through the root.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// The longest reaching the root and opening the route may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Follows the directory until aborted: a forwarder for every other node that publishes
/// `reach = root`, the records' client pointed at it.
pub async fn run(records: Records, credentials: Credentials) {
    let tls = match client_config_for(&credentials) {
        Ok(config) => TlsConnector::from(Arc::new(config)),
        Err(e) => {
            tracing::warn!("cannot reach nodes through the root: {e}");
            return;
        }
    };
    let own = records.node().clone();
    let mut forwarders: HashMap<NodeName, SocketAddr> = HashMap::new();
    let mut ticker = tokio::time::interval(FOLLOW_EVERY);
    loop {
        ticker.tick().await;
        for node in records.reached_via_root() {
            if node == own || forwarders.contains_key(&node) {
                continue;
            }
            match forwarder(records.clone(), tls.clone(), node.clone()).await {
                Ok(address) => {
                    records
                        .client()
                        .set_detour(&node, Some(address.to_string()));
                    forwarders.insert(node.clone(), address);
                    tracing::info!(%node, "reached through the root");
                }
                Err(e) => tracing::warn!(%node, "cannot listen for its forwarder: {e}"),
            }
        }
    }
}

/// A loopback listener whose connections go to `node` through the root.
async fn forwarder(
    records: Records,
    tls: TlsConnector,
    node: NodeName,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let (records, tls, node) = (records.clone(), tls.clone(), node.clone());
            tokio::spawn(async move {
                let opened =
                    tokio::time::timeout(CONNECT_TIMEOUT, through_root(&records, &tls, &node))
                        .await;
                match opened {
                    Ok(Ok(mut upstream)) => {
                        let _ = tcp.set_nodelay(true);
                        let _ = crate::reach::splice(&mut tcp, &mut upstream).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%node, "through the root: {e}"),
                    Err(_) => tracing::debug!(%node, "through the root: no answer in time"),
                }
            });
        }
    });
    Ok(address)
}

/// A connection to `node`'s API through the root's route.
async fn through_root(
    records: &Records,
    tls: &TlsConnector,
    node: &NodeName,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, String> {
    let root = records
        .nodes()
        .into_iter()
        .find(|n| n.alive && n.node.p2f_info().and_then(|i| i.role) == Some(NodeRole::Root))
        .ok_or("the root is not alive")?;
    let api = root.node.api_address().ok_or("the root publishes no API")?;
    let server_name = node_server_name(root.node.name.as_str());
    crate::client::upgrade(
        tls,
        &api,
        &server_name,
        Some(crate::identity::Role::Root),
        &format!("/v1/relay/nodes/{node}"),
        VIA_ROOT_PROTOCOL,
    )
    .await
    .map_err(|e| e.to_string())
}
