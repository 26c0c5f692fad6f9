//! DESIGN.md §2's example, without the services whose files live in the user's crate.
use p2f::prelude::*;

const HOME: Deployment = deployment! {
    nodes: [laptop, pi, "homelaptop-Xk3Pq9Z"],

    service wiki {
        start: "python3 -m http.server $PORT",
        port: 8080,
        domain: "wiki.home.arpa",
        pin: [laptop, pi],
        health: Http("/"),
    }

    service meet {
        strategy: Nix("github:example/meet"),
        start: "$P2F_NIX_OUT/bin/meet --port $PORT",
        port: 8443,
        domain: "meet.example.org",
        restart: OnFailure(5),
        grace: 10s,
        after: [wiki],
    }

    service tube {
        strategy: Custom("true"),
        start: "/opt/tube/bin/tube",
        stop: "/opt/tube/bin/tube --shutdown",
        port: 3000,
        env: { TUBE_MODE: "home" },
    }
};

fn main() {
    assert_eq!(HOME.services().len(), 3);
    assert!(HOME.validate().is_ok(), "{:?}", HOME.validate());
}
