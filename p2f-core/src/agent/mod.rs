//! The node agent: one per machine. `lifecycle` decides; the OS edge acts.

pub mod lifecycle;
pub mod os;
pub mod store;
