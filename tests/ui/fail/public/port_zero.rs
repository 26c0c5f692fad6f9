use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service ssh {
        start: "/usr/sbin/sshd -D",
        public: [Tcp(8022 => 0)],
    }
};

fn main() {}
