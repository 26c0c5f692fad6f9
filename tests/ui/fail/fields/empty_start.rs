use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service wiki {
        start: "  ",
        port: 8080,
    }
};

fn main() {}
