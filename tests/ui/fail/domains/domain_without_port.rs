use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service wiki {
        start: "python3 -m http.server 8080",
        domain: "wiki.home.arpa",
    }
};

fn main() {}
