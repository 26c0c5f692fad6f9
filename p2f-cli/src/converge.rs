//! Desired against running, through the root (the one control plane): `plan` computes the
//! difference between a deployment and the root's desired state (create, update, move,
//! delete, keep) as a value; `apply` gives the deployment to the root and follows each
//! service to running and healthy, one progress line per service.

use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use p2f_core::Network;
use p2f_core::wire::DesiredState;
use p2f_model::{Deployment, Health, Process, ProcessSpec};
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

/// The changes against a root's desired services: create, update, keep in start order, then
/// delete for services the root runs that the deployment no longer declares.
pub fn plan(deployment: &Deployment, desired: &DesiredState, records: &[Process]) -> Vec<Change> {
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
                    fields: current
                        .spec
                        .changed_fields(spec)
                        .into_iter()
                        .map(|f| f.name())
                        .collect(),
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
/// healthy when it has a check), showing one progress line per service. Fails listing each
/// service that did not make it within [`SERVICE_TIMEOUT`], with its formal reason.
pub async fn apply(network: &Network, deployment: &Deployment) -> Result<Vec<Process>> {
    let desired = network.deploy(deployment.services()).await?;
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
                        .unwrap_or_else(|| "not placed yet".into());
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
    Ok(done)
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
