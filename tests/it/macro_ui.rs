//! macro_ui tests.
