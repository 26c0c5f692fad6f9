use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service db {
        start: "postgres",
        after: [wiki],
    }
    service cache {
        start: "redis-server",
        after: [db],
    }
    service wiki {
        start: "python3 -m http.server $PORT",
        after: [cache],
    }
};

fn main() {}
