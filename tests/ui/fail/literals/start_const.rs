use p2f::prelude::*;

const START: &str = "python3 -m http.server $PORT";

const HOME: Deployment = deployment! {
    service wiki {
        start: START,
        port: 8080,
    }
};

fn main() {}
