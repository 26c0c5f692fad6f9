use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service wiki {
        start: "python3 -m http.server $PORT",
        port: 65536,
    }
};

fn main() {}
