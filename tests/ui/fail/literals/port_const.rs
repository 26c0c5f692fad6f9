use p2f::prelude::*;

const PORT: u16 = 8080;

const HOME: Deployment = deployment! {
    service wiki {
        start: "python3 -m http.server $PORT",
        port: PORT,
    }
};

fn main() {}
