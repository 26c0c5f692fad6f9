use p2f::prelude::*;

// A bash script (LF line ends, no byte-order mark) is fine.
const HOME: Deployment = deployment! {
    service wiki {
        strategy: Script("../../../../tests/ui/fixtures/bash.sh"),
        start: "python3 -m http.server $PORT",
    }
};

fn main() {
    let _ = &HOME;
}
