use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service meet {
        strategy: Nix("./deploy/meet-missing"),
        start: "$P2F_NIX_OUT/bin/meet --port $PORT",
    }
};

fn main() {}
