//! The ingress's certificates: one per routed domain, picked by SNI in each TLS handshake,
//! issued on first use and cached. Where a name's certificate comes from is an [`Issuer`]'s
//! business: [`LocalCa`] (the cluster CA, for local names: `.home.arpa`, `.internal`, `.lan`,
//! `.local`, `.test`, `localhost`, IP literals) and [`super::acme::Acme`] for public names.
//! A name that is not a routed domain, or that no issuer covers, is refused (no certificate,
//! the handshake fails) — the ingress reveals nothing about names it does not serve. A
//! handshake offering only ALPN `acme-tls/1` gets the TLS-ALPN-01 challenge certificate of its
//! name while an order is under way, and nothing otherwise.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use super::acme::{ACME_TLS_ALPN, Challenges};
use super::routes::{RouteTable, normalise};
use crate::cluster::{ClusterCa, ClusterError, certified_key};
use crate::wire::CertificateInfo;

/// How long a certificate from the cluster CA is valid, in days.
const LOCAL_VALID_DAYS: u32 = 90;
/// A certificate with less than this part of its life left (a third) is issued again on its
/// next handshake.
const RENEW_DIVISOR: u64 = 3;

/// Why no certificate could be had for a name.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// No issuer covers the name (a public name while only the cluster CA issues).
    #[error("no issuer covers {name}")]
    NotCovered {
        /// The name.
        name: String,
    },
    /// ACME has no certificate for the name (yet): it is being ordered, or the last order
    /// failed (`reason`).
    #[error("no certificate from ACME for {name} yet: {reason}")]
    Acme {
        /// The name.
        name: String,
        /// Why: "being ordered", or the last order's error.
        reason: String,
    },
    /// The cluster CA could not issue it.
    #[error("the cluster CA cannot issue a certificate for {name}: {source}")]
    Cluster {
        /// The name.
        name: String,
        /// Why.
        source: ClusterError,
    },
}

/// A certificate ready to present, and what `GET /v1/routes` shows of it.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The chain and key for rustls.
    pub key: Arc<CertifiedKey>,
    /// Who issued it and when it expires.
    pub info: CertificateInfo,
    /// How long it was issued for, in seconds (for renewal at two thirds of it).
    pub lifetime: u64,
}

/// Where certificates for some names come from.
pub trait Issuer: Send + Sync + 'static {
    /// Whether this issuer is the one for `name` (lower case, no trailing dot).
    fn covers(&self, name: &str) -> bool;
    /// A certificate for `name`, now. Called in a TLS handshake, so it must be quick: an issuer
    /// whose certificates take long (ACME) keeps them ready and answers from its store.
    fn issue(&self, name: &str) -> Result<Issued, CertError>;
    /// Whether this issuer keeps (and renews) its certificates itself, so the resolver asks it
    /// in every handshake instead of caching (its `issue` is then a map look-up). Default false.
    fn keeps_store(&self) -> bool {
        false
    }
    /// The last error getting a certificate for `name`, if the last attempt failed.
    fn last_error(&self, _name: &str) -> Option<String> {
        None
    }
}

/// Whether `name` is a local name: a special-use or private domain that no public CA
/// certifies (`.home.arpa`, `.internal`, `.lan`, `.local`, `.test`, `localhost` and below it),
/// or an IP literal.
pub fn is_local_name(name: &str) -> bool {
    const SUFFIXES: [&str; 6] = ["home.arpa", "internal", "lan", "local", "test", "localhost"];
    let name = normalise(name);
    name.parse::<IpAddr>().is_ok()
        || SUFFIXES
            .iter()
            .any(|suffix| name == *suffix || name.ends_with(&format!(".{suffix}")))
}

/// The cluster CA as an issuer of local names (like Caddy's `tls internal`): 90-day
/// certificates, made in the handshake that first asks (a P-256 key and a signature: about a
/// millisecond).
#[derive(Debug)]
pub struct LocalCa {
    ca: ClusterCa,
}

impl LocalCa {
    /// The issuer for `ca`, which must hold its key (the root's).
    pub fn new(ca: ClusterCa) -> LocalCa {
        LocalCa { ca }
    }
}

impl Issuer for LocalCa {
    fn covers(&self, name: &str) -> bool {
        is_local_name(name)
    }

    fn issue(&self, name: &str) -> Result<Issued, CertError> {
        let failed = |source| CertError::Cluster {
            name: name.to_owned(),
            source,
        };
        let site = self.ca.issue_site(name, LOCAL_VALID_DAYS).map_err(failed)?;
        let key = certified_key(&site.cert_pem, &site.key_pem).map_err(failed)?;
        Ok(Issued {
            key,
            info: CertificateInfo {
                issuer: "cluster CA".to_owned(),
                not_after: site.not_after,
            },
            lifetime: u64::from(LOCAL_VALID_DAYS) * 86_400,
        })
    }
}

/// The certificate resolver of the ingress's HTTPS listener: a cache of [`Issued`]
/// certificates by name, filled from the issuers for routed domains only.
pub struct Certificates {
    issuers: Vec<Arc<dyn Issuer>>,
    routes: watch::Receiver<Arc<RouteTable>>,
    challenges: Arc<Challenges>,
    cache: RwLock<HashMap<String, Issued>>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("issuers", &self.issuers.len())
            .field("cached", &self.read().len())
            .finish()
    }
}

impl Certificates {
    /// A resolver asking `issuers` in order (the first that covers a name issues it), for the
    /// domains of `routes`; TLS-ALPN-01 handshakes get their certificate from `challenges`.
    pub fn new(
        issuers: Vec<Arc<dyn Issuer>>,
        routes: watch::Receiver<Arc<RouteTable>>,
        challenges: Arc<Challenges>,
    ) -> Certificates {
        Certificates {
            issuers,
            routes,
            challenges,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// The certificate for `name` (`None`: no SNI): cached while it has more than a third of
    /// its life left, else issued now. `None` for a name that is not routed or that no issuer
    /// covers, or when issuing fails (logged).
    pub fn certificate(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let name = normalise(name?);
        if !self.routes.borrow().contains(&name) {
            tracing::debug!(%name, "TLS for a name that is not routed: refused");
            return None;
        }
        let issuer = self.issuers.iter().find(|issuer| issuer.covers(&name))?;
        if issuer.keeps_store() {
            return match issuer.issue(&name) {
                Ok(issued) => Some(issued.key),
                Err(e) => {
                    tracing::debug!(%name, "no certificate: {e}");
                    None
                }
            };
        }
        let now = unix_now();
        if let Some(issued) = self.read().get(&name)
            && issued.info.not_after.saturating_sub(now) > issued.lifetime / RENEW_DIVISOR
        {
            return Some(Arc::clone(&issued.key));
        }
        match issuer.issue(&name) {
            Ok(issued) => {
                tracing::info!(%name, issuer = %issued.info.issuer, "certificate issued");
                let key = Arc::clone(&issued.key);
                self.write().insert(name, issued);
                Some(key)
            }
            Err(e) => {
                tracing::warn!(%name, "no certificate: {e}");
                None
            }
        }
    }

    /// The TLS-ALPN-01 challenge certificate for `name` (`None`: no SNI), for a handshake
    /// whose client offered ALPN `acme-tls/1` only (RFC 8737); `None` when no such challenge
    /// is under way for the name.
    pub fn challenge_certificate(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let name = normalise(name?);
        let found = self.challenges.tls_alpn_certificate(&name);
        tracing::debug!(%name, found = found.is_some(), "TLS-ALPN-01 handshake");
        found
    }

    /// What is known of the certificate presented for `name`, once one was issued.
    pub fn info(&self, name: &str) -> Option<CertificateInfo> {
        let name = normalise(name);
        if let Some(issuer) = self.issuers.iter().find(|issuer| issuer.covers(&name))
            && issuer.keeps_store()
        {
            return issuer.issue(&name).ok().map(|issued| issued.info);
        }
        self.read().get(&name).map(|i| i.info.clone())
    }

    /// Why `name` has no certificate, or had none the last time one was asked for: the last
    /// error of its issuer, or that no issuer covers it (a public name without ACME).
    pub fn error(&self, name: &str) -> Option<String> {
        let name = normalise(name);
        match self.issuers.iter().find(|issuer| issuer.covers(&name)) {
            Some(issuer) => issuer.last_error(&name),
            None => Some(
                "no issuer for public names: set [ingress] acme_email in the root's node.toml"
                    .to_owned(),
            ),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Issued>> {
        self.cache.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Issued>> {
        self.cache.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme_only = client_hello.alpn().is_some_and(|mut offered| {
            offered.next() == Some(ACME_TLS_ALPN) && offered.next().is_none()
        });
        if acme_only {
            return self.challenge_certificate(client_hello.server_name());
        }
        self.certificate(client_hello.server_name())
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2f_model::{NodeName, NodeRef, Process, ProcessId, ProcessSpec, Timestamp};

    #[test]
    fn local_names_are_the_special_use_ones_and_ips() {
        for name in [
            "wiki.home.arpa",
            "Wiki.Home.Arpa.",
            "nas.internal",
            "pi.lan",
            "printer.local",
            "app.test",
            "localhost",
            "api.localhost",
            "127.0.0.1",
            "::1",
            "192.168.1.20",
        ] {
            assert!(is_local_name(name), "{name}");
        }
        for name in [
            "wiki.example.org",
            "home.arpa.example.org",
            "arpa",
            "mylan",
            "testing",
            "local.example.com",
        ] {
            assert!(!is_local_name(name), "{name}");
        }
    }

    fn routes_of(domains: &[&str]) -> watch::Receiver<Arc<RouteTable>> {
        let processes: Vec<Arc<Process>> = domains
            .iter()
            .enumerate()
            .map(|(i, domain)| {
                let spec = ProcessSpec::new(format!("s{i}"), "exec true")
                    .with_port(8080)
                    .with_domain(*domain);
                let node = NodeRef {
                    name: NodeName::from_static("n"),
                    address: "127.0.0.1".into(),
                };
                let id = ProcessId::new(format!("s{i}")).expect("id");
                Arc::new(Process::placed(id, 1, spec, node, Timestamp(1)))
            })
            .collect();
        let table = RouteTable::from_copies(
            processes
                .iter()
                .map(|p| (p, crate::records::precedence::Origin::Local)),
        );
        watch::channel(Arc::new(table)).1
    }

    #[test]
    fn routed_local_names_get_a_cached_certificate_and_others_none() {
        let ca = ClusterCa::generate("test").expect("ca");
        let certs = Certificates::new(
            vec![Arc::new(LocalCa::new(ca))],
            routes_of(&["wiki.home.arpa", "public.example.org"]),
            Arc::default(),
        );
        let first = certs.certificate(Some("WIKI.home.arpa")).expect("issued");
        let again = certs.certificate(Some("wiki.home.arpa.")).expect("cached");
        assert!(Arc::ptr_eq(&first, &again), "issued once, then cached");
        let info = certs.info("wiki.home.arpa").expect("info");
        assert_eq!(info.issuer, "cluster CA");
        let days = info.not_after.saturating_sub(unix_now()) / 86_400;
        assert!((89..=90).contains(&days), "{days} days");
        // Not routed, no SNI, or no issuer for a public name: refused.
        assert!(certs.certificate(Some("other.home.arpa")).is_none());
        assert!(certs.certificate(None).is_none());
        assert!(certs.certificate(Some("public.example.org")).is_none());
        assert!(certs.info("public.example.org").is_none());
        let why = certs.error("public.example.org").expect("why");
        assert!(why.contains("acme_email"), "{why}");
        assert!(certs.error("wiki.home.arpa").is_none());
    }
}
