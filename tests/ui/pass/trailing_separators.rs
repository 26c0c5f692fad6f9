use p2f::prelude::*;

// Trailing commas everywhere, services separated by `,` or `;`, no comma after the last field.
const HOME: Deployment = deployment! {
    nodes: [laptop, pi,],
    service wiki {
        start: "python3 -m http.server $PORT",
        pin: [laptop,],
        env: { A: "1", },
        after: [],
    },
    service blog { start: "hugo" };
};

fn main() {}
