use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service wiki {
        strategy: Script("../../../../tests/ui/fixtures/bom.sh"),
        start: "python3 -m http.server $PORT",
    }
};

fn main() {}
