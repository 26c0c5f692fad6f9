//! What P2F's integration tests (`tests/it`) and benchmark examples (`examples/bench_*.rs`)
//! share, so that there is one way to run a real agent:
//!
//! - [`Agent`]: a real `p2f node run` process in a directory of its own, optionally inside a
//!   network namespace, with every OS process it starts marked so it can be found and killed;
//! - [`procs`]: the processes of a run (by their [`MARKER`]), `/proc/PID/stat`, signals;
//! - [`ports`]: ports for services, handed out so that parallel tests cannot race for one;
//! - [`netns`]: network namespaces, a bridged LAN, a NAT-like firewall;
//! - [`wait`]: bounded polling;
//! - [`bins`]: the `p2f` binary and the examples, built with the profile of the running test.
//!
//! Linux only. Failing setup is an `Err` (with the agent's log where it helps), never a silent
//! skip; a missing tool names its Debian package.

pub mod agent;
pub mod bins;
pub mod netns;
pub mod ports;
pub mod procs;
pub mod wait;

pub use agent::{Agent, AgentBuilder, Killed};
pub use bins::{example_bin, p2f_bin};
pub use ports::service_port;
pub use procs::MARKER;
pub use wait::{eventually, node_when, poll};
