//! P2PRC on the wire (issue 15): a P2F node with `[p2prc] listen` answers P2PRC's
//! `GET /server_info` and `POST /IpTable` as a P2PRC client sends them (real `curl -F`), with
//! every sample table; bad input gets a clear 4xx and changes nothing; what a table says never
//! makes a member, and its peers are listed apart. Also `p2f p2prc import`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use p2f::model::IpTable;
use p2f_testkit::procs::require;
use p2f_testkit::{p2f_bin, service_port};
use serde_json::Value;

use crate::support::agent;

fn samples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/p2prc")
}

/// An answer: status and body.
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }
}

/// `curl ARGS URL`, its status and body (within 30 s).
fn curl(url: &str, args: &[&str]) -> Result<Answer> {
    require("curl", "curl")?;
    let output = Command::new("curl")
        .args(["-sS", "-m", "30", "-w", "\n@@%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .context("run curl")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let Some((body, code)) = stdout.rsplit_once("\n@@") else {
        bail!(
            "curl gave no status: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    Ok(Answer {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
    })
}

/// Posts `file` as P2PRC does: `curl -F json=@FILE http://HOST:PORT/IpTable`.
fn post_table(at: SocketAddr, file: &Path) -> Result<Answer> {
    let part = format!("json=@{}", file.display());
    curl(&format!("http://{at}/IpTable"), &["-F", &part])
}

fn names(table: &Value) -> Vec<String> {
    table["ip_address"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["Name"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2prc_clients_see_a_p2prc_node() -> Result<()> {
    let port = service_port();
    let at: SocketAddr = ([127, 0, 0, 1], port).into();
    let scratch = tempfile::tempdir()?;
    let keys = scratch.path().join("authorized_keys");
    let root = agent("wire-root")
        .configure(move |config| {
            config.p2prc = Some(p2f::core::p2prc::P2prcSettings {
                listen: Some(at),
                authorized_keys: Some(keys),
                ..Default::default()
            });
        })
        .init()?
        .started()
        .await?;

    // GET /server_info: P2PRC's field set, in its units.
    let info = curl(&format!("http://{at}/server_info"), &[])?;
    assert_eq!(info.status, 200, "{}", info.body);
    let info = info.json()?;
    let mut keys: Vec<&str> = info
        .as_object()
        .context("an object")?
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(keys, ["CPU", "Disk", "GPU", "Hostname", "Platform", "RAM"]);
    assert!(info["RAM"].as_u64().unwrap_or(0) > 0, "{info}");
    let decoded: p2f::model::ServerInfo = serde_json::from_value(info)?;
    assert!(!decoded.hostname.is_empty());

    // Every sample table, as P2PRC posts it: the answer is the merged table, this node first.
    let mut learned = Vec::new();
    for sample in [
        "ip_table.current.json",
        "ip_table.2024-strings.json",
        "ip_table.legacy-2023.json",
        "ip_table.mixed-entries.json",
    ] {
        let answer = post_table(at, &samples().join(sample))?;
        assert_eq!(answer.status, 200, "{sample}: {}", answer.body);
        let table = answer.json()?;
        let sent: IpTable =
            serde_json::from_str(&std::fs::read_to_string(samples().join(sample))?)?;
        learned.extend(sent.ip_address.iter().map(|n| n.name.to_string()));
        let got = names(&table);
        assert_eq!(
            got.first().map(String::as_str),
            Some("wire-root"),
            "{sample}"
        );
        for name in &learned {
            assert!(got.contains(name), "{sample}: {name} missing from {got:?}");
        }
        assert!(
            !got.iter().any(|n| n == "node 3"),
            "an unusable name is left out"
        );
        // The current format, the root's own entry filled in.
        let own = &table["ip_address"][0];
        assert_eq!(own["ServerPort"], port.to_string());
        assert_eq!(own["ProxyServer"], true, "the root runs the domain proxy");
        assert_eq!(own["UnSafeMode"], true);
        assert_eq!(own["BareMetalSSHPort"], "22");
        assert!(
            own["PublicKey"]
                .as_str()
                .is_some_and(|k| k.starts_with("ssh-ed25519 "))
        );
        let facts: Value = serde_json::from_str(own["CustomInformation"].as_str().unwrap_or(""))?;
        assert_eq!(facts["p2f"]["role"], "root");
        let parsed: IpTable = serde_json::from_value(table)?;
        assert!(parsed.skipped.is_empty());
    }
    learned.sort();
    learned.dedup();
    let peers = || async {
        let mut names: Vec<String> = root
            .network()
            .p2prc_peers()
            .await?
            .into_iter()
            .map(|p| p.node.name.to_string())
            .collect();
        names.sort();
        anyhow::Ok(names)
    };
    assert_eq!(peers().await?, learned);
    // `p2f nodes` lists them apart from the members; `p2f p2prc peers` alone.
    let cli = |args: &[&str]| -> Result<String> {
        let out = Command::new(p2f_bin()?)
            .args(args)
            .arg("--config")
            .arg(root.config_path())
            .env_remove("P2F_OPERATOR")
            .output()?;
        anyhow::ensure!(out.status.success(), "p2f {args:?}: {out:?}");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let listed = cli(&["nodes"])?;
    let (members, apart) = listed
        .split_once("P2PRC peers (known, not members")
        .context("peers listed apart")?;
    assert!(
        members.contains("wire-root") && !members.contains("kitchen-pi-Vb5nE1q"),
        "{listed}"
    );
    assert!(
        apart.contains("kitchen-pi-Vb5nE1q") && apart.contains("posted by 127.0.0.1"),
        "{listed}"
    );
    let json: Value = serde_json::from_str(&cli(&["p2prc", "peers", "--json"])?)?;
    assert_eq!(json.as_array().map(Vec::len), Some(learned.len()));

    // A table naming the root is not believed about it: no member, no peer, no change.
    let forged = scratch.path().join("forged.json");
    std::fs::write(
        &forged,
        r#"{"ip_address":[{"Name":"wire-root","IPV4":"203.0.113.66","ServerPort":"1"}]}"#,
    )?;
    let answer = post_table(at, &forged)?;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()?["ip_address"][0]["IPV4"], "127.0.0.1");
    let nodes = root.network().nodes().await?;
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(peers().await?, learned);

    // Bad input: a clear one-line JSON error, nothing stored.
    let garbage = scratch.path().join("garbage.json");
    std::fs::write(&garbage, "{\"ip_address\": [ this is not json")?;
    let huge = scratch.path().join("huge.json");
    std::fs::File::create(&huge)?.set_len(100 << 20)?;
    let many = scratch.path().join("many.json");
    let entries: Vec<String> = (0..10_000)
        .map(|i| format!("{{\"Name\":\"n{i}\"}}"))
        .collect();
    std::fs::write(&many, format!("{{\"ip_address\":[{}]}}", entries.join(",")))?;
    let url = format!("http://{at}/IpTable");
    let form = |file: &Path| format!("json=@{}", file.display());
    let cases: Vec<(&str, Vec<String>, u16, &str)> = vec![
        ("garbage JSON", vec!["-F".into(), form(&garbage)], 400, "not an IP table"),
        (
            "a 100 MB table",
            vec!["-F".into(), form(&huge)],
            413,
            "larger than",
        ),
        ("10 000 entries", vec!["-F".into(), form(&many)], 413, "at most"),
        (
            "no file name",
            vec!["-F".into(), "json={\"ip_address\":[]}".into()],
            400,
            "file name",
        ),
        (
            "another part",
            vec!["-F".into(), format!("table=@{}", samples().join("ip_table.current.json").display())],
            400,
            "no file part `json`",
        ),
        ("not multipart", vec!["-d".into(), "x=1".into()], 400, "multipart"),
        (
            "a broken multipart body",
            vec![
                "-H".into(),
                "Content-Type: multipart/form-data; boundary=XYZ".into(),
                "--data-binary".into(),
                "--XYZ\r\nContent-Disposition: form-data; name=\"json\"; filename=\"t\"\r\n\r\n{\"ip_a".into(),
            ],
            400,
            "multipart",
        ),
    ];
    for (what, args, status, says) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let answer = curl(&url, &args)?;
        assert_eq!(answer.status, status, "{what}: {}", answer.body);
        let error = answer.json()?;
        let message = error["error"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{what}: {message}");
        assert!(!answer.body.trim().contains('\n'), "{what}: one line");
    }
    let wrong = curl(&format!("http://{at}/MAPPort?port=1"), &[])?;
    assert_eq!(wrong.status, 404, "{}", wrong.body);
    // The node is unharmed and learned nothing from any of it.
    assert_eq!(curl(&format!("http://{at}/server_info"), &[])?.status, 200);
    assert_eq!(peers().await?, learned);
    assert_eq!(root.network().nodes().await?.len(), 1);
    Ok(())
}

/// Two P2F nodes of different clusters know each other only as P2PRC peers: one learns of the
/// other from a posted table, then their table exchange makes the other learn of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2prc_tables_are_exchanged_with_known_peers() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let mut started = Vec::new();
    for (name, ip) in [("swap-a", "127.0.0.1"), ("swap-b", "127.0.0.1")] {
        let at: SocketAddr = (ip.parse::<std::net::IpAddr>()?, service_port()).into();
        let keys = scratch.path().join(format!("{name}-keys"));
        let node = agent(name)
            .configure(move |config| {
                config.p2prc = Some(p2f::core::p2prc::P2prcSettings {
                    listen: Some(at),
                    authorized_keys: Some(keys),
                    gossip_interval: Duration::from_secs(1),
                    ..Default::default()
                });
            })
            .init()?
            .started()
            .await?;
        started.push((node, at));
    }
    let (a, a_at) = &started[0];
    let (b, b_at) = &started[1];
    // A hears of B from someone's table.
    let table = scratch.path().join("b.json");
    std::fs::write(
        &table,
        format!(
            r#"{{"ip_address":[{{"Name":"swap-b","IPV4":"{}","ServerPort":"{}"}}]}}"#,
            b_at.ip(),
            b_at.port()
        ),
    )?;
    assert_eq!(post_table(*a_at, &table)?.status, 200);
    // B learns A from A's exchange, with A's entry as A writes it.
    let learned = p2f_testkit::eventually(
        "swap-a known to swap-b",
        Duration::from_secs(30),
        || async {
            let peers = b.network().p2prc_peers().await.ok()?;
            peers.into_iter().find(|p| p.node.name.as_str() == "swap-a")
        },
    )
    .await?;
    assert_eq!(learned.node.server_port, Some(a_at.port()));
    assert!(learned.via.starts_with("posted by"), "{}", learned.via);
    // Neither is the other's member.
    assert_eq!(a.network().nodes().await?.len(), 1);
    assert_eq!(b.network().nodes().await?.len(), 1);
    Ok(())
}

/// `p2f p2prc import` with the sample `config.json` and every sample table.
#[test]
fn p2prc_import_takes_a_p2prc_machine() -> Result<()> {
    let home = tempfile::tempdir()?;
    let dir = home.path().join("node");
    let p2f = p2f_bin()?;
    let ok = |args: &[&str]| -> Result<String> {
        let out = Command::new(&p2f).args(args).output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        anyhow::ensure!(out.status.success(), "p2f {args:?}: {text}");
        Ok(text)
    };
    let node_toml = dir.join("node.toml");
    let node_arg = node_toml.to_string_lossy().into_owned();
    // Before the machine is a node: told what to do first.
    let config = samples().join("config.json");
    let config_arg = config.to_string_lossy().into_owned();
    let out = Command::new(&p2f)
        .args([
            "p2prc",
            "import",
            "--config",
            &config_arg,
            "--node",
            &node_arg,
        ])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("p2f init"));

    ok(&[
        "init",
        "--name",
        "den-laptop-Rb4wQ8t",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        &dir.to_string_lossy(),
    ])?;
    let table = samples().join("ip_table.current.json");
    let said = ok(&[
        "p2prc",
        "import",
        "--config",
        &config_arg,
        "--ip-table",
        &table.to_string_lossy(),
        "--node",
        &node_arg,
    ])?;
    assert!(
        said.contains("took: MachineName den-laptop-Rb4wQ8t"),
        "{said}"
    );
    assert!(said.contains("took: ServerPort 8089"), "{said}");
    assert!(said.contains("not taken: BehindNAT"), "{said}");
    assert!(said.contains("not taken: PublicKeyFile"), "{said}");
    let config = p2f::core::node::AgentConfig::load(&node_toml)?;
    let settings = config.p2prc.clone().context("[p2prc] written")?;
    assert_eq!(settings.listen.map(|a| a.port()), Some(8089));
    assert!(config.bare_metal && config.unsafe_mode);
    // Every other sample table: its entries become known peers (never the node itself).
    for sample in [
        "ip_table.2024-strings.json",
        "ip_table.legacy-2023.json",
        "ip_table.mixed-entries.json",
    ] {
        let said = ok(&[
            "p2prc",
            "import",
            "--ip-table",
            &samples().join(sample).to_string_lossy(),
            "--node",
            &node_arg,
        ])?;
        assert!(said.contains("took: peer"), "{sample}: {said}");
        if sample.contains("mixed") {
            assert!(
                said.contains("not taken: table entry 1 (\"node 3\")"),
                "{said}"
            );
        }
    }
    let peers = p2f::core::p2prc::Peers::load(p2f::core::p2prc::peers_path(&config.data_dir));
    let names: Vec<String> = peers
        .list()
        .iter()
        .map(|p| p.node.name.to_string())
        .collect();
    assert!(
        names.contains(&"kitchen-pi-Vb5nE1q".to_owned()),
        "{names:?}"
    );
    assert!(
        !names.contains(&"den-laptop-Rb4wQ8t".to_owned()),
        "itself is no peer"
    );
    Ok(())
}

/// A backend standing for a P2PRC peer's web service: answers every request with `body`.
async fn backend(body: &'static str) -> Result<SocketAddr> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok(address)
}

/// `/AddProxy` on the root: a domain routed through the ingress to a known P2PRC peer's
/// address, with the cluster CA's certificate, listed in `p2f routes`; refused for an address
/// no peer has, a bad domain, a P2F domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2prc_add_proxy_routes_a_domain_to_a_known_peer() -> Result<()> {
    let at: SocketAddr = ([127, 0, 0, 1], service_port()).into();
    let scratch = tempfile::tempdir()?;
    let keys = scratch.path().join("authorized_keys");
    let root = agent("proxy-root")
        .configure(move |config| {
            config.p2prc = Some(p2f::core::p2prc::P2prcSettings {
                listen: Some(at),
                add_proxy: true,
                authorized_keys: Some(keys),
                ..Default::default()
            });
        })
        .init()?
        .started()
        .await?;
    let peer = backend("served by the P2PRC peer").await?;
    let add = |domain: &str, ip: &str, port: u16| {
        curl(
            &format!("http://{at}/AddProxy?domain_name={domain}&ip_address={ip}&port={port}"),
            &[],
        )
    };
    // Not a known peer yet.
    let refused = add("box.test", "127.0.0.1", peer.port())?;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(
        refused.json()?["error"]
            .as_str()
            .unwrap_or("")
            .contains("not the address of a known P2PRC peer")
    );
    let table = scratch.path().join("peer.json");
    std::fs::write(
        &table,
        r#"{"ip_address":[{"Name":"peer-box-Qw3","IPV4":"127.0.0.1","ServerPort":"1"}]}"#,
    )?;
    assert_eq!(post_table(at, &table)?.status, 200);
    for (domain, port, status) in [("not a domain", peer.port(), 400), ("box.test", 0, 400)] {
        let answer = add(&domain.replace(' ', "%20"), "127.0.0.1", port)?;
        assert_eq!(answer.status, status, "{domain}: {}", answer.body);
    }
    let missing = curl(&format!("http://{at}/AddProxy?domain_name=box.test"), &[])?;
    assert_eq!(missing.status, 400, "{}", missing.body);
    let added = add("box.test", "127.0.0.1", peer.port())?;
    assert_eq!((added.status, added.body.as_str()), (200, "Sucess"));

    // Through the ingress, over HTTPS with the cluster CA's certificate.
    let report = p2f_testkit::eventually("box.test routed", Duration::from_secs(10), || async {
        let report = root.network().routes().await.ok()?;
        report
            .routes
            .iter()
            .any(|r| r.domain == "box.test")
            .then_some(report)
    })
    .await?;
    let route = report
        .routes
        .iter()
        .find(|r| r.domain == "box.test")
        .context("box.test in the routes")?;
    assert_eq!(route.node.as_str(), "peer-box-Qw3");
    assert_eq!(
        route.upstream.as_deref(),
        Some(format!("p2prc peer peer-box-Qw3 → {peer}").as_str())
    );
    let https: SocketAddr = report.https.parse()?;
    let ca = root.cluster().ca_cert_path();
    let resolve = format!("box.test:{}:{}", https.port(), https.ip());
    let url = format!("https://box.test:{}/", https.port());
    let ca_arg = ca.to_string_lossy().into_owned();
    let answer = curl(&url, &["--cacert", &ca_arg, "--resolve", &resolve])?;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, "served by the P2PRC peer")
    );
    Ok(())
}
