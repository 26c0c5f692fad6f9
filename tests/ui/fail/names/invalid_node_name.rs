use p2f::prelude::*;

const HOME: Deployment = deployment! {
    nodes: [laptop, "a b"],
    service wiki {
        start: "python3 -m http.server $PORT",
    }
};

fn main() {}
