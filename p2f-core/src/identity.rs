//! Who is calling: every certificate the cluster CA issues names its holder and its role, and
//! the control API authorizes each request by the client certificate it came with.
//!
//! A certificate's subject carries the holder's name as its common name (CN) and its role as
//! its organization (O), as Kubernetes does for kubelets (`O=system:nodes`,
//! `CN=system:node:NAME`):
//!
//! | role | O | CN | extra subject alternative name |
//! | --- | --- | --- | --- |
//! | the root node | `p2f:root` | the node's name | DNS `NAME.node.p2f` |
//! | a member node | `p2f:member` | the node's name | DNS `NAME.node.p2f` |
//! | an operator (a person, the `p2f` CLI, a deployment binary) | `p2f:operator` | the operator's name | none |
//!
//! Nodes dial each other by name: the TLS server name is `NAME.node.p2f`, whatever address
//! the gossip says the node is at ([`node_server_name`]), so a call meant for node `nas` is
//! only ever answered by the holder of `nas`'s certificate. Only the CA puts `.node.p2f` names
//! and roles into certificates; it refuses requests for them.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use crate::cluster::{ClusterError, NodeCert};

/// The DNS suffix of node names in certificates (`nas` → `nas.node.p2f`).
pub const NODE_DNS_SUFFIX: &str = ".node.p2f";

/// The TLS server name node `name` is dialed by, and that its certificate carries.
pub fn node_server_name(name: &str) -> String {
    format!("{name}{NODE_DNS_SUFFIX}")
}

/// What a certificate's holder is to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The root node: places processes, holds the CA key.
    Root,
    /// A member node: runs what the root places on it.
    Member,
    /// A person or tool administering the cluster (`p2f init`, `p2f operator add`).
    Operator,
}

impl Role {
    /// The subject organization (O) that carries the role.
    pub fn organization(self) -> &'static str {
        match self {
            Role::Root => "p2f:root",
            Role::Member => "p2f:member",
            Role::Operator => "p2f:operator",
        }
    }

    fn from_organization(text: &str) -> Option<Role> {
        [Role::Root, Role::Member, Role::Operator]
            .into_iter()
            .find(|role| role.organization() == text)
    }

    /// Whether the role holds a node's certificate (it serves the control API).
    pub fn is_node(self) -> bool {
        matches!(self, Role::Root | Role::Member)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Root => "root",
            Role::Member => "member",
            Role::Operator => "operator",
        })
    }
}

/// The authenticated holder of a client certificate: its role and name, and the certificate's
/// serial number (what revokes it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller {
    /// What it is to the cluster.
    pub role: Role,
    /// The node's or operator's name (the certificate's CN).
    pub name: String,
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
}

impl Caller {
    /// The holder named by a certificate (DER) that TLS already verified against the cluster
    /// CA; `None` when it names no role (a certificate from before roles existed, or another
    /// kind the CA signed, such as an ingress site's).
    pub fn from_certificate(der: &[u8]) -> Option<Caller> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject();
        let role = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok())
            .find_map(Role::from_organization)?;
        let name = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
        let serial = cert
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Some(Caller { role, name, serial })
    }

    /// The holder of a certificate in PEM form (its first certificate).
    pub fn from_pem(cert_pem: &str) -> Option<Caller> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
        Caller::from_certificate(&der)
    }

    /// Whether it may act anywhere in the cluster: the root and operators.
    pub fn administers(&self) -> bool {
        matches!(self.role, Role::Root | Role::Operator)
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
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
    pub fn caller(&self) -> Option<Caller> {
        self.identity
            .as_ref()
            .and_then(|cert| Caller::from_pem(&cert.cert_pem))
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
        crate::fsutil::write_atomic(&dir.join(OPERATOR_CA), &self.ca_pem, 0o644)?;
        crate::fsutil::write_atomic(&dir.join(OPERATOR_CERT), &identity.cert_pem, 0o644)?;
        crate::fsutil::write_private(&dir.join(OPERATOR_KEY), &identity.key_pem)?;
        crate::fsutil::write_atomic(&dir.join(OPERATOR_ROOT), format!("{root}\n"), 0o644)?;
        Ok(())
    }

    /// Whether `dir` holds an operator's credentials.
    pub fn is_operator_dir(dir: &Path) -> bool {
        dir.join(OPERATOR_CERT).is_file() && dir.join(OPERATOR_KEY).is_file()
    }
}

fn read(path: &Path) -> Result<String, ClusterError> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ClusterError::Missing {
                path: PathBuf::from(path),
            }
        } else {
            ClusterError::Io {
                action: "read",
                path: path.to_owned(),
                source,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterCa;

    #[test]
    fn a_certificate_names_its_holder_and_role() {
        let ca = ClusterCa::generate("test").expect("ca");
        for role in [Role::Root, Role::Member, Role::Operator] {
            let cert = ca.issue_as(role, "nas", &[]).expect("issue");
            let caller = Caller::from_pem(&cert.cert_pem).expect("a caller");
            assert_eq!((caller.role, caller.name.as_str()), (role, "nas"));
            assert!(caller.serial.len() >= 16, "{}", caller.serial);
            let again = ca.issue_as(role, "nas", &[]).expect("issue");
            let other = Caller::from_pem(&again.cert_pem).expect("a caller");
            assert_ne!(
                caller.serial, other.serial,
                "every certificate has its own serial"
            );
        }
        let site = ca.issue_site("wiki.home.arpa", 7).expect("site");
        assert_eq!(Caller::from_pem(&site.cert_pem), None, "a site has no role");
    }
}
