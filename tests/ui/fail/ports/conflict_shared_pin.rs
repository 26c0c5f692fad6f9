use p2f::prelude::*;

const HOME: Deployment = deployment! {
    nodes: [laptop, pi, "homelaptop-Xk3Pq9Z"],
    service wiki {
        start: "python3 -m http.server $PORT",
        port: 8080,
        pin: [laptop, pi],
    }
    service blog {
        start: "hugo server --port $PORT",
        port: 8080,
        pin: ["homelaptop-Xk3Pq9Z", pi],
    }
};

fn main() {}
