//! Identifiers: node names (stable, P2PRC's `Name`) and process ids.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Why a name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// A node name breaks the naming rule.
    #[error(
        "`{0}` is not a valid node name: use 1-64 letters, digits, '-', '_' or '.', not starting with '-' or '.'"
    )]
    Node(String),
    /// A process id breaks the naming rule.
    #[error(
        "`{0}` is not a valid process id: use 1-128 letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    Process(String),
}

const fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'
}

const fn is_valid_node_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    if bytes.is_empty() || bytes.len() > 64 || bytes[0] == b'-' || bytes[0] == b'.' {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if !is_name_byte(bytes[i]) {
            return false;
        }
        i += 1;
    }
    true
}

/// A node's stable name (P2PRC's `Name`, e.g. `homelaptop-Xk3Pq9Z`). Nodes are always named,
/// never addressed: addresses change behind NAT.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct NodeName(Cow<'static, str>);

impl NodeName {
    /// A node name from a literal, checked at compile time when used in a `const`.
    ///
    /// # Panics
    /// When `name` breaks the naming rule (in a `const`, that is a compile error).
    pub const fn from_static(name: &'static str) -> NodeName {
        assert!(is_valid_node_name(name), "invalid node name");
        NodeName(Cow::Borrowed(name))
    }

    /// A node name from run-time text.
    pub fn new(name: impl Into<String>) -> Result<NodeName, NameError> {
        let name = name.into();
        if is_valid_node_name(&name) {
            Ok(NodeName(Cow::Owned(name)))
        } else {
            Err(NameError::Node(name))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` is a valid node name.
    pub fn is_valid(name: &str) -> bool {
        is_valid_node_name(name)
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for NodeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for NodeName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeName::new(s)
    }
}

impl<'de> Deserialize<'de> for NodeName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        NodeName::new(text).map_err(serde::de::Error::custom)
    }
}

/// A process's id: stable across restarts and moves of the same placement (the generation
/// changes instead). Made of the service name and a short unique suffix, e.g. `wiki-3f9a1c`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ProcessId(String);

impl ProcessId {
    /// A process id from text.
    pub fn new(id: impl Into<String>) -> Result<ProcessId, NameError> {
        let id = id.into();
        // Ids name files and directories on nodes: `.`, `..` and hidden names must not be ids.
        let ok = !id.is_empty()
            && id.len() <= 128
            && !id.starts_with('.')
            && id.bytes().all(is_name_byte);
        if ok {
            Ok(ProcessId(id))
        } else {
            Err(NameError::Process(id))
        }
    }

    /// A fresh id for `service`: the service name, a dash, and 12 hex digits of `entropy`.
    pub fn for_service(service: &str, entropy: u64) -> ProcessId {
        ProcessId(format!("{service}-{:012x}", entropy & 0xffff_ffff_ffff))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::str::FromStr for ProcessId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProcessId::new(s)
    }
}

impl<'de> Deserialize<'de> for ProcessId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ProcessId::new(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_p2prc_machine_names() {
        for ok in ["laptop", "Node1", "homelaptop-Xk3Pq9Z", "pi.lan", "a_b"] {
            assert!(NodeName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "a b", "a/b", &"x".repeat(65)] {
            assert_eq!(NodeName::new(bad), Err(NameError::Node(bad.to_owned())));
        }
        const PI: NodeName = NodeName::from_static("pi");
        assert_eq!(PI.as_str(), "pi");
    }

    #[test]
    fn process_ids_are_service_plus_suffix() {
        let id = ProcessId::for_service("wiki", 0xabc);
        assert_eq!(id.as_str(), "wiki-000000000abc");
        for bad in ["bad id", "", ".", "..", ".hidden", "a/b"] {
            assert!(ProcessId::new(bad).is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<ProcessId>("\"..\"").is_err());
        assert!(ProcessId::new("wiki-1.2").is_ok());
        let json = serde_json::to_string(&id).expect("serialize");
        assert_eq!(serde_json::from_str::<ProcessId>(&json).expect("parse"), id);
        assert!(serde_json::from_str::<NodeName>("\"a b\"").is_err());
    }
}
