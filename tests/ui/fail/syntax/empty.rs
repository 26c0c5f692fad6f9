use p2f::prelude::*;

const HOME: Deployment = deployment! {};

fn main() {}
