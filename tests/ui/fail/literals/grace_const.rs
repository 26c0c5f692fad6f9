use p2f::prelude::*;

const GRACE: &str = "10s";

const HOME: Deployment = deployment! {
    service wiki {
        start: "python3 -m http.server $PORT",
        grace: GRACE,
    }
};

fn main() {}
