use p2f::prelude::*;

const HOME: Deployment = deployment! {
    nodes: [laptop, pi, laptop],
    service wiki {
        start: "python3 -m http.server $PORT",
    }
};

fn main() {}
