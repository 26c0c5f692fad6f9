//! The root decides, on the node that holds the cluster CA key: it keeps the desired services
//! (durably, in its store), and every pass plans ([`plan::plan`], pure) and carries out
//! (`executor`) what makes the records match them: place each service on an allowed live
//! node, place it again elsewhere with a higher generation when its node is lost or its
//! restarts are spent there, replace a copy whose spec or pins changed, and keep a process no
//! node can take as an unplaced record that says why. Nodes fence their own stale copies
//! (`records`); the root never stops a copy but through its owner's API.

pub mod api;
pub mod book;
mod executor;
pub mod issued;
pub mod placement;
pub mod plan;
pub mod tokens;
pub mod unplaced;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use p2f_model::{Deployment, NodeName, Process, ProcessId, ProcessSpec};
use tokio::task::{JoinHandle, JoinSet};

use crate::records::{Origin, Records};
use crate::store::{Store, StoreError};
use crate::wire::{DesiredService, DesiredState, SpinQuery, SpinRequest};
use book::Book;
use unplaced::Unplaced;

/// The store key of the desired state.
const DESIRED_KEY: &str = "desired";
/// How often the root compares the network with the desired state.
const RECONCILE_EVERY: Duration = Duration::from_millis(250);
/// How long in-flight placements and removals are waited for when the root stops.
const DRAIN: Duration = Duration::from_secs(5);

/// Why the desired state could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootError {
    /// The services break rules.
    #[error(transparent)]
    Invalid(#[from] p2f_model::Invalid),
    /// It could not be stored.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The write to the store did not finish (the agent is stopping).
    #[error("the desired state was not stored: {0}")]
    Interrupted(String),
}

/// Why a process could not be migrated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The root does not manage it (it was not deployed through the root).
    #[error("process {0} is not part of the root's deployment")]
    NotManaged(ProcessId),
    /// Its pins do not allow the node.
    #[error("its pins do not allow node {0}")]
    NotAllowed(NodeName),
    /// It already runs there.
    #[error("it already runs on node {0}")]
    AlreadyThere(NodeName),
    /// The node is not a live member.
    #[error("node {0} is not alive")]
    NotAlive(NodeName),
    /// The node refused the placement.
    #[error("the node refused it: {0}")]
    Refused(crate::ClientError),
}

struct Inner {
    store: Arc<Store>,
    records: Records,
    unplaced: Arc<Unplaced>,
    /// Where this root is reached from outside.
    front: Front,
    desired: Mutex<DesiredState>,
    book: Mutex<Book>,
    /// Placements and removals under way.
    tasks: Mutex<JoinSet<()>>,
    /// The services desired when this root started: none of them is placed anew before the
    /// root has heard the network (they may run on a node it has not heard yet).
    known_at_start: Mutex<std::collections::HashSet<ProcessId>>,
    /// Whether the root has heard every live node since it started (or waited long enough).
    caught_up: std::sync::atomic::AtomicBool,
}

impl Inner {
    fn book(&self) -> MutexGuard<'_, Book> {
        lock(&self.book)
    }

    /// Where a process of `spec` is reached from outside: `https://DOMAIN` through this root's
    /// ingress (`:PORT` unless it listens on 443); else its first public port,
    /// `tcp://ROOT:PORT` or `udp://ROOT:PORT`; `None` without either (or without an ingress).
    fn external_for(&self, spec: &ProcessSpec) -> Option<String> {
        let https = self.front.https?;
        if let Some(domain) = spec.domain() {
            return Some(match https {
                443 => format!("https://{domain}"),
                port => format!("https://{domain}:{port}"),
            });
        }
        let public = spec.public().first()?;
        let host = &self.front.host;
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        Some(format!(
            "{}://{host}:{}",
            crate::reach::protocol_name(public.protocol()),
            public.public()
        ))
    }

    /// Runs `task` as one of the root's, drained when it stops.
    fn track(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = lock(&self.tasks);
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }
}

/// Where the root is reached from outside, for the records' `external` and the public ports'
/// checks.
#[derive(Debug, Clone, Default)]
pub struct Front {
    /// The port of the ingress's HTTPS listener, when this root runs one.
    pub https: Option<u16>,
    /// The root's address (host) as it advertises it.
    pub host: String,
    /// The ports the root itself holds, which no public port may take: protocol, port, and
    /// who holds it (`the ingress (HTTPS)`).
    pub reserved: Vec<(p2f_model::Protocol, u16, String)>,
}

/// The root's decisions.
#[derive(Clone)]
pub struct Root {
    inner: Arc<Inner>,
    reconcile: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Root").finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Root {
    /// Loads the desired state from `store` and starts reconciling against `records`;
    /// `unplaced` must be one of the sources `records` publishes.
    pub fn start(
        store: Arc<Store>,
        records: Records,
        unplaced: Arc<Unplaced>,
        front: Front,
    ) -> Result<Root, StoreError> {
        let desired = match store.meta(DESIRED_KEY)? {
            Some(json) => serde_json::from_str(&json).unwrap_or_else(|e| {
                tracing::error!("the stored desired state cannot be read ({e}); starting empty");
                DesiredState::default()
            }),
            None => DesiredState::default(),
        };
        let inner = Arc::new(Inner {
            store,
            records,
            unplaced,
            front,
            known_at_start: Mutex::new(desired.services.iter().map(|s| s.id.clone()).collect()),
            desired: Mutex::new(desired),
            book: Mutex::new(Book::default()),
            tasks: Mutex::new(JoinSet::new()),
            caught_up: std::sync::atomic::AtomicBool::new(false),
        });
        let task = tokio::spawn(reconcile_forever(inner.clone()));
        Ok(Root {
            inner,
            reconcile: Arc::new(Mutex::new(Some(task))),
        })
    }

    /// The desired services.
    pub fn desired(&self) -> DesiredState {
        lock(&self.inner.desired).clone()
    }

    /// Replaces the desired services (durably; the store is written before this returns). A
    /// service keeps its process id across calls (matched by name); a new one gets a fresh id.
    /// A service left out is removed wherever it runs (by its node).
    pub async fn set_desired(&self, services: Vec<ProcessSpec>) -> Result<DesiredState, RootError> {
        let deployment = Deployment::owned(Vec::new(), services.clone());
        deployment.validate()?;
        let reserved: Vec<(p2f_model::Protocol, u16, &str)> = self
            .inner
            .front
            .reserved
            .iter()
            .map(|(protocol, port, holder)| (*protocol, *port, holder.as_str()))
            .collect();
        let clashes = p2f_model::validate::public_port_clashes(&deployment, &reserved);
        if !clashes.is_empty() {
            let findings = clashes
                .into_iter()
                .map(|finding| (finding.path(&deployment), finding))
                .collect();
            return Err(p2f_model::Invalid { findings }.into());
        }
        let current = self.desired();
        let next = DesiredState {
            services: services
                .into_iter()
                .map(|spec| {
                    let id = current
                        .services
                        .iter()
                        .find(|s| s.spec.name() == spec.name())
                        .map(|s| s.id.clone())
                        .unwrap_or_else(|| ProcessId::for_service(spec.name(), rand::random()));
                    DesiredService { id, spec }
                })
                .collect(),
        };
        let json = serde_json::to_string(&next).unwrap_or_default();
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || store.set_meta(DESIRED_KEY, &json))
            .await
            .map_err(|e| RootError::Interrupted(e.to_string()))??;
        let dropped: Vec<ProcessId> = {
            let mut desired = lock(&self.inner.desired);
            let dropped = desired
                .services
                .iter()
                .filter(|old| !next.services.iter().any(|s| s.id == old.id))
                .map(|old| old.id.clone())
                .collect();
            *desired = next.clone();
            dropped
        };
        for id in dropped {
            self.inner.book().forget(&id);
            executor::remove_everywhere(&self.inner, id);
        }
        Ok(next)
    }

    /// Migrates a desired process to `node` (which its pins must allow and which must be
    /// alive): it is placed there with a higher generation, and its old node fences the old
    /// copy. Answers once the new copy runs, failed, or is being restarted.
    pub async fn migrate(&self, id: &ProcessId, node: &NodeName) -> Result<Process, MigrateError> {
        let service = lock(&self.inner.desired)
            .services
            .iter()
            .find(|s| &s.id == id)
            .cloned()
            .ok_or_else(|| MigrateError::NotManaged(id.clone()))?;
        if !service.spec.allows(node) {
            return Err(MigrateError::NotAllowed(node.clone()));
        }
        let records = &self.inner.records;
        if !records
            .nodes()
            .iter()
            .any(|n| &n.node.name == node && n.alive)
        {
            return Err(MigrateError::NotAlive(node.clone()));
        }
        let client = records
            .client_for(node)
            .ok_or_else(|| MigrateError::NotAlive(node.clone()))?;
        let newest = records
            .view()
            .into_iter()
            .find(|c| &c.process().id == id && c.origin != Origin::Unplaced)
            .map(|c| Arc::clone(c.process()));
        let (generation, moved_from) = {
            let mut book = self.inner.book();
            let entry = book.entry(id);
            // The root's own last placement may be newer than what the records show yet.
            let (current, on, live) = match (&newest, entry.placed()) {
                (Some(p), Some(placed)) if placed.generation > p.generation => {
                    (placed.generation, placed.node.clone(), true)
                }
                (Some(p), _) => (p.generation, p.node.name.clone(), !p.status.is_final()),
                (None, Some(placed)) => (placed.generation, placed.node.clone(), true),
                (None, None) => (0, node.clone(), false),
            };
            if &on == node && live {
                return Err(MigrateError::AlreadyThere(node.clone()));
            }
            let generation = entry.next_generation(current + 1, Some(node));
            entry.send(generation, node, Instant::now());
            (generation, (on != *node && current > 0).then_some(on))
        };
        let external = self.inner.external_for(&service.spec);
        let request = SpinRequest {
            spec: service.spec,
            id: Some(id.clone()),
            generation: Some(generation),
            moved_from,
            external,
        };
        tracing::info!(%id, generation, %node, "migrating on request");
        match client.spin(&request, SpinQuery { wait: true }).await {
            Ok(process) => {
                self.inner.unplaced.release(id);
                Ok(process)
            }
            Err(e) => {
                self.inner.book().entry(id).settle(generation);
                Err(MigrateError::Refused(e))
            }
        }
    }

    /// Stops reconciling, then waits (at most a few seconds) for the placements and removals
    /// under way.
    pub async fn stop(&self) {
        let task = lock(&self.reconcile).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        let mut tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        let drained =
            tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("placements still under way when the root stopped: abandoned");
            tasks.shutdown().await;
        }
    }
}

/// How long a restarted root waits to hear every live node before it places the services it
/// knew of at start that no node shows (as a returning member waits before unparking).
const CATCH_UP_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

async fn reconcile_forever(inner: Arc<Inner>) {
    let catching_up = Arc::clone(&inner);
    tokio::spawn(async move {
        let outcome = catching_up.records.caught_up(CATCH_UP_LIMIT).await;
        tracing::debug!(?outcome, "the root has heard the network");
        catching_up
            .caught_up
            .store(true, std::sync::atomic::Ordering::Release);
        lock(&catching_up.known_at_start).clear();
    });
    let mut ticker = tokio::time::interval(RECONCILE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        reconcile(&inner);
    }
}

/// One pass: plan against what the records show now, then act.
fn reconcile(inner: &Arc<Inner>) {
    let mut desired = lock(&inner.desired).clone();
    if desired.services.is_empty() {
        return;
    }
    // A process a live node publishes but whose record is not fetched yet exists: it is left
    // alone until its record is here, rather than placed again.
    let unfetched = inner.records.unfetched();
    if !unfetched.is_empty() {
        desired.services.retain(|s| !unfetched.contains(&s.id));
    }
    let view = inner.records.view();
    // Right after a restart, a service the root knew of that no node shows yet may run on a
    // node not heard yet (one behind NAT is heard only when its own gossip arrives): it waits
    // until the root has heard the network.
    if !inner.caught_up.load(std::sync::atomic::Ordering::Acquire) {
        let known = lock(&inner.known_at_start);
        desired
            .services
            .retain(|s| !known.contains(&s.id) || view.iter().any(|c| c.process().id == s.id));
    }
    let nodes = inner.records.nodes();
    let unplaced = desired
        .services
        .iter()
        .filter_map(|s| inner.unplaced.get(&s.id).map(|p| (s.id.clone(), p)))
        .collect();
    let actions = {
        let book = inner.book();
        plan::plan(
            &desired.services,
            &view,
            &unplaced,
            &nodes,
            &book,
            Instant::now(),
        )
    };
    executor::execute(inner, actions);
}
