use p2f::prelude::*;

const START: &str = "hugo";

const HOME: Deployment = deployment! {
    nodes: [laptop, pi],
    service wiki {
        start: "python3 -m http.server $PORT",
        port: 0,
        domain: "wiki.home.arpa",
    }
    service blog {
        start: START,
        strategy: Nix("./no/such/flake"),
    }
    service shop {
        start: "shop",
        port: 8080,
        pin: [laptop],
    }
    service forum {
        start: "forum",
        port: 8080,
        pin: ["not valid"],
    }
};

fn main() {}
