//! Which certificate a command shows the network: an operator's (`P2F_OPERATOR=DIR`, or the
//! `operator/` directory next to a root's config, which `p2f init` writes), else the node's
//! own (on a member: it may read, and act on its own node and processes).

use std::path::{Path, PathBuf};

use p2f_core::Network;
use p2f_core::cluster::Credentials;
use p2f_core::cluster::{ClusterError, ClusterFiles};
use p2f_core::identity::Role;
use p2f_core::node::AgentConfig;

/// The environment variable naming an operator's directory.
pub const OPERATOR_ENV: &str = "P2F_OPERATOR";

/// The operator directory of a node's data directory (what `p2f init` writes on the root).
pub fn operator_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("operator")
}

/// The operator directory `P2F_OPERATOR` names, if set.
pub fn operator_from_env() -> Option<PathBuf> {
    std::env::var_os(OPERATOR_ENV)
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
}

/// A client of the root as the operator `P2F_OPERATOR` names (at the root its directory names,
/// or `P2F_ROOT`); `None` when the variable is not set.
pub fn operator_client() -> Option<Result<Network, p2f_core::ClientError>> {
    let dir = operator_from_env()?;
    let connect = || {
        let (credentials, root) = Credentials::operator(&dir)?;
        let address = std::env::var("P2F_ROOT").unwrap_or(root);
        Network::connect(&address, &credentials)
    };
    Some(connect())
}

/// The credentials to use with the node whose config is `config`: `P2F_OPERATOR`'s, the
/// node's operator directory's, or the node's own certificate.
///
/// Errors: [`ClusterError::Missing`] when none of them is there.
pub fn credentials_for(config: &AgentConfig) -> Result<Credentials, ClusterError> {
    if let Some(dir) = operator_from_env() {
        return Ok(Credentials::operator(&dir)?.0);
    }
    let dir = operator_dir(&config.data_dir);
    if Credentials::is_operator_dir(&dir) {
        return Ok(Credentials::operator(&dir)?.0);
    }
    Credentials::of_node(&config.cluster_dir(), &config.data_dir.join("tls"))
}

/// A client of `address` for the node whose config is `config` ([`credentials_for`]).
pub fn client_for(config: &AgentConfig, address: &str) -> Result<Network, p2f_core::ClientError> {
    Network::connect(address, &credentials_for(config)?)
}

/// Issues operator `name`'s certificate with the cluster CA in `cluster` (which must hold the
/// CA key: only on the root, before its agent runs: `p2f init`, the embedded network) and
/// writes its directory `dir`, naming `root` as the address to call. A running root issues
/// operators over its API instead ([`add_operator`]).
///
/// Errors: [`ClusterError::NoCaKey`] off the root; a name that is not a valid node-style name;
/// files that cannot be written.
pub fn issue_operator(
    cluster: &ClusterFiles,
    name: &str,
    dir: &Path,
    root: &str,
) -> Result<Credentials, ClusterError> {
    let (ca, _) = cluster.load()?;
    let cert = ca.issue_as(Role::Operator, name, &[])?;
    // Recorded, so that `p2f operator remove` can revoke it.
    p2f_core::root::issued::Issued::open(cluster.dir()).record(&cert.cert_pem)?;
    let credentials = Credentials::new(ca.cert_pem(), Some(cert));
    credentials.save_operator(dir, root)?;
    Ok(credentials)
}

/// The address local tools reach a node's API at: its listen address, `127.0.0.1` for an
/// unspecified IP, and the port it wrote to `DATA/api.addr` when it listens on port 0.
pub fn local_address(config: &AgentConfig) -> String {
    let host = if config.listen.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        config.listen.ip().to_string()
    };
    match std::fs::read_to_string(config.data_dir.join("api.addr")) {
        Ok(text) if config.listen.port() == 0 => text.trim().to_owned(),
        _ if host.contains(':') => format!("[{host}]:{}", config.listen.port()),
        _ => format!("{host}:{}", config.listen.port()),
    }
}

/// Asks the root (`network`, as an operator) for operator `name`'s certificate, for a key made
/// here, and writes its directory `dir` naming `root`.
///
/// Errors: the root's refusal; files that cannot be written.
pub async fn add_operator(
    network: &Network,
    name: &p2f_model::NodeName,
    dir: &Path,
    root: &str,
) -> Result<Credentials, p2f_core::ClientError> {
    let key = p2f_core::cluster::CertRequest::new(name.as_str())?;
    let request = p2f_core::wire::OperatorRequest {
        name: name.clone(),
        csr_pem: key.csr_pem().to_owned(),
    };
    let signed = network.add_operator(&request).await?;
    let cert = key.complete(signed.cert_pem)?;
    let credentials = Credentials::new(signed.ca_pem, Some(cert));
    credentials.save_operator(dir, root)?;
    Ok(credentials)
}
