//! P2PRC compatibility: every sample in `tests/fixtures/p2prc/` parses, writing gives the
//! current format, unknown fields are ignored, and a broken file names the broken field.

use std::path::PathBuf;

use anyhow::Context as _;
use p2f::model::{IpTable, MapPortResponse, Node, NodeName, P2fNodeInfo, P2prcConfig, ServerInfo};
use serde_json::{Value, json};

fn samples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/p2prc")
}

fn read(name: &str) -> anyhow::Result<String> {
    let path = samples().join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

fn table(name: &str) -> anyhow::Result<IpTable> {
    Ok(serde_json::from_str(&read(name)?)?)
}

#[test]
fn every_sample_file_parses() -> anyhow::Result<()> {
    let mut seen = 0;
    for entry in std::fs::read_dir(samples())? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if name == "README.md" {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let parsed: Result<(), serde_json::Error> = if name.starts_with("ip_table") {
            serde_json::from_str::<IpTable>(&text).map(drop)
        } else if name == "config.json" {
            serde_json::from_str::<P2prcConfig>(&text).map(drop)
        } else if name == "server_info.json" {
            serde_json::from_str::<ServerInfo>(&text).map(drop)
        } else if name == "map_port_response.json" {
            serde_json::from_str::<MapPortResponse>(&text).map(drop)
        } else {
            anyhow::bail!("sample {name} has no reader: add one to this test");
        };
        parsed.with_context(|| format!("parsing {name}"))?;
        seen += 1;
    }
    assert!(seen >= 6, "expected every sample, saw {seen}");
    Ok(())
}

#[test]
fn historical_formats_read_leniently() -> anyhow::Result<()> {
    let legacy = table("ip_table.legacy-2023.json")?;
    assert_eq!(legacy.ip_address.len(), 1);
    let root = &legacy.ip_address[0];
    assert_eq!(root.name.as_str(), "bootstrap");
    assert_eq!(root.ipv4, Some("192.0.2.61".parse()?));
    assert_eq!(root.server_port, Some(8090));
    assert!(!root.nat, "\"False\" is false");
    assert_eq!(
        root.custom_information, "",
        "null custom information is empty"
    );

    let strings = table("ip_table.2024-strings.json")?;
    let attic = &strings.ip_address[1];
    assert_eq!(attic.name.as_str(), "attic-box-Jm3sV9e");
    assert_eq!(attic.bare_metal_ssh_port, Some(47121));
    assert!(strings.ip_address[0].proxy_server, "\"True\" is true");
    assert!(!attic.proxy_server, "\"False\" is false");
    assert_eq!(attic.latency.as_nanos(), 31_250_000);
    assert_eq!(attic.custom_information, "under the stairs");
    assert_eq!(attic.p2f_info(), None);

    let current = table("ip_table.current.json")?;
    let pi = &current.ip_address[2];
    assert_eq!(pi.ipv6, Some("2001:db8:7:1::9".parse()?));
    assert_eq!(pi.ipv4, None);
    assert!(pi.unsafe_mode);
    assert_eq!(pi.api_address().as_deref(), Some("[2001:db8:7:1::9]:7440"));
    let laptop = &current.ip_address[1];
    assert!(laptop.public_key.ends_with(" sam@den-laptop\n"));
    Ok(())
}

#[test]
fn writing_gives_the_current_format() -> anyhow::Result<()> {
    // The current sample survives a read and a write unchanged, field for field.
    let original: Value = serde_json::from_str(&read("ip_table.current.json")?)?;
    let written = serde_json::to_value(table("ip_table.current.json")?)?;
    assert_eq!(written, original);

    // Older formats come out with every current field, typed as the current format types them.
    let keys = |v: &Value| -> Vec<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let current_keys = keys(&original["ip_address"][0]);
    for old in ["ip_table.legacy-2023.json", "ip_table.2024-strings.json"] {
        let written = serde_json::to_value(table(old)?)?;
        for node in written["ip_address"].as_array().into_iter().flatten() {
            assert_eq!(keys(node), current_keys, "{old}");
            assert!(
                node["NAT"].is_boolean() && node["ProxyServer"].is_boolean(),
                "{old}"
            );
            assert!(
                node["ServerPort"].is_string() && node["CustomInformation"].is_string(),
                "{old}"
            );
        }
        let again: IpTable = serde_json::from_value(written)?;
        assert_eq!(again, table(old)?, "{old} round-trips");
    }
    Ok(())
}

#[test]
fn unknown_fields_are_ignored_and_missing_ones_default() -> anyhow::Result<()> {
    let node: Node =
        serde_json::from_value(json!({ "Name": "pi", "Flux": [1, 2], "ServerPort": 8088 }))?;
    assert_eq!(node.name.as_str(), "pi");
    assert_eq!(node.server_port, Some(8088));
    assert_eq!(node.bare_metal_ssh_port, None);
    let table: IpTable = serde_json::from_value(json!({ "ip_address": null, "extra": true }))?;
    assert!(table.ip_address.is_empty());
    Ok(())
}

#[test]
fn a_broken_entry_names_its_field() {
    let cases = [
        (json!({ "Name": "pi", "ServerPort": "http" }), "ServerPort"),
        (
            json!({ "Name": "pi", "BareMetalSSHPort": 70000 }),
            "BareMetalSSHPort",
        ),
        (json!({ "Name": "pi", "NAT": "maybe" }), "NAT"),
        (json!({ "Name": "pi", "IPV4": "300.1.1.1" }), "IPV4"),
        (json!({ "Name": "pi", "Latency": -5 }), "Latency"),
        (json!({ "Name": "no spaces please" }), "Name"),
        (json!({ "IPV4": "1.2.3.4" }), "Name"),
    ];
    for (value, field) in cases {
        let err = serde_json::from_value::<Node>(value.clone())
            .expect_err(&value.to_string())
            .to_string();
        assert!(err.contains(field), "{value}: {err}");
    }
}

#[test]
fn config_defaults_bare_metal_and_unsafe_mode_to_true() -> anyhow::Result<()> {
    let sample: P2prcConfig = serde_json::from_str(&read("config.json")?)?;
    assert_eq!(sample.machine_name, "den-laptop-Rb4wQ8t");
    assert_eq!(sample.server_port, "8089");
    assert!(sample.behind_nat && sample.bare_metal && sample.unsafe_mode);
    let empty: P2prcConfig = serde_json::from_str("{}")?;
    assert!(empty.bare_metal && empty.unsafe_mode);
    assert_eq!(empty, P2prcConfig::default());
    let off: P2prcConfig =
        serde_json::from_value(json!({ "BareMetal": false, "UnsafeMode": false }))?;
    assert!(!off.bare_metal && !off.unsafe_mode);
    Ok(())
}

#[test]
fn p2f_facts_ride_in_custom_information() -> anyhow::Result<()> {
    let info = P2fNodeInfo {
        api: Some("127.0.0.2:7300".into()),
        version: Some("0.1.0".into()),
        role: Some(p2f::model::NodeRole::Member),
    };
    let plain = Node::named(NodeName::new("laptop")?);
    assert_eq!(plain.with_p2f_info(&info).p2f_info(), Some(info.clone()));
    // Text that was there before is kept, not lost.
    let noted = Node {
        custom_information: "hello".into(),
        ..plain.clone()
    }
    .with_p2f_info(&info);
    let value: Value = serde_json::from_str(&noted.custom_information)?;
    assert_eq!(value["text"], "hello");
    assert_eq!(noted.api_address().as_deref(), Some("127.0.0.2:7300"));
    // Other keys of a JSON object are kept.
    let other = Node {
        custom_information: r#"{"gpu":"none"}"#.into(),
        ..plain
    }
    .with_p2f_info(&info);
    let value: Value = serde_json::from_str(&other.custom_information)?;
    assert_eq!(value["gpu"], "none");
    Ok(())
}

#[test]
fn responses_parse() -> anyhow::Result<()> {
    let info: ServerInfo = serde_json::from_str(&read("server_info.json")?)?;
    assert_eq!((info.hostname.as_str(), info.ram), ("den-laptop", 15731));
    let mapped: MapPortResponse = serde_json::from_str(&read("map_port_response.json")?)?;
    assert_eq!(mapped.entire_address, "203.0.113.17:52417");
    assert_eq!(mapped.port_no, "52417");
    Ok(())
}

#[test]
fn one_odd_entry_does_not_spoil_the_table() -> anyhow::Result<()> {
    let mixed = table("ip_table.mixed-entries.json")?;
    let names: Vec<&str> = mixed.ip_address.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "garage-nuc-Tp7wK2d",
            "kitchen-pi-Vb5nE1q",
            "study-desk-Hc8rM3x"
        ]
    );
    // Strings for booleans, latency and ports; a port as a number.
    let garage = &mixed.ip_address[0];
    assert!(garage.nat && !garage.proxy_server && garage.unsafe_mode);
    assert_eq!(
        (garage.server_port, garage.bare_metal_ssh_port),
        (Some(8088), Some(2222))
    );
    assert_eq!(garage.latency.as_nanos(), 4_100_000);
    // Lower-case keys.
    let pi = &mixed.ip_address[1];
    assert_eq!(pi.machine_username, "pi");
    assert_eq!(pi.ipv4, Some("198.51.100.25".parse()?));
    assert_eq!(
        (pi.server_port, pi.bare_metal_ssh_port),
        (Some(8090), Some(22))
    );
    assert!(pi.proxy_server);
    // The name P2F cannot use: left out, named, with why.
    assert_eq!(mixed.skipped.len(), 1);
    let skipped = &mixed.skipped[0];
    assert_eq!(
        (skipped.index, skipped.name.as_deref()),
        (1, Some("node 3"))
    );
    assert!(skipped.to_string().contains("\"node 3\""), "{skipped}");
    assert!(skipped.reason.contains("Name"), "{skipped}");
    // Written back in the current format, without the left-out entry.
    let again: IpTable = serde_json::from_value(serde_json::to_value(&mixed)?)?;
    assert_eq!(again.ip_address, mixed.ip_address);
    assert!(again.skipped.is_empty());
    Ok(())
}

#[test]
fn a_table_that_is_not_a_table_is_an_error() {
    for text in [
        r#"{"ip_address": 5}"#,
        r#"{"ip_address": "x"}"#,
        "[1, 2]",
        "garbage",
    ] {
        assert!(serde_json::from_str::<IpTable>(text).is_err(), "{text}");
    }
    // Entries that are not objects are left out one by one.
    let table: IpTable =
        serde_json::from_str(r#"{"IP_Address": [7, {"Name": "pi"}, null]}"#).expect("lenient");
    assert_eq!(table.ip_address.len(), 1);
    assert_eq!(
        table.skipped.iter().map(|s| s.index).collect::<Vec<_>>(),
        [0, 2]
    );
}
