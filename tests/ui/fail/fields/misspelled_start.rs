use p2f::prelude::*;

// A misspelled `start` is reported once, as an unknown field, not also as a missing `start`.
const HOME: Deployment = deployment! {
    service wiki {
        strat: "python3 -m http.server $PORT",
        port: 8080,
    }
};

fn main() {}
