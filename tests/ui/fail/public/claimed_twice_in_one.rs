use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service ssh {
        start: "/usr/sbin/sshd -D",
        public: [Tcp(8022 => 22), Tcp(8022 => 2222)],
    }
};

fn main() {}
