use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service meet {
        // The trybuild project is `target/tests/trybuild/p2f`: this is `tests/ui/fixtures/no-flake`.
        strategy: Nix("../../../../tests/ui/fixtures/no-flake"),
        start: "$P2F_NIX_OUT/bin/meet --port $PORT",
    }
};

fn main() {}
