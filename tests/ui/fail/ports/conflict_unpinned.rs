use p2f::prelude::*;

const HOME: Deployment = deployment! {
    nodes: [laptop, pi],
    service wiki {
        start: "python3 -m http.server $PORT",
        port: 8080,
        pin: [laptop],
    }
    service blog {
        start: "hugo server --port $PORT",
        port: 8080,
    }
};

fn main() {}
