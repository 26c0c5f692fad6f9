//! Joining a cluster: join tokens (the root's API address, the cluster CA and a random secret,
//! as one copyable line; made by `p2f node token`, kept on the root only as a hash, short-lived
//! and single-use unless asked otherwise) and what a new member asks the root for with one
//! (its node certificate, for a key the member made and keeps, and the gossip key).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

pub use crate::wire::{JoinRequest, JoinResponse};

use crate::cluster::{CertRequest, ClusterError, NodeCert, Secret};
use crate::{ClientError, Network};

/// The prefix of every join token (and its format version).
const PREFIX: &str = "p2f-join-v2:";
/// The prefix of the tokens of earlier versions, which carried the cluster secret itself.
const OLD_PREFIX: &str = "p2f-join-v1:";
/// Bytes of randomness in a token's secret (hex in the token).
const SECRET_BYTES: usize = 32;

/// Why a join token could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a P2F join token at all.
    #[error("not a p2f join token (it should start with `{PREFIX}`)")]
    Prefix,
    /// A token of an earlier P2F, which carried the cluster secret.
    #[error(
        "this join token is from an earlier p2f and is no longer accepted: make a new one on the root with `p2f node token`"
    )]
    Old,
    /// Damaged on the way (a cut copy, a changed character).
    #[error("the join token is damaged ({0}); copy it again from `p2f node token`'s output")]
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

/// Gets this node's certificate and the gossip secret from the root (`root`, a client with the
/// cluster's CA and no certificate) with `token`: a new key is made here and stays here, the
/// root signs a request for it, and the answer must certify that key. Save the certificate
/// with [`NodeCert::save`].
pub async fn request_certificate(
    root: &Network,
    name: &p2f_model::NodeName,
    hosts: Vec<String>,
    token: &JoinToken,
) -> Result<(NodeCert, Secret), JoinError> {
    let key = CertRequest::new(name.as_str())?;
    let request = JoinRequest {
        name: name.clone(),
        hosts,
        csr_pem: key.csr_pem().to_owned(),
        token: token.secret.clone(),
    };
    let signed = root.join(&request).await?;
    let secret = Secret::parse(&signed.gossip_secret)?;
    Ok((key.complete(signed.cert_pem)?, secret))
}

/// What a new member needs to join: where the root's API is, which CA to trust, and the
/// token's secret that authorizes it once (or as many times as it was made for).
#[derive(Clone)]
pub struct JoinToken {
    /// The root's API address (`host:port`).
    pub root: String,
    /// The root's gossip address (`host:port`), when it gossips.
    pub gossip: Option<String>,
    /// The cluster CA certificate (PEM).
    pub ca_pem: String,
    /// The random secret (64 hex characters); the root keeps its SHA-256 only.
    pub secret: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("root", &self.root)
            .field("gossip", &self.gossip)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    root: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gossip: Option<String>,
    ca: String,
    token: String,
}

impl JoinToken {
    /// A new token for the root at `root` (and `gossip`) of the cluster whose CA is `ca_pem`,
    /// with a fresh random secret.
    pub fn generate(root: String, gossip: Option<String>, ca_pem: String) -> JoinToken {
        // The same 32 random bytes in hex as a cluster secret.
        JoinToken {
            root,
            gossip,
            ca_pem,
            secret: Secret::generate().expose().to_owned(),
        }
    }

    /// The SHA-256 of a token's secret, in hex: what the root keeps.
    pub fn hash_secret(secret: &str) -> String {
        use sha2::Digest as _;
        hex(&sha2::Sha256::digest(secret.as_bytes()))
    }

    /// The token as one line of text.
    pub fn encode(&self) -> String {
        let wire = Wire {
            root: self.root.clone(),
            gossip: self.gossip.clone(),
            ca: self.ca_pem.clone(),
            token: self.secret.clone(),
        };
        let json = serde_json::to_vec(&wire).unwrap_or_default();
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Reads a token (surrounding whitespace ignored).
    pub fn decode(text: &str) -> Result<JoinToken, TokenError> {
        let text = text.trim();
        if text.starts_with(OLD_PREFIX) {
            return Err(TokenError::Old);
        }
        let body = text.strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenError::Damaged(e.to_string()))?;
        let wire: Wire =
            serde_json::from_slice(&json).map_err(|e| TokenError::Damaged(e.to_string()))?;
        let well_formed = wire.token.len() == 2 * SECRET_BYTES
            && wire.token.bytes().all(|b| b.is_ascii_hexdigit());
        if !well_formed {
            return Err(TokenError::Damaged(
                "its secret is not 64 hex digits".into(),
            ));
        }
        Ok(JoinToken {
            root: wire.root,
            gossip: wire.gossip,
            ca_pem: wire.ca,
            secret: wire.token,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_damage_is_named() {
        let token = JoinToken::generate(
            "192.168.1.10:7440".into(),
            Some("192.168.1.10:7441".into()),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
        );
        let text = token.encode();
        assert!(text.starts_with(PREFIX));
        let back = JoinToken::decode(&format!("  {text}\n")).expect("decode");
        assert_eq!(
            (back.root.as_str(), back.ca_pem.as_str()),
            (token.root.as_str(), token.ca_pem.as_str())
        );
        assert_eq!(back.secret, token.secret);
        assert_eq!(JoinToken::hash_secret(&back.secret).len(), 64);
        assert_ne!(JoinToken::hash_secret(&back.secret), back.secret);
        let cases = [
            ("hello", "not a p2f join token"),
            ("p2f-join-v1:eyJ9", "earlier p2f"),
            ("p2f-join-v2:!!!", "damaged"),
            (&text[..text.len() - 10], "damaged"),
        ];
        for (input, says) in cases {
            let err = JoinToken::decode(input).expect_err(input).to_string();
            assert!(err.contains(says), "{input}: {err}");
        }
    }
}
