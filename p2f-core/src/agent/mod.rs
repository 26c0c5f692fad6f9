//! The node agent: one per machine. `lifecycle` decides; the OS edge (coming) acts.

pub mod lifecycle;
