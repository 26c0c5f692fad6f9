//! Every key a node publishes in the mesh, in one place. Values are strings of at most
//! [`super::MAX_VALUE_LEN`] bytes.

pub use super::process::PROCESS_PREFIX;

/// The node's control API address (`host:port`).
pub const API: &str = "api";
/// The node's P2PRC IP-table entry (JSON of `p2f_model::Node`).
pub const NODE: &str = "node";
/// How other nodes reach the node's API: `root` for a node behind NAT that keeps a link to
/// the root (`relay/link.rs`); unset for a node reached where it publishes its API.
pub const REACH: &str = "reach";
/// The value of [`REACH`] for a node reached through the root.
pub const REACH_VIA_ROOT: &str = "root";
/// The node's available memory (`MemAvailable`), in bytes, decimal.
pub const MEMORY: &str = "mem";
/// How many times the node published its process digests: set after them, so another node
/// that has it has every digest it announces (chitchat delivers a node's key-values in the
/// order they were set).
pub const SEQ: &str = "seq";
