use p2f::prelude::*;

// `blog`'s pin is rejected, so it is not treated as unpinned: no port conflict with `wiki`.
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
        pin: [pi, "not valid"],
    }
};

fn main() {}
