use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service web {
        start: "python3 -m http.server $PORT",
        port: 8443,
        public: [Tcp(443 => 8443)],
    }
};

fn main() {}
