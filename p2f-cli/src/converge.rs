//! Desired against running, through the root (the one control plane): `plan` computes the
//! difference between a deployment and the root's desired state (create, update, move,
//! delete, keep) as a value; `apply` gives the deployment to the root and follows each
//! service to running and healthy, one progress line per service.

use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use p2f_core::Network;
use p2f_core::wire::DesiredState;
use p2f_model::{Deployment, Health, Process, ProcessSpec, Status};
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
    let mut failed = Vec::new();
    let deadline = Instant::now() + SERVICE_TIMEOUT;
    while !waiting.is_empty() {
        let all = network.list_processes().await?;
        let timed_out = Instant::now() > deadline;
        waiting.retain(|(name, id, checked)| {
            let newest = all.iter().find(|p| &p.id == id);
            match outcome(newest, *checked, timed_out) {
                Outcome::Done(p) => {
                    let how = if *checked { "healthy" } else { "running" };
                    let on = &p.node.name;
                    bars.finish(
                        name,
                        &format!("{how} on {on} in {}", elapsed(started)),
                        true,
                    );
                    done.push(p.clone());
                    false
                }
                Outcome::Waiting(what) => {
                    bars.stage(name, &what);
                    true
                }
                Outcome::Failed(why) => {
                    bars.finish(name, &format!("failed: {why}"), false);
                    failed.push(format!("{name}: {why}"));
                    false
                }
            }
        });
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
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

/// Where one service of an `apply` stands.
enum Outcome<'a> {
    /// Running (and healthy, when it has a check).
    Done(&'a Process),
    /// On its way: what it is doing.
    Waiting(String),
    /// It failed, is being restarted after a failure, or no node can take it: why.
    Failed(String),
}

/// Where the service whose record is `newest` stands; `checked` when it has a health check.
/// A process being restarted after a failure is reported failed at once, with its reason (the
/// node keeps restarting it; `status` shows how it goes).
fn outcome(newest: Option<&Process>, checked: bool, timed_out: bool) -> Outcome<'_> {
    let reason = |p: &Process| {
        p.last_failure
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| p.status.to_string())
    };
    match newest {
        Some(p) if p.is_running() && (!checked || p.is_healthy()) => Outcome::Done(p),
        Some(p) if matches!(p.status, Status::Failed(_) | Status::Unplaced) => {
            Outcome::Failed(reason(p))
        }
        Some(p) if !p.is_running() && p.restarts > 0 && p.last_failure.is_some() => {
            Outcome::Failed(reason(p))
        }
        Some(p) if timed_out => Outcome::Failed(format!(
            "not {} after {} ({} on {})",
            if checked { "healthy" } else { "running" },
            p2f_model::format_duration(SERVICE_TIMEOUT),
            p.status,
            p.node.name
        )),
        None if timed_out => Outcome::Failed("not placed".into()),
        Some(p) if p.is_running() => Outcome::Waiting(format!(
            "running on {}, waiting for its health check",
            p.node.name
        )),
        Some(p) => Outcome::Waiting(format!("{} on {}", p.status, p.node.name)),
        None => Outcome::Waiting("given to the root, waiting for its placement".into()),
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

    /// Shows where `service` is; a line is printed (without a terminal) only when it changed.
    fn stage(&self, service: &str, message: &str) {
        let Some(bar) = self.bar(service) else {
            return;
        };
        if bar.message() == message {
            return;
        }
        bar.set_message(message.to_owned());
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

#[cfg(test)]
mod tests {
    use super::*;
    use p2f_model::{EventKind, Failure, NodeName, NodeRef, ProcessId, Timestamp};

    fn record(status: Status, restarts: u32, failure: Option<Failure>, healthy: bool) -> Process {
        let mut p = Process::placed(
            ProcessId::for_service("web", 1),
            1,
            ProcessSpec::new("web", "true"),
            NodeRef {
                name: NodeName::from_static("pi"),
                address: String::new(),
            },
            Timestamp(1),
        );
        p.status = status;
        p.restarts = restarts;
        p.last_failure = failure;
        if healthy {
            p.record(Timestamp(2), EventKind::Healthy);
        }
        p
    }

    /// `(record, checked, timed out)` → what `apply` says of the service.
    fn check(newest: Option<Process>, checked: bool, timed_out: bool, expected: &str) {
        let got = match outcome(newest.as_ref(), checked, timed_out) {
            Outcome::Done(p) => format!("done on {}", p.node.name),
            Outcome::Waiting(what) => format!("waiting: {what}"),
            Outcome::Failed(why) => format!("failed: {why}"),
        };
        assert_eq!(got, expected);
    }

    #[test]
    fn apply_says_of_each_service_whether_it_runs_waits_or_failed() {
        let port = || Some(Failure::PortInUse { port: 80 });
        let no_node = Some(Failure::NoAllowedNode {
            pins: Vec::new(),
            rejected: Vec::new(),
        });
        check(
            None,
            false,
            false,
            "waiting: given to the root, waiting for its placement",
        );
        check(None, false, true, "failed: not placed");
        check(
            Some(record(Status::Running, 0, None, false)),
            false,
            false,
            "done on pi",
        );
        check(
            Some(record(Status::Running, 0, None, false)),
            true,
            false,
            "waiting: running on pi, waiting for its health check",
        );
        check(
            Some(record(Status::Running, 0, None, true)),
            true,
            false,
            "done on pi",
        );
        check(
            Some(record(Status::Pending, 0, None, false)),
            false,
            false,
            "waiting: pending on pi",
        );
        // Restarting after a failure, failed, or no node for it: said at once, with why.
        check(
            Some(record(Status::Pending, 1, port(), false)),
            false,
            false,
            "failed: port 80 is already in use",
        );
        check(
            Some(record(
                Status::Failed(Failure::CommandNotFound),
                0,
                Some(Failure::CommandNotFound),
                false,
            )),
            false,
            false,
            "failed: command not found",
        );
        check(
            Some(record(Status::Unplaced, 0, no_node, false)),
            false,
            false,
            "failed: no node is alive",
        );
        check(
            Some(record(Status::Deploying, 0, None, false)),
            true,
            true,
            "failed: not healthy after 2m (deploying on pi)",
        );
    }
}
