//! P2F's runtime. For now it re-exports the model; the agent, mesh, root and client land here.

pub use p2f_model as model;
