//! What people read: the status table (and its JSON rows) and the plan.

use comfy_table::{Table, presets};
use p2f_model::{Process, Status, Timestamp};
use serde::Serialize;

use crate::converge::Change;

/// Whether to colour output: stdout is a terminal and `NO_COLOR` is not set.
pub fn colours() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stdout()) && std::env::var_os("NO_COLOR").is_none()
}

/// One row of `status --json` (a stable schema for scripts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusRow {
    pub service: String,
    pub id: String,
    pub node: String,
    pub address: Option<String>,
    pub domain: Option<String>,
    /// Where it is reached from outside (the record's `external`: the root's ingress).
    pub url: Option<String>,
    pub status: String,
    pub running: bool,
    pub restarts: u32,
    pub memory_bytes: u64,
    pub uptime_seconds: Option<u64>,
    pub last_failure: Option<String>,
}

impl StatusRow {
    /// The row of a record.
    pub fn of(p: &Process) -> StatusRow {
        StatusRow {
            service: p.name().to_owned(),
            id: p.id.to_string(),
            node: p.node.name.to_string(),
            address: reachable_at(p),
            domain: p.domain().map(str::to_owned),
            url: p.external.clone(),
            status: p.status.name().to_owned(),
            running: p.is_running(),
            restarts: p.restarts,
            memory_bytes: p.memory_bytes,
            uptime_seconds: uptime(p).map(|ms| ms / 1000),
            last_failure: p.last_failure.as_ref().map(ToString::to_string),
        }
    }
}

/// Where a running process can be reached, from where its node's kernel says its port is
/// bound: `NODE_ADDRESS:PORT` when it listens on every address, else the address it is bound to
/// (`127.0.0.1:PORT`: from its node only). `None` while it does not listen (or runs nowhere).
fn reachable_at(p: &Process) -> Option<String> {
    if !p.is_running() {
        return None;
    }
    let listen: std::net::SocketAddr = p.listen.as_deref()?.parse().ok()?;
    Some(if listen.ip().is_unspecified() {
        format!("{}:{}", p.node.address, listen.port())
    } else {
        listen.to_string()
    })
}

/// Whether `address` (from [`reachable_at`]) is a loopback one: reachable from its node only.
fn node_only(address: &str) -> bool {
    address
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
}

fn uptime(p: &Process) -> Option<u64> {
    let Timestamp(started) = p.started_at?;
    if !p.is_running() {
        return None;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(started);
    Some(now.saturating_sub(started))
}

/// The status table: service, id, node, address, public URL (or the domain, without an
/// ingress), status, restarts, memory, uptime, last failure.
pub fn status_table(processes: &[Process]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::UTF8_BORDERS_ONLY);
    table.set_header([
        "SERVICE",
        "ID",
        "NODE",
        "ADDRESS",
        "URL",
        "STATUS",
        "RESTARTS",
        "MEMORY",
        "UPTIME",
        "LAST FAILURE",
    ]);
    for p in processes {
        let row = StatusRow::of(p);
        let healthy = p.is_healthy();
        let status = match &p.status {
            Status::Running if healthy => "running (healthy)".to_owned(),
            other => other.name().to_owned(),
        };
        table.add_row([
            row.service,
            row.id,
            row.node,
            match row.address {
                Some(address) if node_only(&address) => format!("{address} (node only)"),
                Some(address) => address,
                None => "-".into(),
            },
            row.url.or(row.domain).unwrap_or_else(|| "-".into()),
            status,
            row.restarts.to_string(),
            bytes(row.memory_bytes),
            row.uptime_seconds
                .map(duration)
                .unwrap_or_else(|| "-".into()),
            row.last_failure.unwrap_or_else(|| "-".into()),
        ]);
    }
    table
}

/// The nodes table: name, address, API, alive, processes, unsafe mode.
pub fn nodes_table(nodes: &[p2f_core::wire::NodeStatus]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::UTF8_BORDERS_ONLY);
    table.set_header([
        "NODE",
        "ADDRESS",
        "API",
        "REACHED",
        "STATUS",
        "PROCESSES",
        "UNSAFE MODE",
    ]);
    for n in nodes {
        let address = n
            .node
            .ipv4
            .map(|ip| ip.to_string())
            .or_else(|| n.node.ipv6.map(|ip| ip.to_string()))
            .unwrap_or_else(|| "-".into());
        table.add_row([
            n.node.name.to_string(),
            address,
            n.node.api_address().unwrap_or_else(|| "-".into()),
            reached(n),
            if n.alive { "alive" } else { "dead" }.to_owned(),
            n.processes.to_string(),
            n.node.unsafe_mode.to_string(),
        ]);
    }
    table
}

/// How a node is reached: `direct`, or `via root` with its link's state and round-trip time
/// (`via root, linked, rtt 0.4 ms`; `via root, link down`).
fn reached(n: &p2f_core::wire::NodeStatus) -> String {
    use p2f_core::wire::Reach;
    match (n.reach, n.link) {
        (Reach::Direct, None) => "direct".to_owned(),
        (_, Some(link)) if link.linked => match link.rtt_us {
            Some(rtt) => format!("via root, linked, rtt {:.1} ms", rtt as f64 / 1000.0),
            None => "via root, linked".to_owned(),
        },
        (_, Some(_)) => "via root, link down".to_owned(),
        (Reach::Root, None) => "via root".to_owned(),
    }
}

/// The known P2PRC peers: name, address, P2PRC's API port, SSH port, how they were learned.
pub fn peers_table(peers: &[p2f_core::wire::P2prcPeer]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::UTF8_BORDERS_ONLY);
    table.set_header([
        "P2PRC PEER",
        "ADDRESS",
        "SERVER PORT",
        "SSH PORT",
        "LEARNED",
    ]);
    let port = |p: Option<u16>| p.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    for p in peers {
        let address = p
            .node
            .ipv4
            .map(|ip| ip.to_string())
            .or_else(|| p.node.ipv6.map(|ip| ip.to_string()))
            .unwrap_or_else(|| "-".into());
        table.add_row([
            p.node.name.to_string(),
            address,
            port(p.node.server_port),
            port(p.node.bare_metal_ssh_port),
            p.via.clone(),
        ]);
    }
    table
}

/// The ingress's routes: domain, service (process), node, upstream or why none, certificate,
/// last error; under it where the ingress listens.
pub fn routes_table(report: &p2f_core::wire::RoutesReport) -> String {
    let mut table = Table::new();
    table.load_preset(presets::UTF8_BORDERS_ONLY);
    table.set_header([
        "DOMAIN",
        "PROCESS",
        "NODE",
        "UPSTREAM",
        "CERTIFICATE",
        "LAST ERROR",
    ]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for route in &report.routes {
        let upstream = match (&route.upstream, &route.down) {
            (Some(upstream), _) => upstream.clone(),
            (None, Some(down)) => format!("down: {down}"),
            (None, None) => "down".to_owned(),
        };
        let mut certificate = route
            .certificate
            .as_ref()
            .map(|c| format!("{}, {}", c.issuer, expiry(c.not_after, now)))
            .unwrap_or_else(|| match &route.certificate_error {
                Some(_) => "none".to_owned(),
                None => "on first use".to_owned(),
            });
        if let Some(error) = &route.certificate_error {
            certificate.push_str(&format!("; error: {error}"));
        }
        table.add_row([
            route.domain.clone(),
            format!("{} ({})", route.process, route.service),
            format!("{} (gen {})", route.node, route.generation),
            upstream,
            certificate,
            route.last_error.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    let mut out = format!(
        "{table}\nHTTP on {}, HTTPS on {}",
        report.http, report.https
    );
    if !report.ports.is_empty() {
        let mut ports = Table::new();
        ports.load_preset(presets::UTF8_BORDERS_ONLY);
        ports.set_header(["PUBLIC PORT", "PROCESS", "NODE", "UPSTREAM"]);
        for port in &report.ports {
            let upstream = match (&port.error, &port.upstream, &port.down) {
                (Some(error), _, _) => format!("not listening: {error}"),
                (None, Some(upstream), _) => upstream.clone(),
                (None, None, Some(down)) => format!("down: {down}"),
                (None, None, None) => "down".to_owned(),
            };
            ports.add_row([
                format!("{} {}", port.protocol, port.address),
                format!("{} ({})", port.process, port.service),
                port.node.to_string(),
                upstream,
            ]);
        }
        out.push_str(&format!("\n{ports}"));
    }
    out
}

/// How long until `not_after` (seconds since the epoch) from `now`: `89d23h left`,
/// `40s left`, `expired`.
fn expiry(not_after: u64, now: u64) -> String {
    match not_after.saturating_sub(now) {
        0 => "expired".to_owned(),
        left => format!("{} left", duration(left)),
    }
}

/// `12.3 MiB`.
pub fn bytes(n: u64) -> String {
    if n == 0 {
        return "-".into();
    }
    let mib = n as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.1} MiB")
    }
}

/// `42s`, `3m12s`, `2h05m`, `3d04h`.
pub fn duration(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// The plan, one line per service: `+ create`, `~ update (fields)`, `= keep`.
pub fn plan(changes: &[Change], colour: bool) -> String {
    let paint = |code: &str, text: String| {
        if colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text
        }
    };
    let mut out = String::new();
    let (mut create, mut update, mut keep, mut delete, mut moving) = (0, 0, 0, 0, 0);
    for change in changes {
        let line = match change {
            Change::Create { service } => {
                create += 1;
                paint("32", format!("+ create  {service}"))
            }
            Change::Update { service, fields } => {
                update += 1;
                paint(
                    "33",
                    format!("~ update  {service} ({} changed)", fields.join(", ")),
                )
            }
            Change::Keep { service } => {
                keep += 1;
                format!("  keep    {service}")
            }
            Change::Delete { service } => {
                delete += 1;
                paint("31", format!("- delete  {service}"))
            }
            Change::Move { service, from } => {
                moving += 1;
                paint(
                    "36",
                    format!("> move    {service} (off {from}: its pins no longer allow it)"),
                )
            }
        };
        out.push_str(&line);
        out.push('\n');
    }
    let mut extra = String::new();
    if moving > 0 {
        extra.push_str(&format!(", {moving} to move"));
    }
    if delete > 0 {
        extra.push_str(&format!(", {delete} to delete"));
    }
    out.push_str(&format!(
        "\nPlan: {create} to create, {update} to update{extra}, {keep} unchanged.\n"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn how_a_node_is_reached_reads_well() {
        use p2f_core::wire::{LinkInfo, NodeStatus, Reach};
        let node = |reach, link| NodeStatus {
            node: p2f_model::Node::named(p2f_model::NodeName::from_static("nas")),
            alive: true,
            incarnation: 1,
            processes: 0,
            memory_available: None,
            reach,
            link,
        };
        let up = |rtt_us| LinkInfo {
            linked: true,
            since_ms: 10,
            rtt_us,
        };
        let down = LinkInfo {
            linked: false,
            since_ms: 0,
            rtt_us: None,
        };
        let cases = [
            (node(Reach::Direct, None), "direct"),
            (node(Reach::Root, None), "via root"),
            (
                node(Reach::Root, Some(up(Some(420)))),
                "via root, linked, rtt 0.4 ms",
            ),
            (node(Reach::Root, Some(up(None))), "via root, linked"),
            (node(Reach::Root, Some(down)), "via root, link down"),
        ];
        for (status, expected) in cases {
            assert_eq!(reached(&status), expected);
        }
    }

    #[test]
    fn durations_and_sizes_read_well() {
        let cases = [
            (0, "0s"),
            (59, "59s"),
            (61, "1m01s"),
            (3_700, "1h01m"),
            (90_000, "1d01h"),
        ];
        for (s, want) in cases {
            assert_eq!(duration(s), want);
        }
        assert_eq!(bytes(0), "-");
        assert_eq!(bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(bytes(2 * 1024 * 1024 * 1024), "2.0 GiB");
    }

    #[test]
    fn routes_show_the_certificate_and_why_there_is_none() {
        use p2f_core::wire::{CertificateInfo, RouteInfo, RoutesReport};
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let route = |domain: &str, certificate, certificate_error: Option<&str>| RouteInfo {
            domain: domain.into(),
            process: p2f_model::ProcessId::new("wiki-1").expect("id"),
            service: "wiki".into(),
            node: p2f_model::NodeName::from_static("pi"),
            generation: 1,
            upstream: Some("agent pi → 127.0.0.1:8080".into()),
            down: None,
            certificate,
            certificate_error: certificate_error.map(str::to_owned),
            last_error: None,
        };
        let report = RoutesReport {
            ports: Vec::new(),
            http: "0.0.0.0:80".into(),
            https: "0.0.0.0:443".into(),
            routes: vec![
                route(
                    "a.example.org",
                    Some(CertificateInfo {
                        issuer: "ACME: R11".into(),
                        not_after: now + 100,
                    }),
                    None,
                ),
                route("b.example.org", None, Some("being ordered")),
            ],
        };
        let table = routes_table(&report);
        assert!(table.contains("ACME: R11, 1m"), "{table}");
        assert!(table.contains("none; error: being ordered"), "{table}");
        assert_eq!(expiry(now, now), "expired");
        assert_eq!(expiry(now + 90_000, now), "1d01h left");
    }

    #[test]
    fn the_plan_counts_its_changes() {
        let changes = [
            Change::Create {
                service: "wiki".into(),
            },
            Change::Update {
                service: "tube".into(),
                fields: vec!["start", "env"],
            },
            Change::Keep {
                service: "backup".into(),
            },
            Change::Delete {
                service: "old".into(),
            },
            Change::Move {
                service: "db".into(),
                from: "pi".into(),
            },
        ];
        assert_eq!(
            plan(&changes, false),
            "+ create  wiki\n~ update  tube (start, env changed)\n  keep    backup\n- delete  old\n> move    db (off pi: its pins no longer allow it)\n\nPlan: 1 to create, 1 to update, 1 to move, 1 to delete, 1 unchanged.\n"
        );
    }
}
