use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service wiki {
        port: 8080,
        health: Http("/"),
    }
};

fn main() {}
