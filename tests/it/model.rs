//! The model as values: `const` deployments, serde round-trips of every record type.

use p2f::model::{
    Event, EventKind, Failure, Field, NodeName, NodeRef, Process, ProcessId, ProcessKey, Protocol,
    Status, Timestamp,
};
use p2f::prelude::*;

const HOME: Deployment = deployment! {
    nodes: [laptop, "pi-4b"],
    service db { start: "sleep 60", port: 5432, pin: ["pi-4b"], grace: 2m }
    service web {
        start: "python3 -m http.server $PORT",
        stop: "kill -INT $PID",
        port: 8080,
        domain: "web.home.arpa",
        after: [db],
        health: Http("/"),
        restart: Always,
        env: { MODE: "home", "WITH_QUOTES": "a \"b\"" },
        user: "www-data",
    }
    service worker { start: "sleep 60", after: [web, db], restart: Never, strategy: Custom("true") }
    service mc { start: "sleep 60", port: 25565, public: [Tcp(25565), Udp(19132), Tcp(8022 => 22)] }
};

#[test]
fn a_const_deployment_is_a_plain_value() {
    let home = &HOME;
    assert_eq!(home.nodes().len(), 2);
    let web = home.service("web").expect("web is declared");
    assert_eq!(web.port(), Some(8080));
    assert_eq!(web.stop(), Some("kill -INT $PID"));
    assert_eq!(web.env()[1].value(), "a \"b\"");
    assert_eq!(web.user(), Some("www-data"));
    assert_eq!(home.service("db").map(|s| s.grace().as_secs()), Some(120));
    assert_eq!(
        home.service("worker").map(|s| s.health()),
        Some(Health::None)
    );
    let mc = home.service("mc").expect("mc is declared");
    assert_eq!(
        mc.public(),
        [
            PublicPort::tcp(25565),
            PublicPort::udp(19132),
            PublicPort::new(Protocol::Tcp, 8022, 22)
        ]
    );
    assert!(home.service("web").is_some_and(|s| s.public().is_empty()));
    let order: Vec<&str> = home.start_order().iter().map(|s| s.name()).collect();
    assert_eq!(order, ["db", "web", "worker", "mc"]);
    assert!(home.validate().is_ok());
}

#[test]
fn deployments_round_trip_through_json() -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(&HOME)?;
    let back: Deployment = serde_json::from_str(&json)?;
    assert_eq!(back, HOME);
    // Defaults are left out of the JSON, and come back as defaults.
    let value: serde_json::Value = serde_json::from_str(&json)?;
    assert!(value["services"][0].get("health").is_none());
    assert_eq!(value["services"][0]["grace"], "2m");
    assert!(value["services"][0].get("public").is_none());
    Ok(())
}

/// A public port is written with all three keys; `target` may be left out when reading.
#[test]
fn public_ports_have_one_json_shape() -> anyhow::Result<()> {
    let mc = HOME.service("mc").expect("mc is declared").clone();
    let value = serde_json::to_value(&mc)?;
    assert_eq!(
        value["public"],
        serde_json::json!([
            { "protocol": "tcp", "public": 25565, "target": 25565 },
            { "protocol": "udp", "public": 19132, "target": 19132 },
            { "protocol": "tcp", "public": 8022, "target": 22 },
        ])
    );
    assert_eq!(serde_json::from_value::<ProcessSpec>(value)?, mc);
    let short: PublicPort = serde_json::from_str(r#"{"protocol":"udp","public":51820}"#)?;
    assert_eq!(short, PublicPort::udp(51820));
    assert_eq!(short.to_string(), "Udp(51820)");
    assert_eq!(mc.public()[2].to_string(), "Tcp(8022 => 22)");
    // A spec written before public ports existed still reads, with none.
    let old: ProcessSpec = serde_json::from_str(r#"{"name":"a","start":"sleep 60"}"#)?;
    assert!(old.public().is_empty());
    // The plan sees a change of public ports, and only that.
    let moved = mc.with_public([PublicPort::tcp(25566)]);
    assert_eq!(mc.changed_fields(&moved), [Field::Public]);
    assert!(mc.changed_fields(&mc.clone()).is_empty());
    Ok(())
}

#[test]
fn process_records_round_trip_in_every_status() -> anyhow::Result<()> {
    let spec = HOME.services()[1].clone();
    let node = NodeRef {
        name: NodeName::new("laptop")?,
        address: "127.0.0.1".into(),
    };
    let mut p = Process::placed(
        ProcessId::for_service("web", 7),
        1,
        spec,
        node,
        Timestamp(1),
    );
    let statuses = [
        Status::Pending,
        Status::Deploying,
        Status::Running,
        Status::Stopping,
        Status::Stopped,
        Status::Lost,
        Status::Failed(Failure::HealthCheckFailed {
            check: "Http(\"/\")".into(),
            detail: "503".into(),
        }),
        Status::Failed(Failure::NoAllowedNode {
            pins: vec![NodeName::new("pi-4b")?],
            rejected: Vec::new(),
        }),
        Status::Failed(Failure::DeployFailed {
            exit: None,
            stderr_tail: "x".into(),
        }),
    ];
    for status in statuses {
        p.status = status.clone();
        p.record(
            Timestamp(2),
            EventKind::Exited {
                failure: Failure::Killed { signal: 9 },
            },
        );
        p.record(
            Timestamp(3),
            EventKind::Moved {
                from: NodeName::new("pi-4b")?,
                to: NodeName::new("laptop")?,
            },
        );
        let json = serde_json::to_string(&p)?;
        let back: Process = serde_json::from_str(&json)?;
        assert_eq!(back, p, "{status}");
        assert_eq!(back.is_running(), status == Status::Running);
    }
    assert!(p.matches(&ProcessKey::Domain("WEB.home.arpa".into())));
    assert!(p.matches(&ProcessKey::Id(ProcessId::for_service("web", 7))));
    let event: Event = serde_json::from_str(r#"{"at":5,"kind":"Started","pid":42}"#)?;
    assert_eq!(event.kind, EventKind::Started { pid: 42 });
    assert!(serde_json::from_str::<Process>(r#"{"id":"x"}"#).is_err());
    Ok(())
}
