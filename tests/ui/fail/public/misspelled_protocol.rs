use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service ssh {
        start: "/usr/sbin/sshd -D",
        public: [Tpc(8022 => 22)],
    }
};

fn main() {}
