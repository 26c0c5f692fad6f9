use p2f::prelude::*;

const PATH: &str = "/";

const HOME: Deployment = deployment! {
    service wiki {
        start: "python3 -m http.server $PORT",
        port: 8080,
        health: Http(PATH),
    }
};

fn main() {}
