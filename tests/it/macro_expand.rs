//! Expansion snapshots of `deployment!`: what the macro produces, seen as the value it builds.
//!
//! `p2f-macros` is a proc-macro crate, so its token output cannot be produced in-process here;
//! instead each case snapshots the `{:#?}` of the `const` the macro wrote (every field, defaults
//! included, and the embedded bundle) and checks it against the same value built at run time.
//! Snapshots live in `tests/it/snapshots/`; after an intended change, regenerate them with
//! `INSTA_UPDATE=always cargo test --test it macro_expand` and review the diff.

use std::path::Path;
use std::time::Duration;

use insta::assert_snapshot;
use p2f::model::SpecParts;
use p2f::prelude::*;

/// The smallest service: every field but `start` at its default.
const MINIMAL: Deployment = deployment! {
    service worker {
        start: "sleep infinity",
    }
};

/// Every field of the language, string and identifier node names, both kinds of env keys.
const FULL: Deployment = deployment! {
    nodes: [laptop, pi, "homelaptop-Xk3Pq9Z"],

    service wiki {
        start: "python3 -m http.server $PORT",
        stop: "kill -INT $PID",
        port: 8080,
        strategy: Custom("pip install --user wiki"),
        domain: "wiki.home.arpa",
        pin: [laptop, "homelaptop-Xk3Pq9Z"],
        after: [db],
        health: Http("/healthz"),
        restart: OnFailure(3),
        grace: 500ms,
        env: { WIKI_MODE: "home", "WIKI_TITLE": "Our wiki" },
        user: "wiki",
    }

    service db {
        strategy: Nix("nixpkgs#postgresql"),
        start: "$P2F_NIX_OUT/bin/postgres -p $PORT",
        port: 5432,
        pin: [pi],
        health: Cmd("pg_isready -p $PORT"),
        restart: Always,
        grace: 2m,
    }
};

/// Public ports: the same number over TCP and UDP, a forward to another port, a service
/// without `port`, and one without public ports next to them.
const PUBLIC: Deployment = deployment! {
    service mc {
        start: "java -jar server.jar",
        port: 25565,
        public: [Tcp(25565), Udp(25565), Udp(19132 => 19133)],
    }

    service ssh {
        start: "/usr/sbin/sshd -D",
        public: [Tcp(8022 => 22)],
    }

    service worker {
        start: "sleep infinity",
    }
};

/// The strategies that embed files, with the example files of this repository.
const BUNDLES: Deployment = deployment! {
    service backup {
        strategy: Script("examples/deploy/backup.sh"),
        start: "sleep infinity",
        restart: Never,
        grace: 1h,
    }

    service tube {
        strategy: Ansible("examples/deploy/tube.yml"),
        start: "python3 -m http.server $PORT --directory $P2F_BUNDLE/www",
        port: 3000,
    }

    service notes {
        strategy: Nix("./examples/deploy/notes"),
        start: "$P2F_NIX_OUT/bin/notes $PORT",
        port: 8081,
        health: None,
    }
};

/// `{:#?}` with the sizes of embedded files hidden: they belong to the example files, whose
/// contents [`bundles`] compares with the disk instead.
fn debug_without_sizes(value: &impl std::fmt::Debug) -> String {
    format!("{value:#?}")
        .lines()
        .map(|line| match line.rfind(" bytes)") {
            Some(end) if line.contains("BundleFile(") => {
                let start = line[..end].rfind(", ").map_or(end, |i| i + 2);
                format!("{}[size]{}", &line[..start], &line[end..])
            }
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn minimal() {
    let home = &MINIMAL;
    assert_snapshot!("minimal", format!("{home:#?}"));
    let by_hand = Deployment::owned(
        Vec::new(),
        vec![ProcessSpec::new("worker", "sleep infinity")],
    );
    assert_eq!(
        *home, by_hand,
        "the macro's defaults are the model's defaults"
    );
    assert!(home.validate().is_ok());
}

#[test]
fn full() -> anyhow::Result<()> {
    let home = &FULL;
    assert_snapshot!("full", format!("{home:#?}"));

    let node = |name: &str| NodeName::new(name);
    let wiki = ProcessSpec::new("wiki", "python3 -m http.server $PORT")
        .with_stop("kill -INT $PID")
        .with_port(8080)
        .with_strategy(Strategy::Custom("pip install --user wiki".into()))
        .with_domain("wiki.home.arpa")
        .with_pin([node("laptop")?, node("homelaptop-Xk3Pq9Z")?])
        .with_after(["db"])
        .with_health(Health::Http("/healthz".into()))
        .with_restart(RestartPolicy::OnFailure(3))
        .with_grace(Duration::from_millis(500))
        .with_env("WIKI_MODE", "home")
        .with_env("WIKI_TITLE", "Our wiki")
        .with_user("wiki");
    let db = ProcessSpec::from_parts(SpecParts {
        strategy: Strategy::Nix("nixpkgs#postgresql".into()),
        port: Some(5432),
        pin: vec![node("pi")?].into(),
        health: Some(Health::Cmd("pg_isready -p $PORT".into())),
        restart: RestartPolicy::Always,
        grace: Duration::from_secs(120),
        ..ProcessSpec::new("db", "$P2F_NIX_OUT/bin/postgres -p $PORT").to_parts()
    });
    let by_hand = Deployment::owned(
        vec![node("laptop")?, node("pi")?, node("homelaptop-Xk3Pq9Z")?],
        vec![wiki, db],
    );
    assert_eq!(*home, by_hand);
    assert!(home.validate().is_ok(), "{:?}", home.validate());
    Ok(())
}

#[test]
fn public() {
    use p2f::model::{Protocol, PublicPort};
    let home = &PUBLIC;
    assert_snapshot!("public", format!("{home:#?}"));
    let ssh = PublicPort::new(Protocol::Tcp, 8022, 22);
    let by_hand = Deployment::owned(
        Vec::new(),
        vec![
            ProcessSpec::new("mc", "java -jar server.jar")
                .with_port(25565)
                .with_public([
                    PublicPort::tcp(25565),
                    PublicPort::udp(25565),
                    PublicPort::new(Protocol::Udp, 19132, 19133),
                ]),
            ProcessSpec::new("ssh", "/usr/sbin/sshd -D").with_public([ssh]),
            ProcessSpec::new("worker", "sleep infinity"),
        ],
    );
    assert_eq!(*home, by_hand);
    assert!(home.validate().is_ok(), "{:?}", home.validate());
}

#[test]
fn bundles() -> anyhow::Result<()> {
    let home = &BUNDLES;
    assert_snapshot!("bundles", debug_without_sizes(home));

    // Every embedded file is the file on disk, byte for byte (paths in a bundle are relative
    // to the crate, as the macro resolved them).
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for spec in home.services() {
        assert!(!spec.bundle().is_empty(), "{} embeds nothing", spec.name());
        for file in spec.bundle().files() {
            let on_disk = std::fs::read(root.join(file.path()))?;
            assert_eq!(file.contents(), on_disk, "{}: {}", spec.name(), file.path());
        }
    }
    assert!(home.validate().is_ok(), "{:?}", home.validate());
    Ok(())
}
