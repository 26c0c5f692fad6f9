//! Every key a node publishes in the mesh, in one place. Values are strings of at most
//! [`super::MAX_VALUE_LEN`] bytes.

pub use super::process::PROCESS_PREFIX;

/// The node's control API address (`host:port`).
pub const API: &str = "api";
/// The node's P2PRC IP-table entry (JSON of `p2f_model::Node`).
pub const NODE: &str = "node";
/// The node's available memory (`MemAvailable`), in bytes, decimal.
pub const MEMORY: &str = "mem";
/// How many times the node published its process digests: set after them, so another node
/// that has it has every digest it announces (chitchat delivers a node's key-values in the
/// order they were set).
pub const SEQ: &str = "seq";
