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

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

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
