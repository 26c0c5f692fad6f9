//! P2F: describe the services of your home servers as typed Rust, check them at compile time,
//! and run them on a small peer-to-peer network of your own machines.
//!
//! ```
//! use p2f::prelude::*;
//!
//! const HOME: Deployment = deployment! {
//!     nodes: [laptop, pi],
//!     service wiki {
//!         start: "python3 -m http.server $PORT",
//!         port: 8080,
//!         domain: "wiki.home.arpa",
//!         pin: [laptop, pi],
//!         health: Http("/"),
//!     }
//! };
//!
//! assert_eq!(HOME.services()[0].port(), Some(8080));
//! assert!(HOME.validate().is_ok());
//! ```
//!
//! The language is documented in DESIGN.md §2 and the README; every rule is checked at compile
//! time by [`deployment!`] and at run time by [`Deployment::validate`](model::Deployment::validate).

pub use p2f_core as core;

/// The command line of a deployment binary: `p2f::cli::run(&DEPLOYMENT).await`.
pub mod cli {
    pub use p2f_cli::{Args, Command, Embedded, Error, execute, run};
}

/// `Result` of [`cli::run`].
pub type Result<T, E = cli::Error> = std::result::Result<T, E>;
pub use p2f_macros::deployment;
pub use p2f_model as model;

/// Everything a deployment file needs.
pub mod prelude {
    pub use crate::deployment;
    pub use p2f_model::{
        Deployment, Failure, Health, NodeName, Process, ProcessId, ProcessKey, ProcessSpec,
        PublicPort, RestartPolicy, Status, Strategy,
    };
}
