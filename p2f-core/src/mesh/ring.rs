//! The gossip key ring: the keys a node tags its datagrams with and accepts them under.
//!
//! Each key is derived from a secret (HMAC-SHA256(secret, [`KEY_LABEL`]), never the secret
//! itself) and named by a [`KeyId`]: the first 4 bytes of SHA-256 of the derived key. A
//! datagram carries the id of the key that tagged it, so a receiver checks one key, not all.
//!
//! A ring holds one primary key (the one outgoing datagrams are tagged with) and up to
//! [`MAX_KEYS`]` - 1` other accepted keys. Rotating the cluster's key without losing anyone:
//!
//! 1. install the new key on every node ([`KeyRing::install`], `Mesh::install_key`): everyone
//!    accepts both, still tags with the old;
//! 2. make it primary on every node ([`KeyRing::use_key`], `Mesh::use_key`): nodes tag with
//!    the new one as they switch, and everyone still accepts both;
//! 3. remove the old key everywhere ([`KeyRing::remove`], `Mesh::remove_key`).
//!
//! Each step must reach every node before the next starts: a node that tags with a key a peer
//! does not have is not heard by that peer (and is declared dead by it after the failure
//! detector's timeout).

use std::fmt;
use std::str::FromStr;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::MeshError;
use crate::cluster::Secret;

/// Most keys a ring holds, the primary included.
pub const MAX_KEYS: usize = 4;
/// Bytes of a [`KeyId`] on the wire.
pub(super) const KEY_ID_LEN: usize = 4;
/// Bytes of a tag: a full HMAC-SHA256 output.
pub(super) const TAG_LEN: usize = 32;
/// Domain separation: the gossip key is derived from the secret, never the secret itself.
const KEY_LABEL: &[u8] = b"p2f/mesh/gossip/v1";

/// The short public name of a gossip key: the first 4 bytes of SHA-256 of the key derived from
/// its secret. Shown and parsed as 8 lowercase hexadecimal digits (`3fa9c01b`); serialized the
/// same way. It says which key tagged a datagram; it reveals nothing usable about the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct KeyId([u8; KEY_ID_LEN]);

impl KeyId {
    /// The id of the gossip key derived from `secret` (what [`KeyRing::install`] would
    /// return), computed without a ring: for showing which key a secret is.
    pub fn of(secret: &Secret) -> KeyId {
        GossipKey::derive(secret.expose().as_bytes()).id()
    }

    pub(super) fn from_bytes(bytes: [u8; KEY_ID_LEN]) -> KeyId {
        KeyId(bytes)
    }

    pub(super) fn to_bytes(self) -> [u8; KEY_ID_LEN] {
        self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = MeshError;

    /// Reads 8 hexadecimal digits (either case; surrounding whitespace ignored).
    ///
    /// # Errors
    /// [`MeshError::BadKeyId`] for anything else.
    fn from_str(text: &str) -> Result<KeyId, MeshError> {
        let bad = || MeshError::BadKeyId(text.chars().take(64).collect());
        let digits = text.trim().as_bytes();
        if digits.len() != 2 * KEY_ID_LEN {
            return Err(bad());
        }
        let mut bytes = [0u8; KEY_ID_LEN];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(KeyId(bytes))
    }
}

impl From<KeyId> for String {
    fn from(id: KeyId) -> String {
        id.to_string()
    }
}

impl TryFrom<String> for KeyId {
    type Error = MeshError;

    fn try_from(text: String) -> Result<KeyId, MeshError> {
        text.parse()
    }
}

/// One gossip key, ready to tag or verify.
#[derive(Clone)]
pub(super) struct GossipKey {
    id: KeyId,
    /// SHA-256 of the derived key: tells two keys apart without keeping the key's bytes.
    fingerprint: [u8; 32],
    mac: Hmac<Sha256>,
}

impl fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GossipKey({}, <redacted>)", self.id)
    }
}

impl GossipKey {
    /// The gossip key of `secret`: HMAC-SHA256(secret, [`KEY_LABEL`]).
    pub(super) fn derive(secret: &[u8]) -> GossipKey {
        let derived = Hmac::<Sha256>::new_from_slice(secret)
            .expect("HMAC takes a key of any length")
            .chain_update(KEY_LABEL)
            .finalize()
            .into_bytes();
        let fingerprint: [u8; 32] = Sha256::digest(derived).into();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&fingerprint[..KEY_ID_LEN]);
        GossipKey {
            id: KeyId(id),
            fingerprint,
            mac: Hmac::<Sha256>::new_from_slice(&derived).expect("HMAC takes a key of any length"),
        }
    }

    pub(super) fn id(&self) -> KeyId {
        self.id
    }

    /// The tag of `bytes`.
    pub(super) fn tag(&self, bytes: &[u8]) -> [u8; TAG_LEN] {
        self.mac
            .clone()
            .chain_update(bytes)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `tag` is the tag of `bytes` (compared in constant time by `hmac`).
    pub(super) fn verify(&self, bytes: &[u8], tag: &[u8]) -> bool {
        self.mac
            .clone()
            .chain_update(bytes)
            .verify_slice(tag)
            .is_ok()
    }

    fn same_key(&self, other: &GossipKey) -> bool {
        bool::from(self.fingerprint.ct_eq(&other.fingerprint))
    }
}

/// One key of a ring as [`KeyRing::keys`] lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// The key's id.
    pub id: KeyId,
    /// Whether outgoing datagrams are tagged with it.
    pub primary: bool,
}

/// The gossip keys of a node: one primary key that tags outgoing datagrams, and every key
/// (the primary included, [`MAX_KEYS`] at most) under which incoming ones are accepted. See the
/// module documentation for a rotation. `Debug` shows key ids only.
#[derive(Clone)]
pub struct KeyRing {
    /// Never empty; at most [`MAX_KEYS`], ids distinct, in installation order.
    keys: Vec<GossipKey>,
    /// Index of the primary key in `keys`.
    primary: usize,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("primary", &self.primary_id())
            .field(
                "accepted",
                &self.keys.iter().map(GossipKey::id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl KeyRing {
    /// A ring of one key, derived from `secret`, which is primary.
    pub fn new(primary: &Secret) -> KeyRing {
        KeyRing {
            keys: vec![GossipKey::derive(primary.expose().as_bytes())],
            primary: 0,
        }
    }

    /// Adds the key derived from `secret` as an accepted (not primary) key and returns its id.
    /// Installing a key the ring already holds changes nothing and returns its id.
    ///
    /// # Errors
    /// [`MeshError::KeyRingFull`] when the ring already holds [`MAX_KEYS`] keys;
    /// [`MeshError::KeyIdTaken`] when another key of the ring has the same id (a 1 in 2³²
    /// chance: pick another secret).
    pub fn install(&mut self, secret: &Secret) -> Result<KeyId, MeshError> {
        let key = GossipKey::derive(secret.expose().as_bytes());
        let id = key.id();
        if let Some(known) = self.keys.iter().find(|known| known.id() == id) {
            return if known.same_key(&key) {
                Ok(id)
            } else {
                Err(MeshError::KeyIdTaken(id))
            };
        }
        if self.keys.len() >= MAX_KEYS {
            return Err(MeshError::KeyRingFull);
        }
        self.keys.push(key);
        Ok(id)
    }

    /// Makes the key `id` primary: outgoing datagrams are tagged with it from the next one on.
    /// The previous primary stays accepted.
    ///
    /// # Errors
    /// [`MeshError::UnknownKey`] when the ring has no key `id`.
    pub fn use_key(&mut self, id: KeyId) -> Result<(), MeshError> {
        self.primary = self.index(id).ok_or(MeshError::UnknownKey(id))?;
        Ok(())
    }

    /// Removes the key `id`: datagrams tagged with it are rejected from now on.
    ///
    /// # Errors
    /// [`MeshError::UnknownKey`] when the ring has no key `id`; [`MeshError::RemovePrimary`]
    /// when it is the primary key (make another key primary first).
    pub fn remove(&mut self, id: KeyId) -> Result<(), MeshError> {
        let index = self.index(id).ok_or(MeshError::UnknownKey(id))?;
        if index == self.primary {
            return Err(MeshError::RemovePrimary(id));
        }
        self.keys.remove(index);
        if index < self.primary {
            self.primary -= 1;
        }
        Ok(())
    }

    /// The id of the primary key.
    pub fn primary_id(&self) -> KeyId {
        self.primary_key().id()
    }

    /// Every key's id, the primary first, then the others in the order they were installed.
    pub fn keys(&self) -> Vec<KeyInfo> {
        let primary = self.primary_id();
        let mut keys: Vec<KeyInfo> = self
            .keys
            .iter()
            .map(|key| KeyInfo {
                id: key.id(),
                primary: key.id() == primary,
            })
            .collect();
        keys.sort_by_key(|info| !info.primary);
        keys
    }

    /// Whether the ring holds the key `id`.
    pub fn contains(&self, id: KeyId) -> bool {
        self.index(id).is_some()
    }

    pub(super) fn primary_key(&self) -> &GossipKey {
        // `primary` always indexes `keys` (every method that shrinks `keys` keeps it so).
        &self.keys[self.primary]
    }

    pub(super) fn get(&self, id: KeyId) -> Option<&GossipKey> {
        self.keys.iter().find(|key| key.id() == id)
    }

    fn index(&self, id: KeyId) -> Option<usize> {
        self.keys.iter().position(|key| key.id() == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> Secret {
        Secret::parse(text).expect("test secrets are valid")
    }

    #[test]
    fn a_tag_verifies_only_with_the_same_secret_and_bytes() {
        let key = GossipKey::derive(b"0123456789abcdef-secret");
        let tag = key.tag(b"hello gossip");
        assert!(key.verify(b"hello gossip", &tag));
        assert!(!key.verify(b"hello gossiP", &tag));
        assert!(!key.verify(b"hello gossip", &tag[..TAG_LEN - 1]));
        let other = GossipKey::derive(b"0123456789abcdef-other!");
        assert!(!other.verify(b"hello gossip", &tag));
        assert_ne!(key.id(), other.id());
    }

    #[test]
    fn a_key_id_is_stable_shown_as_hex_and_parsed_back() {
        let a = secret("ring-test-secret-a-0123456789");
        let id = KeyId::of(&a);
        assert_eq!(id, KeyRing::new(&a).primary_id());
        let text = id.to_string();
        assert_eq!(text.len(), 8);
        assert!(text.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(text.parse::<KeyId>().expect("parses"), id);
        assert_eq!(text.to_uppercase().parse::<KeyId>().expect("parses"), id);
        let json = serde_json::to_string(&id).expect("serializes");
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<KeyId>(&json).expect("reads"), id);
        for bad in ["", "123", "0123456789", "zzzzzzzz", "éé0000"] {
            assert!(
                matches!(bad.parse::<KeyId>(), Err(MeshError::BadKeyId(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_ring_installs_switches_and_removes_keys() {
        let old = secret("ring-test-secret-old-0123456789");
        let new = secret("ring-test-secret-new-0123456789");
        let mut ring = KeyRing::new(&old);
        let old_id = ring.primary_id();
        let new_id = ring.install(&new).expect("room for a second key");
        assert_eq!(ring.install(&new).expect("idempotent"), new_id);
        assert_eq!(
            ring.keys(),
            [
                KeyInfo {
                    id: old_id,
                    primary: true
                },
                KeyInfo {
                    id: new_id,
                    primary: false
                }
            ]
        );
        assert!(matches!(
            ring.remove(old_id),
            Err(MeshError::RemovePrimary(id)) if id == old_id
        ));
        ring.use_key(new_id).expect("installed");
        assert_eq!(ring.primary_id(), new_id);
        assert_eq!(ring.keys()[0].id, new_id);
        ring.remove(old_id).expect("no longer primary");
        assert!(!ring.contains(old_id));
        assert_eq!(ring.primary_id(), new_id);
        assert!(ring.get(old_id).is_none());
        assert!(matches!(
            ring.use_key(old_id),
            Err(MeshError::UnknownKey(id)) if id == old_id
        ));
        assert!(matches!(ring.remove(old_id), Err(MeshError::UnknownKey(_))));

        // Bounded.
        for i in 1..MAX_KEYS {
            ring.install(&secret(&format!("ring-test-secret-{i}-0123456789")))
                .expect("room");
        }
        assert!(matches!(
            ring.install(&secret("ring-test-secret-one-too-many")),
            Err(MeshError::KeyRingFull)
        ));
        assert_eq!(ring.keys().len(), MAX_KEYS);
        assert_eq!(ring.primary_id(), new_id);
    }

    #[test]
    fn removing_a_key_before_the_primary_keeps_the_primary() {
        let a = secret("ring-test-secret-a-0123456789");
        let b = secret("ring-test-secret-b-0123456789");
        let mut ring = KeyRing::new(&a);
        let a_id = ring.primary_id();
        let b_id = ring.install(&b).expect("room");
        ring.use_key(b_id).expect("installed");
        ring.remove(a_id).expect("not primary");
        assert_eq!(ring.primary_id(), b_id);
        assert_eq!(ring.primary_key().id(), b_id);
    }

    #[test]
    fn debug_shows_ids_but_no_key_material() {
        let a = secret("ring-test-secret-a-0123456789");
        let ring = KeyRing::new(&a);
        let shown = format!("{ring:?} {:?}", ring.primary_key());
        assert!(shown.contains(&ring.primary_id().to_string()), "{shown}");
        assert!(!shown.contains("ring-test-secret"), "{shown}");
        assert!(!shown.contains("mac"), "{shown}");
        assert!(!shown.contains("fingerprint"), "{shown}");
    }
}
