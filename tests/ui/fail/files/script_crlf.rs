use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service wiki {
        strategy: Script("../../../../tests/ui/fixtures/crlf.sh"),
        start: "python3 -m http.server $PORT",
    }
};

fn main() {}
