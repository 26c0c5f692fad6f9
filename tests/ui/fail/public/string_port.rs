use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service mc {
        start: "java -jar server.jar",
        public: [Tcp("25565")],
    }
};

fn main() {}
