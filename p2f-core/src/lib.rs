//! P2F's runtime. Today: the supervisor's decision logic (`agent::lifecycle`), a pure state
//! machine with no OS calls. The agent's IO edge (spawning, the control API, the store), the
//! mesh, the root and the `Network` client build on it.

pub mod agent;

pub use p2f_model as model;
