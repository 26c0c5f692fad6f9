//! The root's front door: every service's `domain` served over HTTP and HTTPS, routed by
//! `Host` and SNI to the copy of its process that serves now, wherever it runs. A feature
//! mounted on the root only (by the composition root, `node/mod.rs`); it reads `records` and
//! stands on `server`, `cluster` and `wire`, and nothing else imports it.
//!
//! - [`routes`] — the route table, derived from the records' view on every change (pure).
//! - [`headers`] — host parsing, hop-by-hop and forwarding headers (pure).
//! - [`certs`] — certificates by SNI, issued on first use: the cluster CA for local names;
//!   the [`certs::Issuer`] seam is where ACME plugs in.
//! - [`upstream`] — the [`upstream::Upstream`] seam: a byte stream to a process, through its
//!   node's agent ([`upstream::ThroughAgent`]); a relay for NAT'd nodes goes behind it too.
//! - `proxy` — the hyper-based proxy behind both listeners.
//! - [`api`] — `GET /v1/routes`.

pub mod api;
pub mod certs;
pub mod headers;
mod proxy;
pub mod routes;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::{ALPN_H2_HTTP1, ClusterCa, ClusterError, Secret, resolving_server_config};
use crate::records::Records;
use crate::server::{Accept, PlainHttp};
use crate::wire::{RouteInfo, RoutesReport};
use certs::{Certificates, Issuer, LocalCa};
use routes::RouteTable;
use upstream::{ThroughAgent, Upstream, UpstreamError};

/// How the ingress runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngressConfig {
    /// The plain-HTTP listener (port 0 picks one).
    pub http: SocketAddr,
    /// The HTTPS listener (port 0 picks one).
    pub https: SocketAddr,
    /// How long an idempotent request waits for a copy to serve it.
    pub hold: Duration,
    /// Whether plain HTTP redirects to HTTPS (`308`).
    pub redirect: bool,
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
    certificates: Arc<Certificates>,
    upstream: Arc<dyn Upstream>,
    errors: Arc<proxy::Errors>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
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
    /// Starts the ingress of the root whose records are `records`: processes are reached
    /// through their agents (the cluster's `ca` and `secret`), local names get certificates
    /// from `ca` (which must hold its key).
    ///
    /// Errors: a listener that cannot be bound ([`IngressError::Listen`]), a CA certificate
    /// rustls refuses.
    pub async fn start(
        config: IngressConfig,
        records: Records,
        ca: ClusterCa,
        secret: Secret,
    ) -> Result<Ingress, IngressError> {
        let upstream = Arc::new(ThroughAgent::new(records.clone(), &ca, secret)?);
        let issuers: Vec<Arc<dyn Issuer>> = vec![Arc::new(LocalCa::new(ca))];
        Ingress::start_with(config, records, issuers, upstream).await
    }

    /// [`Ingress::start`] with other certificate issuers and another way to reach processes.
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
        let (http_listener, http) = bind("http", config.http).await?;
        let (https_listener, https) = bind("https", config.https).await?;

        let table = route_table(&records);
        let (routes_tx, routes) = watch::channel(Arc::new(table));
        let certificates = Arc::new(Certificates::new(issuers, routes.clone()));
        let tls = resolving_server_config(certificates.clone(), ALPN_H2_HTTP1)?;
        let errors = Arc::new(proxy::Errors::default());
        let settings = proxy::Settings {
            hold: config.hold,
            redirect: config.redirect,
            https_port: https.port(),
        };
        let app =
            proxy::Proxy::new(routes.clone(), upstream.clone(), errors.clone(), settings).app();
        let (stop, stopped) = watch::channel(false);
        let until_stopped = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        };
        let serve = |listener, accept, name: &'static str| {
            let limits = crate::server::Limits::INGRESS;
            let served = crate::server::serve_limited(
                listener,
                accept,
                limits,
                app.clone(),
                until_stopped(),
            );
            tokio::spawn(async move {
                if let Err(e) = served.await {
                    tracing::warn!("the ingress's {name} listener ended: {e}");
                }
            })
        };
        let tasks = vec![
            tokio::spawn(follow(records, routes_tx)),
            serve(http_listener, Accept::Plain, "http"),
            serve(
                https_listener,
                Accept::Tls {
                    config: tls,
                    plain: PlainHttp::Reject("this port speaks HTTPS only: use https://\n"),
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
                certificates,
                upstream,
                errors,
                stop,
                tasks: Mutex::new(tasks),
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
                last_error: self.inner.errors.get(&route.domain),
            })
            .collect();
        RoutesReport {
            http: self.inner.http.to_string(),
            https: self.inner.https.to_string(),
            routes,
        }
    }

    /// Stops accepting, lets requests in flight finish (up to 5 s), and stops following the
    /// records.
    pub async fn stop(self) {
        let _ = self.inner.stop.send(true);
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

/// The route table of what `records` see now.
fn route_table(records: &Records) -> RouteTable {
    let view = records.view();
    RouteTable::from_copies(view.iter().map(|copy| (copy.process(), copy.origin)))
}

/// Rebuilds the route table on every change of the records.
async fn follow(records: Records, routes: watch::Sender<Arc<RouteTable>>) {
    let mut changes = records.changes();
    loop {
        if changes.changed().await.is_err() {
            return;
        }
        routes.send_replace(Arc::new(route_table(&records)));
    }
}
