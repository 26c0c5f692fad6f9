//! The root's front door: a service's domain served over HTTPS (HTTP/1.1 and HTTP/2) and plain
//! HTTP by the root's ingress, reaching the process on another node through that node's agent
//! (the backend binds 127.0.0.1 only); WebSockets; streamed bodies; forwarding headers; a 503
//! that names the record's reason; a request held across a move; bad input refused without
//! harm. Real agents, real `curl`, a small python3 backend; loopback only.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use p2f::core::wire::{RouteInfo, RoutesReport};
use p2f::model::{Health, NodeName, ProcessSpec};
use p2f_testkit::procs::require;
use p2f_testkit::{Agent, eventually};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::{agent, member, service_port};

/// The backend: `GET` answers JSON with the node it runs on and the headers it got, `/big/N`
/// streams N bytes, `/slow` answers after 1.5 s, `POST` counts and hashes what it reads, `/health` is its check, and a
/// WebSocket upgrade echoes text frames as `echo: TEXT`. It binds 127.0.0.1 only.
const BACKEND: &str = r#"
import base64, hashlib, json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, code, body, kind="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            return self.answer(200, b"ok", "text/plain")
        if self.path == "/slow":
            time.sleep(1.5)
            return self.answer(200, b"slow", "text/plain")
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if self.path.startswith("/big/"):
            size = int(self.path[5:])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"x" * 65536
            while size > 0:
                self.wfile.write(chunk[:size])
                size -= min(size, len(chunk))
            return
        seen = {k.lower(): v for k, v in self.headers.items()}
        body = {"node": os.environ.get("P2F_NODE"), "path": self.path, "headers": seen}
        self.answer(200, json.dumps(body).encode())

    def do_POST(self):
        left = int(self.headers.get("Content-Length", "0"))
        digest, count = hashlib.sha256(), 0
        while left > 0:
            chunk = self.rfile.read(min(65536, left))
            if not chunk:
                break
            digest.update(chunk)
            count += len(chunk)
            left -= len(chunk)
        self.answer(200, json.dumps({"bytes": count, "sha256": digest.hexdigest()}).encode())

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, size = head[0] & 0x0F, head[1] & 0x7F
            if size == 126:
                size = int.from_bytes(self.rfile.read(2), "big")
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(size)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                self.wfile.flush()
                return
            reply = b"echo: " + data
            self.wfile.write(bytes([0x81, len(reply)]) + reply)
            self.wfile.flush()

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

/// The longest a route may take to serve once deployed.
const ROUTE_LIMIT: Duration = Duration::from_secs(60);

/// Writes the backend into `dir`; its path.
fn backend(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("backend.py");
    std::fs::write(&path, BACKEND)?;
    Ok(path)
}

/// A spec running the backend on a fresh port, for `domain`, on `pins`, checked on `/health`;
/// `delay` (like `1.5`) seconds of sleep before it starts.
fn backend_spec(
    name: &str,
    script: &Path,
    domain: &str,
    pins: &[&str],
    delay: Option<&str>,
) -> ProcessSpec {
    let start = match delay {
        None => format!("exec python3 {} $PORT", script.display()),
        Some(s) => format!("sleep {s}; exec python3 {} $PORT", script.display()),
    };
    ProcessSpec::new(name, start)
        .with_port(service_port())
        .with_domain(domain)
        .with_health(Health::Http("/health".into()))
        .with_pin(pins.iter().map(|n| NodeName::new(*n).expect("node name")))
}

/// A started root whose ingress holds idempotent requests for `hold`.
async fn root_holding(hold: Duration) -> Result<Agent> {
    require("python3", "python3")?;
    agent("root")
        .configure(move |config| {
            if let Some(ingress) = &mut config.ingress {
                ingress.hold = hold;
            }
        })
        .init()?
        .started()
        .await
}

/// The route of `domain` once `ready` holds for it.
async fn route_when(
    root: &Agent,
    domain: &str,
    what: &str,
    ready: impl Fn(&RouteInfo) -> bool,
) -> Result<(RoutesReport, RouteInfo)> {
    eventually(&format!("{domain}: {what}"), ROUTE_LIMIT, || {
        let network = root.network().clone();
        let ready = &ready;
        async move {
            let report = network.routes().await.ok()?;
            let route = report.routes.iter().find(|r| r.domain == domain)?.clone();
            ready(&route).then_some((report, route))
        }
    })
    .await
}

/// What `curl` answered: the last transfer's status, protocol version and body (with the
/// response head when asked with `-D -`), and each transfer's count of new connections.
#[derive(Debug)]
struct Answer {
    status: u16,
    version: String,
    connects: Vec<u32>,
    body: String,
}

/// Runs `curl` (bounded to 20 s) with the cluster CA and `name` resolved to `https`, plus `args`.
fn curl(ca: &Path, name: &str, https: SocketAddr, args: &[&str]) -> Result<Answer> {
    require("curl", "curl")?;
    let resolve = format!("{name}:{}:{}", https.port(), https.ip());
    let output = Command::new("curl")
        .args(["-sS", "-m", "20", "--cacert"])
        .arg(ca)
        .args(["--resolve", &resolve])
        .args(["-w", "\n@@ %{http_code} %{http_version} %{num_connects}\n"])
        .args(args)
        .output()
        .context("run curl")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "curl {args:?} failed ({}): {}{stdout}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // One "@@" line after each transfer.
    let (mut body, mut current) = (String::new(), String::new());
    let (mut status, mut version, mut connects) = (0, String::new(), Vec::new());
    for line in stdout.lines() {
        match line.strip_prefix("@@ ") {
            Some(meta) => {
                // The newline before the summary is curl's `-w`, not the body's.
                current.pop();
                body = std::mem::take(&mut current);
                let fields: Vec<&str> = meta.split(' ').collect();
                ensure!(fields.len() == 3, "curl's summary {meta:?}");
                status = fields[0].parse()?;
                version = fields[1].to_owned();
                connects.push(fields[2].parse()?);
            }
            None => {
                current.push_str(line);
                current.push('\n');
            }
        }
    }
    Ok(Answer {
        status,
        version,
        connects,
        body,
    })
}

/// The exit code of a `curl` that is expected to fail.
fn curl_failure(ca: &Path, name: &str, https: SocketAddr, url: &str) -> Result<Option<i32>> {
    let resolve = format!("{name}:{}:{}", https.port(), https.ip());
    let output = Command::new("curl")
        .args(["-sS", "-m", "20", "--cacert"])
        .arg(ca)
        .args(["--resolve", &resolve, url])
        .output()?;
    Ok(output.status.code())
}

/// Sends `request` on a new plain TCP connection and reads the answer's head (bounded), or
/// with `to_end` everything until the server closes.
async fn raw(addr: SocketAddr, request: &[u8], to_end: bool) -> Result<String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e),
            };
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || (!to_end && answer.windows(4).any(|w| w == b"\r\n\r\n")) {
                break;
            }
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .context("no answer within 20 s")?
        .context("raw exchange")
}

fn json(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text.trim()).with_context(|| format!("not JSON: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_is_served_through_the_root_from_another_node() -> Result<()> {
    require("python3", "python3")?;
    let temp = tempfile::tempdir()?;
    let script = backend(temp.path())?;
    let mut root = agent("root").init()?.started().await?;
    let member = member(&root, "member", "127.0.0.21").await?;
    root.all_alive(&["member", "root"]).await?;
    let domain = "echo.home.arpa";
    let spec = backend_spec("echo", &script, domain, &["member"], None);
    let desired = root.network().deploy(&[spec]).await?;
    let (report, route) = route_when(&root, domain, "served from the member", |r| {
        r.upstream.is_some() && r.node.as_str() == "member"
    })
    .await?;
    assert_eq!(route.service, "echo");
    assert!(
        route
            .upstream
            .as_deref()
            .is_some_and(|u| u.contains("member")),
        "{route:?}"
    );
    let https: SocketAddr = report.https.parse()?;
    let http: SocketAddr = report.http.parse()?;
    let ca = root.cluster().ca_cert_path();
    let base = format!("https://{domain}:{}", https.port());
    let host = format!("{domain}:{}", https.port());

    // The member's tunnel opens only its own running processes' ports, for the cluster only.
    let id = &desired.services[0].id;
    tunnel_refusals(&member, id.as_str(), route.generation).await?;

    // HTTP/1.1 with keep-alive: two requests, one connection; what the backend saw.
    let url = format!("{base}/hello?x=1");
    let answer = curl(
        &ca,
        domain,
        https,
        &[
            "--http1.1",
            "-H",
            "Connection: keep-alive, X-Drop",
            "-H",
            "X-Drop: secret",
            "-H",
            "X-Forwarded-For: 6.6.6.6",
            &url,
            &url,
        ],
    )?;
    assert_eq!(
        (answer.status, answer.version.as_str()),
        (200, "1.1"),
        "{answer:?}"
    );
    assert_eq!(
        answer.connects,
        [1, 0],
        "the second request reuses the connection"
    );
    let seen = json(&answer.body)?;
    assert_eq!(seen["node"], "member", "{seen}");
    assert_eq!(seen["path"], "/hello?x=1");
    let headers = &seen["headers"];
    assert_eq!(headers["host"], host.as_str(), "{headers}");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{headers}");
    assert_eq!(headers["x-forwarded-proto"], "https");
    assert_eq!(headers["x-forwarded-host"], host.as_str());
    assert_eq!(
        headers["forwarded"],
        format!("for=127.0.0.1;proto=https;host=\"{host}\"").as_str()
    );
    assert!(
        headers.get("x-drop").is_none(),
        "hop-by-hop header forwarded: {headers}"
    );

    // HTTP/2 from the client (ALPN h2), HTTP/1.1 to the process.
    let answer = curl(&ca, domain, https, &["--http2", &format!("{base}/two")])?;
    assert_eq!(
        (answer.status, answer.version.as_str()),
        (200, "2"),
        "{answer:?}"
    );
    let seen = json(&answer.body)?;
    assert_eq!(seen["headers"]["host"], host.as_str(), "{seen}");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");

    // Bodies streamed both ways: 8 MiB up, 16 MiB down.
    let upload = temp.path().join("upload.bin");
    let mut file = std::fs::File::create(&upload)?;
    let block: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    for _ in 0..8 {
        file.write_all(&block)?;
    }
    drop(file);
    let expected_sha = String::from_utf8(Command::new("sha256sum").arg(&upload).output()?.stdout)?;
    let data = format!("@{}", upload.display());
    let answer = curl(
        &ca,
        domain,
        https,
        &["--data-binary", &data, &format!("{base}/upload")],
    )?;
    let counted = json(&answer.body)?;
    assert_eq!(counted["bytes"], 8 << 20, "{counted}");
    assert!(
        expected_sha.starts_with(counted["sha256"].as_str().unwrap_or("?")),
        "{counted} vs {expected_sha}"
    );
    let download = temp.path().join("download.bin");
    let out = download.display().to_string();
    let answer = curl(
        &ca,
        domain,
        https,
        &["-o", &out, &format!("{base}/big/{}", 16 << 20)],
    )?;
    assert_eq!(answer.status, 200);
    assert_eq!(std::fs::metadata(&download)?.len(), 16 << 20);

    // Plain HTTP: redirected to HTTPS, but ACME's challenge path; an unknown host is a bare 404.
    let plain = format!("http://{http}/page?q=1");
    let host_header = format!("Host: {domain}");
    let answer = curl(&ca, domain, https, &["-H", &host_header, "-D", "-", &plain])?;
    assert_eq!(answer.status, 308, "{answer:?}");
    let location = format!("location: {base}/page?q=1");
    assert!(
        answer
            .body
            .to_ascii_lowercase()
            .contains(&location.to_ascii_lowercase()),
        "{answer:?}"
    );
    let challenge = format!("http://{http}/.well-known/acme-challenge/token");
    let answer = curl(&ca, domain, https, &["-H", &host_header, &challenge])?;
    assert_eq!(answer.status, 404, "{answer:?}");
    let answer = curl(&ca, domain, https, &["-H", "Host: other.home.arpa", &plain])?;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (404, "404 page not found\n")
    );

    // A WebSocket through the proxy (and the agent's tunnel), over TLS.
    websocket_echo(&root, domain, https).await?;

    // Bad input: each refused with a clear 4xx, and a normal request still works afterwards.
    let normal = || -> Result<()> {
        let answer = curl(&ca, domain, https, &[&format!("{base}/after")])?;
        ensure!(answer.status == 200, "after bad input: {answer:?}");
        Ok(())
    };
    let lengths = format!(
        "POST / HTTP/1.1\r\nHost: {domain}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"
    );
    let gzipped =
        format!("POST / HTTP/1.1\r\nHost: {domain}\r\nTransfer-Encoding: gzip\r\n\r\nhello");
    let bad_host = "GET / HTTP/1.1\r\nHost: bad host!\r\n\r\n".to_owned();
    let no_host = "GET / HTTP/1.1\r\n\r\n".to_owned();
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: {domain}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(600 * 1024)
    );
    for (what, request, status) in [
        ("two different Content-Lengths", lengths, "400"),
        ("a Transfer-Encoding that is not chunked", gzipped, "400"),
        ("an invalid Host", bad_host, "400"),
        ("no Host", no_host, "400"),
        ("oversized headers", huge, "431"),
    ] {
        let answer = raw(http, request.as_bytes(), false).await?;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: {answer:?}"
        );
        normal().with_context(|| what.to_owned())?;
    }
    // Content-Length and Transfer-Encoding together (RFC 9112 §6.1): the body is read as
    // chunked, the length dropped, and the connection closed after the answer, so a request
    // smuggled behind the body is never served.
    let smuggling = format!(
        "POST / HTTP/1.1\r\nHost: {domain}\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n\
         0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {domain}\r\n\r\n"
    );
    let answer = raw(http, smuggling.as_bytes(), true).await?;
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer:?}");
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer:?}");
    normal().context("after Content-Length with Transfer-Encoding")?;
    // A name the ingress does not serve gets no certificate: the handshake is refused (curl 35).
    let unknown = format!("https://unknown.home.arpa:{}/", https.port());
    assert_eq!(
        curl_failure(&ca, "unknown.home.arpa", https, &unknown)?,
        Some(35)
    );
    normal().context("after an unknown SNI")?;
    // Slowloris: 300 connections from 127.0.0.1 that never finish their request; at most 256
    // of them are kept (the rest closed at once), and another address is still served.
    let mut silent = Vec::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(https).await?;
        stream.write_all(b"\x16\x03\x01").await?;
        silent.push(stream);
    }
    let answer = curl(
        &ca,
        domain,
        https,
        &["--interface", "127.0.0.2", &format!("{base}/during")],
    )?;
    assert_eq!(answer.status, 200, "during the slowloris: {answer:?}");
    let closed = futures_util::future::join_all(silent.iter_mut().map(|stream| async move {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte));
        matches!(read.await, Ok(Ok(0) | Err(_)))
    }))
    .await
    .into_iter()
    .filter(|closed| *closed)
    .count();
    // 44 beyond the 256 (a few more if connections of the requests above still count).
    assert!((44..=64).contains(&closed), "{closed} of 300 closed");
    drop(silent);
    // And the certificate that was issued is listed.
    let (_, route) = route_when(&root, domain, "its certificate listed", |r| {
        r.certificate.is_some()
    })
    .await?;
    assert_eq!(
        route.certificate.map(|c| c.issuer),
        Some("cluster CA".to_owned())
    );

    // The root stops (SIGTERM) while a request is in flight: the request still gets its answer.
    let in_flight = tokio::task::spawn_blocking({
        let (ca, url) = (ca.clone(), format!("{base}/slow"));
        move || curl(&ca, domain, https, &[&url])
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = root.sigterm()?;
    assert!(status.success(), "{status}");
    let answer = in_flight.await??;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, "slow"),
        "{answer:?}"
    );
    Ok(())
}

/// Asks `agent`'s tunnel for what it must refuse: no certificate (401), a member's own
/// certificate (403: only the root opens tunnels), no upgrade (426), a process it does not run
/// (404), another generation of `id` (409); then `generation` of `id` is opened (101) with the
/// operator's certificate.
async fn tunnel_refusals(agent: &Agent, id: &str, generation: u64) -> Result<()> {
    let api = agent.network().address().to_owned();
    let ca = agent.cluster().ca_cert_path();
    let data = agent.config().data_dir.clone();
    // curl's options for a certificate and its key.
    let cert = |pem: &str, key: &str| -> Vec<String> {
        vec![
            "--cert".to_owned(),
            data.join(pem).display().to_string(),
            "--key".to_owned(),
            data.join(key).display().to_string(),
        ]
    };
    let operator = cert("operator/operator.pem", "operator/operator.key");
    let member = cert("tls/node.pem", "tls/node.key");
    let none: Vec<String> = Vec::new();
    let url = |id: &str, generation: u64| {
        format!("https://{api}/v1/processes/{id}/tunnel?generation={generation}")
    };
    let ask = |credentials: &[String], headers: &[&str], url: String| -> Vec<String> {
        let headers = headers
            .iter()
            .flat_map(|h| ["-H".to_owned(), (*h).to_owned()]);
        credentials
            .iter()
            .cloned()
            .chain(headers)
            .chain([url])
            .collect()
    };
    let (connection, upgrade) = ("Connection: upgrade", "Upgrade: p2f-tunnel");
    let both = [connection, upgrade];
    let cases = [
        (ask(&none, &both, url(id, generation)), 401),
        (ask(&member, &both, url(id, generation)), 403),
        (ask(&operator, &[], url(id, generation)), 426),
        (ask(&operator, &both, url("not-here", 1)), 404),
        (ask(&operator, &both, url(id, generation + 1)), 409),
        (ask(&operator, &both, url(id, generation)), 101),
    ];
    for (args, status) in cases {
        // A tunnel that opens stays open: curl gives up after a second, having printed the head.
        let output = Command::new("curl")
            .args([
                "-sS",
                "-m",
                "2",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
            ])
            .arg(&ca)
            .args(&args)
            .output()?;
        let got = String::from_utf8_lossy(&output.stdout);
        ensure!(
            got == status.to_string(),
            "{args:?}: {got} (expected {status})"
        );
    }
    Ok(())
}

/// Opens a WebSocket to `domain` through the root's HTTPS listener and checks two echoes.
async fn websocket_echo(root: &Agent, domain: &str, https: SocketAddr) -> Result<()> {
    let ca = std::fs::read_to_string(root.cluster().ca_cert_path())?;
    let config = p2f::core::cluster::client_config(&ca)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let exchange = async {
        let tcp = TcpStream::connect(https).await?;
        let name = rustls_pki_types::ServerName::try_from(domain.to_owned())?;
        let mut tls = connector.connect(name, tcp).await?;
        let request = format!(
            "GET /chat HTTP/1.1\r\nHost: {domain}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        tls.write_all(request.as_bytes()).await?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            ensure!(
                tls.read(&mut byte).await? == 1,
                "closed during the handshake"
            );
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        ensure!(head.starts_with("http/1.1 101"), "{head}");
        ensure!(
            head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        for text in ["hello", "again"] {
            // A masked text frame, as a client sends it.
            let mask = [1u8, 2, 3, 4];
            let mut frame = vec![0x81, 0x80 | text.len() as u8];
            frame.extend_from_slice(&mask);
            frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            tls.write_all(&frame).await?;
            let mut header = [0u8; 2];
            tls.read_exact(&mut header).await?;
            ensure!(header[0] == 0x81, "not a text frame: {header:?}");
            let mut payload = vec![0u8; usize::from(header[1] & 0x7F)];
            tls.read_exact(&mut payload).await?;
            ensure!(
                payload == format!("echo: {text}").as_bytes(),
                "{:?}",
                String::from_utf8_lossy(&payload)
            );
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .context("the WebSocket exchange took over 20 s")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_names_the_reason_and_a_held_request_follows_a_move() -> Result<()> {
    let temp = tempfile::tempdir()?;
    let script = backend(temp.path())?;
    let root = root_holding(Duration::from_secs(20)).await?;
    // Health checks every second: a process may take 3 s to pass its first.
    let slow_checks = |name: &str, ip: &str| {
        agent(name).ip(ip).configure(|config| {
            config.supervisor.health_interval = Duration::from_secs(1);
        })
    };
    let _one = slow_checks("one", "127.0.0.22")
        .join(&root)?
        .started()
        .await?;
    let _two = slow_checks("two", "127.0.0.23")
        .join(&root)?
        .started()
        .await?;
    root.all_alive(&["one", "root", "two"]).await?;
    // `ghost` can run nowhere; `mover` takes 1.5 s to start, so a move leaves it down a while.
    let ghost = backend_spec("ghost", &script, "ghost.home.arpa", &["nowhere"], None);
    let mover = backend_spec(
        "mover",
        &script,
        "mover.home.arpa",
        &["one", "two"],
        Some("1.5"),
    );
    let desired = root.network().deploy(&[ghost, mover]).await?;
    let mover_id = desired
        .services
        .iter()
        .find(|s| s.spec.name() == "mover")
        .context("mover")?
        .id
        .clone();
    let (report, _) = route_when(&root, "ghost.home.arpa", "down, unplaced", |r| {
        r.down
            .as_deref()
            .is_some_and(|d| d.contains("waits for a node"))
    })
    .await?;
    let https: SocketAddr = report.https.parse()?;
    let ca = root.cluster().ca_cert_path();

    // Not idempotent: answered at once, as JSON when asked, with the record's formal reason.
    let url = format!("https://ghost.home.arpa:{}/", https.port());
    let answer = curl(
        &ca,
        "ghost.home.arpa",
        https,
        &[
            "-X",
            "POST",
            "-H",
            "Accept: application/json",
            "-D",
            "-",
            &url,
        ],
    )?;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(
        answer.body.to_ascii_lowercase().contains("retry-after: 20"),
        "{answer:?}"
    );
    let body = answer.body.rsplit("\n\n").next().unwrap_or_default();
    let body = json(body)?;
    assert_eq!(body["service"], "ghost", "{body}");
    assert_eq!(body["status"], "unplaced");
    assert_eq!(body["failure"]["kind"], "NoAllowedNode");
    assert_eq!(
        body["reason"],
        "ghost waits for a node: no node can take it: one is not in its pins, root is not in its pins, two is not in its pins"
    );
    // A GET is not held for a process waiting for a node (the hold is 20 s, curl's limit too).
    let answer = curl(&ca, "ghost.home.arpa", https, &["-m", "10", &url])?;
    assert_eq!(answer.status, 503);
    assert!(
        answer
            .body
            .contains("<h1>ghost is unavailable right now</h1>")
            && answer
                .body
                .contains("ghost waits for a node: no node can take it"),
        "{answer:?}"
    );

    // A move: the new copy (a generation up, on the other node) takes 1.5 s to start; a GET sent
    // while the route is down is held, and answered by the new copy.
    let (_, before) =
        route_when(&root, "mover.home.arpa", "served", |r| r.upstream.is_some()).await?;
    let (from, to) = if before.node.as_str() == "one" {
        ("one", "two")
    } else {
        ("two", "one")
    };
    let network = root.network().clone();
    let target = NodeName::new(to)?;
    let moving = tokio::spawn(async move { network.move_process(&mover_id, &target).await });
    let (_, down) = route_when(&root, "mover.home.arpa", "down while it moves", |r| {
        r.node.as_str() == to && r.upstream.is_none()
    })
    .await?;
    assert_eq!(down.generation, before.generation + 1, "{down:?}");
    let url = format!("https://mover.home.arpa:{}/held", https.port());
    let answer = curl(&ca, "mover.home.arpa", https, &[&url])?;
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = json(&answer.body)?;
    assert_eq!(
        seen["node"], to,
        "answered by the new copy, not {from}: {seen}"
    );
    let moved = tokio::time::timeout(Duration::from_secs(60), moving)
        .await
        .context("the move did not finish")???;
    assert_eq!(moved.node.name.as_str(), to);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_as_a_node_dies_is_answered_by_the_copy_that_replaces_it() -> Result<()> {
    let temp = tempfile::tempdir()?;
    let script = backend(temp.path())?;
    let root = root_holding(Duration::from_secs(30)).await?;
    let mut a = member(&root, "a", "127.0.0.24").await?;
    let mut b = member(&root, "b", "127.0.0.25").await?;
    root.all_alive(&["a", "b", "root"]).await?;
    let domain = "failover.home.arpa";
    let spec = backend_spec("failover", &script, domain, &["a", "b"], None);
    root.network().deploy(&[spec]).await?;
    let (report, before) = route_when(&root, domain, "served", |r| r.upstream.is_some()).await?;
    let https: SocketAddr = report.https.parse()?;
    let ca = root.cluster().ca_cert_path();
    let url = format!("https://{domain}:{}/", https.port());
    let (dead, alive) = match before.node.as_str() {
        "a" => (&mut a, "b"),
        _ => (&mut b, "a"),
    };
    // The node dies; the route still names it until the root declares it lost (about 5 s
    // here): the request's tunnel fails, and it is tried again until the replacement serves.
    dead.kill_node()?;
    let answer = tokio::task::spawn_blocking({
        let (ca, url) = (ca.clone(), url.clone());
        move || curl(&ca, domain, https, &[&url])
    })
    .await??;
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = json(&answer.body)?;
    assert_eq!(seen["node"], alive, "{seen}");
    let (_, after) = route_when(&root, domain, "served by the replacement", |r| {
        r.upstream.is_some()
    })
    .await?;
    assert_eq!(after.node.as_str(), alive);
    assert!(after.generation > before.generation, "{after:?}");

    // The operator's view: `p2f routes` and `p2f ca` on the root's config.
    let p2f = p2f_testkit::p2f_bin()?;
    let routes = Command::new(&p2f)
        .args(["routes", "--config"])
        .arg(root.config_path())
        .output()?;
    let text = String::from_utf8_lossy(&routes.stdout);
    ensure!(routes.status.success(), "p2f routes: {routes:?}");
    assert!(
        text.contains(domain) && text.contains(&format!("agent {alive}")),
        "{text}"
    );
    assert!(text.contains("cluster CA"), "{text}");
    let ca_text = Command::new(&p2f)
        .args(["ca", "--config"])
        .arg(root.config_path())
        .output()?;
    let text = String::from_utf8_lossy(&ca_text.stdout);
    let ca_path = std::fs::canonicalize(&ca)?;
    assert!(
        text.contains(&format!("The cluster CA: {}", ca_path.display())),
        "{text}"
    );
    Ok(())
}

/// A domain that is an IP address (`https://127.0.0.1/`: no DNS at home): the client sends no
/// server name (SNI) for an address, so the ingress presents the certificate of the address it
/// was reached at, from the cluster CA, and serves the process on the root itself directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_address_domain_is_served_over_https_without_sni() -> Result<()> {
    let root = root_holding(Duration::from_secs(5)).await?;
    let dir = tempfile::tempdir()?;
    let script = backend(dir.path())?;
    let spec = backend_spec("by-ip", &script, "127.0.0.1", &["root"], None);
    root.network().deploy(&[spec]).await?;
    let (report, route) =
        route_when(&root, "127.0.0.1", "served", |r| r.upstream.is_some()).await?;
    let upstream = route.upstream.clone().unwrap_or_default();
    assert!(upstream.starts_with("local → "), "{upstream}");
    let https: SocketAddr = report.https.parse()?;
    let ca = root.cluster().ca_cert_path();
    let url = format!("https://127.0.0.1:{}/hello", https.port());
    let answer = curl(&ca, "127.0.0.1", https, &[&url])?;
    assert_eq!(answer.status, 200, "{answer:?}");
    let body = json(&answer.body)?;
    assert_eq!(body["path"], "/hello", "{body}");
    assert_eq!(body["headers"]["x-forwarded-proto"], "https", "{body}");
    Ok(())
}
