//! P2F's runtime: the node agent (control API, supervisor, store), cluster trust (CA, secret,
//! TLS), and the `Network` client. The mesh and the root build on the agent.

pub mod api_error;
pub mod client;
pub mod cluster;
pub mod fsutil;
pub mod identity;
pub mod ingress;
pub mod join;
pub mod mesh;
pub mod node;
pub mod p2prc;
pub mod reach;
pub mod records;
pub mod relay;
pub mod root;
pub mod server;
pub mod ssh_keys;
pub mod store;
pub mod trust;
pub mod wire;

pub use client::{ClientError, Network};
pub use p2f_model as model;
