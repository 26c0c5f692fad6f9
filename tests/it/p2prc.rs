//! p2prc tests.
