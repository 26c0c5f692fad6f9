use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service wiki {
        start: "python3 -m http.server $PORT",
    }
    nodes: [laptop],
};

fn main() {}
