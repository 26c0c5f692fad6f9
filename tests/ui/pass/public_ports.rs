use p2f::model::{Protocol, PublicPort};
use p2f::prelude::*;

const HOME: Deployment = deployment! {
    nodes: [pi, nas],

    // A game server: the same number over TCP and UDP is two ports, and a public port may
    // forward to another port than `port`.
    service mc {
        start: "java -jar server.jar",
        port: 25565,
        public: [Tcp(25565), Udp(25565), Udp(19132 => 19133),],
    }

    // No `port`: nothing for the agent to check, but the root still forwards.
    service ssh {
        start: "/usr/sbin/sshd -D",
        public: [Tcp(8022 => 22)],
        pin: [pi],
    }

    // UDP 443 is not the ingress's (it serves TCP), and a domain can go with public ports.
    service web {
        start: "caddy run",
        port: 8443,
        domain: "web.home.arpa",
        public: [Udp(443 => 8443)],
    }

    service worker { start: "sleep infinity", public: [] }
};

fn main() {
    let home = &HOME;
    assert!(home.validate().is_ok(), "{:?}", home.validate());
    let mc = home.service("mc").expect("mc");
    assert_eq!(
        mc.public(),
        [
            PublicPort::tcp(25565),
            PublicPort::udp(25565),
            PublicPort::new(Protocol::Udp, 19132, 19133),
        ]
    );
    let ssh = home.service("ssh").expect("ssh");
    assert_eq!(ssh.port(), None);
    assert_eq!(ssh.public()[0].target(), 22);
    assert!(home.service("worker").expect("worker").public().is_empty());
}
