//! P2F's data model: what a user declares (`Deployment`, `ProcessSpec`), what the network
//! records (`Process`, `Status`, `Failure`, `Event`), P2PRC's node entry (`Node`), and the one
//! set of validation rules shared by the `deployment!` macro and the runtime.
//!
//! This crate does no IO and never depends on an async runtime, so the proc macro can use it.

pub mod duration;
mod name;
mod node;
mod process;
mod spec;
pub mod validate;

pub use duration::{DurationError, format_duration, parse_duration};
pub use name::{NameError, NodeName, ProcessId};
pub use node::{
    IpTable, MapPortResponse, Node, NodeError, NodeRole, P2fNodeInfo, P2prcConfig, ServerInfo,
    SkippedEntry,
};
pub use process::{
    Event, EventKind, Failure, NodeRef, Process, ProcessKey, Rejection, Status, Timestamp, Unfit,
};
pub use spec::{
    Bundle, BundleFile, DEFAULT_GRACE, Deployment, EnvVar, Health, ProcessSpec, Protocol,
    PublicPort, RestartPolicy, SpecParts, Strategy, is_local_nix_path, normalize_bundle_path,
    shebang,
};
pub use validate::{Field, Finding, Invalid, Location, Rule};
