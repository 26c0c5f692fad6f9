//! The validation rules at run time, on deployments that arrive as JSON or from the builder:
//! the same functions the macro runs, so the same findings (the compile-fail cases in
//! `tests/ui` show the compile-time side).

use p2f::model::validate::{self, Rule};
use p2f::model::{Deployment, Health, NodeName, ProcessSpec, Protocol, PublicPort, RestartPolicy};
use serde_json::{Value, json};

/// Parses `deployment` as JSON, validates it, and compares (rule, path) of every finding.
fn check(deployment: Value, expected: &[(Rule, &str)]) {
    let d: Deployment = match serde_json::from_value(deployment.clone()) {
        Ok(d) => d,
        Err(e) => panic!("{deployment} does not parse: {e}"),
    };
    let got: Vec<(Rule, String)> = validate::deployment(&d)
        .iter()
        .map(|f| (f.rule, f.path(&d)))
        .collect();
    let want: Vec<(Rule, String)> = expected
        .iter()
        .map(|(r, p)| (*r, (*p).to_owned()))
        .collect();
    assert_eq!(got, want, "{deployment}");
    assert_eq!(d.validate().is_ok(), expected.is_empty());
}

fn svc(name: &str, extra: Value) -> Value {
    let mut spec = json!({ "name": name, "start": "sleep 60" });
    if let (Some(obj), Some(more)) = (spec.as_object_mut(), extra.as_object()) {
        obj.extend(more.clone());
    }
    spec
}

#[test]
fn valid_deployments_have_no_findings() {
    check(
        json!({ "services": [svc("wiki", json!({ "port": 8080, "domain": "wiki.home.arpa" }))] }),
        &[],
    );
    check(
        json!({
            "nodes": ["laptop", "pi"],
            "services": [
                svc("a", json!({ "port": 80, "pin": ["laptop"] })),
                svc("b", json!({ "port": 80, "pin": ["pi"], "after": ["a"] })),
                svc("c", json!({ "env": { "MODE": "home", "_X1": "y" }, "grace": "500ms", "restart": "Always" })),
            ]
        }),
        &[],
    );
}

#[test]
fn each_rule_reports_where() {
    use Rule::*;
    check(
        json!({ "services": [svc("a", json!({ "port": 0 }))] }),
        &[(PortOutOfRange, "services.a.port")],
    );
    check(
        json!({ "services": [svc("a", json!({ "start": "  " }))] }),
        &[(MissingStart, "services.a.start")],
    );
    check(
        json!({ "services": [svc("a", json!({})), svc("a", json!({}))] }),
        &[(DuplicateService, "services.a")],
    );
    check(
        json!({ "services": [svc("9a", json!({}))] }),
        &[(InvalidServiceName, "services.9a")],
    );
    check(
        json!({ "services": [svc("a", json!({ "port": 1, "domain": "x.org" })), svc("b", json!({ "port": 2, "domain": "X.org" }))] }),
        &[(DuplicateDomain, "services.b.domain")],
    );
    for bad in [
        "-a.org",
        "a..org",
        "a_b.org",
        &format!("{}.org", "x".repeat(64)),
        "",
    ] {
        check(
            json!({ "services": [svc("a", json!({ "port": 1, "domain": bad }))] }),
            &[(InvalidDomain, "services.a.domain")],
        );
    }
    check(
        json!({ "services": [svc("a", json!({ "domain": "a.org" }))] }),
        &[(DomainWithoutPort, "services.a.domain")],
    );
    check(
        json!({ "nodes": ["laptop"], "services": [svc("a", json!({ "pin": ["laptop", "lpatop"] }))] }),
        &[(UnknownPin, "services.a.pin[1]")],
    );
    check(
        json!({ "nodes": ["pi", "pi"], "services": [svc("a", json!({}))] }),
        &[(DuplicateNode, "nodes[1]")],
    );
    check(
        json!({ "services": [svc("a", json!({ "after": ["b"] }))] }),
        &[(UnknownAfter, "services.a.after[0]")],
    );
    check(
        json!({ "services": [svc("a", json!({ "after": ["b"] })), svc("b", json!({ "after": ["c"] })), svc("c", json!({ "after": ["a"] }))] }),
        &[(AfterCycle, "services.c.after[0]")],
    );
    check(
        json!({ "services": [svc("a", json!({ "after": ["a"] }))] }),
        &[(AfterCycle, "services.a.after[0]")],
    );
    check(
        json!({ "services": [svc("a", json!({ "port": 80 })), svc("b", json!({ "port": 80, "pin": ["pi"] }))] }),
        &[(PortConflict, "services.b.port")],
    );
    check(
        json!({ "services": [svc("a", json!({ "port": 80, "pin": ["pi", "nas"] })), svc("b", json!({ "port": 80, "pin": ["nas"] }))] }),
        &[(PortConflict, "services.b.port")],
    );
    check(
        json!({ "services": [svc("a", json!({ "env": { "1X": "y", "PORT": "1", "OK": "x" } }))] }),
        &[
            (InvalidEnvName, "services.a.env[0]"),
            (InvalidEnvName, "services.a.env[2]"),
        ],
    );
    check(
        json!({ "services": [svc("a", json!({ "strategy": { "Script": "deploy/a.sh" } }))] }),
        &[(MissingFile, "services.a.strategy")],
    );
    check(
        json!({ "services": [svc("a", json!({ "strategy": { "Nix": "./flake" } }))] }),
        &[(MissingFile, "services.a.strategy")],
    );
    check(
        json!({ "services": [svc("a", json!({ "public": [{ "protocol": "tcp", "public": 0 }] }))] }),
        &[(PortOutOfRange, "services.a.public[0]")],
    );
    check(
        json!({ "services": [svc("a", json!({ "public": [{ "protocol": "udp", "public": 7, "target": 0 }] }))] }),
        &[(PortOutOfRange, "services.a.public[0]")],
    );
    check(
        json!({ "services": [
            svc("a", json!({ "public": [{ "protocol": "tcp", "public": 25565 }] })),
            svc("b", json!({ "public": [{ "protocol": "udp", "public": 25565 }, { "protocol": "tcp", "public": 25565, "target": 25566 }] })),
        ] }),
        &[(DuplicatePublicPort, "services.b.public[1]")],
    );
    check(
        json!({ "services": [svc("a", json!({ "public": [
            { "protocol": "tcp", "public": 2222, "target": 22 },
            { "protocol": "tcp", "public": 2222, "target": 23 },
        ] }))] }),
        &[(DuplicatePublicPort, "services.a.public[1]")],
    );
    check(
        json!({ "services": [svc("a", json!({ "public": [
            { "protocol": "udp", "public": 443 },
            { "protocol": "tcp", "public": 443 },
            { "protocol": "tcp", "public": 80, "target": 8080 },
        ] }))] }),
        &[
            (ReservedPublicPort, "services.a.public[1]"),
            (ReservedPublicPort, "services.a.public[2]"),
        ],
    );
    // A Nix installable that is not a local path needs no bundle.
    check(
        json!({ "services": [svc("a", json!({ "strategy": { "Nix": "nixpkgs#hello" } }))] }),
        &[],
    );
}

/// Public ports are forwarded by the root from any node, so neither `port` nor `pin` limits
/// them: the target may differ from `port`, a worker may have some, pins do not separate them.
#[test]
fn public_ports_are_the_roots_and_claimed_once() {
    use Rule::*;
    let tcp =
        |public: u16, target: u16| json!({ "protocol": "tcp", "public": public, "target": target });
    check(
        json!({ "services": [
            svc("mc", json!({ "port": 25565, "public": [tcp(25565, 25565), { "protocol": "udp", "public": 25565 }, { "protocol": "udp", "public": 19132 }] })),
            svc("ssh", json!({ "public": [tcp(8022, 22)] })),
            svc("web", json!({ "port": 8080, "domain": "web.home.arpa", "public": [tcp(8443, 8080)] })),
        ] }),
        &[],
    );
    check(
        json!({
            "nodes": ["pi", "nas"],
            "services": [
                svc("a", json!({ "pin": ["pi"], "public": [tcp(2222, 22)] })),
                svc("b", json!({ "pin": ["nas"], "public": [tcp(2222, 22)] })),
            ]
        }),
        &[(DuplicatePublicPort, "services.b.public[0]")],
    );
    // A second claim names the service of the first, and how to keep the target.
    let d: Deployment = serde_json::from_value(json!({ "services": [
        svc("mc", json!({ "public": [tcp(25565, 25565)] })),
        svc("mc2", json!({ "public": [tcp(25565, 25565)] })),
    ] }))
    .expect("valid json");
    let findings = validate::deployment(&d);
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(
        findings[0].message,
        "public TCP port 25565 is already claimed by service `mc`"
    );
    assert_eq!(
        findings[0].help.as_deref(),
        Some(
            "pick another public port; `Tcp(PUBLIC => 25565)` still reaches port 25565 of the process"
        )
    );
    // The ingress's default ports are refused at compile time and by `validate`.
    let web = ProcessSpec::new("web", "sleep 60").with_public([PublicPort::tcp(443)]);
    let err = web.validate().expect_err("443 is the ingress's");
    assert!(
        err.to_string().contains(
            "services.web.public[0]: public TCP port 443 is the root's own: the ingress (HTTPS) listens there; serve the service with `domain: \"..\"`"
        ),
        "{err}"
    );
    let twice = ProcessSpec::new("vpn", "sleep 60")
        .with_public([PublicPort::udp(51820), PublicPort::udp(51820)]);
    assert_eq!(
        twice
            .validate()
            .expect_err("claimed twice")
            .findings
            .iter()
            .map(|(path, f)| (f.rule, path.as_str()))
            .collect::<Vec<_>>(),
        [(DuplicatePublicPort, "services.vpn.public[1]")]
    );
}

/// The root checks a deployment against the ports it really holds, which its configuration
/// may have moved away from 80 and 443.
#[test]
fn public_port_clashes_checks_the_ports_given() {
    let d = Deployment::owned(
        Vec::new(),
        vec![
            ProcessSpec::new("a", "sleep 60").with_public([
                PublicPort::tcp(8443),
                PublicPort::udp(8443),
                PublicPort::tcp(443),
            ]),
            ProcessSpec::new("b", "sleep 60").with_public([PublicPort::new(
                Protocol::Udp,
                7946,
                9000,
            )]),
        ],
    );
    let reserved = [
        (Protocol::Tcp, 8080, "the ingress (HTTP)"),
        (Protocol::Tcp, 8443, "the ingress (HTTPS)"),
        (Protocol::Udp, 7946, "the mesh"),
    ];
    let found: Vec<(Rule, String, String)> = validate::public_port_clashes(&d, &reserved)
        .into_iter()
        .map(|f| (f.rule, f.path(&d), f.message))
        .collect();
    assert_eq!(
        found,
        [
            (
                Rule::ReservedPublicPort,
                "services.a.public[0]".to_owned(),
                "public TCP port 8443 is the root's own: the ingress (HTTPS) listens there"
                    .to_owned()
            ),
            (
                Rule::ReservedPublicPort,
                "services.b.public[0]".to_owned(),
                "public UDP port 7946 is the root's own: the mesh listens there".to_owned()
            ),
        ]
    );
    assert!(validate::public_port_clashes(&d, &[]).is_empty());
    // `validate::deployment` holds the defaults, whatever the root's configuration says.
    let defaults: Vec<String> = validate::public_port_clashes(&d, &validate::INGRESS_PORTS)
        .iter()
        .map(|f| f.path(&d))
        .collect();
    assert_eq!(defaults, ["services.a.public[2]"]);
}

#[test]
fn every_finding_is_reported_at_once() {
    use Rule::*;
    check(
        json!({
            "nodes": ["pi"],
            "services": [
                svc("a", json!({ "port": 0, "domain": "bad_name", "pin": ["nas"], "after": ["zz"] })),
                svc("a", json!({ "env": { "P2F_NODE": "x" } })),
            ]
        }),
        &[
            (PortOutOfRange, "services.a.port"),
            (InvalidDomain, "services.a.domain"),
            (UnknownPin, "services.a.pin[0]"),
            (InvalidEnvName, "services.a.env[0]"),
            (DuplicateService, "services.a"),
            (UnknownAfter, "services.a.after[0]"),
        ],
    );
}

#[test]
fn hints_name_the_closest_candidate() {
    assert_eq!(
        validate::did_you_mean("prot", ["port", "pin"]).as_deref(),
        Some("did you mean `port`?")
    );
    assert_eq!(validate::did_you_mean("zzzz", ["port", "pin"]), None);
    let finding = validate::unknown_field("domian", 0);
    assert_eq!(finding.help.as_deref(), Some("did you mean `domain`?"));
    let d: Deployment = serde_json::from_value(
        json!({ "services": [svc("wiki", json!({})), svc("b", json!({ "after": ["wkii"] }))] }),
    )
    .expect("valid json");
    let findings = validate::deployment(&d);
    assert_eq!(findings[0].help.as_deref(), Some("did you mean `wiki`?"));
}

#[test]
fn malformed_json_specs_are_rejected_with_the_field() {
    let cases = [
        (
            json!({ "services": [svc("a", json!({ "prot": 1 }))] }),
            "prot",
        ),
        (json!({ "services": [{ "name": "a" }] }), "start"),
        (
            json!({ "services": [svc("a", json!({ "port": 70000 }))] }),
            "70000",
        ),
        (
            json!({ "services": [svc("a", json!({ "grace": "10x" }))] }),
            "10x",
        ),
        (
            json!({ "services": [svc("a", json!({ "pin": ["a b"] }))] }),
            "a b",
        ),
        (
            json!({ "services": [svc("a", json!({ "strategy": "Docker" }))] }),
            "Docker",
        ),
        (
            json!({ "services": [svc("a", json!({ "public": [{ "protocol": "sctp", "public": 5 }] }))] }),
            "sctp",
        ),
        (
            json!({ "services": [svc("a", json!({ "public": [{ "protocol": "tcp", "public": 70000 }] }))] }),
            "70000",
        ),
        (
            json!({ "services": [svc("a", json!({ "public": [{ "protocol": "tcp", "port": 22 }] }))] }),
            "`port`",
        ),
        (
            json!({ "services": [svc("a", json!({ "public": [{ "tcp": 22 }] }))] }),
            "`tcp`",
        ),
    ];
    for (value, fragment) in cases {
        let err = serde_json::from_value::<Deployment>(value.clone())
            .expect_err(&value.to_string())
            .to_string();
        assert!(err.contains(fragment), "{value}: {err}");
    }
}

#[test]
fn builder_specs_are_values_and_validate_like_json() -> anyhow::Result<()> {
    let base = ProcessSpec::new("wiki", "python3 -m http.server $PORT");
    let web = base
        .with_port(8080)
        .with_domain("wiki.home.arpa")
        .with_health(Health::Http("/".into()));
    assert_eq!(base.port(), None, "the original is untouched");
    assert_eq!(web.port(), Some(8080));
    assert_eq!(web.health(), Health::Http("/".into()));
    assert_eq!(base.health(), Health::None);
    assert_eq!(base.with_port(1).health(), Health::Tcp);
    let pinned = web
        .with_pin([NodeName::new("pi")?])
        .with_restart(RestartPolicy::Never)
        .with_env("A", "1")
        .with_env("A", "2");
    assert_eq!(pinned.env().len(), 1);
    assert_eq!(pinned.env()[0].value(), "2");
    assert!(pinned.validate().is_ok());
    let broken = web.without_port();
    let err = broken.validate().expect_err("domain without port");
    assert!(
        err.to_string()
            .contains("services.wiki.domain: `domain` needs `port`"),
        "{err}"
    );
    // Serde round-trips the builder's spec.
    let json = serde_json::to_string(&pinned)?;
    assert_eq!(serde_json::from_str::<ProcessSpec>(&json)?, pinned);
    Ok(())
}

/// The content rules at run time: a spec built or sent as JSON with a CRLF or BOM script, or a
/// string no OS can take, gets the same findings the macro gives (`tests/ui/fail/files`,
/// `strings`), so the API answers 422 instead of a failure at start.
#[test]
fn file_content_and_os_strings_are_checked_at_run_time() {
    use p2f::model::{Bundle, BundleFile, Strategy};
    let with_script = |bytes: &[u8]| {
        ProcessSpec::new("wiki", "sleep 60")
            .with_strategy(Strategy::Script("deploy/x.sh".into()))
            .with_bundle(Bundle::owned(vec![BundleFile::owned(
                "deploy/x.sh",
                bytes.to_vec(),
            )]))
    };
    let rules = |spec: ProcessSpec| -> Vec<Rule> {
        validate::deployment(&Deployment::owned(Vec::new(), vec![spec]))
            .iter()
            .map(|f| f.rule)
            .collect()
    };
    assert_eq!(
        rules(with_script(b"#!/bin/sh\r\necho hi\r\n")),
        [Rule::FileContent]
    );
    assert_eq!(
        rules(with_script(b"\xef\xbb\xbf#!/bin/sh\necho hi\n")),
        [Rule::FileContent]
    );
    assert!(rules(with_script(b"#!/bin/bash\n[[ 1 ]]\n")).is_empty());
    let nul = ProcessSpec::new("wiki", "echo \0")
        .with_env("MODE", "a\0b")
        .with_stop("kill \0")
        .with_health(Health::Cmd("true\0".into()));
    assert_eq!(rules(nul), [Rule::NotAnOsString; 4]);
    for user in ["", "a b", "a:b", "a/b"] {
        assert_eq!(
            rules(ProcessSpec::new("wiki", "sleep 60").with_user(user)),
            [Rule::NotAnOsString],
            "user {user:?}"
        );
    }
    assert!(rules(ProcessSpec::new("wiki", "sleep 60").with_user("www-data")).is_empty());
}

/// A script's `#!` line names the program that runs it.
#[test]
fn a_scripts_shebang_names_its_interpreter() {
    use p2f::model::shebang;
    let words = |s: &[&str]| Some(s.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>());
    assert_eq!(shebang(b"#!/bin/bash\necho"), words(&["/bin/bash"]));
    assert_eq!(
        shebang(b"#!/usr/bin/env python3 -u\nprint()"),
        words(&["/usr/bin/env", "python3", "-u"])
    );
    assert_eq!(shebang(b"#! /bin/sh"), words(&["/bin/sh"]));
    assert_eq!(shebang(b"echo no shebang\n"), None);
    assert_eq!(shebang(b"#!\n"), None);
    assert_eq!(shebang(b""), None);
}
