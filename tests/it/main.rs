//! P2F's integration tests: one binary, one module per concern.

mod acme;
mod agent;
mod cli;
mod ingress;
mod join;
mod macro_expand;
mod macro_ui;
mod model;
mod network;
mod p2prc;
mod p2prc_ssh;
mod p2prc_wire;
mod partition;
mod relay;
mod root;
mod rules;
mod strategies;
mod supervision;
mod support;
mod trust;
