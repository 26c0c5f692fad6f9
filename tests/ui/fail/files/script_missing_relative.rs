use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service wiki {
        strategy: Script("deploy/missing.sh"),
        start: "python3 -m http.server $PORT",
    }
};

fn main() {}
