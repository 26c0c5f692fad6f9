use p2f::prelude::*;

const HOME: Deployment = deployment! {
    nodes: [laptop, pi],
    service wiki {
        start: "python3 -m http.server $PORT",
        prot: 8080,
        pin: [laptpo],
        grace: 10x,
    }
    service blog {
        port: 70000,
        domain: "blog.home.arpa",
        env: { PORT: "1" },
        after: [wik],
    }
};

fn main() {}
