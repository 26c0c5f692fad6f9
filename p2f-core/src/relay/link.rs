//! A member's link to the root, for a member the root cannot reach (behind NAT or a
//! firewall). `[relay] via_root`: `auto` (default) asks the root to try this node's API
//! (`GET /v1/relay/probe`) and links only when that fails, asking again every minute while
//! direct; `true` always links; `false` never does.
//!
//! The link is TLS to the root's control API with this node's certificate (the root's must
//! name role `root`), `GET /v1/relay/link` upgraded to `p2f-link`, then a yamux session in
//! which the root opens streams. It comes back after the root restarts or the connection
//! drops, after 250 ms doubling to 10 s, each ±25 %. While linked (or trying to), the node
//! publishes `reach = root` in the mesh, so every node dials it through the root.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use p2f_model::{NodeName, NodeRole};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::session::{Session, Side, Stream};
use super::{Answer, HEADER_TIMEOUT, LINK_PROTOCOL, Open};
use crate::cluster::{Credentials, client_config_for};
use crate::identity::{Role, node_server_name};
use crate::reach::{LocalProcesses, Refusal};
use crate::records::Records;

/// Whether a member keeps a link to the root (`[relay] via_root`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViaRoot {
    /// Link only when the root cannot reach this node's API (asked at start and every minute).
    #[default]
    Auto,
    /// Always link.
    Always,
    /// Never link.
    Never,
}

/// How often a directly reachable member asks the root again.
const PROBE_EVERY: Duration = Duration::from_secs(60);
/// The first wait after a failed link; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// The longest wait between link attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The longest opening a link may take (TCP, TLS, the upgrade).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the member's link needs.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `[relay] via_root`.
    pub via_root: ViaRoot,
    /// Where this node's API listens (a stream for the API is connected here, on loopback
    /// when it listens on every address).
    pub api: SocketAddr,
    /// The API address this node publishes (what the root's probe tries).
    pub advertised_api: String,
    /// The root's API address from the config (used until the gossip names the root).
    pub root: Option<String>,
    /// This node's certificate.
    pub credentials: Credentials,
    /// The processes whose ports the root may open.
    pub processes: LocalProcesses,
}

/// Keeps the link as `config` says, until aborted (the records track it).
pub async fn run(records: Records, config: LinkConfig) {
    let config = Arc::new(config);
    let mut backoff = BACKOFF_MIN;
    let mut published = false;
    loop {
        let Some((root_name, root_api)) = root_of(&records, &config) else {
            tokio::time::sleep(BACKOFF_MIN).await;
            continue;
        };
        if config.via_root == ViaRoot::Never {
            return;
        }
        if config.via_root == ViaRoot::Auto && !published {
            match probe(&config, root_name.as_ref(), &root_api).await {
                Ok(true) => {
                    tokio::time::sleep(PROBE_EVERY).await;
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!("cannot ask the root whether it reaches this node: {e}");
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        if !published {
            match records
                .mesh()
                .set(crate::mesh::keys::REACH, crate::mesh::keys::REACH_VIA_ROOT)
                .await
            {
                Ok(()) => published = true,
                Err(e) => {
                    tracing::warn!("cannot publish that this node is reached via the root: {e}")
                }
            }
        }
        let opened = tokio::time::timeout(
            CONNECT_TIMEOUT,
            connect(&config, root_name.as_ref(), &root_api),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no link within {CONNECT_TIMEOUT:?}")));
        match opened {
            Ok(io) => {
                backoff = BACKOFF_MIN;
                tracing::info!(root = %root_api, "linked to the root: it reaches this node through the link");
                let serving = Arc::clone(&config);
                let session = Session::start(io, Side::Member, move |stream| {
                    tokio::spawn(serve(Arc::clone(&serving), stream));
                });
                let why = session.closed.await.unwrap_or_else(|_| "ended".into());
                tracing::warn!(root = %root_api, "link to the root down: {why}");
            }
            Err(e) => tracing::warn!(root = %root_api, "cannot link to the root: {e}"),
        }
        tokio::time::sleep(jitter(backoff)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// `wait` ± 25 %.
fn jitter(wait: Duration) -> Duration {
    wait.mul_f64(0.75 + rand::random::<f64>() * 0.5)
}

/// The root's name (when the gossip has it) and API address: from the gossip, else the config.
fn root_of(records: &Records, config: &LinkConfig) -> Option<(Option<NodeName>, String)> {
    let root = records
        .nodes()
        .into_iter()
        .find(|n| n.alive && n.node.p2f_info().and_then(|i| i.role) == Some(NodeRole::Root));
    if let Some(root) = root
        && let Some(api) = root.node.api_address()
    {
        return Some((Some(root.node.name.clone()), api));
    }
    config.root.clone().map(|api| (None, api))
}

/// Asks the root whether it reaches this node's API.
async fn probe(config: &LinkConfig, root: Option<&NodeName>, api: &str) -> Result<bool, String> {
    let client = crate::Network::connect(api, &config.credentials).map_err(|e| e.to_string())?;
    let client = match root {
        Some(name) => client.peer(name, api),
        None => client,
    };
    let answer = client
        .relay_probe(&config.advertised_api)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(why) = &answer.detail {
        tracing::info!("the root cannot reach this node's API ({why}): linking to it");
    }
    Ok(answer.reachable)
}

/// TLS to the root with this node's certificate, the root's role checked, the link upgrade.
async fn connect(
    config: &LinkConfig,
    root: Option<&NodeName>,
    api: &str,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, String> {
    let tls = TlsConnector::from(Arc::new(
        client_config_for(&config.credentials).map_err(|e| e.to_string())?,
    ));
    let server_name = match root {
        Some(name) => node_server_name(name.as_str()),
        None => crate::client::host_of(api).to_owned(),
    };
    crate::client::upgrade(
        &tls,
        api,
        &server_name,
        Some(Role::Root),
        "/v1/relay/link",
        LINK_PROTOCOL,
    )
    .await
    .map_err(|e| e.to_string())
}

/// Serves one stream the root opened: its header, then the API, a process's port or a ping.
async fn serve(config: Arc<LinkConfig>, mut stream: Stream) {
    let open = match tokio::time::timeout(HEADER_TIMEOUT, Open::read(&mut stream)).await {
        Ok(Ok(open)) => open,
        Ok(Err(e)) => {
            tracing::debug!("a link stream: {e}");
            return;
        }
        Err(_) => return,
    };
    match open {
        Open::Ping => {
            let mut nonce = [0u8; 8];
            if Answer(Ok(())).write(&mut stream).await.is_ok()
                && stream.read_exact(&mut nonce).await.is_ok()
            {
                let _ = stream.write_all(&nonce).await;
                let _ = stream.flush().await;
            }
        }
        Open::Api => {
            let local = own_api(config.api);
            match TcpStream::connect(local).await {
                Ok(mut tcp) => {
                    let _ = tcp.set_nodelay(true);
                    if Answer(Ok(())).write(&mut stream).await.is_ok() {
                        let _ = crate::reach::splice(&mut stream, &mut tcp).await;
                    }
                }
                Err(e) => {
                    let refusal = Refusal {
                        status: 502,
                        message: format!("this node's API at {local}: {e}"),
                    };
                    let _ = Answer(Err(refusal)).write(&mut stream).await;
                }
            }
        }
        Open::Port(request) => match config.processes.open(&request).await {
            Ok(opened) => {
                if Answer(Ok(())).write(&mut stream).await.is_ok()
                    && let Err(e) = opened.splice(stream).await
                {
                    tracing::debug!(id = %request.id, "port through the link: {e}");
                }
            }
            Err(refusal) => {
                let _ = Answer(Err(refusal)).write(&mut stream).await;
            }
        },
    }
}

/// Where this node's own API is dialed: its listen address, loopback for an unspecified one.
fn own_api(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}
