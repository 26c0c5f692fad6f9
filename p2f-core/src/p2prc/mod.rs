//! P2PRC compatibility on the wire: a P2F node answers P2PRC's node API on `[p2prc] listen`
//! ([`api`]), keeps the P2PRC nodes it learns of as known but untrusted peers ([`peers`]), and
//! exchanges tables with them ([`gossip`]). A feature room: it reads `records` and stands on
//! the shared pieces; nothing it learns reaches membership, placement or `authorized_keys`.

pub mod api;
pub mod config;
pub mod gossip;
pub mod peers;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use p2f_model::Node;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub use api::P2prcApi;
pub use config::P2prcSettings;
pub use peers::{P2prcPeer, Peers};

use crate::records::Records;
use crate::server::{Accept, Limits};

/// Connections to the P2PRC listener: in all, and from one address.
const LIMITS: Limits = Limits {
    connections: 256,
    per_peer: 16,
    idle: crate::server::IDLE_TIMEOUT,
};

/// Where a node keeps its known P2PRC peers.
pub fn peers_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("p2prc").join("peers.json")
}

/// P2PRC's side of a running node: the listener (when `listen` is set) and the exchange.
#[derive(Debug)]
pub struct P2prc {
    api: P2prcApi,
    address: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl P2prc {
    /// Starts P2PRC's node API on `settings.listen` (if set) and the table exchange, for
    /// this node (`own`) and its network (`records`); with `add_proxy` (the root with an
    /// ingress) it answers `/AddProxy` ([`P2prc::proxies`]). `ca_pem` only satisfies the HTTP
    /// client's TLS setup: the exchange is plain HTTP.
    pub async fn start(
        settings: &P2prcSettings,
        data_dir: &Path,
        own: Node,
        records: Option<Records>,
        add_proxy: bool,
        ca_pem: &str,
    ) -> std::io::Result<P2prc> {
        let peers = Arc::new(Peers::load(peers_path(data_dir)));
        let api = P2prcApi::new(own, records, peers, add_proxy);
        let mut tasks = Vec::new();
        let (mut address, mut stop) = (None, None);
        if let Some(listen) = settings.listen {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            address = Some(listener.local_addr()?);
            let (tx, rx) = oneshot::channel::<()>();
            stop = Some(tx);
            let app = api::routes(api.clone());
            tasks.push(tokio::spawn(async move {
                let served = crate::server::serve_limited(
                    listener,
                    Accept::Plain,
                    LIMITS,
                    app,
                    async move {
                        let _ = rx.await;
                    },
                )
                .await;
                if let Err(e) = served {
                    tracing::warn!("P2PRC's API stopped: {e}");
                }
            }));
            tracing::info!("P2PRC's node API on http://{}", listen);
            let client = reqwest::Client::builder()
                .tls_backend_preconfigured(
                    crate::cluster::client_config(ca_pem).map_err(std::io::Error::other)?,
                )
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(std::io::Error::other)?;
            tasks.push(tokio::spawn(gossip::run(
                api.clone(),
                client,
                settings.gossip_interval,
            )));
        }
        Ok(P2prc {
            api,
            address,
            stop,
            tasks,
        })
    }

    /// `/AddProxy`'s routes as they change, when this node answers it.
    pub fn proxies(&self) -> Option<watch::Receiver<Arc<Vec<crate::wire::DirectRoute>>>> {
        self.api.proxies()
    }

    /// Where P2PRC's API listens, when it does.
    pub fn address(&self) -> Option<SocketAddr> {
        self.address
    }

    /// `GET /v1/p2prc/peers` on the control API: the known P2PRC peers.
    pub fn routes(&self) -> Router {
        Router::new()
            .route("/v1/p2prc/peers", get(list_peers))
            .with_state(self.api.clone())
    }

    /// Stops the listener and the exchange.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }
}

async fn list_peers(State(api): State<P2prcApi>) -> axum::Json<Vec<P2prcPeer>> {
    axum::Json(api.peers().list())
}
