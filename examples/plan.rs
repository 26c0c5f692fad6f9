//! A realistic homelab declared with `deployment!` — every strategy, pins, domains, `after`
//! and env — checked at compile time and printed as a plan table.
//!
//! Run it with `cargo run --example plan`. Try breaking it (a typo in a field name, a pin to a
//! node that is not listed, two services on one port and node): the build fails and points
//! at the mistake.

use p2f::model::format_duration;
use p2f::prelude::*;

/// Three machines: a laptop, a Raspberry Pi, and an old laptop named the P2PRC way.
const HOME: Deployment = deployment! {
    nodes: [laptop, pi, "homelaptop-Xk3Pq9Z"],

    service wiki {
        start: "python3 -m http.server $PORT",
        port: 8080,
        domain: "wiki.home.arpa",
        pin: [laptop, pi],
        health: Http("/"),
    }

    service notes {
        strategy: Nix("./examples/deploy/notes"),
        start: "$P2F_NIX_OUT/bin/notes $PORT",
        port: 8081,
        domain: "notes.home.arpa",
        after: [wiki],
        restart: OnFailure(3),
        grace: 5s,
    }

    service tube {
        strategy: Ansible("examples/deploy/tube.yml"),
        start: "python3 -m http.server $PORT --directory $P2F_BUNDLE/www",
        port: 3000,
        domain: "tube.example.org",
        env: { TUBE_MODE: "home" },
        pin: ["homelaptop-Xk3Pq9Z"],
    }

    service backup {
        strategy: Script("examples/deploy/backup.sh"),
        start: "sh -c 'while true; do tar czf $BACKUP_DIR/wiki-$(date +%s).tgz /srv/wiki; sleep 3600; done'",
        env: { BACKUP_DIR: "/tmp/p2f-backups" },
        after: [wiki],
        restart: Always,
        pin: [pi],
    }

    service minecraft {
        strategy: Custom("test -f server.jar || cp /srv/minecraft/server.jar ."),
        start: "java -Xmx2G -jar server.jar --port $PORT --nogui",
        stop: "kill -INT $PID",
        port: 25565,
        health: Tcp,
        grace: 2m,
        pin: ["homelaptop-Xk3Pq9Z", laptop],
    }

    service sync {
        start: "rsync --daemon --no-detach --port=$PORT",
        port: 8873,
        health: Cmd("rsync rsync://localhost:$PORT/"),
        restart: Never,
        grace: 500ms,
    }
};

fn main() {
    let home = &HOME;
    // The macro checked every rule already; the same rules run at run time too.
    if let Err(invalid) = home.validate() {
        eprintln!("{invalid}");
        std::process::exit(1);
    }
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header([
        "service", "strategy", "port", "domain", "nodes", "after", "health", "restart", "grace",
        "bundle",
    ]);
    for spec in home.start_order() {
        let nodes: Vec<&str> = spec.pin().iter().map(NodeName::as_str).collect();
        let after: Vec<&str> = spec.after().collect();
        table.add_row([
            spec.name().to_owned(),
            spec.strategy().to_string(),
            spec.port()
                .map_or_else(|| "-".to_owned(), |p| p.to_string()),
            spec.domain().unwrap_or("-").to_owned(),
            if nodes.is_empty() {
                "any".to_owned()
            } else {
                nodes.join(", ")
            },
            if after.is_empty() {
                "-".to_owned()
            } else {
                after.join(", ")
            },
            spec.health().to_string(),
            spec.restart().to_string(),
            format_duration(spec.grace()),
            match spec.bundle().files().len() {
                0 => "-".to_owned(),
                n => format!("{n} files, {} B", spec.bundle().size()),
            },
        ]);
    }
    let nodes: Vec<&str> = home.nodes().iter().map(NodeName::as_str).collect();
    println!(
        "Plan for {} services on {}:",
        home.services().len(),
        nodes.join(", ")
    );
    println!("{table}");
}
