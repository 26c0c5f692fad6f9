use p2f::prelude::*;

// `prot` is reported as an unknown field; `domain` is not also reported as lacking a port.
const HOME: Deployment = deployment! {
    service wiki {
        start: "python3 -m http.server $PORT",
        prot: 8080,
        domain: "wiki.home.arpa",
    }
};

fn main() {}
