use std::time::Duration;

use p2f::prelude::*;

const HOME: Deployment = deployment! {
    nodes: [laptop, pi, "homelaptop-Xk3Pq9Z", "nas.local", "node_7"],

    service wiki {
        start: "python3 -m http.server $PORT",
        stop: "pkill -f http.server",
        port: 8080,
        strategy: Shell,
        domain: "wiki.home.arpa",
        pin: [laptop, "homelaptop-Xk3Pq9Z"],
        after: [db],
        health: Http("/"),
        restart: OnFailure(3),
        grace: 500ms,
        env: { WIKI_MODE: "home", "WIKI_TITLE": "Our wiki", _UNDERSCORE: "" },
        user: "wiki",
    }

    service db {
        strategy: Custom("initdb -D /var/lib/wiki-db || true"),
        start: "postgres -D /var/lib/wiki-db -p $PORT",
        port: 5432,
        pin: [pi, "nas.local", node_7],
        health: Tcp,
        restart: Always,
        grace: 2m,
    }

    service tube {
        strategy: Nix("nixpkgs#invidious"),
        start: "$P2F_NIX_OUT/bin/invidious",
        port: 3000,
        domain: "tube.example.org",
        health: Cmd("curl -fsS localhost:$PORT/api/v1/stats"),
        restart: Never,
        grace: 1h,
        after: [db, wiki],
    }

    service backup {
        start: "restic backup /srv",
        health: None,
        grace: 10s,
    }
};

static ALSO_STATIC: Deployment = deployment! {
    service worker { start: "sleep infinity" }
};

fn main() {
    // A `const` is a fresh value at each use: bind it once to borrow from it.
    let home = &HOME;
    assert!(home.validate().is_ok(), "{:?}", home.validate());
    assert!(ALSO_STATIC.validate().is_ok());
    assert_eq!(home.nodes().len(), 5);
    assert_eq!(home.nodes()[2].as_str(), "homelaptop-Xk3Pq9Z");

    let wiki = home.service("wiki").expect("wiki");
    assert_eq!(wiki.stop(), Some("pkill -f http.server"));
    assert_eq!(wiki.port(), Some(8080));
    assert_eq!(wiki.strategy(), &Strategy::Shell);
    assert_eq!(wiki.domain(), Some("wiki.home.arpa"));
    assert_eq!(wiki.pin().len(), 2);
    assert_eq!(wiki.after().collect::<Vec<_>>(), ["db"]);
    assert_eq!(wiki.restart(), RestartPolicy::OnFailure(3));
    assert_eq!(wiki.grace(), Duration::from_millis(500));
    let env: Vec<_> = wiki.env().iter().map(|v| (v.name(), v.value())).collect();
    assert_eq!(
        env,
        [("WIKI_MODE", "home"), ("WIKI_TITLE", "Our wiki"), ("_UNDERSCORE", "")]
    );
    assert_eq!(wiki.user(), Some("wiki"));

    let db = home.service("db").expect("db");
    assert!(matches!(db.strategy(), Strategy::Custom(_)));
    assert_eq!(db.health(), Health::Tcp);
    assert_eq!(db.restart(), RestartPolicy::Always);
    assert_eq!(db.grace(), Duration::from_secs(120));

    let tube = home.service("tube").expect("tube");
    assert!(matches!(tube.strategy(), Strategy::Nix(_)));
    assert!(tube.bundle().is_empty(), "a flake reference is not embedded");
    assert!(matches!(tube.health(), Health::Cmd(_)));
    assert_eq!(tube.restart(), RestartPolicy::Never);
    assert_eq!(tube.grace(), Duration::from_secs(3600));

    let backup = home.service("backup").expect("backup");
    assert_eq!(backup.health(), Health::None);
    assert_eq!(backup.grace(), Duration::from_secs(10));

    let order: Vec<_> = home.start_order().iter().map(|s| s.name()).collect();
    assert_eq!(order.iter().position(|s| *s == "db"), Some(0));
}
