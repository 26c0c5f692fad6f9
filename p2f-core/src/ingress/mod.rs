//! The root's front door: every service's `domain` served over HTTP and HTTPS, routed by
//! `Host` and SNI to the copy of its process that serves now, wherever it runs. A feature
//! mounted on the root only (by the composition root, `node/mod.rs`); it reads `records` and
//! stands on `server`, `cluster` and `wire`, and nothing else imports it.
//!
//! - [`routes`] — the route table, derived from the records' view on every change (pure).
//! - [`headers`] — host parsing, hop-by-hop and forwarding headers (pure).
//! - [`certs`] — certificates by SNI: the cluster CA for local names (issued on first use),
//!   behind the [`certs::Issuer`] seam with ACME beside it.
//! - [`acme`] — certificates for public names from an ACME CA, ordered and renewed in the
//!   background, stored in the root's data directory; HTTP-01 and TLS-ALPN-01.
//! - [`upstream`] — the [`upstream::Upstream`] seam: a byte stream to a process, through its
//!   node's agent ([`upstream::ThroughAgent`]), or directly for a process on the root itself
//!   ([`upstream::Local`], checked against the root's supervisor); a relay for NAT'd nodes
//!   goes behind it too.
//! - `proxy` — the hyper-based proxy behind both listeners; `pool` — its kept-alive
//!   connections to processes, one pool per worker thread.
//! - [`api`] — `GET /v1/routes`.

pub mod acme;
pub mod api;
pub mod certs;
pub mod headers;
mod pool;
pub mod ports;
mod proxy;
pub mod routes;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::{ClusterCa, ClusterError, resolving_server_config};
use crate::records::Records;
use crate::server::{Accept, PlainHttp};
use crate::wire::{RouteInfo, RoutesReport};
use acme::{ACME_TLS_ALPN, AcmeConfig, Challenges};
use certs::{Certificates, Issuer, LocalCa};
use routes::RouteTable;
use upstream::{Local, LocalProcesses, Relayed, ThroughAgent, Upstream, UpstreamError};

/// ALPN of the ingress's HTTPS listener: HTTP/2, HTTP/1.1, and TLS-ALPN-01's `acme-tls/1`
/// (which only ACME validators offer, alone; see [`certs::Certificates`]).
const ALPN_INGRESS: &[&[u8]] = &[b"h2", b"http/1.1", ACME_TLS_ALPN];

/// How the ingress runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressConfig {
    /// The plain-HTTP listener (port 0 picks one).
    pub http: SocketAddr,
    /// The HTTPS listener (port 0 picks one).
    pub https: SocketAddr,
    /// How long an idempotent request waits for a copy to serve it.
    pub hold: Duration,
    /// Whether plain HTTP redirects to HTTPS (`308`).
    pub redirect: bool,
    /// Certificates for public names from ACME; `None`: public names get none (their
    /// handshakes are refused).
    pub acme: Option<AcmeConfig>,
    /// Threads of the ingress's own that serve its connections, each with a single-threaded
    /// runtime (see [`crate::server::Workers`]); 0 serves them on the agent's runtime.
    pub workers: usize,
}

/// Why the ingress could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngressError {
    /// A listener could not be bound.
    #[error(
        "the ingress cannot listen for {what} on {address}: {source} (set [ingress] {what} in node.toml to another address, or enabled = false)"
    )]
    Listen {
        /// `http` or `https`.
        what: &'static str,
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS configuration.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The upstream connector.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The worker threads.
    #[error("the ingress cannot start its worker threads: {0}")]
    Workers(std::io::Error),
}

/// A running ingress. Clones share it.
#[derive(Clone)]
pub struct Ingress {
    inner: Arc<Inner>,
}

struct Inner {
    http: SocketAddr,
    https: SocketAddr,
    routes: watch::Receiver<Arc<RouteTable>>,
    /// Routes to P2PRC peers (`/AddProxy`), merged into the table by `follow`.
    direct: watch::Sender<Arc<Vec<crate::wire::DirectRoute>>>,
    certificates: Arc<Certificates>,
    upstream: Arc<dyn Upstream>,
    errors: Arc<proxy::Errors>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The ACME manager (aborted at stop).
    acme: Mutex<Option<JoinHandle<()>>>,
    /// The public TCP and UDP ports.
    ports: ports::PublicPorts,
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("http", &self.inner.http)
            .field("https", &self.inner.https)
            .finish_non_exhaustive()
    }
}

impl Ingress {
    /// Starts the ingress of the root whose records are `records`: the root's own processes
    /// (`local`, its supervisor's) are reached directly on loopback, other nodes' through
    /// their agents (with the root's `credentials`); local names get certificates from `ca`
    /// (which must hold its key), public names from ACME when `config.acme` says so.
    /// `P2F_INGRESS_DIRECT=0` in the environment sends the root's own processes through its
    /// agent's tunnel too (as before the direct path; for comparing the two).
    ///
    /// Errors: a listener that cannot be bound ([`IngressError::Listen`]), a CA certificate
    /// rustls refuses.
    pub async fn start(
        config: IngressConfig,
        records: Records,
        ca: ClusterCa,
        credentials: &crate::cluster::Credentials,
        local: LocalProcesses,
        linked: Arc<dyn crate::reach::PortOpener>,
    ) -> Result<Ingress, IngressError> {
        let through_agent: Arc<dyn Upstream> = Arc::new(Relayed::new(
            linked,
            Arc::new(ThroughAgent::new(records.clone(), credentials)?),
        ));
        let upstream: Arc<dyn Upstream> = if direct_path_enabled() {
            Arc::new(Local::new(local, through_agent))
        } else {
            tracing::info!(
                "{DIRECT_ENV}=0: the root's own processes are reached through its agent's tunnel"
            );
            through_agent
        };
        let upstream: Arc<dyn Upstream> = Arc::new(upstream::Direct::new(upstream));
        let issuers: Vec<Arc<dyn Issuer>> = vec![Arc::new(LocalCa::new(ca))];
        Ingress::start_with(config, records, issuers, upstream).await
    }

    /// [`Ingress::start`] with other certificate issuers and another way to reach processes
    /// (ACME, when `config.acme` is set, is asked after `issuers`).
    pub async fn start_with(
        config: IngressConfig,
        records: Records,
        issuers: Vec<Arc<dyn Issuer>>,
        upstream: Arc<dyn Upstream>,
    ) -> Result<Ingress, IngressError> {
        let bind = |what, address| async move {
            let listener =
                TcpListener::bind(address)
                    .await
                    .map_err(|source| IngressError::Listen {
                        what,
                        address,
                        source,
                    })?;
            let local = listener
                .local_addr()
                .map_err(|source| IngressError::Listen {
                    what,
                    address,
                    source,
                })?;
            Ok::<_, IngressError>((listener, local))
        };
        let workers = match config.workers {
            0 => None,
            threads => Some(Arc::new(
                crate::server::Workers::start(threads, "p2f-ingress")
                    .map_err(IngressError::Workers)?,
            )),
        };
        let (http_listener, http) = bind("http", config.http).await?;
        let (https_listener, https) = bind("https", config.https).await?;

        let table = route_table(&records);
        let (routes_tx, routes) = watch::channel(Arc::new(table));
        let (direct, direct_rx) = watch::channel(Arc::new(Vec::new()));
        let challenges = Arc::new(Challenges::default());
        let mut issuers = issuers;
        let acme = config.acme.clone().map(|acme_config| {
            let (issuer, manager) = acme::Manager::new(acme_config, challenges.clone());
            issuers.push(Arc::new(issuer));
            tokio::spawn(manager.run(routes.clone()))
        });
        let certificates = Arc::new(Certificates::new(
            issuers,
            routes.clone(),
            challenges.clone(),
        ));
        let tls = resolving_server_config(certificates.clone(), ALPN_INGRESS)?;
        let errors = Arc::new(proxy::Errors::default());
        let settings = proxy::Settings {
            hold: config.hold,
            redirect: config.redirect,
            https_port: https.port(),
        };
        let app = proxy::Proxy::new(
            routes.clone(),
            upstream.clone(),
            errors.clone(),
            challenges,
            settings,
            config.workers,
        );
        let (stop, stopped) = watch::channel(false);
        let until_stopped = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        };
        let serve = |listener, accept, name: &'static str| {
            let limits = crate::server::Limits::INGRESS;
            let served = crate::server::serve_on(
                listener,
                accept,
                limits,
                app.clone(),
                until_stopped(),
                workers.clone(),
            );
            tokio::spawn(async move {
                if let Err(e) = served.await {
                    tracing::warn!("the ingress's {name} listener ended: {e}");
                }
            })
        };
        let ports = ports::PublicPorts::start(records.clone(), https.ip(), upstream.clone());
        let tasks = vec![
            tokio::spawn(follow(records, direct_rx, routes_tx)),
            serve(http_listener, Accept::Plain, "http"),
            serve(
                https_listener,
                Accept::Tls {
                    config: tls,
                    plain: PlainHttp::Reject("this port speaks HTTPS only: use https://\n"),
                    // `https://192.168.1.10/` sends no SNI: the certificate of the address
                    // the client connected to, when it is a routed domain.
                    without_sni: Some(Arc::new({
                        let certificates = Arc::clone(&certificates);
                        move |ip: std::net::IpAddr| certificates.certificate(Some(&ip.to_string()))
                    })),
                },
                "https",
            ),
        ];
        tracing::info!(%http, %https, "ingress listening");
        Ok(Ingress {
            inner: Arc::new(Inner {
                http,
                https,
                routes,
                direct,
                certificates,
                upstream,
                errors,
                stop,
                tasks: Mutex::new(tasks),
                acme: Mutex::new(acme),
                ports,
            }),
        })
    }

    /// Where plain HTTP is served.
    pub fn http_address(&self) -> SocketAddr {
        self.inner.http
    }

    /// Where HTTPS is served.
    pub fn https_address(&self) -> SocketAddr {
        self.inner.https
    }

    /// Replaces the routes to P2PRC peers (`/AddProxy`); P2F's own domains keep theirs.
    pub fn set_direct_routes(&self, routes: Vec<crate::wire::DirectRoute>) {
        self.inner.direct.send_replace(Arc::new(routes));
    }

    /// The routes now: domain, process, node, upstream or why none, certificate, last error.
    pub fn report(&self) -> RoutesReport {
        let table = self.inner.routes.borrow().clone();
        let routes = table
            .routes()
            .map(|route| RouteInfo {
                domain: route.domain.clone(),
                process: route.process.id.clone(),
                service: route.process.name().to_owned(),
                node: route.process.node.name.clone(),
                generation: route.process.generation,
                upstream: route
                    .target
                    .as_ref()
                    .map(|target| self.inner.upstream.describe(target)),
                down: route
                    .target
                    .is_none()
                    .then(|| routes::reason(&route.process)),
                certificate: self.inner.certificates.info(&route.domain),
                certificate_error: self.inner.certificates.error(&route.domain),
                last_error: self.inner.errors.get(&route.domain),
            })
            .collect();
        RoutesReport {
            http: self.inner.http.to_string(),
            https: self.inner.https.to_string(),
            routes,
            ports: self
                .inner
                .ports
                .report(self.inner.https.ip(), self.inner.upstream.as_ref()),
        }
    }

    /// Stops accepting, lets requests in flight finish (up to 5 s), and stops following the
    /// records.
    pub async fn stop(self) {
        let _ = self.inner.stop.send(true);
        self.inner.ports.stop();
        let acme = self
            .inner
            .acme
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(acme) = acme {
            acme.abort();
        }
        let tasks = std::mem::take(
            &mut *self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let mut tasks = tasks.into_iter();
        // The first follows the records (never ending by itself); requests held while the
        // listeners drain may still see a new copy, so it stops last.
        let follow = tasks.next();
        for task in tasks {
            let _ = task.await;
        }
        if let Some(follow) = follow {
            follow.abort();
        }
    }
}

/// Set to `0` (or `false`, `off`, `no`), the environment variable that sends the root's own
/// processes through its agent's tunnel rather than directly (see [`Ingress::start`]).
pub const DIRECT_ENV: &str = "P2F_INGRESS_DIRECT";

/// Whether [`DIRECT_ENV`] leaves the direct path to the root's own processes on (the default).
fn direct_path_enabled() -> bool {
    std::env::var(DIRECT_ENV).map_or(true, |value| {
        !matches!(
            value.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "off" | "no"
        )
    })
}

/// The route table of what `records` see now.
fn route_table(records: &Records) -> RouteTable {
    let view = records.view();
    RouteTable::from_copies(view.iter().map(|copy| (copy.process(), copy.origin)))
}

/// Rebuilds the route table on every change of the records or of the direct routes.
async fn follow(
    records: Records,
    mut direct: watch::Receiver<Arc<Vec<crate::wire::DirectRoute>>>,
    routes: watch::Sender<Arc<RouteTable>>,
) {
    let mut changes = records.changes();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            changed = direct.changed() => if changed.is_err() { return },
        }
        let extra = direct.borrow_and_update().clone();
        routes.send_replace(Arc::new(route_table(&records).with_direct(&extra)));
    }
}
