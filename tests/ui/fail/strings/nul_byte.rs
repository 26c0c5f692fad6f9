use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service wiki {
        start: "echo \0 oops",
        env: { MODE: "a\0b" },
        user: "not a user",
    }
};

fn main() {}
