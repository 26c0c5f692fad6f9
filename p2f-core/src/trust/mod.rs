//! What every node keeps about trust besides its certificate, shared by the node and the root:
//! the gossip key ring ([`gossip_keys`]) and the revoked certificates ([`revoked`]), each saved
//! in the cluster directory and served under `/v1`.

pub mod gossip_keys;
pub mod revoked;
