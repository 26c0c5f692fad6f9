//! The route table, pure: each domain (lower case) → the record of its process that counts now,
//! and the copy that serves it, if one does. Derived from the records' view on every change —
//! the records are the one source of truth, the table only indexes them.

use std::collections::BTreeMap;
use std::sync::Arc;

use p2f_model::{Health, NodeName, Process, ProcessId, RestartPolicy, Status};

use crate::reach::{PortRequest, Protocol};
use crate::records::precedence::{self, Candidate, Origin};

/// Where a serving copy is: what the ingress asks an [`super::upstream::Upstream`] to reach.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// The process.
    pub id: ProcessId,
    /// The copy's generation (a copy the root replaced is refused by its agent).
    pub generation: u64,
    /// The node it runs on.
    pub node: NodeName,
    /// Its port on that node (reached on the node's loopback).
    pub port: u16,
    /// TCP (a domain, a public TCP port) or UDP (a public UDP port: the stream carries framed
    /// datagrams).
    pub protocol: Protocol,
    /// A P2PRC peer's address, connected to directly (`/AddProxy`); `None` for P2F's own
    /// processes, which are reached through their node's agent.
    pub direct: Option<std::net::SocketAddr>,
}

impl Target {
    /// What the node that runs it is asked to open.
    pub fn port_request(&self) -> PortRequest {
        PortRequest {
            id: self.id.clone(),
            generation: Some(self.generation),
            protocol: self.protocol,
            port: Some(self.port),
        }
    }
}

/// One domain's route.
#[derive(Debug, Clone)]
pub struct Route {
    /// The domain, lower case.
    pub domain: String,
    /// The record that counts for it now (serving or not).
    pub process: Arc<Process>,
    /// The copy that serves it; `None` while none does ([`reason`] says why).
    pub target: Option<Target>,
}

/// Every domain's route.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    by_domain: BTreeMap<String, Route>,
}

impl RouteTable {
    /// The table for `copies` (a records view: one copy per process id, with its origin).
    /// Several processes with one domain (an old record beside a new one): a serving copy
    /// first, then the one [`precedence::serving_order`] puts first.
    pub fn from_copies<'a>(copies: impl IntoIterator<Item = (&'a Arc<Process>, Origin)>) -> Self {
        let mut best: BTreeMap<String, (&'a Arc<Process>, Origin)> = BTreeMap::new();
        for (process, origin) in copies {
            let Some(domain) = process.domain() else {
                continue;
            };
            let domain = normalise(domain);
            match best.get(&domain) {
                Some((current, current_origin))
                    if !better(process, origin, current, *current_origin) => {}
                _ => {
                    best.insert(domain, (process, origin));
                }
            }
        }
        let by_domain = best
            .into_iter()
            .map(|(domain, (process, _))| {
                let route = Route {
                    domain: domain.clone(),
                    process: Arc::clone(process),
                    target: serving(process),
                };
                (domain, route)
            })
            .collect();
        RouteTable { by_domain }
    }

    /// The route of `host` (any case, with or without a trailing dot).
    pub fn find(&self, host: &str) -> Option<&Route> {
        self.by_domain.get(&normalise(host))
    }

    /// [`RouteTable::find`] for a host [`normalise`] would leave as it is (as
    /// [`super::headers::host_of`] gives it).
    pub fn find_normalised(&self, host: &str) -> Option<&Route> {
        self.by_domain.get(host)
    }

    /// The table with `direct` routes to P2PRC peers added (`/AddProxy`), each as a
    /// `Running` record of the peer (service `p2prc-proxy`, id `p2prc.DOMAIN`) whose target is
    /// its address. A domain of a P2F process keeps its process: P2F's own routes win.
    pub fn with_direct(mut self, direct: &[crate::wire::DirectRoute]) -> RouteTable {
        for route in direct {
            let domain = normalise(&route.domain);
            if self.by_domain.contains_key(&domain) {
                continue;
            }
            let Ok(id) = ProcessId::new(format!("p2prc.{domain}")) else {
                continue;
            };
            let spec = p2f_model::ProcessSpec::new("p2prc-proxy", "")
                .with_port(route.address.port())
                .with_domain(domain.clone())
                .with_health(Health::None);
            let node = p2f_model::NodeRef {
                name: route.peer.clone(),
                address: route.address.ip().to_string(),
            };
            let mut process = Process::placed(id, 1, spec, node, p2f_model::Timestamp::now());
            process.status = Status::Running;
            let target = serving(&process).map(|target| Target {
                direct: Some(route.address),
                ..target
            });
            let route = Route {
                domain: domain.clone(),
                process: Arc::new(process),
                target,
            };
            self.by_domain.insert(domain, route);
        }
        self
    }

    /// Whether `host` is a routed domain.
    pub fn contains(&self, host: &str) -> bool {
        self.find(host).is_some()
    }

    /// Every route, sorted by domain.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.by_domain.values()
    }
}

/// Whether `a` should count for its domain rather than `b`.
fn better(a: &Process, a_origin: Origin, b: &Process, b_origin: Origin) -> bool {
    match (serving(a).is_some(), serving(b).is_some()) {
        (true, false) => true,
        (false, true) => false,
        _ => precedence::serving_order(&Candidate::of(a, a_origin), &Candidate::of(b, b_origin))
            .is_lt(),
    }
}

/// The copy `process` is, if it serves: `Running` with a port, and healthy — its health check
/// passed since it started (a process without a check is healthy while it runs).
pub fn serving(process: &Process) -> Option<Target> {
    let port = process.port?;
    let healthy = process.spec.health() == Health::None || process.passed_health_check();
    (process.is_running() && healthy).then(|| Target {
        protocol: Protocol::Tcp,
        id: process.id.clone(),
        generation: process.generation,
        node: process.node.name.clone(),
        port,
        direct: None,
    })
}

/// Why `process` does not serve now, in one line for people: its status and its record's
/// formal reason (`wiki is restarting: exited with code 3, restart 2 of 5`).
pub fn reason(process: &Process) -> String {
    let name = process.name();
    let node = &process.node.name;
    let failure = process.last_failure.as_ref();
    match (&process.status, failure) {
        (Status::Running, _) if serving(process).is_none() && process.port.is_none() => {
            format!("{name} has no port to serve on")
        }
        (Status::Running, _) => format!("{name} is starting: its health check has not passed yet"),
        (Status::Pending, Some(failure)) if process.restarts > 0 => {
            let of = match process.spec.restart() {
                RestartPolicy::OnFailure(n) => format!(" of {n}"),
                _ => String::new(),
            };
            format!(
                "{name} is restarting: {failure}, restart {}{of}",
                process.restarts
            )
        }
        (Status::Pending, _) => format!("{name} is starting on {node}"),
        (Status::Deploying, _) => format!("{name} is being deployed on {node}"),
        (Status::Parked, _) => format!("{name} waits for its node {node} to hear the network"),
        (Status::Unplaced, Some(failure)) => format!("{name} waits for a node: {failure}"),
        (Status::Unplaced, None) => format!("{name} waits for a node"),
        (Status::Stopping, _) => format!("{name} is stopping"),
        (Status::Stopped, _) => format!("{name} is stopped"),
        (Status::Failed(failure), _) => format!("{name} failed: {failure}"),
        (Status::Lost, _) => format!("{name} is being moved: its node {node} was lost"),
        (other, _) => format!("{name} is {other}"),
    }
}

/// A host name as routes are keyed: ASCII lower case, without a trailing dot.
pub fn normalise(host: &str) -> String {
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2f_model::{EventKind, Failure, NodeRef, ProcessSpec, Timestamp};

    fn record(id: &str, domain: &str, node: &str, generation: u64, status: Status) -> Arc<Process> {
        let spec = ProcessSpec::new(id, "exec true")
            .with_port(8080)
            .with_domain(domain);
        let node = NodeRef {
            name: NodeName::new(node).expect("node"),
            address: "127.0.0.1".into(),
        };
        let id = ProcessId::new(id).expect("id");
        let mut p = Process::placed(id, generation, spec, node, Timestamp(1));
        p.status = status;
        Arc::new(p)
    }

    fn healthy(p: Arc<Process>) -> Arc<Process> {
        let mut p = (*p).clone();
        p.record(Timestamp(2), EventKind::Started { pid: 7 });
        p.record(Timestamp(3), EventKind::Healthy);
        Arc::new(p)
    }

    #[test]
    fn direct_routes_join_the_table_but_never_take_a_p2f_domain() {
        let direct = |domain: &str, port: u16| crate::wire::DirectRoute {
            domain: domain.into(),
            address: ([192, 0, 2, 7], port).into(),
            peer: NodeName::from_static("peer-Ab1"),
        };
        let wiki = healthy(record("wiki", "wiki.test", "pi", 1, Status::Running));
        let table = RouteTable::from_copies([(&wiki, Origin::Local)])
            .with_direct(&[direct("Box.Test", 8080), direct("wiki.test", 9000)]);
        let boxed = table.find("box.test").expect("box.test");
        let target = boxed.target.as_ref().expect("serves");
        assert_eq!(target.direct, Some(([192, 0, 2, 7], 8080).into()));
        assert_eq!((target.node.as_str(), target.port), ("peer-Ab1", 8080));
        assert_eq!(boxed.process.id.as_str(), "p2prc.box.test");
        let wiki = table.find("wiki.test").expect("wiki");
        assert_eq!(wiki.process.id.as_str(), "wiki", "P2F's own route wins");
        assert_eq!(wiki.target.as_ref().and_then(|t| t.direct), None);
    }

    /// What a lookup found: the record's node and generation, and whether a copy serves.
    type Found<'a> = Option<(&'a str, u64, bool)>;

    /// The table of `copies` (all local); for each `(host, expected)`: the node and generation
    /// of the record that counts and whether it serves, or nothing.
    fn check(copies: &[Arc<Process>], cases: &[(&str, Found<'_>)]) {
        let table = RouteTable::from_copies(copies.iter().map(|p| (p, Origin::Local)));
        for (host, expected) in cases {
            let found = table.find(host).map(|route| {
                (
                    route.process.node.name.as_str(),
                    route.process.generation,
                    route.target.is_some(),
                )
            });
            assert_eq!(found, *expected, "{host}");
            if let Some(route) = table.find(host)
                && let Some(target) = &route.target
            {
                let record = &route.process;
                let expected = (record.node.name.as_str(), record.generation, 8080);
                assert_eq!(
                    (target.node.as_str(), target.generation, target.port),
                    expected
                );
            }
        }
    }

    #[test]
    fn a_domain_routes_to_its_running_healthy_copy_in_any_case() {
        let wiki = healthy(record("wiki", "Wiki.Home.Arpa", "pi", 1, Status::Running));
        let other = record("tube", "tube.lan", "laptop", 1, Status::Pending);
        check(
            &[wiki, other],
            &[
                ("wiki.home.arpa", Some(("pi", 1, true))),
                ("WIKI.home.ARPA.", Some(("pi", 1, true))),
                ("tube.lan", Some(("laptop", 1, false))),
                ("home.arpa", None),
                ("www.wiki.home.arpa", None),
            ],
        );
    }

    #[test]
    fn running_is_not_enough_without_a_passed_check() {
        let starting = record("wiki", "wiki.lan", "pi", 1, Status::Running);
        check(
            std::slice::from_ref(&starting),
            &[("wiki.lan", Some(("pi", 1, false)))],
        );
        assert_eq!(
            reason(&starting),
            "wiki is starting: its health check has not passed yet"
        );
        // A check that passed before the last start does not count.
        let mut restarted = (*healthy(starting)).clone();
        restarted.record(Timestamp(9), EventKind::Started { pid: 8 });
        check(
            &[Arc::new(restarted)],
            &[("wiki.lan", Some(("pi", 1, false)))],
        );
        // Without a check, running is serving.
        let mut unchecked = (*record("w", "w.lan", "pi", 1, Status::Running)).clone();
        unchecked.spec = unchecked.spec.with_health(Health::None);
        check(&[Arc::new(unchecked)], &[("w.lan", Some(("pi", 1, true)))]);
    }

    #[test]
    fn a_move_or_failover_is_followed_within_one_view() {
        // The view holds the copy that wins per id: during a move the new generation, still
        // starting (down); then healthy elsewhere.
        let moving = record("wiki", "wiki.lan", "laptop", 2, Status::Deploying);
        check(&[moving], &[("wiki.lan", Some(("laptop", 2, false)))]);
        let moved = healthy(record("wiki", "wiki.lan", "laptop", 2, Status::Running));
        check(&[moved], &[("wiki.lan", Some(("laptop", 2, true)))]);
        let lost = record("wiki", "wiki.lan", "pi", 1, Status::Lost);
        check(&[lost], &[("wiki.lan", Some(("pi", 1, false)))]);
    }

    #[test]
    fn of_two_processes_with_one_domain_the_serving_one_counts() {
        let old = record("old", "wiki.lan", "pi", 1, Status::Stopped);
        let new = healthy(record("new", "wiki.lan", "laptop", 1, Status::Running));
        check(
            &[old.clone(), new.clone()],
            &[("wiki.lan", Some(("laptop", 1, true)))],
        );
        check(&[new, old], &[("wiki.lan", Some(("laptop", 1, true)))]);
        // Neither serves: the live one before the ended one.
        let pending = record("new", "wiki.lan", "laptop", 1, Status::Pending);
        let stopped = record("old", "wiki.lan", "pi", 1, Status::Stopped);
        check(
            &[stopped, pending],
            &[("wiki.lan", Some(("laptop", 1, false)))],
        );
    }

    #[test]
    fn reasons_name_the_formal_failure() {
        let with = |status: Status, failure: Option<Failure>, restarts: u32| {
            let mut p = (*record("wiki", "wiki.lan", "pi", 1, status)).clone();
            p.last_failure = failure;
            p.restarts = restarts;
            reason(&p)
        };
        let exited = Some(Failure::Exited { code: 3 });
        let cases = [
            (
                with(Status::Pending, exited.clone(), 2),
                "wiki is restarting: exited with code 3, restart 2 of 5",
            ),
            (
                with(Status::Failed(Failure::Exited { code: 3 }), exited, 5),
                "wiki failed: exited with code 3",
            ),
            (
                with(
                    Status::Unplaced,
                    Some(Failure::NoAllowedNode {
                        pins: vec![NodeName::from_static("pi")],
                        rejected: Vec::new(),
                    }),
                    0,
                ),
                "wiki waits for a node: none of its nodes is alive (pi)",
            ),
            (
                with(Status::Lost, None, 0),
                "wiki is being moved: its node pi was lost",
            ),
            (with(Status::Pending, None, 0), "wiki is starting on pi"),
            (with(Status::Stopped, None, 0), "wiki is stopped"),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }
}
