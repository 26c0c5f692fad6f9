//! Joining a cluster: the root's join token (its API address, the cluster CA and the secret,
//! as one copyable line) and what a new member asks the root for (its node certificate, for a
//! key the member made and keeps).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

pub use crate::wire::{JoinRequest, JoinResponse};

use crate::cluster::{CertRequest, ClusterError, NodeCert, Secret};
use crate::{ClientError, Network};

/// The prefix of every join token (and its format version).
const PREFIX: &str = "p2f-join-v1:";

/// Why a join token could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a P2F join token at all.
    #[error("not a p2f join token (it should start with `{PREFIX}`)")]
    Prefix,
    /// Damaged on the way (a cut copy, a changed character).
    #[error("the join token is damaged ({0}); copy it again from the root's DATA/join-token")]
    Damaged(String),
}

/// Why a member did not get its certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// Making the key or request, or the answer's certificate, failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The root refused or could not be reached.
    #[error(transparent)]
    Root(#[from] ClientError),
}

/// Gets this node's certificate from the root (`root`, a client with the cluster's CA and
/// secret): a new key is made here and stays here, the root signs a request for it, and the
/// answer must certify that key. Save it with [`NodeCert::save`].
pub async fn request_certificate(
    root: &Network,
    name: &p2f_model::NodeName,
    hosts: Vec<String>,
) -> Result<NodeCert, JoinError> {
    let key = CertRequest::new(name.as_str())?;
    let request = JoinRequest {
        name: name.clone(),
        hosts,
        csr_pem: key.csr_pem().to_owned(),
    };
    let signed = root.join(&request).await?;
    Ok(key.complete(signed.cert_pem)?)
}

/// What a new member needs to join: where the root's API is, which CA to trust, the secret.
#[derive(Debug, Clone)]
pub struct JoinToken {
    /// The root's API address (`host:port`).
    pub root: String,
    /// The root's gossip address (`host:port`), when it gossips.
    pub gossip: Option<String>,
    /// The cluster CA certificate (PEM).
    pub ca_pem: String,
    /// The cluster secret.
    pub secret: Secret,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    root: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gossip: Option<String>,
    ca: String,
    secret: String,
}

impl JoinToken {
    /// The token as one line of text.
    pub fn encode(&self) -> String {
        let wire = Wire {
            root: self.root.clone(),
            gossip: self.gossip.clone(),
            ca: self.ca_pem.clone(),
            secret: self.secret.expose().to_owned(),
        };
        let json = serde_json::to_vec(&wire).unwrap_or_default();
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Reads a token (surrounding whitespace ignored).
    pub fn decode(text: &str) -> Result<JoinToken, TokenError> {
        let body = text.trim().strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenError::Damaged(e.to_string()))?;
        let wire: Wire =
            serde_json::from_slice(&json).map_err(|e| TokenError::Damaged(e.to_string()))?;
        let secret = Secret::parse(&wire.secret).map_err(|e| TokenError::Damaged(e.to_string()))?;
        Ok(JoinToken {
            root: wire.root,
            gossip: wire.gossip,
            ca_pem: wire.ca,
            secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_damage_is_named() {
        let token = JoinToken {
            root: "192.168.1.10:7440".into(),
            gossip: Some("192.168.1.10:7441".into()),
            ca_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            secret: Secret::generate(),
        };
        let text = token.encode();
        assert!(text.starts_with(PREFIX));
        let back = JoinToken::decode(&format!("  {text}\n")).expect("decode");
        assert_eq!(
            (back.root.as_str(), back.ca_pem.as_str()),
            (token.root.as_str(), token.ca_pem.as_str())
        );
        assert_eq!(back.secret.expose(), token.secret.expose());
        let cases = [
            ("hello", "not a p2f join token"),
            ("p2f-join-v1:!!!", "damaged"),
            (&text[..text.len() - 10], "damaged"),
        ];
        for (input, says) in cases {
            let err = JoinToken::decode(input).expect_err(input).to_string();
            assert!(err.contains(says), "{input}: {err}");
        }
    }
}
