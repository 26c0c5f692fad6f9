//! A member behind a real NAT: its home namespace sits behind a router namespace that
//! masquerades (nftables) with no way in, so nothing on the LAN can open a connection to it.
//! It keeps a link to the root, and everything reaches it through that link: placements,
//! logs, kills, the ingress. The root restarted, the link comes back and nothing is re-placed;
//! the node SIGKILLed, its service moves to a LAN node.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use p2f::core::Network;
use p2f::core::wire::{NodeStatus, Reach};
use p2f::model::{Health, NodeName, ProcessSpec, Protocol, PublicPort};
use p2f_testkit::netns::{Lan, Nat, block_on_in};
use p2f_testkit::procs::require;
use p2f_testkit::{Agent, eventually, p2f_bin};

use crate::support::{agent, log_containing, running, service_port};

/// How long a converging network may take here.
const CONVERGE: Duration = Duration::from_secs(60);

/// A UDP echo server on loopback: `python3 -c UDP_ECHO PORT` answers `NODE: DATAGRAM`.
const UDP_ECHO: &str = "import os,socket,sys\n\
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
s.bind(('127.0.0.1',int(sys.argv[1])))\n\
while True:\n    d,a=s.recvfrom(65535)\n    s.sendto(os.environ['P2F_NODE'].encode()+b': '+d,a)\n";

/// Ports of the web service: its own, its public TCP port, its public UDP port and the UDP
/// echo's port on its node.
#[derive(Clone, Copy)]
struct Ports {
    http: u16,
    public_tcp: u16,
    public_udp: u16,
    udp: u16,
}

/// A web server on loopback only that says which node it runs on, with a UDP echo beside it;
/// its HTTP port is also a public TCP port, its echo a public UDP port.
fn web(pins: &[&str], ports: Ports) -> ProcessSpec {
    let script = format!(
        "python3 -c \"$ECHO\" {udp} & \
         mkdir -p site && echo \"hello from $P2F_NODE\" > site/index.html && \
         exec python3 -u -m http.server \"$PORT\" --bind 127.0.0.1 --directory site",
        udp = ports.udp
    );
    ProcessSpec::new("web", script)
        .with_env("ECHO", UDP_ECHO)
        .with_public([
            PublicPort::new(Protocol::Tcp, ports.public_tcp, ports.http),
            PublicPort::new(Protocol::Udp, ports.public_udp, ports.udp),
        ])
        .with_port(ports.http)
        .with_domain("web.home.arpa")
        .with_health(Health::Http("/".into()))
        .with_pin(pins.iter().map(|n| NodeName::new(*n).expect("node name")))
}

/// `node`'s entry in the root's list, once `ready` holds for it.
async fn node_when(
    root: &Network,
    node: &str,
    what: &str,
    ready: impl Fn(&NodeStatus) -> bool,
) -> Result<NodeStatus> {
    p2f_testkit::node_when(root, node, what, CONVERGE, ready).await
}

fn linked(status: &NodeStatus) -> bool {
    status.alive && status.reach == Reach::Root && status.link.is_some_and(|l| l.linked)
}

/// The page the ingress serves for web.home.arpa, fetched with curl from this namespace.
async fn page(root: &Agent) -> Result<String> {
    let report = root.network().routes().await?;
    let https: std::net::SocketAddr = report.https.parse()?;
    let ca = root.cluster().ca_cert_path();
    eventually("web.home.arpa through the ingress", CONVERGE, || {
        let ca = ca.clone();
        async move { curl(&ca, https).ok() }
    })
    .await
}

fn curl(ca: &Path, https: std::net::SocketAddr) -> Result<String> {
    let resolve = format!("web.home.arpa:{}:{}", https.port(), https.ip());
    let out = Command::new("curl")
        .args(["-sS", "-f", "-m", "10", "--cacert"])
        .arg(ca)
        .args(["--resolve", &resolve])
        .arg(format!("https://web.home.arpa:{}/", https.port()))
        .output()
        .context("run curl")?;
    ensure!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the public TCP port answers at `/` (plain HTTP), from this namespace.
async fn public_tcp(root_ip: &str, port: u16) -> Option<String> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-f", "-m", "5"])
        .arg(format!("http://{root_ip}:{port}/"))
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the public UDP port echoes for one datagram, from this namespace.
async fn public_udp(root_ip: &str, port: u16) -> Option<String> {
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await.ok()?;
    socket.send_to(b"ping", (root_ip, port)).await.ok()?;
    let mut buf = [0u8; 256];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Waits until the public ports reach the copy on `node`.
async fn public_ports_reach(root_ip: &str, ports: Ports, node: &str) -> Result<()> {
    let hello = format!("hello from {node}");
    eventually(
        &format!("the public TCP port reaching {node}"),
        CONVERGE,
        || {
            let hello = hello.clone();
            async move {
                public_tcp(root_ip, ports.public_tcp)
                    .await
                    .filter(|b| b.contains(&hello))
            }
        },
    )
    .await?;
    let echo = format!("{node}: ping");
    eventually(
        &format!("the public UDP port reaching {node}"),
        CONVERGE,
        || {
            let echo = echo.clone();
            async move {
                public_udp(root_ip, ports.public_udp)
                    .await
                    .filter(|b| *b == echo)
            }
        },
    )
    .await?;
    Ok(())
}

#[test]
fn a_member_behind_nat_is_reached_through_its_link() -> Result<()> {
    p2f_bin()?;
    require("python3", "python3")?;
    require("curl", "curl")?;
    let lan = Lan::new("relay", 4, &["root", "b", "router"])?;
    let home = Nat::behind(&lan, "router", "relay", 44)?;
    let (mut root, b, mut nat) = block_on_in(lan.switch(), || async {
        let root = agent("root")
            .netns(lan.ns("root"))
            .ip(&lan.ip("root"))
            .fixed_ports(lan.ip("root").parse()?, service_port(), service_port())
            .init()?
            .started()
            .await?;
        let b = agent("node-b")
            .netns(lan.ns("b"))
            .ip(&lan.ip("b"))
            .join(&root)?
            .started()
            .await?;
        // The join itself goes out through the NAT.
        let mut nat = agent("node-nat")
            .netns(home.ns())
            .ip(&home.ip())
            .join(&root)?;
        nat.start_unreachable().await?;
        root.all_alive(&["node-b", "node-nat", "root"]).await?;
        anyhow::Ok((root, b, nat))
    })?;

    // The NAT is real: from the root's namespace, the member's API cannot be reached.
    let api = nat.network().address().to_owned();
    let direct = block_on_in(lan.ns("root"), || async {
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(&api))
            .await
            .is_ok_and(|connected| connected.is_ok())
    });
    ensure!(!direct, "the root must not reach {api} directly");

    let ports = Ports {
        http: service_port(),
        public_tcp: service_port(),
        public_udp: service_port(),
        udp: service_port(),
    };
    let root_ip = lan.ip("root");
    let id = block_on_in(lan.switch(), || async {
        let network = root.network();
        let status = node_when(network, "node-nat", "linked", linked).await?;
        eprintln!("node-nat: {:?}", status.link);
        // node-b runs one process already, so web (pinned to both) goes to node-nat.
        let filler = ProcessSpec::new("filler", "exec sleep 1000")
            .with_pin([NodeName::from_static("node-b")]);
        let desired = network
            .deploy(&[filler, web(&["node-nat", "node-b"], ports)])
            .await?;
        let id = desired
            .services
            .iter()
            .find(|s| s.spec.name() == "web")
            .context("web in the desired state")?
            .id
            .clone();
        let placed = running(network, std::slice::from_ref(&id), 1).await?;
        ensure!(
            placed[0].node.name.as_str() == "node-nat",
            "web runs on {}, not node-nat",
            placed[0].node.name
        );
        // The ingress reaches it through the link.
        let body = page(&root).await?;
        ensure!(body.contains("hello from node-nat"), "{body}");
        // Its public TCP and UDP ports on the root reach it through the link.
        public_ports_reach(&root_ip, ports, "node-nat").await?;
        let listed = network.list_processes().await?;
        let record = listed.iter().find(|p| p.id == id).context("web listed")?;
        ensure!(
            record
                .external
                .as_deref()
                .is_some_and(|e| e.starts_with("https://web.home.arpa")),
            "external: {:?}",
            record.external
        );
        // Its logs come through the link too (the root forwards the call to node-nat).
        log_containing(network, &id, "GET / ", CONVERGE).await?;
        // And so does a node on the LAN, through the root.
        let on_b = b.client()?;
        let known = eventually("web's record on node-b", CONVERGE, || {
            let (on_b, id) = (on_b.clone(), id.clone());
            async move {
                on_b.process_information(p2f::model::ProcessKey::Id(id))
                    .await
                    .ok()
                    .flatten()
            }
        })
        .await;
        let known = match known {
            Ok(known) => known,
            Err(e) => bail!("{e:#}\n{}", b.log_tail(30)),
        };
        ensure!(known.node.name.as_str() == "node-nat");
        log_containing(&b.client()?, &id, "GET / ", CONVERGE).await?;
        anyhow::Ok(id)
    })?;
    let pids = nat.os_copies(&id);
    ensure!(pids.len() == 1, "web runs once on node-nat: {pids:?}");

    // The root restarts: the link comes back, and nothing is placed again.
    root.sigterm()?;
    block_on_in(lan.switch(), || async {
        root.start().await?;
        if let Err(e) = node_when(root.network(), "node-nat", "linked again", linked).await {
            bail!(
                "{e:#}\nnode-nat:\n{}\nroot:\n{}",
                nat.log_tail(30),
                root.log_tail(30)
            );
        }
        let body = page(&root).await?;
        let all = root.network().list_processes().await?;
        ensure!(
            body.contains("hello from node-nat"),
            "after the root's restart: {body}\nweb: {:#?}\nroot:\n{}\nnode-nat:\n{}",
            all.iter().find(|p| p.id == id),
            root.log_tail(60),
            nat.log_tail(30)
        );
        let web = all.iter().find(|p| p.id == id).context("web listed")?;
        ensure!(
            web.generation == 1 && web.node.name.as_str() == "node-nat",
            "web was placed again: generation {} on {}",
            web.generation,
            web.node.name
        );
        anyhow::Ok(())
    })?;
    ensure!(
        nat.os_copies(&id) == pids,
        "web restarted on node-nat: {pids:?} → {:?}",
        nat.os_copies(&id)
    );

    // node-nat dies: web moves to node-b, and the ingress follows.
    nat.kill_node()?;
    block_on_in(lan.switch(), || async {
        let moved = running(root.network(), std::slice::from_ref(&id), 2).await?;
        ensure!(moved[0].node.name.as_str() == "node-b");
        let body = eventually("web from node-b", CONVERGE, || async {
            page(&root).await.ok().filter(|b| b.contains("node-b"))
        })
        .await?;
        ensure!(body.contains("hello from node-b"), "{body}");
        // Its public ports followed it.
        public_ports_reach(&root_ip, ports, "node-b").await?;
        anyhow::Ok(())
    })?;
    drop((root, b, nat));
    Ok(())
}

/// A member told to link (`[relay] via_root = true`, on loopback: no NAT needed) is linked;
/// once removed from the cluster its link is closed and a new one refused; a link cannot be
/// opened without a member's certificate.
#[test]
fn a_removed_members_link_is_closed_and_refused() -> Result<()> {
    p2f_bin()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let root = crate::support::root("root").await?;
        let member = agent("linked")
            .ip("127.0.0.61")
            .configure(|config| {
                config.relay.via_root = p2f::core::relay::link::ViaRoot::Always;
            })
            .join(&root)?
            .started()
            .await?;
        let network = root.network();
        node_when(network, "linked", "linked", linked).await?;

        // A public port the root holds itself is refused, naming who holds it.
        let api_port: u16 = network
            .address()
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .context("the root's API port")?;
        let clash =
            ProcessSpec::new("clash", "exec sleep 100").with_public([PublicPort::tcp(api_port)]);
        let refused = network.deploy(&[clash]).await.expect_err("refused");
        ensure!(
            refused.status() == Some(422) && refused.to_string().contains("the control API"),
            "{refused}"
        );

        // An operator's certificate is no member's: it cannot hold a link.
        let refused = raw_link(network.address(), &root.credentials()?).await?;
        ensure!(
            refused.contains("403"),
            "an operator opened a link: {refused}"
        );
        // A member's certificate from another CA is refused in the handshake.
        let forger = p2f::core::cluster::ClusterCa::generate("forged")?;
        let forged = forger.issue_as(
            p2f::core::identity::Role::Member,
            "linked",
            &["127.0.0.61".to_owned()],
        )?;
        let ca = std::fs::read_to_string(root.cluster().ca_cert_path())?;
        let credentials = p2f::core::cluster::Credentials::new(ca, Some(forged));
        let answer = raw_link(network.address(), &credentials).await;
        ensure!(
            !matches!(&answer, Ok(line) if line.contains("101")),
            "a forged certificate opened a link: {answer:?}"
        );

        network
            .remove_node(&NodeName::from_static("linked"))
            .await?;
        node_when(network, "linked", "unlinked after its removal", |n| {
            !n.link.is_some_and(|l| l.linked)
        })
        .await?;
        // And it stays unlinked: its certificate is refused (401) at every attempt.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let nodes = network.nodes().await?;
        let after = nodes.iter().find(|n| n.node.name.as_str() == "linked");
        ensure!(
            !after.is_some_and(|n| n.link.is_some_and(|l| l.linked)),
            "a removed member linked again: {after:?}"
        );
        drop(member);
        anyhow::Ok(())
    })
}

/// The status line the root answers to `GET /v1/relay/link` with `credentials`.
async fn raw_link(address: &str, credentials: &p2f::core::cluster::Credentials) -> Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let config = p2f::core::cluster::client_config_for(credentials)?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(address).await?;
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())?;
    let mut stream = tls.connect(name, tcp).await?;
    stream
        .write_all(
            b"GET /v1/relay/link HTTP/1.1\r\nHost: root\r\nConnection: upgrade\r\nUpgrade: p2f-link\r\n\r\n",
        )
        .await?;
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await??;
    Ok(String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned())
}
