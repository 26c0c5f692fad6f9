use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service wiki {
        strategy: Script("/nonexistent/p2f/setup.sh"),
        start: "python3 -m http.server $PORT",
    }
};

fn main() {}
