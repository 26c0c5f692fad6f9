//! Certificates for public names from an ACME CA (Let's Encrypt by default), with
//! [instant-acme](https://docs.rs/instant-acme).
//!
//! - [`Acme`] is the [`Issuer`] of every name that is not local ([`is_local_name`]). It answers
//!   handshakes from memory only: a name with a certificate gets it (until it expires), a name
//!   without one gets [`CertError::Acme`] — the handshake is refused, and `GET /v1/routes`
//!   says why (`certificate_error`).
//! - [`Manager::run`], the background task, orders what is missing or due, one order at a time:
//!   a certificate is renewed at two thirds of its lifetime, up to a thirtieth of the lifetime
//!   earlier (jitter), so many certificates issued together do not renew together; a failed
//!   order is tried again after 30 s, then 1, 2, 4 … minutes, at most 12 h, each ±25 %.
//! - [`Challenges`] holds what the CA checks while an order is under way: HTTP-01 key
//!   authorisations (answered on the plain-HTTP listener at `/.well-known/acme-challenge/TOKEN`)
//!   and TLS-ALPN-01 certificates (presented to a handshake offering only ALPN `acme-tls/1`).
//!
//! On disk, under the directory given (the root's `DATA_DIR/acme`), one folder per ACME
//! directory URL (its characters other than letters, digits, `.` and `-` made `-`, like Caddy):
//! `account.json` (the account's URL and key) and `certificates/NAME.crt` (the chain, PEM) with
//! `certificates/NAME.key` (its key, PEM), every file mode 0600, written atomically. They are
//! read at start, so a restart presents the same certificates and orders nothing new.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use super::certs::{CertError, Issued, Issuer, is_local_name, unix_now};
use super::routes::RouteTable;
use crate::cluster::certified_key;
use crate::wire::CertificateInfo;

/// Let's Encrypt's production directory, the default.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The first pause after a failed order; it doubles with each failure in a row.
const RETRY_FIRST: Duration = Duration::from_secs(30);
/// The longest pause between failed orders.
const RETRY_MAX: Duration = Duration::from_secs(12 * 3600);
/// The longest one order may take, all requests and polls included.
const ORDER_LIMIT: Duration = Duration::from_secs(180);
/// The shortest time between two orders of one name, even when the last one succeeded.
const ORDER_GAP: Duration = Duration::from_secs(10);
/// The shortest sleep of the manager between two passes over the names.
const LOOP_MIN: Duration = Duration::from_secs(1);
/// How long the CA may take to validate the challenges, then to issue.
const POLL_LIMIT: Duration = Duration::from_secs(90);

/// Which challenge proves control of a name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AcmeChallenge {
    /// TLS-ALPN-01 first (it needs only the HTTPS port); when that order fails, HTTP-01 at once
    /// in a new order (like Caddy, which enables both and falls back from one to the other).
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// HTTP-01 only: the CA fetches `http://NAME/.well-known/acme-challenge/TOKEN` (port 80).
    #[serde(rename = "http-01")]
    Http01,
    /// TLS-ALPN-01 only: the CA connects to `NAME:443` offering ALPN `acme-tls/1`.
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

impl AcmeChallenge {
    /// The challenge types one attempt tries, in order.
    fn plan(self) -> Vec<ChallengeType> {
        match self {
            AcmeChallenge::Auto => vec![ChallengeType::TlsAlpn01, ChallengeType::Http01],
            AcmeChallenge::Http01 => vec![ChallengeType::Http01],
            AcmeChallenge::TlsAlpn01 => vec![ChallengeType::TlsAlpn01],
        }
    }
}

/// How the ingress gets certificates for public names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The ACME directory URL (`https://…`), e.g. [`LETS_ENCRYPT`].
    pub directory: String,
    /// The account's contact address (`mailto:` is added).
    pub email: String,
    /// A PEM file whose first certificate is trusted for the directory (else the system's
    /// roots): for test CAs and private ones.
    pub ca: Option<PathBuf>,
    /// Which challenge to answer.
    pub challenge: AcmeChallenge,
    /// Where the account and certificates are kept (the root's `DATA_DIR/acme`).
    pub dir: PathBuf,
}

/// Why an order, or the account, failed. Kept as a string per name for `GET /v1/routes`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcmeError {
    /// The ACME library (a request, the CA's answer, a problem document).
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    /// The CA did not offer the challenge type asked for.
    #[error("the CA offers no {0:?} challenge for this name")]
    NoChallenge(ChallengeType),
    /// An authorisation or the order did not turn valid.
    #[error("the order failed: {0}")]
    Invalid(String),
    /// The order took longer than its limit.
    #[error("the order took longer than {0:?}")]
    Timeout(Duration),
    /// The certificate could not be used, or the challenge certificate made.
    #[error("the certificate: {0}")]
    Certificate(String),
    /// A file could not be written.
    #[error(transparent)]
    Write(#[from] crate::fsutil::WriteError),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What the CA checks while an order is under way, shared with the listeners.
#[derive(Default)]
pub struct Challenges {
    /// HTTP-01: token → key authorisation.
    http: RwLock<HashMap<String, String>>,
    /// TLS-ALPN-01: name → the self-signed certificate with the acmeIdentifier extension.
    tls_alpn: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges")
            .field("http", &read(&self.http).len())
            .field("tls_alpn", &read(&self.tls_alpn).len())
            .finish()
    }
}

impl Challenges {
    /// The body to answer `GET /.well-known/acme-challenge/TOKEN` with, while that challenge is
    /// under way.
    pub fn http_response(&self, token: &str) -> Option<String> {
        read(&self.http).get(token).cloned()
    }

    /// The certificate for a TLS-ALPN-01 handshake for `name` (lower case), while that
    /// challenge is under way.
    pub fn tls_alpn_certificate(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        read(&self.tls_alpn).get(name).cloned()
    }
}

/// A certificate of the store, with when to renew it.
#[derive(Debug, Clone)]
struct Stored {
    issued: Issued,
    /// When to order its successor, seconds since the epoch.
    renew_at: u64,
}

/// What the issuer and the manager share.
#[derive(Debug, Default)]
struct State {
    certificates: RwLock<HashMap<String, Stored>>,
    errors: Mutex<HashMap<String, String>>,
    /// Woken when a handshake asks for a name without a certificate.
    wake: Notify,
}

/// The [`Issuer`] of public names: answers from the store the [`Manager`] fills.
#[derive(Debug, Clone)]
pub struct Acme {
    state: Arc<State>,
}

impl Issuer for Acme {
    fn covers(&self, name: &str) -> bool {
        !is_local_name(name)
    }

    fn issue(&self, name: &str) -> Result<Issued, CertError> {
        let now = unix_now();
        if let Some(stored) = read(&self.state.certificates).get(name)
            && stored.issued.info.not_after > now
        {
            return Ok(stored.issued.clone());
        }
        self.state.wake.notify_one();
        let reason = lock(&self.state.errors)
            .get(name)
            .cloned()
            .unwrap_or_else(|| "being ordered".to_owned());
        Err(CertError::Acme {
            name: name.to_owned(),
            reason,
        })
    }

    fn keeps_store(&self) -> bool {
        true
    }

    fn last_error(&self, name: &str) -> Option<String> {
        if let Some(error) = lock(&self.state.errors).get(name) {
            return Some(error.clone());
        }
        let valid = read(&self.state.certificates)
            .get(name)
            .is_some_and(|stored| stored.issued.info.not_after > unix_now());
        (!valid).then(|| "being ordered".to_owned())
    }
}

/// The background task that orders and renews the certificates of [`Acme`].
pub struct Manager {
    config: AcmeConfig,
    state: Arc<State>,
    challenges: Arc<Challenges>,
    /// The CA's folder under `config.dir`.
    home: PathBuf,
    account: Option<Account>,
    /// Per name: failures in a row, and not before when to try again.
    retries: HashMap<String, (u32, SystemTime)>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("config", &self.config)
            .field("account", &self.account.as_ref().map(Account::id))
            .finish_non_exhaustive()
    }
}

/// The account file.
#[derive(Serialize, Deserialize)]
struct AccountFile {
    directory: String,
    credentials: AccountCredentials,
}

impl Manager {
    /// The issuer and its manager for `config`; the certificates already stored are loaded
    /// (those unreadable are logged and ordered again).
    pub fn new(config: AcmeConfig, challenges: Arc<Challenges>) -> (Acme, Manager) {
        let home = config.dir.join(folder_of(&config.directory));
        let state = Arc::new(State::default());
        let mut loaded = HashMap::new();
        let certificates = home.join("certificates");
        if let Ok(entries) = std::fs::read_dir(&certificates) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_none_or(|e| e != "crt") {
                    continue;
                }
                let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                    continue;
                };
                match load(&certificates, name, &config.directory) {
                    Ok(stored) => {
                        tracing::info!(%name, not_after = stored.issued.info.not_after, "ACME certificate loaded");
                        loaded.insert(name.to_owned(), stored);
                    }
                    Err(e) => tracing::warn!(%name, "stored ACME certificate unusable: {e}"),
                }
            }
        }
        *state
            .certificates
            .write()
            .unwrap_or_else(PoisonError::into_inner) = loaded;
        let acme = Acme {
            state: Arc::clone(&state),
        };
        let manager = Manager {
            config,
            state,
            challenges,
            home,
            account: None,
            retries: HashMap::new(),
        };
        (acme, manager)
    }

    /// Orders what the public names of `routes` lack or must renew, for as long as it runs
    /// (abort the task to stop it; files are replaced atomically, so that is safe).
    pub async fn run(mut self, mut routes: watch::Receiver<Arc<RouteTable>>) {
        // instant-acme's HTTPS client takes rustls's process-wide provider: make it ring, the
        // crate's only one, whatever else a build may enable (an error: one is already set).
        let _ = rustls::crypto::ring::default_provider().install_default();
        loop {
            let names: Vec<String> = {
                let table = routes.borrow_and_update();
                let mut names: Vec<String> = table
                    .routes()
                    .map(|r| r.domain.clone())
                    .filter(|d| !is_local_name(d) && safe_name(d))
                    .collect();
                names.sort();
                names
            };
            let mut next: Option<SystemTime> = None;
            for name in &names {
                let due = self.due(name);
                if due <= SystemTime::now() {
                    self.attempt(name).await;
                }
                let due = self.due(name);
                next = Some(next.map_or(due, |n| n.min(due)));
            }
            let sleep = match next {
                None => RETRY_MAX,
                Some(next) => next
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .clamp(LOOP_MIN, RETRY_MAX),
            };
            tokio::select! {
                changed = routes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(sleep) => {}
                () = self.state.wake.notified() => {}
            }
        }
    }

    /// When `name` is next to be ordered.
    fn due(&self, name: &str) -> SystemTime {
        let renew = read(&self.state.certificates)
            .get(name)
            .map_or(UNIX_EPOCH, |s| UNIX_EPOCH + Duration::from_secs(s.renew_at));
        let retry = self.retries.get(name).map_or(UNIX_EPOCH, |(_, at)| *at);
        renew.max(retry)
    }

    /// One attempt for `name`: each challenge type of the plan in turn, until one order
    /// succeeds; then the certificate is stored, else the retry is put off.
    async fn attempt(&mut self, name: &str) {
        let started = std::time::Instant::now();
        let mut last = None;
        for kind in self.config.challenge.plan() {
            let ordered = tokio::time::timeout(ORDER_LIMIT, self.order(name, kind.clone())).await;
            match ordered.unwrap_or(Err(AcmeError::Timeout(ORDER_LIMIT))) {
                Ok(stored) => {
                    tracing::info!(
                        %name,
                        challenge = ?kind,
                        not_after = stored.issued.info.not_after,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "ACME certificate issued"
                    );
                    write(&self.state.certificates).insert(name.to_owned(), stored);
                    lock(&self.state.errors).remove(name);
                    // Even a certificate due at once (a tiny lifetime, a clock far off) is not
                    // followed by another order of the name for a while.
                    let not_before = SystemTime::now() + ORDER_GAP;
                    self.retries.insert(name.to_owned(), (0, not_before));
                    return;
                }
                Err(e) => {
                    tracing::warn!(%name, challenge = ?kind, "ACME order failed: {e}");
                    last = Some(format!("{kind:?}: {e}"));
                }
            }
        }
        let failures = self.retries.get(name).map_or(0, |(n, _)| *n) + 1;
        let pause = retry_pause(failures, rand::random_range(0.0..1.0));
        let at = SystemTime::now() + pause;
        self.retries.insert(name.to_owned(), (failures, at));
        let error = format!(
            "{} (failure {failures} in a row; next try in {}s)",
            last.unwrap_or_default(),
            pause.as_secs()
        );
        lock(&self.state.errors).insert(name.to_owned(), error);
    }

    /// The account, created on first use and kept in `account.json`.
    async fn account(&mut self) -> Result<Account, AcmeError> {
        if let Some(account) = &self.account {
            return Ok(account.clone());
        }
        let builder = || match &self.config.ca {
            Some(ca) => Account::builder_with_root(ca),
            None => Account::builder(),
        };
        let path = self.home.join("account.json");
        let stored = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<AccountFile>(&bytes).ok())
            .filter(|file| file.directory == self.config.directory);
        let account = match stored {
            Some(file) => builder()?.from_credentials(file.credentials).await?,
            None => {
                let contact = format!("mailto:{}", self.config.email);
                let (account, credentials) = builder()?
                    .create(
                        &NewAccount {
                            contact: &[&contact],
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.config.directory.clone(),
                        None,
                    )
                    .await?;
                let file = AccountFile {
                    directory: self.config.directory.clone(),
                    credentials,
                };
                let json = serde_json::to_vec_pretty(&file)
                    .map_err(|e| AcmeError::Certificate(e.to_string()))?;
                create_private_dir(&self.home)?;
                crate::fsutil::write_private(&path, json)?;
                tracing::info!(directory = %self.config.directory, id = account.id(), "ACME account created");
                account
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }

    /// One order for `name` answered with `kind`; the certificate, stored on disk.
    async fn order(&mut self, name: &str, kind: ChallengeType) -> Result<Stored, AcmeError> {
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(name.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let mut pending = Pending {
            challenges: &self.challenges,
            tokens: Vec::new(),
            names: Vec::new(),
        };
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::Invalid(format!(
                        "the authorisation is {other:?}"
                    )));
                }
            }
            let mut challenge = authorization
                .challenge(kind.clone())
                .ok_or(AcmeError::NoChallenge(kind.clone()))?;
            let key_authorization = challenge.key_authorization();
            match kind {
                ChallengeType::Http01 => {
                    pending.http(&challenge.token, key_authorization.as_str());
                }
                _ => {
                    let cert = challenge_certificate(name, key_authorization.digest().as_ref())?;
                    pending.tls_alpn(name, cert);
                }
            }
            challenge.set_ready().await?;
        }
        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(POLL_LIMIT);
        let status = order.poll_ready(&retries).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Invalid(why_invalid(&mut order).await));
        }
        drop(pending);
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&retries).await?;
        let stored = stored_of(&chain_pem, &key_pem, &self.config.directory)?;
        let certificates = self.home.join("certificates");
        create_private_dir(&certificates)?;
        // The key first: a chain on disk always has its key.
        crate::fsutil::write_private(&certificates.join(format!("{name}.key")), &key_pem)?;
        crate::fsutil::write_private(&certificates.join(format!("{name}.crt")), &chain_pem)?;
        Ok(stored)
    }
}

/// The challenges an order put up, taken down when it ends (whatever the outcome).
struct Pending<'a> {
    challenges: &'a Challenges,
    tokens: Vec<String>,
    names: Vec<String>,
}

impl Pending<'_> {
    fn http(&mut self, token: &str, key_authorization: &str) {
        write(&self.challenges.http).insert(token.to_owned(), key_authorization.to_owned());
        self.tokens.push(token.to_owned());
    }

    fn tls_alpn(&mut self, name: &str, cert: Arc<CertifiedKey>) {
        write(&self.challenges.tls_alpn).insert(name.to_owned(), cert);
        self.names.push(name.to_owned());
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut http = write(&self.challenges.http);
        for token in &self.tokens {
            http.remove(token);
        }
        drop(http);
        let mut tls_alpn = write(&self.challenges.tls_alpn);
        for name in &self.names {
            tls_alpn.remove(name);
        }
    }
}

/// The CA's reason an order turned invalid: the first challenge error it states.
async fn why_invalid(order: &mut instant_acme::Order) -> String {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        if let Ok(state) = authorization.refresh().await {
            for challenge in &state.challenges {
                if let Some(error) = &challenge.error {
                    return error.to_string();
                }
            }
        }
    }
    "the CA invalidated the order without saying why".to_owned()
}

/// The TLS-ALPN-01 certificate for `name` (RFC 8737): self-signed, the name as its only SAN,
/// the critical acmeIdentifier extension holding `digest` (SHA-256 of the key authorisation).
fn challenge_certificate(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, AcmeError> {
    let fail = |e: &dyn std::fmt::Display| AcmeError::Certificate(e.to_string());
    if digest.len() != 32 {
        return Err(fail(&"the key authorisation digest is not 32 bytes"));
    }
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(|e| fail(&e))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| fail(&e))?;
    let cert = params.self_signed(&key).map_err(|e| fail(&e))?;
    // Built by hand: `CertifiedKey::from_der` parses the certificate with webpki, which refuses
    // the critical acmeIdentifier extension it does not know.
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| fail(&e))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// A chain and key from the CA, ready to present, with when to renew it.
fn stored_of(chain_pem: &str, key_pem: &str, directory: &str) -> Result<Stored, AcmeError> {
    let fail = |e: &dyn std::fmt::Display| AcmeError::Certificate(e.to_string());
    let key = certified_key(chain_pem, key_pem).map_err(|e| fail(&e))?;
    let leaf = key
        .cert
        .first()
        .ok_or_else(|| fail(&"the chain is empty"))?;
    let (_, x509) = x509_parser::parse_x509_certificate(leaf).map_err(|e| fail(&e))?;
    let validity = x509.validity();
    let to_secs = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
    let (not_before, not_after) = (to_secs(validity.not_before), to_secs(validity.not_after));
    let lifetime = not_after.saturating_sub(not_before);
    let issuer = x509
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map_or_else(|| host_of(directory).to_owned(), str::to_owned);
    let jitter = (lifetime / 30) as f64 * rand::random_range(0.0..1.0);
    Ok(Stored {
        renew_at: renew_at(not_before, lifetime, jitter as u64),
        issued: Issued {
            key,
            info: CertificateInfo {
                issuer: format!("ACME: {issuer}"),
                not_after,
            },
            lifetime,
        },
    })
}

/// The stored certificate of `name` in `dir`.
fn load(dir: &Path, name: &str, directory: &str) -> Result<Stored, AcmeError> {
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).map_err(|source| AcmeError::Read { path, source })
    };
    let chain = read(dir.join(format!("{name}.crt")))?;
    let key = read(dir.join(format!("{name}.key")))?;
    stored_of(&chain, &key, directory)
}

/// When to renew a certificate valid from `not_before` (seconds since the epoch) for
/// `lifetime` seconds: at two thirds of its lifetime, `jitter` seconds earlier.
fn renew_at(not_before: u64, lifetime: u64, jitter: u64) -> u64 {
    (not_before + lifetime * 2 / 3).saturating_sub(jitter)
}

/// The pause after the `failures`-th failed attempt in a row (1 or more): 30 s doubled for
/// each further failure, at most 12 h, scaled by 0.75 + `unit` / 2 (`unit` in `0.0..1.0`).
fn retry_pause(failures: u32, unit: f64) -> Duration {
    let doubled = RETRY_FIRST.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    doubled
        .min(RETRY_MAX)
        .mul_f64(0.75 + unit.clamp(0.0, 1.0) / 2.0)
}

/// The folder of an ACME directory URL: its letters, digits, `.` and `-`; anything else `-`.
fn folder_of(directory: &str) -> String {
    let url = directory
        .strip_prefix("https://")
        .or_else(|| directory.strip_prefix("http://"))
        .unwrap_or(directory);
    url.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// The host of a URL.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split(['/', ':']).next().unwrap_or(rest)
}

/// Whether `name` can name files: letters, digits, `-` and inner `.` only.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
}

/// Creates `dir` (and its parents) with mode 0700 where new.
fn create_private_dir(dir: &Path) -> Result<(), AcmeError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| AcmeError::Read {
            path: dir.to_owned(),
            source,
        })
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_two_thirds_less_the_jitter() {
        assert_eq!(renew_at(1_000, 90 * 86_400, 0), 1_000 + 60 * 86_400);
        assert_eq!(renew_at(1_000, 90, 3), 1_000 + 60 - 3);
        assert_eq!(renew_at(0, 0, 5), 0);
    }

    #[test]
    fn retries_back_off_exponentially_with_jitter_up_to_twelve_hours() {
        let middle = |n| retry_pause(n, 0.5);
        assert_eq!(middle(1), Duration::from_secs(30));
        assert_eq!(middle(2), Duration::from_secs(60));
        assert_eq!(middle(5), Duration::from_secs(480));
        assert_eq!(middle(30), RETRY_MAX);
        assert_eq!(retry_pause(1, 0.0), Duration::from_millis(22_500));
        assert_eq!(
            retry_pause(1, 0.999_999),
            Duration::from_secs(30).mul_f64(1.249_999_5)
        );
        assert!(retry_pause(u32::MAX, 1.0) <= RETRY_MAX.mul_f64(1.25));
    }

    #[test]
    fn auto_tries_tls_alpn_then_http() {
        assert_eq!(
            AcmeChallenge::Auto.plan(),
            [ChallengeType::TlsAlpn01, ChallengeType::Http01]
        );
        assert_eq!(AcmeChallenge::Http01.plan(), [ChallengeType::Http01]);
    }

    #[test]
    fn folders_and_names() {
        assert_eq!(
            folder_of(LETS_ENCRYPT),
            "acme-v02.api.letsencrypt.org-directory"
        );
        assert_eq!(
            folder_of("https://127.0.0.1:14000/dir"),
            "127.0.0.1-14000-dir"
        );
        assert_eq!(host_of(LETS_ENCRYPT), "acme-v02.api.letsencrypt.org");
        assert!(safe_name("wiki.example.org"));
        for bad in ["", "../x", ".x", "a/b", "a..b"] {
            assert!(!safe_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_challenge_certificate_carries_the_acme_identifier() {
        let digest = [7u8; 32];
        let key = challenge_certificate("wiki.example.org", &digest).expect("certificate");
        let (_, x509) = x509_parser::parse_x509_certificate(&key.cert[0]).expect("parse");
        let acme_oid =
            x509_parser::oid_registry::Oid::from(&[1, 3, 6, 1, 5, 5, 7, 1, 31]).expect("oid");
        let extension = x509
            .extensions()
            .iter()
            .find(|e| e.oid == acme_oid)
            .expect("acmeIdentifier");
        assert!(extension.critical);
        // An OCTET STRING of the 32 bytes.
        assert_eq!(&extension.value[..2], &[0x04, 32]);
        assert_eq!(&extension.value[2..], &digest);
        assert!(challenge_certificate("wiki.example.org", &[1, 2]).is_err());
    }

    #[test]
    fn a_name_without_a_certificate_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("dir");
        let config = AcmeConfig {
            directory: "https://127.0.0.1:1/dir".into(),
            email: "a@example.org".into(),
            ca: None,
            challenge: AcmeChallenge::Auto,
            dir: dir.path().to_owned(),
        };
        let (acme, _manager) = Manager::new(config, Arc::default());
        assert!(acme.covers("wiki.example.org"));
        assert!(!acme.covers("wiki.home.arpa"));
        let err = acme
            .issue("wiki.example.org")
            .expect_err("no certificate yet");
        assert!(err.to_string().contains("being ordered"), "{err}");
        lock(&acme.state.errors).insert("wiki.example.org".into(), "refused".into());
        let err = acme
            .issue("wiki.example.org")
            .expect_err("no certificate yet");
        assert!(err.to_string().contains("refused"), "{err}");
        assert_eq!(
            acme.last_error("wiki.example.org").as_deref(),
            Some("refused")
        );
        lock(&acme.state.errors).clear();
        assert_eq!(
            acme.last_error("wiki.example.org").as_deref(),
            Some("being ordered")
        );
    }
}
