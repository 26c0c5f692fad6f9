use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service game {
        start: "game-server",
        public: [Tcp, Udp(70000), Tcp(1 2), Udp(27015)],
    }
};

fn main() {}
