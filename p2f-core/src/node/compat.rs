//! Wires P2PRC compatibility into the agent (`[p2prc]`): the node's P2PRC entry gets its SSH
//! key, user and ports; P2PRC's node API and the table exchange start ([`crate::p2prc`]); and
//! on root and members the SSH key mesh keeps `authorized_keys` ([`crate::ssh_keys`]); on the
//! root with an ingress, `/AddProxy`'s routes go to the ingress. Without
//! the section nothing here runs.

use std::sync::Arc;

use p2f_model::Node;

use super::{AgentConfig, AgentError};
use crate::cluster::ClusterCa;
use crate::ingress::Ingress;
use crate::p2prc::P2prc;
use crate::records::Records;
use crate::ssh_keys::{self, KeyMesh};
use crate::trust::revoked::Revoked;

/// This node's P2PRC entry with its SSH key (`PublicKey`), `MachineUsername`,
/// `BareMetalSSHPort` and `ServerPort` (P2PRC's API port), and the key mesh it will run.
pub(super) fn entry(
    config: &AgentConfig,
    ca: &ClusterCa,
    mut node: Node,
) -> Result<(Node, Option<KeyMesh>), AgentError> {
    let Some(settings) = &config.p2prc else {
        return Ok((node, None));
    };
    let key = ssh_keys::own_key(
        &config.data_dir,
        settings.ssh_public_key.as_deref(),
        &config.name,
    )?;
    let target = ssh_keys::target(
        settings.ssh_user.as_deref(),
        settings.authorized_keys.as_deref(),
    )?;
    node.public_key = key.clone();
    node.machine_username = target.user.clone();
    node.bare_metal_ssh_port = config.bare_metal.then_some(settings.ssh_port);
    node.server_port = settings.listen.map(|a| a.port());
    let mesh = KeyMesh {
        label: ca.label(),
        target,
        own: (config.name.clone(), key),
        enabled: config.unsafe_mode,
    };
    Ok((node, Some(mesh)))
}

/// Starts P2PRC's API and exchange, the key mesh (which needs the records), and on the root
/// with an ingress and `add_proxy` the routes `/AddProxy` adds.
pub(super) async fn start(
    config: &AgentConfig,
    node: &Node,
    records: Option<&Records>,
    ingress: Option<&Ingress>,
    revoked: &Arc<Revoked>,
    mesh: Option<KeyMesh>,
    ca: &ClusterCa,
) -> Result<Option<P2prc>, AgentError> {
    let Some(settings) = &config.p2prc else {
        return Ok(None);
    };
    if let (Some(mesh), Some(records)) = (mesh, records) {
        records.track(tokio::spawn(ssh_keys::run(
            mesh,
            records.clone(),
            Arc::clone(revoked),
        )));
    }
    let started = P2prc::start(
        settings,
        &config.data_dir,
        node.clone(),
        records.cloned(),
        settings.add_proxy && ingress.is_some(),
        ca.cert_pem(),
    )
    .await
    .map_err(|source| AgentError::Listen {
        address: settings.listen.unwrap_or(config.listen),
        source,
    })?;
    if let (Some(mut proxies), Some(ingress), Some(records)) = (started.proxies(), ingress, records)
    {
        let ingress = ingress.clone();
        records.track(tokio::spawn(async move {
            while proxies.changed().await.is_ok() {
                let routes = proxies.borrow_and_update().to_vec();
                ingress.set_direct_routes(routes);
            }
        }));
    } else if settings.add_proxy {
        tracing::warn!(
            "[p2prc] add_proxy is ignored: only the root with an [ingress] maps domains"
        );
    }
    Ok(Some(started))
}
