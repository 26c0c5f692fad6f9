use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service wiki {
        start: "python3 -m http.server $PORT",
        port: 8080,
        domain: "wiki.home.arpa",
    }
    service blog {
        start: "hugo server --port $PORT",
        port: 8081,
        domain: "Wiki.Home.Arpa",
    }
};

fn main() {}
