use p2f::prelude::*;

const HOME: Deployment = deployment! {
    nodes: [laptop, pi],
    service wiki {
        start: "python3 -m http.server $PORT",
        pin: [laptop, lptop],
    }
};

fn main() {}
