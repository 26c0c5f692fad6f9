//! Cluster trust material: the shared secret, the cluster CA that `p2f init` creates, node
//! certificates signed by it, the rustls configurations built from them, and the files they live in.

use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::server::ResolvesServerCert;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use subtle::ConstantTimeEq as _;

use crate::fsutil;
use crate::identity::Role;

/// How long the cluster CA is valid, in years.
const CA_VALID_YEARS: i32 = 10;
/// How long a node certificate is valid, in years.
const NODE_VALID_YEARS: i32 = 5;
/// Shortest secret [`Secret::parse`] accepts.
const SECRET_MIN_LEN: usize = 16;
/// Longest secret [`Secret::parse`] accepts (it travels in an HTTP header).
const SECRET_MAX_LEN: usize = 1024;
/// Names every node certificate carries, so local tools can always reach the local agent.
const ALWAYS_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Everything that can go wrong with the cluster's trust material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// A file or directory operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done: "read", "write", "create", ...
        action: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A trust file the node needs is absent.
    #[error("{} does not exist: run `p2f init` on the root (or join a cluster) first", path.display())]
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// `create` found trust files already in place.
    #[error("refusing to overwrite existing cluster files in {}", dir.display())]
    AlreadyExists {
        /// The directory holding them.
        dir: PathBuf,
    },
    /// Issuing was asked of a node that only holds the CA certificate.
    #[error("this node has no CA key, only the root can issue certificates")]
    NoCaKey,
    /// A secret that is too short, too long or contains unusable characters.
    #[error("invalid cluster secret: {reason}")]
    BadSecret {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// PEM text that does not hold what it should.
    #[error("invalid {what}: {reason}")]
    BadPem {
        /// Which object: "CA certificate", "CA key", "node certificate", "node key".
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A member's certificate signing request that cannot be signed.
    #[error("invalid certificate request: {0}")]
    BadRequest(String),
    /// Certificate or key generation failed.
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls rejected the configuration.
    #[error("tls configuration failed: {0}")]
    Tls(#[from] rustls::Error),
}

impl From<fsutil::WriteError> for ClusterError {
    fn from(e: fsutil::WriteError) -> ClusterError {
        ClusterError::Io {
            action: e.action,
            path: e.path,
            source: e.source,
        }
    }
}

impl ClusterError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> ClusterError {
        ClusterError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }

    fn pem(what: &'static str, reason: impl fmt::Display) -> ClusterError {
        ClusterError::BadPem {
            what,
            reason: reason.to_string(),
        }
    }
}

/// The cluster secret every control request and gossip datagram carries.
///
/// Generated secrets are 32 random bytes as 64 lowercase hex characters. `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// A fresh secret from the thread-local CSPRNG (seeded by the OS).
    pub fn generate() -> Secret {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let mut text = String::with_capacity(64);
        for byte in bytes {
            text.push_str(&format!("{byte:02x}"));
        }
        Secret(text)
    }

    /// Reads a secret from text (a file or an environment variable); surrounding whitespace is
    /// ignored.
    pub fn parse(text: &str) -> Result<Secret, ClusterError> {
        let text = text.trim();
        if text.len() < SECRET_MIN_LEN {
            return Err(ClusterError::BadSecret {
                reason: "shorter than 16 characters",
            });
        }
        if text.len() > SECRET_MAX_LEN {
            return Err(ClusterError::BadSecret {
                reason: "longer than 1024 characters",
            });
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClusterError::BadSecret {
                reason: "only printable ASCII without spaces is allowed",
            });
        }
        Ok(Secret(text.to_owned()))
    }

    /// The text form, for files and `Authorization` headers.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this secret, compared in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        mine.len() == presented.len() && bool::from(mine.ct_eq(presented))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The cluster CA: its certificate, and on the root also its private key.
#[derive(Clone)]
pub struct ClusterCa {
    cert_pem: String,
    key_pem: Option<String>,
    /// The certificate's common name (for `Debug`).
    common_name: String,
}

impl ClusterCa {
    /// A new self-signed CA (ECDSA P-256, CN `P2F cluster CA <name>`, valid 10 years).
    pub fn generate(cluster_name: &str) -> Result<ClusterCa, ClusterError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = named(&format!("P2F cluster CA {cluster_name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = ca_key_usages();
        set_validity(&mut params, CA_VALID_YEARS);
        let cert = params.self_signed(&key)?;
        // Going through `from_pem` checks that a loaded CA behaves exactly like a fresh one.
        ClusterCa::from_pem(cert.pem(), Some(key.serialize_pem()))
    }

    /// A CA from PEM text; checks that the certificate parses and that the key, if any, is its key.
    pub fn from_pem(cert_pem: String, key_pem: Option<String>) -> Result<ClusterCa, ClusterError> {
        const WHAT: &str = "CA certificate";
        let mut certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes());
        let der = match certs.next() {
            Some(Ok(der)) => der,
            Some(Err(e)) => return Err(ClusterError::pem(WHAT, e)),
            None => return Err(ClusterError::pem(WHAT, "no CERTIFICATE block found")),
        };
        if certs.next().is_some() {
            return Err(ClusterError::pem(WHAT, "more than one CERTIFICATE block"));
        }
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| ClusterError::pem(WHAT, format!("not a well-formed certificate ({e})")))?;
        if let Some(key_pem) = &key_pem {
            let key = KeyPair::from_pem(key_pem).map_err(|e| ClusterError::pem("CA key", e))?;
            if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(ClusterError::pem(
                    "CA key",
                    "it does not belong to the CA certificate",
                ));
            }
        }
        let common_name = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or("?")
            .to_owned();
        Ok(ClusterCa {
            cert_pem,
            key_pem,
            common_name,
        })
    }

    /// The CA certificate in PEM form.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The cluster's name and a short fingerprint of its CA (`homelab, CA 3f2a9c1b`): what a
    /// person can tell two clusters apart by, even of the same name.
    pub fn label(&self) -> String {
        use sha2::Digest as _;
        let name = self
            .common_name
            .strip_prefix("P2F cluster CA ")
            .unwrap_or(&self.common_name);
        let digest = sha2::Sha256::digest(self.cert_pem.as_bytes());
        let short: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        format!("{name}, CA {short}")
    }

    /// The CA key in PEM form; `None` on member nodes.
    pub fn key_pem(&self) -> Option<&str> {
        self.key_pem.as_deref()
    }

    /// Issues a member's certificate with a new key made here; see [`ClusterCa::issue_as`].
    pub fn issue(&self, node: &str, hosts: &[String]) -> Result<NodeCert, ClusterError> {
        self.issue_as(Role::Member, node, hosts)
    }

    /// Issues a certificate for `role` and `name` with a new key made here (the root's own
    /// certificate, an operator's); a member makes its key itself and sends a
    /// [`CertRequest`] to [`ClusterCa::sign_as`].
    pub fn issue_as(
        &self,
        role: Role,
        name: &str,
        hosts: &[String],
    ) -> Result<NodeCert, ClusterError> {
        let request = CertRequest::new(name)?;
        let cert_pem = self.sign_as(role, name, hosts, request.csr_pem())?;
        request.complete(cert_pem)
    }

    /// Signs a member's certificate request; see [`ClusterCa::sign_as`].
    pub fn sign(
        &self,
        node: &str,
        hosts: &[String],
        csr_pem: &str,
    ) -> Result<String, ClusterError> {
        self.sign_as(Role::Member, node, hosts, csr_pem)
    }

    /// Signs a certificate request for `name` in `role` (subject `CN=name, O=p2f:ROLE`, see
    /// [`crate::identity`]), valid 5 years, for the request's key, which must be ECDSA P-256.
    /// Only the key and the proof that the requester holds it are taken from the request;
    /// names and usages are the CA's:
    /// - a node (root or member) gets `NAME.node.p2f`, `hosts`, `localhost`, `127.0.0.1` and
    ///   `::1` as subject alternative names (IP literals as IP SANs, other names as DNS SANs),
    ///   usable for server and client authentication;
    /// - an operator gets no SAN and client authentication only.
    ///
    /// Errors: [`ClusterError::BadRequest`] for another key type, a name that is not a valid
    /// node name, or a host that is a wildcard, ends in `.node.p2f` or is no DNS name or IP
    /// address; [`ClusterError::NoCaKey`] off the root.
    pub fn sign_as(
        &self,
        role: Role,
        name: &str,
        hosts: &[String],
        csr_pem: &str,
    ) -> Result<String, ClusterError> {
        let ca_key_pem = self.key_pem.as_deref().ok_or(ClusterError::NoCaKey)?;
        let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| ClusterError::pem("CA key", e))?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)
            .map_err(|e| ClusterError::pem("CA certificate", e))?;
        // rcgen checks the request's signature (the member holds the key) but takes the key's
        // type from the signature algorithm: the key itself is checked here.
        let request = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| ClusterError::BadRequest(e.to_string()))?;
        if request.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 || !is_p256_key(csr_pem) {
            return Err(ClusterError::BadRequest(
                "the key must be ECDSA P-256, the request signed with SHA-256 (what `p2f node join` makes)".into(),
            ));
        }
        p2f_model::NodeName::new(name).map_err(|e| ClusterError::BadRequest(e.to_string()))?;
        let mut params = named(name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, role.organization());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if role.is_node() {
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            check_hosts(hosts)?;
            let mut sans = vec![SanType::DnsName(
                crate::identity::node_server_name(name).try_into()?,
            )];
            sans.extend(subject_alt_names(hosts)?);
            params.subject_alt_names = sans;
        } else {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        set_validity(&mut params, NODE_VALID_YEARS);
        params.serial_number = Some(random_serial());
        Ok(params.signed_by(&request.public_key, &issuer)?.pem())
    }
}

/// A random positive serial number of 16 bytes (RFC 5280 §4.1.2.2: unique per CA, at most 20
/// bytes): what a revocation names.
fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    rcgen::SerialNumber::from(bytes.to_vec())
}

/// Refuses hosts the CA cannot vouch for in any certificate: wildcards, names in the nodes'
/// own `.node.p2f` namespace, and text that is neither a DNS name nor an IP address.
fn check_hosts(hosts: &[String]) -> Result<(), ClusterError> {
    for host in hosts {
        let bare = host.trim();
        let bare = bare
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(bare);
        if bare.parse::<IpAddr>().is_ok() {
            continue;
        }
        let lower = bare.to_ascii_lowercase();
        let refuse = |why: &str| Err(ClusterError::BadRequest(format!("host {host:?}: {why}")));
        if lower.contains('*') {
            return refuse("wildcards are never signed");
        }
        if lower.ends_with(crate::identity::NODE_DNS_SUFFIX) || lower == "node.p2f" {
            return refuse("names under .node.p2f are the CA's to give");
        }
        let label_ok = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        if lower.is_empty() || lower.len() > 253 || !lower.split('.').all(label_ok) {
            return refuse("not a DNS name or an IP address");
        }
    }
    Ok(())
}

/// A certificate the cluster CA issued for a web site (the ingress's local names), with its
/// new key and its end of validity.
#[derive(Clone)]
pub struct SiteCert {
    /// The certificate, signed by the cluster CA (PEM).
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM).
    pub key_pem: String,
    /// When it stops being valid, in seconds since the Unix epoch.
    pub not_after: u64,
}

impl fmt::Debug for SiteCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteCert")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Issues a server certificate for one site name (`wiki.home.arpa`, or an IP literal) with a
    /// new ECDSA P-256 key: CN and the only SAN are `name`, usable for server authentication
    /// only (never as a node's certificate), valid from yesterday for `days` days.
    ///
    /// Errors: [`ClusterError::NoCaKey`] off the root; [`ClusterError::Certificate`] for a name
    /// that is neither a DNS name nor an IP address.
    pub fn issue_site(&self, name: &str, days: u32) -> Result<SiteCert, ClusterError> {
        const DAY: Duration = Duration::from_secs(86_400);
        let ca_key_pem = self.key_pem.as_deref().ok_or(ClusterError::NoCaKey)?;
        let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| ClusterError::pem("CA key", e))?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)
            .map_err(|e| ClusterError::pem("CA certificate", e))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = named(name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.subject_alt_names = vec![match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.to_ascii_lowercase().try_into()?),
        }];
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let not_before = now.saturating_sub(DAY);
        let not_after = now + DAY * days;
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        // Fails only after the year 9999.
        let at = |since_epoch: Duration| {
            since_epoch
                .try_into()
                .ok()
                .and_then(|since_epoch| epoch.checked_add(since_epoch))
                .unwrap_or(epoch)
        };
        params.not_before = at(not_before);
        params.not_after = at(not_after);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(SiteCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after: not_after.as_secs(),
        })
    }
}

/// A node's new private key and its request for a certificate (PKCS#10, signed with that key):
/// the key stays on the node, only the request travels to the root.
pub struct CertRequest {
    key: KeyPair,
    csr_pem: String,
}

impl CertRequest {
    /// A new ECDSA P-256 key and a request naming `node`.
    pub fn new(node: &str) -> Result<CertRequest, ClusterError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let csr_pem = named(node).serialize_request(&key)?.pem()?;
        Ok(CertRequest { key, csr_pem })
    }

    /// The request in PEM form (`CERTIFICATE REQUEST`).
    pub fn csr_pem(&self) -> &str {
        &self.csr_pem
    }

    /// The node's certificate and key, once the root signed the request; the certificate must
    /// certify this request's key.
    pub fn complete(self, cert_pem: String) -> Result<NodeCert, ClusterError> {
        const WHAT: &str = "node certificate";
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| ClusterError::pem(WHAT, e))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| ClusterError::pem(WHAT, format!("not a well-formed certificate ({e})")))?;
        if x509.public_key().subject_public_key.data.as_ref() != self.key.public_key_raw() {
            return Err(ClusterError::pem(
                WHAT,
                "it certifies another key than the one this node made",
            ));
        }
        Ok(NodeCert {
            cert_pem,
            key_pem: self.key.serialize_pem(),
        })
    }
}

impl fmt::Debug for CertRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertRequest").finish_non_exhaustive()
    }
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("subject", &self.common_name)
            .field("has_key", &self.key_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// A node's TLS certificate and private key, both PEM.
#[derive(Clone)]
pub struct NodeCert {
    /// The certificate, signed by the cluster CA.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

impl NodeCert {
    /// The certificate's file in a node's TLS directory (`DATA/tls`).
    pub const CERT_FILE: &'static str = "node.pem";
    /// The private key's file in a node's TLS directory.
    pub const KEY_FILE: &'static str = "node.key";

    /// Writes both into `dir` (created if missing), readable by the owner only.
    pub fn save(&self, dir: &Path) -> Result<(), ClusterError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| ClusterError::io("create directory", dir, e))?;
        fsutil::write_private(&dir.join(NodeCert::CERT_FILE), &self.cert_pem)?;
        fsutil::write_private(&dir.join(NodeCert::KEY_FILE), &self.key_pem)?;
        Ok(())
    }

    /// Reads what [`NodeCert::save`] wrote in `dir`; `None` when either file is missing.
    pub fn load(dir: &Path) -> Option<NodeCert> {
        let cert_pem = fs::read_to_string(dir.join(NodeCert::CERT_FILE)).ok()?;
        let key_pem = fs::read_to_string(dir.join(NodeCert::KEY_FILE)).ok()?;
        Some(NodeCert { cert_pem, key_pem })
    }
}

impl fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCert")
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &format_args!("<redacted>"))
            .finish()
    }
}

/// ALPN offering HTTP/1.1 only: the control API's.
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];
/// ALPN offering HTTP/2, then HTTP/1.1: the ingress's.
pub const ALPN_H2_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The rustls server configuration of the control API: always `cert` (a single-certificate
/// resolver), no client certificates, [`ALPN_HTTP1`].
pub fn server_config(cert: &NodeCert) -> Result<Arc<rustls::ServerConfig>, ClusterError> {
    let key = load_certified_key(
        &cert.cert_pem,
        &cert.key_pem,
        ["node certificate", "node key"],
    )?;
    resolving_server_config(Arc::new(SingleCertAndKey::from(key)), ALPN_HTTP1)
}

/// The rustls server configuration of the control API with mutual TLS: presents `cert`, asks
/// every client for a certificate from the CA in `ca_pem` ([`ALPN_HTTP1`]). A client that
/// shows none is still let through the handshake (joining needs no certificate, only a join
/// token); one that shows a certificate the CA did not sign, or an expired one, is refused in
/// the handshake. The API then authorizes each request by the certificate's role and name
/// ([`crate::identity::Caller`]).
pub fn api_server_config(
    cert: &NodeCert,
    ca_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, ClusterError> {
    let key = load_certified_key(
        &cert.cert_pem,
        &cert.key_pem,
        ["node certificate", "node key"],
    )?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(ca_pem)?),
        provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| ClusterError::pem("CA certificate", e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
    config.alpn_protocols = ALPN_HTTP1.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A rustls server configuration that presents, in each handshake, the certificate `resolver`
/// picks (say, a [`crate::server::SniResolver`]), and offers the `alpn` protocols in order of
/// preference (the first the client also offers wins; a client offering only others is
/// refused).
///
/// The protocol versions and cipher suites are the crate's usual ones (ring, TLS 1.2 and 1.3).
/// No client certificate is asked for: mutual TLS would pass a `ClientCertVerifier` in place
/// of `with_no_client_auth` here. [`crate::server::serve`] serves HTTP/2 when `alpn` offers
/// `h2` ([`ALPN_H2_HTTP1`]).
pub fn resolving_server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, ClusterError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A certificate chain (PEM, the server's certificate first) and its private key (PEM: PKCS#8,
/// SEC1 or PKCS#1), ready for a certificate resolver; checks that the key belongs to the first
/// certificate.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, ClusterError> {
    load_certified_key(cert_pem, key_pem, ["certificate", "private key"])
}

/// [`certified_key`], naming the certificate and the key `what` in errors.
fn load_certified_key(
    cert_pem: &str,
    key_pem: &str,
    what: [&'static str; 2],
) -> Result<Arc<CertifiedKey>, ClusterError> {
    let [cert_what, key_what] = what;
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClusterError::pem(cert_what, e))?;
    if chain.is_empty() {
        return Err(ClusterError::pem(cert_what, "no CERTIFICATE block found"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| ClusterError::pem(key_what, e))?;
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider())?))
}

/// The rustls client configuration for talking to cluster nodes: trusts only the CA in
/// `ca_pem`, shows no client certificate (enough for joining and for tests of refusals).
pub fn client_config(ca_pem: &str) -> Result<rustls::ClientConfig, ClusterError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The rustls client configuration of `credentials`: trusts only their CA and shows their
/// certificate, when they have one ([`client_config`] otherwise).
pub fn client_config_for(credentials: &Credentials) -> Result<rustls::ClientConfig, ClusterError> {
    let Some(identity) = &credentials.identity else {
        return client_config(&credentials.ca_pem);
    };
    let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClusterError::pem("client certificate", e))?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
        .map_err(|e| ClusterError::pem("client key", e))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&credentials.ca_pem)?)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The CA certificates in `ca_pem` as a root store.
fn roots(ca_pem: &str) -> Result<rustls::RootCertStore, ClusterError> {
    const WHAT: &str = "CA certificate";
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(der.map_err(|e| ClusterError::pem(WHAT, e))?)?;
    }
    if roots.is_empty() {
        return Err(ClusterError::pem(WHAT, "no CERTIFICATE block found"));
    }
    Ok(roots)
}

/// The cluster's trust files in a directory: `ca.pem`, `ca.key` (mode 0600; only on the root),
/// `secret` (mode 0600).
#[derive(Debug, Clone)]
pub struct ClusterFiles {
    dir: PathBuf,
}

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const SECRET_FILE: &str = "secret";

impl ClusterFiles {
    /// The trust files in `dir` (nothing is read or written yet).
    pub fn new(dir: impl Into<PathBuf>) -> ClusterFiles {
        ClusterFiles { dir: dir.into() }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the CA certificate, `ca.pem`.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// Path of the CA key, `ca.key` (present only on the root).
    pub fn ca_key_path(&self) -> PathBuf {
        self.dir.join(CA_KEY_FILE)
    }

    /// Path of the cluster secret, `secret`.
    pub fn secret_path(&self) -> PathBuf {
        self.dir.join(SECRET_FILE)
    }

    /// Whether the cluster has been set up here (`ca.pem` exists).
    pub fn exists(&self) -> bool {
        self.ca_cert_path().exists()
    }

    /// Creates a new cluster: a CA and a secret, written to the directory (created with mode
    /// 0700 if absent). Refuses to overwrite any existing trust file.
    pub fn create(&self, cluster_name: &str) -> Result<(ClusterCa, Secret), ClusterError> {
        self.refuse_existing(&[CA_CERT_FILE, CA_KEY_FILE, SECRET_FILE])?;
        let ca = ClusterCa::generate(cluster_name)?;
        let secret = Secret::generate();
        let key_pem = ca.key_pem().ok_or(ClusterError::NoCaKey)?;
        self.ensure_dir()?;
        // `ca.pem` goes last: `exists()` looks at it, so a half-written cluster never looks done.
        let files: [(&str, &str, u32); 3] = [
            (CA_KEY_FILE, key_pem, fsutil::PRIVATE),
            (
                SECRET_FILE,
                &format!("{}\n", secret.expose()),
                fsutil::PRIVATE,
            ),
            (CA_CERT_FILE, ca.cert_pem(), 0o644),
        ];
        let mut written = Vec::new();
        for (name, contents, mode) in files {
            let path = self.dir.join(name);
            match fsutil::write_atomic(&path, contents, mode) {
                Ok(()) => written.push(path),
                Err(e) => {
                    for path in written {
                        let _ = fs::remove_file(path);
                    }
                    return Err(e.into());
                }
            }
        }
        Ok((ca, secret))
    }

    /// Reads the CA (with its key when `ca.key` is present) and the secret.
    pub fn load(&self) -> Result<(ClusterCa, Secret), ClusterError> {
        let cert_pem = self.read_required(CA_CERT_FILE)?;
        let key_path = self.ca_key_path();
        let key_pem = match fs::read_to_string(&key_path) {
            Ok(text) => {
                warn_if_readable_by_others(&key_path);
                Some(text)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(ClusterError::io("read", &key_path, e)),
        };
        let secret_text = self.read_required(SECRET_FILE)?;
        warn_if_readable_by_others(&self.secret_path());
        let ca = ClusterCa::from_pem(cert_pem, key_pem)?;
        let secret = Secret::parse(&secret_text)?;
        Ok((ca, secret))
    }

    /// Writes what a member node needs to join: `ca.pem` and `secret`, no key. Replaces an
    /// earlier membership, but refuses to touch a root's directory (one holding `ca.key`).
    pub fn write_member(&self, ca_pem: &str, secret: &Secret) -> Result<(), ClusterError> {
        ClusterCa::from_pem(ca_pem.to_owned(), None)?;
        self.refuse_existing(&[CA_KEY_FILE])?;
        self.ensure_dir()?;
        fsutil::write_private(&self.secret_path(), format!("{}\n", secret.expose()))?;
        fsutil::write_atomic(&self.ca_cert_path(), ca_pem, 0o644)?;
        Ok(())
    }

    fn refuse_existing(&self, names: &[&str]) -> Result<(), ClusterError> {
        for name in names {
            let path = self.dir.join(name);
            match fs::symlink_metadata(&path) {
                Ok(_) => {
                    return Err(ClusterError::AlreadyExists {
                        dir: self.dir.clone(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ClusterError::io("inspect", &path, e)),
            }
        }
        Ok(())
    }

    fn ensure_dir(&self) -> Result<(), ClusterError> {
        // Parents get the usual mode (they hold the node's data, which service users traverse);
        // only the cluster directory itself is private.
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)
                .map_err(|e| ClusterError::io("create directory", parent, e))?;
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| ClusterError::io("create directory", &self.dir, e))
    }

    fn read_required(&self, name: &str) -> Result<String, ClusterError> {
        read(&self.dir.join(name))
    }
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
            "cluster secret material is readable by other users; chmod 600 it"
        );
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether the request's public key is an uncompressed ECDSA P-256 point.
fn is_p256_key(csr_pem: &str) -> bool {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
    use x509_parser::prelude::FromDer as _;
    let Ok(der) =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
    else {
        return false;
    };
    let Ok((_, request)) = X509CertificationRequest::from_der(der.as_ref()) else {
        return false;
    };
    let spki = &request.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    let point = spki.subject_public_key.data.as_ref();
    spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && curve == Some(OID_EC_P256)
        && point.len() == 65
        && point.first() == Some(&0x04)
}

/// Certificate parameters whose subject is only the common name `cn`.
fn named(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
}

fn ca_key_usages() -> Vec<KeyUsagePurpose> {
    vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ]
}

/// Every host as a SAN (IP literal → IP SAN, else DNS SAN), plus the local names, without
/// duplicates.
fn subject_alt_names(hosts: &[String]) -> Result<Vec<SanType>, ClusterError> {
    let mut sans: Vec<SanType> = Vec::new();
    let extra = ALWAYS_HOSTS.iter().copied();
    for host in hosts.iter().map(|h| h.trim()).chain(extra) {
        // Accept the bracketed form of IPv6 literals that appears in URLs.
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if bare.is_empty() {
            continue;
        }
        let san = match bare.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(bare.to_ascii_lowercase().try_into()?),
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

/// Sets `not_before` to yesterday (tolerating clock skew between nodes) and `not_after` to the
/// same calendar day `years` later.
fn set_validity(params: &mut CertificateParams, years: i32) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    set_validity_at(params, now, years);
}

/// [`set_validity`] for a certificate made `now` after the Unix epoch; both bounds are at
/// midnight UTC.
fn set_validity_at(params: &mut CertificateParams, now: Duration, years: i32) {
    const DAY: Duration = Duration::from_secs(86_400);
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let date = |since_epoch: Duration| {
        // Fails only after the year 9999.
        let when = since_epoch
            .try_into()
            .ok()
            .and_then(|since_epoch| epoch.checked_add(since_epoch))
            .unwrap_or(epoch);
        (when.year(), u8::from(when.month()), when.day())
    };
    let (y, m, d) = date(now.saturating_sub(DAY));
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = date(now);
    // 28 exists in every month, so a 29 February start never produces an invalid date.
    params.not_after = rcgen::date_time_ymd(y + years, m, d.min(28));
}

/// What a client of the control API shows: the CA it trusts, and the certificate and key it
/// proves who it is with (none only for joining, which a join token authorizes).
#[derive(Clone)]
pub struct Credentials {
    /// The cluster CA certificate (PEM).
    pub ca_pem: String,
    /// The client certificate and key, from the cluster CA.
    pub identity: Option<NodeCert>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.caller())
            .finish_non_exhaustive()
    }
}

/// The files of an operator's credentials in its directory.
const OPERATOR_CERT: &str = "operator.pem";
const OPERATOR_KEY: &str = "operator.key";
const OPERATOR_CA: &str = "ca.pem";
const OPERATOR_ROOT: &str = "root";

impl Credentials {
    /// Credentials from `ca_pem` and a client certificate.
    pub fn new(ca_pem: impl Into<String>, identity: Option<NodeCert>) -> Credentials {
        Credentials {
            ca_pem: ca_pem.into(),
            identity,
        }
    }

    /// Who the certificate says this is (`None` without one).
    pub fn caller(&self) -> Option<crate::identity::Caller> {
        self.identity
            .as_ref()
            .and_then(|cert| crate::identity::Caller::from_pem(&cert.cert_pem))
    }

    /// A node's own credentials: the CA in its cluster directory (`DATA/cluster/ca.pem`) and
    /// its certificate in `DATA/tls` ([`NodeCert::load`]).
    ///
    /// Errors: [`ClusterError::Missing`] when either is absent.
    pub fn of_node(cluster_dir: &Path, tls_dir: &Path) -> Result<Credentials, ClusterError> {
        let ca_pem = read(&cluster_dir.join(OPERATOR_CA))?;
        let identity = NodeCert::load(tls_dir).ok_or_else(|| ClusterError::Missing {
            path: tls_dir.join(NodeCert::CERT_FILE),
        })?;
        Ok(Credentials::new(ca_pem, Some(identity)))
    }

    /// An operator's credentials from its directory (what `p2f init` and `p2f operator add`
    /// write): `ca.pem`, `operator.pem`, `operator.key` and `root` (the root's API address).
    /// Returns them with that address.
    ///
    /// Errors: [`ClusterError::Missing`] for a missing file.
    pub fn operator(dir: &Path) -> Result<(Credentials, String), ClusterError> {
        let ca_pem = read(&dir.join(OPERATOR_CA))?;
        let cert_pem = read(&dir.join(OPERATOR_CERT))?;
        let key_pem = read(&dir.join(OPERATOR_KEY))?;
        let root = read(&dir.join(OPERATOR_ROOT))?.trim().to_owned();
        let credentials = Credentials::new(ca_pem, Some(NodeCert { cert_pem, key_pem }));
        Ok((credentials, root))
    }

    /// Writes an operator's directory (created 0700; the key 0600): see
    /// [`Credentials::operator`]. `root` is the root's API address (`host:port`).
    pub fn save_operator(&self, dir: &Path, root: &str) -> Result<(), ClusterError> {
        use std::os::unix::fs::DirBuilderExt as _;
        let identity = self.identity.as_ref().ok_or_else(|| ClusterError::BadPem {
            what: "operator certificate",
            reason: "none to save".into(),
        })?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| ClusterError::Io {
                action: "create directory",
                path: dir.to_owned(),
                source,
            })?;
        fsutil::write_atomic(&dir.join(OPERATOR_CA), &self.ca_pem, 0o644)?;
        fsutil::write_atomic(&dir.join(OPERATOR_CERT), &identity.cert_pem, 0o644)?;
        fsutil::write_private(&dir.join(OPERATOR_KEY), &identity.key_pem)?;
        fsutil::write_atomic(&dir.join(OPERATOR_ROOT), format!("{root}\n"), 0o644)?;
        Ok(())
    }

    /// Whether `dir` holds an operator's credentials.
    pub fn is_operator_dir(dir: &Path) -> bool {
        dir.join(OPERATOR_CERT).is_file() && dir.join(OPERATOR_KEY).is_file()
    }
}

/// A trust file's text; [`ClusterError::Missing`] when it is not there.
fn read(path: &Path) -> Result<String, ClusterError> {
    fs::read_to_string(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            ClusterError::Missing {
                path: path.to_owned(),
            }
        } else {
            ClusterError::io("read", path, e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    #[test]
    fn secret_round_trips_through_text() {
        let secret = Secret::generate();
        assert_eq!(secret.expose().len(), 64);
        assert!(
            secret
                .expose()
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        let parsed = Secret::parse(&format!("  {}\n", secret.expose())).expect("parse");
        assert_eq!(parsed.expose(), secret.expose());
        assert_ne!(Secret::generate().expose(), secret.expose());
    }

    #[test]
    fn secret_parse_rejects_bad_text() {
        let check = |text: &str| {
            assert!(
                matches!(Secret::parse(text), Err(ClusterError::BadSecret { .. })),
                "{text:?} should be rejected"
            );
        };
        check("");
        check("short");
        check("fifteen-chars-x");
        check("has a space inside it");
        check("has\ta-tab-inside-it");
        check("non-ascii-é-inside-it");
        check(&"x".repeat(2000));
        assert!(Secret::parse("sixteen-chars-xx").is_ok());
    }

    #[test]
    fn secret_matches_only_itself() {
        let secret = Secret::parse("correct-horse-battery-staple").expect("parse");
        assert!(secret.matches(b"correct-horse-battery-staple"));
        assert!(!secret.matches(b"correct-horse-battery-stapla"));
        assert!(!secret.matches(b"correct-horse-battery-staple!"));
        assert!(!secret.matches(b"correct"));
        assert!(!secret.matches(b""));
    }

    #[test]
    fn debug_redacts_secrets_and_keys() {
        let secret = Secret::generate();
        let shown = format!("{secret:?}");
        assert_eq!(shown, "Secret(<redacted>)");

        let ca = ClusterCa::generate("test").expect("ca");
        let shown = format!("{ca:?}");
        assert!(shown.contains("P2F cluster CA test"), "{shown}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");

        let cert = ca.issue("n1", &[]).expect("issue");
        let shown = format!("{cert:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(!shown.contains(&cert.key_pem), "{shown}");
    }

    #[test]
    fn issue_needs_the_ca_key() {
        let ca = ClusterCa::generate("test").expect("ca");
        let member = ClusterCa::from_pem(ca.cert_pem().to_owned(), None).expect("member ca");
        let err = member.issue("n1", &[]).expect_err("no key");
        assert!(matches!(err, ClusterError::NoCaKey));
        assert_eq!(
            err.to_string(),
            "this node has no CA key, only the root can issue certificates"
        );
    }

    #[test]
    fn from_pem_rejects_garbage_and_foreign_keys() {
        let ca = ClusterCa::generate("test").expect("ca");
        let other = ClusterCa::generate("other").expect("other ca");
        let err = ClusterCa::from_pem("not pem".to_owned(), None).expect_err("garbage");
        assert!(matches!(err, ClusterError::BadPem { .. }), "{err}");
        let err = ClusterCa::from_pem(ca.cert_pem().to_owned(), other.key_pem().map(str::to_owned))
            .expect_err("foreign key");
        assert_eq!(
            err.to_string(),
            "invalid CA key: it does not belong to the CA certificate"
        );
        let err = ClusterCa::from_pem(ca.cert_pem().to_owned(), Some("junk".to_owned()))
            .expect_err("junk key");
        assert!(
            matches!(err, ClusterError::BadPem { what: "CA key", .. }),
            "{err}"
        );
    }

    #[test]
    fn issued_certificates_name_the_ca_as_issuer() {
        let ca = ClusterCa::generate("test").expect("ca");
        let cert = ca.issue("n1", &["10.0.0.7".to_owned()]).expect("issue");
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("ca der");
        let leaf_der = CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).expect("leaf der");
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).expect("ca");
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).expect("leaf");
        assert_eq!(leaf.issuer().as_raw(), ca_x509.subject().as_raw());
        assert_eq!(ca_x509.issuer().as_raw(), ca_x509.subject().as_raw());
        let cn = leaf.subject().iter_common_name().next().expect("a CN");
        assert_eq!(cn.as_str().ok(), Some("n1"));
        assert!(!leaf.is_ca());
    }

    #[test]
    fn the_ca_signs_a_members_request_for_the_members_own_key() {
        let ca = ClusterCa::generate("test").expect("ca");
        let request = CertRequest::new("laptop").expect("request");
        assert!(
            request
                .csr_pem()
                .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
        );
        let cert_pem = ca
            .sign("laptop", &["10.0.0.8".to_owned()], request.csr_pem())
            .expect("sign");
        let cert = request.complete(cert_pem.clone()).expect("complete");
        // The pair works for TLS (key and certificate belong together).
        server_config(&cert).expect("a server config from the pair");

        // Another node's key: the certificate is refused by the wrong request.
        let other = CertRequest::new("laptop").expect("request");
        let err = other.complete(cert_pem).expect_err("another key");
        assert!(err.to_string().contains("another key"), "{err}");

        // Garbage, a tampered request (the signature no longer matches), a foreign key type.
        let good = CertRequest::new("x").expect("request");
        let body: String = good
            .csr_pem()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let mut der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body)
            .expect("base64");
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der)
        );
        let foreign = |alg| {
            let key = KeyPair::generate_for(alg).expect("a key");
            CertificateParams::default()
                .serialize_request(&key)
                .and_then(|csr| csr.pem())
                .expect("a request")
        };
        let ed25519 = foreign(&rcgen::PKCS_ED25519);
        let p384 = foreign(&rcgen::PKCS_ECDSA_P384_SHA384);
        for (csr, says) in [
            ("not a request", "invalid certificate request"),
            (tampered.as_str(), "invalid certificate request"),
            (ed25519.as_str(), "ECDSA P-256"),
            (p384.as_str(), "ECDSA P-256"),
        ] {
            let err = ca.sign("x", &[], csr).expect_err(csr).to_string();
            assert!(err.contains(says), "{err}");
        }
        // A member cannot sign.
        let member = ClusterCa::from_pem(ca.cert_pem().to_owned(), None).expect("member");
        assert!(matches!(
            member.sign("x", &[], good.csr_pem()),
            Err(ClusterError::NoCaKey)
        ));
    }

    #[test]
    fn certified_keys_need_a_certificate_and_its_own_key() {
        let ca = ClusterCa::generate("test").expect("ca");
        let a = ca.issue("a", &[]).expect("issue a");
        let b = ca.issue("b", &[]).expect("issue b");
        let key = certified_key(&a.cert_pem, &a.key_pem).expect("a's pair");
        assert_eq!(key.cert.len(), 1);
        // A chain keeps its order: the server's certificate first.
        let chain = format!("{}{}", a.cert_pem, ca.cert_pem());
        let key = certified_key(&chain, &a.key_pem).expect("a chain");
        assert_eq!(key.cert.len(), 2);

        let err = certified_key(&a.cert_pem, &b.key_pem).expect_err("b's key");
        assert!(
            matches!(err, ClusterError::Tls(rustls::Error::InconsistentKeys(_))),
            "{err}"
        );
        for (cert_pem, key_pem, says) in [
            (
                "junk",
                a.key_pem.as_str(),
                "invalid certificate: no CERTIFICATE block found",
            ),
            (a.cert_pem.as_str(), "junk", "invalid private key: "),
        ] {
            let err = certified_key(cert_pem, key_pem)
                .expect_err(says)
                .to_string();
            assert!(err.starts_with(says), "{err}");
        }
        let err = server_config(&NodeCert {
            cert_pem: a.cert_pem.clone(),
            key_pem: "junk".to_owned(),
        })
        .expect_err("a node's junk key");
        assert!(err.to_string().starts_with("invalid node key: "), "{err}");
    }

    #[test]
    fn subject_alt_names_cover_hosts_and_local_names() {
        let sans = subject_alt_names(&[
            "node1.lan".to_owned(),
            "192.168.1.5".to_owned(),
            "[fd00::1]".to_owned(),
            "localhost".to_owned(),
            String::new(),
        ])
        .expect("sans");
        let ip = |s: &str| SanType::IpAddress(s.parse().expect("ip"));
        let dns = |s: &str| SanType::DnsName(s.try_into().expect("dns"));
        assert_eq!(
            sans,
            vec![
                dns("node1.lan"),
                ip("192.168.1.5"),
                ip("fd00::1"),
                dns("localhost"),
                ip("127.0.0.1"),
                ip("::1"),
            ]
        );
    }

    #[test]
    fn validity_runs_from_yesterday_to_the_same_day_years_later() {
        let check = |days: u64, years, from: (i32, u8, u8), to: (i32, u8, u8)| {
            // Noon on the day `days` after the epoch.
            let now = Duration::from_secs(days * 86_400 + 43_200);
            let mut params = CertificateParams::default();
            set_validity_at(&mut params, now, years);
            let expected = (
                rcgen::date_time_ymd(from.0, from.1, from.2),
                rcgen::date_time_ymd(to.0, to.1, to.2),
            );
            assert_eq!(
                (params.not_before, params.not_after),
                expected,
                "day {days}"
            );
        };
        check(0, 5, (1970, 1, 1), (1975, 1, 1));
        check(1, 10, (1970, 1, 1), (1980, 1, 2));
        check(11_016, 5, (2000, 2, 28), (2005, 2, 28));
        check(11_017, 5, (2000, 2, 29), (2005, 3, 1));
        check(19_782, 10, (2024, 2, 28), (2034, 2, 28));
        check(20_454, 5, (2025, 12, 31), (2031, 1, 1));
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn a_node_certificate_is_saved_private_and_loaded_back() {
        let ca = ClusterCa::generate("home").expect("ca");
        let cert = ca.issue("pi", &["127.0.0.1".into()]).expect("issue");
        let dir = tempfile::tempdir().expect("temp dir");
        let tls = dir.path().join("tls");
        assert!(NodeCert::load(&tls).is_none(), "nothing saved yet");
        cert.save(&tls).expect("save");
        assert_eq!(mode(&tls), 0o700);
        assert_eq!(mode(&tls.join(NodeCert::CERT_FILE)), 0o600);
        assert_eq!(mode(&tls.join(NodeCert::KEY_FILE)), 0o600);
        let loaded = NodeCert::load(&tls).expect("load");
        assert_eq!(
            (loaded.cert_pem, loaded.key_pem),
            (cert.cert_pem.clone(), cert.key_pem.clone())
        );
        // Saving again replaces both, also over a file that was made wider meanwhile.
        fs::set_permissions(
            tls.join(NodeCert::KEY_FILE),
            fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        cert.save(&tls).expect("save again");
        assert_eq!(mode(&tls.join(NodeCert::KEY_FILE)), 0o600);
    }

    #[test]
    fn create_then_load_round_trips() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let files = ClusterFiles::new(tmp.path().join("cluster"));
        assert!(!files.exists());
        let (ca, secret) = files.create("home").expect("create");
        assert!(files.exists());
        assert_eq!(mode(files.dir()), 0o700);
        assert_eq!(mode(&files.ca_key_path()), 0o600);
        assert_eq!(mode(&files.secret_path()), 0o600);
        assert_eq!(mode(&files.ca_cert_path()), 0o644);
        let leftovers: Vec<_> = fs::read_dir(files.dir())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        let (loaded_ca, loaded_secret) = files.load().expect("load");
        assert_eq!(loaded_ca.cert_pem(), ca.cert_pem());
        assert_eq!(loaded_ca.key_pem(), ca.key_pem());
        assert_eq!(loaded_secret.expose(), secret.expose());
        loaded_ca.issue("n1", &[]).expect("loaded CA can issue");

        let err = files.create("home").expect_err("second create");
        assert_eq!(
            err.to_string(),
            format!(
                "refusing to overwrite existing cluster files in {}",
                files.dir().display()
            )
        );
        assert_eq!(
            fs::read_to_string(files.ca_cert_path()).expect("read"),
            ca.cert_pem(),
            "refused create must leave the files alone"
        );
    }

    #[test]
    fn members_have_no_key_and_missing_files_are_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = ClusterFiles::new(tmp.path().join("root"));
        let (ca, secret) = root.create("home").expect("create");

        let member = ClusterFiles::new(tmp.path().join("member"));
        let err = member.load().expect_err("nothing there yet");
        assert!(
            matches!(&err, ClusterError::Missing { path } if path == &member.ca_cert_path()),
            "{err}"
        );
        assert!(err.to_string().contains("p2f init"), "{err}");

        member
            .write_member(ca.cert_pem(), &secret)
            .expect("write member");
        assert_eq!(mode(&member.secret_path()), 0o600);
        let (loaded, loaded_secret) = member.load().expect("load member");
        assert!(loaded.key_pem().is_none());
        assert_eq!(loaded_secret.expose(), secret.expose());
        // Joining again (say, after the secret changed) replaces the membership.
        member.write_member(ca.cert_pem(), &secret).expect("rejoin");
        // A root's directory is never turned into a member's.
        let err = root
            .write_member(ca.cert_pem(), &secret)
            .expect_err("root has a key");
        assert!(matches!(err, ClusterError::AlreadyExists { .. }), "{err}");

        fs::remove_file(member.secret_path()).expect("remove secret");
        let err = member.load().expect_err("secret missing");
        assert!(
            err.to_string()
                .contains(&*member.secret_path().to_string_lossy()),
            "{err}"
        );
    }

    /// Runs one TLS handshake over loopback TCP; `Ok` carries the negotiated ALPN protocol.
    async fn handshake(
        server_cert: &NodeCert,
        client_ca_pem: &str,
        server_name: &str,
    ) -> Result<Option<Vec<u8>>, String> {
        let acceptor = TlsAcceptor::from(server_config(server_cert).expect("server config"));
        let connector = TlsConnector::from(Arc::new(
            client_config(client_ca_pem).expect("client config"),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            tls.write_all(&buf).await.map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())
        });
        let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).expect("name");
        let client = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(&buf, b"ping");
            Ok(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
        };
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), client)
            .await
            .expect("handshake timed out");
        server.abort();
        result
    }

    #[tokio::test]
    async fn tls_handshake_trusts_only_the_cluster_ca() {
        let ca = ClusterCa::generate("test").expect("ca");
        let cert = ca.issue("n1", &["node1.lan".to_owned()]).expect("issue");
        for name in ["localhost", "127.0.0.1", "::1", "node1.lan"] {
            let alpn = handshake(&cert, ca.cert_pem(), name)
                .await
                .unwrap_or_else(|e| panic!("handshake as {name} failed: {e}"));
            assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        }

        let err = handshake(&cert, ca.cert_pem(), "elsewhere.lan")
            .await
            .expect_err("name not in the certificate");
        assert!(err.contains("not valid for name"), "{err}");

        let other = ClusterCa::generate("other").expect("other ca");
        let err = handshake(&cert, other.cert_pem(), "localhost")
            .await
            .expect_err("foreign CA must fail");
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    use crate::identity::Role as CertRole;
    #[test]
    fn a_certificate_names_its_holder_and_role() {
        let ca = ClusterCa::generate("test").expect("ca");
        for role in [CertRole::Root, CertRole::Member, CertRole::Operator] {
            let cert = ca.issue_as(role, "nas", &[]).expect("issue");
            let caller = crate::identity::Caller::from_pem(&cert.cert_pem).expect("a caller");
            assert_eq!((caller.role, caller.name.as_str()), (role, "nas"));
            assert!(caller.serial.len() >= 16, "{}", caller.serial);
            let again = ca.issue_as(role, "nas", &[]).expect("issue");
            let other = crate::identity::Caller::from_pem(&again.cert_pem).expect("a caller");
            assert_ne!(
                caller.serial, other.serial,
                "every certificate has its own serial"
            );
        }
        let site = ca.issue_site("wiki.home.arpa", 7).expect("site");
        assert_eq!(
            crate::identity::Caller::from_pem(&site.cert_pem),
            None,
            "a site has no role"
        );
    }
}
