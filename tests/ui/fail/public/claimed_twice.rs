use p2f::prelude::*;

const HOME: Deployment = deployment! {
    service mc {
        start: "java -jar server.jar",
        port: 25565,
        public: [Tcp(25565), Udp(19132)],
    }
    service mc_test {
        start: "java -jar server.jar --port 25566",
        public: [Udp(25565), Tcp(25565 => 25566)],
    }
};

fn main() {}
