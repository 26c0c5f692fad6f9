use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service tube {
        strategy: Ansible("deploy/tube.yml"),
        start: "/opt/tube/bin/tube",
    }
};

fn main() {}
