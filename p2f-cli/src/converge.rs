//! Desired against running: `plan` computes the difference (create, update, delete, keep) as a
//! value; `apply` carries it out on a node in the deployment's start order, showing one
//! progress line per service (placed → deployed → running → healthy), and waits.

use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use p2f_core::Network;
use p2f_core::wire::{DesiredState, SpinQuery, SpinRequest};
use p2f_model::{Deployment, Health, Node, Process, ProcessKey, ProcessSpec};
use serde::Serialize;

use crate::{Error, Result, SERVICE_TIMEOUT};

/// What `apply` does to one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Change {
    /// Not running: start it.
    Create { service: String },
    /// Runs with another spec: replace it. `fields` names what differs.
    Update {
        service: String,
        fields: Vec<&'static str>,
    },
    /// Runs as declared.
    Keep { service: String },
    /// The root runs it, and the deployment no longer declares it: stop and forget it.
    Delete { service: String },
    /// It runs on a node its new pins no longer allow: it is placed again elsewhere.
    Move { service: String, from: String },
}

/// The changes that make `current` match `deployment`, in start order. (Deleting records of
/// services that left the deployment needs records to name their deployment: not yet.)
pub fn plan(deployment: &Deployment, current: &[Process]) -> Vec<Change> {
    deployment
        .start_order()
        .into_iter()
        .map(|spec| {
            let live = current
                .iter()
                .find(|p| p.name() == spec.name() && !p.status.is_final());
            let service = spec.name().to_owned();
            match live {
                None => Change::Create { service },
                Some(p) if &p.spec == spec => Change::Keep { service },
                Some(p) => Change::Update {
                    service,
                    fields: differences(&p.spec, spec),
                },
            }
        })
        .collect()
}

fn differences(old: &ProcessSpec, new: &ProcessSpec) -> Vec<&'static str> {
    let mut fields = Vec::new();
    let mut check = |name, differs: bool| {
        if differs {
            fields.push(name);
        }
    };
    check("start", old.start() != new.start());
    check("stop", old.stop() != new.stop());
    check("port", old.port() != new.port());
    check("strategy", old.strategy() != new.strategy());
    check("domain", old.domain() != new.domain());
    check("pin", old.pin() != new.pin());
    check("health", old.health() != new.health());
    check("restart", old.restart() != new.restart());
    check("grace", old.grace() != new.grace());
    check("env", old.env() != new.env());
    check("user", old.user() != new.user());
    check("bundle", old.bundle() != new.bundle());
    if fields.is_empty() {
        fields.push("after");
    }
    fields
}

/// The changes against a root's desired services: create, update, keep in start order, then
/// delete for services the root runs that the deployment no longer declares.
pub fn plan_against_root(
    deployment: &Deployment,
    desired: &DesiredState,
    records: &[Process],
) -> Vec<Change> {
    let mut changes: Vec<Change> = deployment
        .start_order()
        .into_iter()
        .map(|spec| {
            let service = spec.name().to_owned();
            let Some(current) = desired
                .services
                .iter()
                .find(|d| d.spec.name() == spec.name())
            else {
                return Change::Create { service };
            };
            if current.spec == *spec {
                return Change::Keep { service };
            }
            let runs_on = records
                .iter()
                .find(|p| p.id == current.id && !p.status.is_final())
                .map(|p| p.node.name.clone());
            match runs_on {
                Some(node) if !spec.allows(&node) => Change::Move {
                    service,
                    from: node.to_string(),
                },
                _ => Change::Update {
                    service,
                    fields: differences(&current.spec, spec),
                },
            }
        })
        .collect();
    let declared: Vec<&ProcessSpec> = desired.services.iter().map(|s| &s.spec).collect();
    for old in declared {
        if deployment.service(old.name()).is_none() {
            changes.push(Change::Delete {
                service: old.name().to_owned(),
            });
        }
    }
    changes
}

/// Gives the deployment to the root of a network and waits until every service runs (and is
/// healthy when it has a check). Returns `None` when the node is not a root (a lone agent or
/// the embedded network): then the caller places the services itself.
pub async fn apply_through_root(
    network: &Network,
    deployment: &Deployment,
) -> Result<Option<Vec<Process>>> {
    let desired = match network.deploy(deployment.services()).await {
        Ok(desired) => desired,
        Err(p2f_core::ClientError::Api { status: 409, .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let bars = Progress::new(deployment);
    let started = Instant::now();
    let mut waiting: Vec<(String, p2f_model::ProcessId, bool)> = desired
        .services
        .iter()
        .map(|s| {
            (
                s.spec.name().to_owned(),
                s.id.clone(),
                s.spec.health() != Health::None,
            )
        })
        .collect();
    for (name, _, _) in &waiting {
        bars.stage(name, "given to the root, waiting for its placement");
    }
    let mut done = Vec::new();
    let deadline = Instant::now() + SERVICE_TIMEOUT;
    while !waiting.is_empty() {
        let all = network.list_processes().await?;
        waiting.retain(|(name, id, checked)| {
            let newest = all
                .iter()
                .filter(|p| &p.id == id)
                .max_by_key(|p| p.generation);
            match newest {
                Some(p) if p.is_running() && (!checked || p.is_healthy()) => {
                    let how = if *checked { "healthy" } else { "running" };
                    bars.finish(
                        name,
                        &format!("{how} on {} in {}", p.node.name, elapsed(started)),
                        true,
                    );
                    done.push(p.clone());
                    false
                }
                Some(p) if p.is_running() => {
                    bars.stage(
                        name,
                        &format!("running on {}, waiting for its health check", p.node.name),
                    );
                    true
                }
                Some(p) => {
                    bars.stage(name, &format!("{} on {}", p.status, p.node.name));
                    true
                }
                None => true,
            }
        });
        if waiting.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let failed: Vec<String> = waiting
                .iter()
                .map(|(name, id, _)| {
                    let why = all
                        .iter()
                        .filter(|p| &p.id == id)
                        .max_by_key(|p| p.generation)
                        .map(|p| {
                            p.last_failure
                                .as_ref()
                                .map(ToString::to_string)
                                .unwrap_or_else(|| p.status.to_string())
                        })
                        .unwrap_or_else(|| "not placed (no allowed node alive?)".into());
                    bars.finish(name, &format!("failed: {why}"), false);
                    format!("{name}: {why}")
                })
                .collect();
            return Err(Error::Failed {
                failed,
                total: deployment.services().len(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(Some(done))
}

/// Carries out the plan on `node` and waits until every service runs (and is healthy when it
/// has a check). Returns the records; fails listing each service that did not make it.
pub async fn apply(
    network: &Network,
    node: &Node,
    deployment: &Deployment,
) -> Result<Vec<Process>> {
    let current = network.list_processes().await?;
    let changes = plan(deployment, &current);
    let bars = Progress::new(deployment);
    let target = match node.api_address() {
        Some(address) => network.at(&address),
        None => network.clone(),
    };
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for change in &changes {
        let (service, replace) = match change {
            Change::Create { service } => (service, false),
            Change::Update { service, .. } => (service, true),
            Change::Keep { service } => {
                bars.finish(service, "running (unchanged)", true);
                if let Some(p) = current
                    .iter()
                    .find(|p| p.name() == service && !p.status.is_final())
                {
                    done.push(p.clone());
                }
                continue;
            }
            // A node's own plan never deletes or moves: only a root knows what it placed.
            Change::Delete { .. } | Change::Move { .. } => continue,
        };
        let Some(spec) = deployment.service(service) else {
            continue;
        };
        if replace {
            for old in current
                .iter()
                .filter(|p| p.name() == service && !p.status.is_final())
            {
                bars.stage(service, "replacing the old process");
                network.remove_process(&old.id).await?;
            }
        }
        match run_one(&target, spec, &bars).await {
            Ok(process) => done.push(process),
            Err(reason) => {
                bars.finish(service, &format!("failed: {reason}"), false);
                failed.push(format!("{service}: {reason}"));
            }
        }
    }
    if failed.is_empty() {
        Ok(done)
    } else {
        Err(Error::Failed {
            failed,
            total: deployment.services().len(),
        })
    }
}

/// Spins one service and follows it to `Running` and, with a health check, to healthy.
async fn run_one(
    network: &Network,
    spec: &ProcessSpec,
    bars: &Progress,
) -> Result<Process, String> {
    let name = spec.name();
    let started = Instant::now();
    bars.stage(name, "placed, deploying");
    let request = SpinRequest {
        spec: spec.clone(),
        id: None,
        generation: None,
        moved_from: None,
    };
    let process = network
        .spin(&request, SpinQuery { wait: true })
        .await
        .map_err(|e| e.to_string())?;
    if let Some(failure) = &process.last_failure
        && !process.is_running()
    {
        return Err(failure.to_string());
    }
    if process.restarts > 0 && !process.is_running() {
        return Err(process
            .last_failure
            .map(|f| f.to_string())
            .unwrap_or_else(|| "it did not start".into()));
    }
    if spec.health() == Health::None {
        bars.finish(name, &format!("running in {}", elapsed(started)), true);
        return Ok(process);
    }
    bars.stage(name, "running, waiting for its health check");
    let deadline = Instant::now() + SERVICE_TIMEOUT;
    loop {
        let current = network
            .process_information(ProcessKey::Id(process.id.clone()))
            .await
            .map_err(|e| e.to_string())?
            .ok_or("its record disappeared")?;
        let healthy = current.is_healthy() && current.restarts == process.restarts;
        if healthy {
            bars.finish(name, &format!("healthy in {}", elapsed(started)), true);
            return Ok(current);
        }
        if current.status.is_final() || current.restarts > process.restarts {
            let reason = current
                .last_failure
                .map(|f| f.to_string())
                .unwrap_or_else(|| current.status.to_string());
            return Err(reason);
        }
        if Instant::now() > deadline {
            return Err(format!("not healthy after {}", elapsed(started)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn elapsed(since: Instant) -> String {
    format!("{:.1}s", since.elapsed().as_secs_f64())
}

/// One progress line per service (spinners on a terminal, plain lines otherwise).
struct Progress {
    /// Draws the bars; kept alive with them.
    _multi: MultiProgress,
    bars: Vec<(String, ProgressBar)>,
    tty: bool,
}

impl Progress {
    fn new(deployment: &Deployment) -> Progress {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let multi = MultiProgress::new();
        let width = deployment
            .services()
            .iter()
            .map(|s| s.name().len())
            .max()
            .unwrap_or(0);
        let style =
            ProgressStyle::with_template(&format!("{{spinner}} {{prefix:{width}}}  {{msg}}"))
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bars = deployment
            .start_order()
            .into_iter()
            .map(|spec| {
                let bar = if tty {
                    multi.add(ProgressBar::new_spinner())
                } else {
                    ProgressBar::hidden()
                };
                bar.set_style(style.clone());
                bar.set_prefix(spec.name().to_owned());
                bar.set_message("waiting");
                bar.enable_steady_tick(Duration::from_millis(120));
                (spec.name().to_owned(), bar)
            })
            .collect();
        Progress {
            _multi: multi,
            bars,
            tty,
        }
    }

    fn bar(&self, service: &str) -> Option<&ProgressBar> {
        self.bars
            .iter()
            .find(|(name, _)| name == service)
            .map(|(_, bar)| bar)
    }

    fn stage(&self, service: &str, message: &str) {
        if let Some(bar) = self.bar(service) {
            bar.set_message(message.to_owned());
        }
        if !self.tty {
            eprintln!("{service}: {message}");
        }
    }

    fn finish(&self, service: &str, message: &str, ok: bool) {
        let mark = if ok { "✔" } else { "✘" };
        if let Some(bar) = self.bar(service) {
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{mark} {{prefix:{}}}  {{msg}}",
                    self.width()
                ))
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.finish_with_message(message.to_owned());
        }
        if !self.tty {
            eprintln!("{service}: {message}");
        }
    }

    fn width(&self) -> usize {
        self.bars.iter().map(|(n, _)| n.len()).max().unwrap_or(0)
    }
}
