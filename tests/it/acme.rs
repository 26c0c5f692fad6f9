//! Certificates for public names from ACME: Debian's `pebble` as the CA (its listener
//! certificate made here), `pebble-challtestsrv` as mock DNS pointing every name at 127.0.0.1,
//! and a real root whose ingress answers the challenges. A real order over HTTP-01 and one over
//! TLS-ALPN-01 (each with the other challenge's port dead, so only that one can pass); the
//! certificate served is checked by a client trusting pebble's root only; a restart orders
//! nothing; a short validity forces a renewal that no handshake notices; a failing order is not
//! tried again before its pause, however many handshakes ask. Loopback only; every process is
//! killed by pid at the end.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use p2f::core::ingress::acme::AcmeChallenge;
use p2f::core::wire::RouteInfo;
use p2f::model::{Health, ProcessSpec};
use p2f_testkit::procs::require;
use p2f_testkit::{Agent, eventually};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;

use crate::support::{agent, service_port};

/// The longest pebble and its DNS may take to answer.
const START_LIMIT: Duration = Duration::from_secs(20);
/// The longest a first certificate may take once the domain is routed.
const ISSUE_LIMIT: Duration = Duration::from_secs(60);

/// A running pebble with its mock DNS, killed (by pid) when dropped.
struct Pebble {
    dir: tempfile::TempDir,
    children: Vec<Child>,
    /// The ACME directory URL.
    directory: String,
    /// The CA that signed pebble's listener certificate (trusted for the directory).
    listener_ca: PathBuf,
    /// Pebble's root, which signs what it issues (PEM).
    root_pem: String,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Pebble {
    /// Starts pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` of
    /// 127.0.0.1, issuing certificates valid `validity` seconds (pebble's default when `None`).
    async fn start(http_port: u16, tls_port: u16, validity: Option<u64>) -> Result<Pebble> {
        require("pebble", "pebble")?;
        require("pebble-challtestsrv", "pebble")?;
        require("curl", "curl")?;
        let dir = tempfile::Builder::new().prefix("p2f-pebble-").tempdir()?;
        let listener_ca = dir.path().join("listener-ca.pem");
        let (cert, key) = listener_certificate(&listener_ca)?;
        std::fs::write(dir.path().join("cert.pem"), cert)?;
        std::fs::write(dir.path().join("key.pem"), key)?;
        let (acme, management, dns, dns_management) = (
            service_port(),
            service_port(),
            service_port(),
            service_port(),
        );
        let mut config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.path().join("cert.pem"),
            "privateKey": dir.path().join("key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        if let Some(validity) = validity {
            config["pebble"]["certificateValidityPeriod"] = validity.into();
        }
        let config_path = dir.path().join("pebble.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let logs = dir.path().to_owned();
        let log =
            |name: &str| -> Result<Stdio> { Ok(std::fs::File::create(logs.join(name))?.into()) };
        let mut pebble = Pebble {
            children: Vec::new(),
            directory: format!("https://127.0.0.1:{acme}/dir"),
            listener_ca,
            root_pem: String::new(),
            dir,
        };
        let dns_at = format!("127.0.0.1:{dns}");
        pebble.children.push(
            Command::new("pebble-challtestsrv")
                .args([
                    "-dns01",
                    &dns_at,
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                ])
                .args(["-management", &format!("127.0.0.1:{dns_management}")])
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .stdout(log("challtestsrv.log")?)
                .stderr(log("challtestsrv.err")?)
                .spawn()
                .context("start pebble-challtestsrv")?,
        );
        pebble.children.push(
            Command::new("pebble")
                .arg("-config")
                .arg(&config_path)
                .args(["-dnsserver", &dns_at, "-strict=false"])
                .env("PEBBLE_VA_NOSLEEP", "1")
                // Deterministic: no nonce is refused (instant-acme retries a few, but an order
                // failing on a fourth in a row would cost the test a 30 s backoff).
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdout(log("pebble.log")?)
                .stderr(log("pebble.err")?)
                .spawn()
                .context("start pebble")?,
        );
        let directory = pebble.directory.clone();
        let ca = pebble.listener_ca.clone();
        eventually("pebble's directory", START_LIMIT, || {
            let (directory, ca) = (directory.clone(), ca.clone());
            async move {
                curl_get(&ca, &directory)
                    .ok()
                    .filter(|d| d.contains("newOrder"))
            }
        })
        .await
        .with_context(|| pebble.logs())?;
        pebble.root_pem = curl_get(
            &pebble.listener_ca,
            &format!("https://127.0.0.1:{management}/roots/0"),
        )?;
        ensure!(
            pebble.root_pem.contains("BEGIN CERTIFICATE"),
            "pebble's root: {}",
            pebble.root_pem
        );
        Ok(pebble)
    }

    /// The orders pebble created so far (from its log).
    fn orders(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("pebble.log"))
            .unwrap_or_default()
            .matches("Added order")
            .count()
    }

    /// Pebble's and its DNS's logs, for failure messages.
    fn logs(&self) -> String {
        [
            "pebble.log",
            "pebble.err",
            "challtestsrv.log",
            "challtestsrv.err",
        ]
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("--- {name}\n{}\n", tail.join("\n"))
        })
        .collect()
    }
}

/// A CA (written to `ca_path`) and pebble's listener certificate for 127.0.0.1 and localhost
/// signed by it: (certificate PEM, key PEM).
fn listener_certificate(ca_path: &Path) -> Result<(String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "p2f test: pebble's listener CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    std::fs::write(ca_path, ca_cert.pem())?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// `curl` GET trusting `ca` only, bounded to 10 s: the body.
fn curl_get(ca: &Path, url: &str) -> Result<String> {
    let output = Command::new("curl")
        .args(["-sS", "--fail", "-m", "10", "--cacert"])
        .arg(ca)
        .arg(url)
        .output()
        .context("run curl")?;
    ensure!(
        output.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// A root whose ingress listens on `http` and `https` of 127.0.0.1 and gets certificates for
/// public names from `pebble` with `challenge`.
async fn acme_root(
    pebble: &Pebble,
    http: u16,
    https: u16,
    challenge: AcmeChallenge,
) -> Result<Agent> {
    let directory = pebble.directory.clone();
    let ca = pebble.listener_ca.clone();
    agent("root")
        .configure(move |config| {
            if let Some(ingress) = &mut config.ingress {
                ingress.http = SocketAddr::from(([127, 0, 0, 1], http));
                ingress.https = SocketAddr::from(([127, 0, 0, 1], https));
                ingress.acme_email = Some("ops@example.org".to_owned());
                ingress.acme_directory = Some(directory);
                ingress.acme_ca = Some(ca);
                ingress.acme_challenge = challenge;
            }
        })
        .init()?
        .started()
        .await
}

/// Deploys a small static web server (binding 127.0.0.1) for `domain`.
async fn deploy_site(root: &Agent, domain: &str) -> Result<()> {
    require("python3", "python3")?;
    let spec = ProcessSpec::new("site", "exec python3 -m http.server --bind 127.0.0.1 $PORT")
        .with_port(service_port())
        .with_domain(domain)
        .with_health(Health::Http("/".into()));
    root.network().deploy(&[spec]).await?;
    Ok(())
}

/// The route of `domain` once `ready` holds for it (within `limit`).
async fn route_when(
    root: &Agent,
    domain: &str,
    what: &str,
    limit: Duration,
    ready: impl Fn(&RouteInfo) -> bool,
) -> Result<RouteInfo> {
    let found = eventually(&format!("{domain}: {what}"), limit, || {
        let network = root.network().clone();
        let ready = &ready;
        async move {
            let report = network.routes().await.ok()?;
            let route = report.routes.iter().find(|r| r.domain == domain)?.clone();
            ready(&route).then_some(route)
        }
    })
    .await;
    match found {
        Ok(route) => Ok(route),
        Err(e) => {
            let report = root.network().routes().await;
            bail!("{e:#}\nroutes: {report:?}\n{}", root.log_tail(30))
        }
    }
}

/// A TLS handshake with `https` for `name`, trusting `root_pem` only: the leaf certificate
/// presented (DER). Fails when the chain does not verify. Bounded to 10 s.
async fn served_leaf(https: SocketAddr, name: &str, root_pem: &str) -> Result<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let server_name = ServerName::try_from(name.to_owned())?;
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(https).await?;
        let tls = connector.connect(server_name, tcp).await?;
        let (_, connection) = tls.get_ref();
        let leaf = connection
            .peer_certificates()
            .and_then(|chain| chain.first())
            .context("no certificate presented")?;
        Ok::<_, anyhow::Error>(leaf.as_ref().to_vec())
    };
    tokio::time::timeout(Duration::from_secs(10), handshake)
        .await
        .context("no handshake within 10 s")?
}

/// `curl https://NAME:PORT/` trusting `root` only: the HTTP status.
fn curl_status(root: &Path, name: &str, https: SocketAddr) -> Result<String> {
    let resolve = format!("{name}:{}:{}", https.port(), https.ip());
    let output = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "10",
            "--cacert",
        ])
        .arg(root)
        .args(["--resolve", &resolve])
        .arg(format!("https://{name}:{}/", https.port()))
        .output()?;
    ensure!(
        output.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// The order's own time, from the root's log line `ACME certificate issued … elapsed_ms=N`.
fn issued_line(root: &Agent) -> String {
    let log = root.log();
    let ms = log
        .lines()
        .filter(|line| line.contains("ACME certificate issued"))
        .map(without_colours)
        .filter_map(|line| {
            let rest = line.split("elapsed_ms=").nth(1)?;
            Some(
                rest.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>(),
            )
        })
        .next_back();
    format!("the order took {} ms", ms.unwrap_or_else(|| "?".into()))
}

/// `line` without its ANSI colour sequences (`ESC [ … m`).
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The mode bits of `path`.
fn mode(path: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    Ok(std::fs::metadata(path)
        .with_context(|| path.display().to_string())?
        .permissions()
        .mode()
        & 0o777)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_01_gets_a_certificate_that_a_restart_keeps_without_a_new_order() -> Result<()> {
    let (http, https, dead) = (service_port(), service_port(), service_port());
    // TLS-ALPN-01 would be checked on a port nothing listens on: only HTTP-01 can pass.
    let pebble = Pebble::start(http, dead, None).await?;
    let mut root = acme_root(&pebble, http, https, AcmeChallenge::Http01).await?;
    let domain = "wiki.example.com";
    let https_at = SocketAddr::from(([127, 0, 0, 1], https));

    // Before the domain is routed the CA has been asked nothing.
    assert_eq!(pebble.orders(), 0, "{}", pebble.logs());
    let started = Instant::now();
    deploy_site(&root, domain).await?;
    // Until the certificate comes, the handshake is refused and the route says why.
    let early = served_leaf(https_at, domain, &pebble.root_pem).await;
    let report = root.network().routes().await?;
    if let Some(route) = report
        .routes
        .iter()
        .find(|r| r.domain == domain && r.certificate.is_none())
    {
        ensure!(
            early.is_err(),
            "a certificate before ACME issued one: {route:?}"
        );
        ensure!(route.certificate_error.is_some(), "{route:?}");
    }
    let route = route_when(&root, domain, "a certificate from ACME", ISSUE_LIMIT, |r| {
        r.certificate.is_some()
    })
    .await
    .with_context(|| pebble.logs())?;
    println!(
        "time to a certificate from pebble over HTTP-01: {} ms (deploy to route report); {}",
        started.elapsed().as_millis(),
        issued_line(&root)
    );
    let certificate = route.certificate.clone().context("certificate")?;
    assert!(
        certificate
            .issuer
            .starts_with("ACME: Pebble Intermediate CA"),
        "{certificate:?}"
    );
    assert!(route.certificate_error.is_none(), "{route:?}");
    let leaf = served_leaf(https_at, domain, &pebble.root_pem).await?;
    let root_path = pebble.dir.path().join("pebble-root.pem");
    std::fs::write(&root_path, &pebble.root_pem)?;
    let _ = route_when(&root, domain, "served", ISSUE_LIMIT, |r| {
        r.upstream.is_some()
    })
    .await?;
    println!(
        "served {} ms after the deploy",
        started.elapsed().as_millis()
    );
    assert_eq!(curl_status(&root_path, domain, https_at)?, "200");
    assert_eq!(pebble.orders(), 1, "{}", pebble.logs());

    // Stored on the root, private.
    let store = root.config().data_dir.join("acme").join(format!(
        "127.0.0.1-{}-dir",
        pebble
            .directory
            .rsplit(':')
            .next()
            .unwrap_or("")
            .trim_end_matches("/dir")
    ));
    for file in [
        "account.json",
        "certificates/wiki.example.com.key",
        "certificates/wiki.example.com.crt",
    ] {
        assert_eq!(mode(&store.join(file))?, 0o600, "{file}");
    }
    // An unknown challenge token is a 404 (nothing is proxied on that path).
    let plain = format!("http://127.0.0.1:{http}/.well-known/acme-challenge/nope");
    let output = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "10",
            "-H",
        ])
        .arg(format!("Host: {domain}"))
        .arg(&plain)
        .output()?;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "404");

    // A restart presents the same certificate and orders nothing.
    let restart = Instant::now();
    root.sigterm()?;
    println!("stopped in {} ms", restart.elapsed().as_millis());
    root.start().await?;
    println!("restarted in {} ms", restart.elapsed().as_millis());
    let again = eventually(
        "the stored certificate after the restart",
        ISSUE_LIMIT,
        || {
            let root_pem = pebble.root_pem.clone();
            async move { served_leaf(https_at, domain, &root_pem).await.ok() }
        },
    )
    .await?;
    assert_eq!(
        again, leaf,
        "the restarted root presents the stored certificate"
    );
    println!(
        "stored certificate served {} ms after the restart began",
        restart.elapsed().as_millis()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pebble.orders(),
        1,
        "no new order after the restart\n{}",
        pebble.logs()
    );
    assert!(
        root.log().contains("ACME certificate loaded"),
        "{}",
        root.log_tail(30)
    );
    let route = route_when(&root, domain, "the same certificate", ISSUE_LIMIT, |r| {
        r.certificate.is_some()
    })
    .await?;
    assert_eq!(route.certificate, Some(certificate));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_gets_a_certificate_and_renews_it_without_downtime() -> Result<()> {
    let (http, https, dead) = (service_port(), service_port(), service_port());
    // HTTP-01 would be checked on a port nothing listens on: only TLS-ALPN-01 can pass (and
    // `auto` tries it first). Certificates live 30 s: renewed after about 20.
    let validity = 30;
    let pebble = Pebble::start(dead, https, Some(validity)).await?;
    let root = acme_root(&pebble, http, https, AcmeChallenge::Auto).await?;
    let domain = "app.example.net";
    let https_at = SocketAddr::from(([127, 0, 0, 1], https));

    let started = Instant::now();
    deploy_site(&root, domain).await?;
    let route = route_when(&root, domain, "a certificate from ACME", ISSUE_LIMIT, |r| {
        r.certificate.is_some()
    })
    .await
    .with_context(|| pebble.logs())?;
    println!(
        "time to a certificate from pebble over TLS-ALPN-01: {} ms (deploy to route report); {}",
        started.elapsed().as_millis(),
        issued_line(&root)
    );
    let first = route.certificate.clone().context("certificate")?;
    let issued_at = Instant::now();
    let leaf = served_leaf(https_at, domain, &pebble.root_pem).await?;
    assert_eq!(pebble.orders(), 1, "{}", pebble.logs());

    // Handshakes every 200 ms until another certificate is presented: none may fail.
    let deadline = Instant::now() + Duration::from_secs(validity + 20);
    let (mut handshakes, mut failures) = (0, Vec::new());
    let renewed = loop {
        ensure!(
            Instant::now() < deadline,
            "no renewal within {validity} + 20 s ({handshakes} handshakes, failures {failures:?})\n{}\n{}",
            root.log_tail(30),
            pebble.logs()
        );
        handshakes += 1;
        match served_leaf(https_at, domain, &pebble.root_pem).await {
            Ok(now) if now != leaf => break now,
            Ok(_) => {}
            Err(e) => failures.push(format!("{e:#}")),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let renewed_after = issued_at.elapsed();
    assert!(failures.is_empty(), "{failures:?}");
    // At two thirds of the lifetime (20 s), up to a thirtieth earlier (1 s); the first
    // certificate was seen a little after it was issued, and its notBefore is whole seconds.
    assert!(
        renewed_after >= Duration::from_secs(validity * 2 / 3 - validity / 30 - 3),
        "renewed too early: {renewed_after:?} after the first certificate"
    );
    assert_ne!(renewed, leaf);
    assert_eq!(pebble.orders(), 2, "{}", pebble.logs());
    let route = route_when(&root, domain, "the renewed certificate", ISSUE_LIMIT, |r| {
        r.certificate
            .as_ref()
            .is_some_and(|c| c.not_after > first.not_after)
    })
    .await?;
    println!(
        "renewed {} ms after the first certificate, {handshakes} handshakes, none failed; {route:?}",
        renewed_after.as_millis()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_order_is_tried_again_only_after_a_pause() -> Result<()> {
    let (http, https, dead_http, dead_tls) = (
        service_port(),
        service_port(),
        service_port(),
        service_port(),
    );
    // Pebble checks both challenges on ports nothing listens on: every order fails.
    let pebble = Pebble::start(dead_http, dead_tls, None).await?;
    let root = acme_root(&pebble, http, https, AcmeChallenge::Auto).await?;
    let domain = "down.example.org";
    let https_at = SocketAddr::from(([127, 0, 0, 1], https));
    deploy_site(&root, domain).await?;
    let route = route_when(&root, domain, "a failed order", ISSUE_LIMIT, |r| {
        r.certificate_error
            .as_deref()
            .is_some_and(|e| e.contains("failure 1 in a row"))
    })
    .await
    .with_context(|| pebble.logs())?;
    let error = route.certificate_error.unwrap_or_default();
    // `auto` tried TLS-ALPN-01, then HTTP-01 in a second order; the CA's reason is shown.
    assert!(error.starts_with("Http01: "), "{error}");
    assert!(error.contains("connection refused"), "{error}");
    assert_eq!(pebble.orders(), 2, "{}", pebble.logs());
    // Handshakes keep asking for the name (each wakes the manager), yet nothing is ordered
    // before the pause (22.5 s at least) is over.
    for _ in 0..25 {
        ensure!(
            served_leaf(https_at, domain, &pebble.root_pem)
                .await
                .is_err(),
            "a certificate although every order fails"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(pebble.orders(), 2, "{}", pebble.logs());
    Ok(())
}
