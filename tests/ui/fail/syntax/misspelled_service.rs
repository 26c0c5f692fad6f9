use p2f::prelude::*;

const HOME: Deployment = deployment! {
    servce wiki {
        start: "python3 -m http.server $PORT",
    }
};

fn main() {}
