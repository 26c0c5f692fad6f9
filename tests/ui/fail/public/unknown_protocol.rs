use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service sip {
        start: "kamailio -DD",
        public: [Sctp(5060)],
    }
};

fn main() {}
