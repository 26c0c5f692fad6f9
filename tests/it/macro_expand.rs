//! Expansion snapshots of `deployment!` (filled in below).
