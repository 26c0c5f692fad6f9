//! A small homelab on this machine: a wiki you can open in a browser, a backup job, a file
//! server for its archives and a clock worker — deployed, supervised and stopped by P2F with nothing to set up.
//!
//! Run it with `cargo run --example homelab`, then open http://127.0.0.1:8480/ (or
//! `curl 127.0.0.1:8480`); the wiki and the file server also answer at their domains through
//! the root's front door, on the ports and with the `curl` commands it prints. In another terminal, `cargo run --example homelab -- status`
//! shows the same table, `-- logs backup -f` follows the backup job. Ctrl-C stops everything.

use p2f::prelude::*;

const HOMELAB: Deployment = deployment! {
    service wiki {
        strategy: Script("examples/homelab/install-wiki.sh"),
        start: "exec python3 -m http.server $PORT --bind 127.0.0.1 --directory www",
        port: 8480,
        domain: "wiki.home.arpa",
        health: Http("/"),
    }

    service files {
        start: "mkdir -p $BACKUP_DIR; exec python3 -m http.server $PORT --bind 127.0.0.1 --directory $BACKUP_DIR",
        port: 8481,
        domain: "files.home.arpa",
        env: { BACKUP_DIR: "/tmp/p2f-homelab-backups" },
        after: [backup],
    }

    service backup {
        // Archives every service's bundle on this node (the wiki's pages among them) every
        // 10 s, keeping the newest five.
        start: "mkdir -p $BACKUP_DIR; cd $P2F_BUNDLE/../..; while true; do tar czf $BACKUP_DIR/bundles-$(date +%s).tgz . 2>/dev/null; ls -t $BACKUP_DIR/*.tgz | tail -n +6 | xargs -r rm -f; echo backup done: $(ls $BACKUP_DIR | wc -l) archives; sleep 10; done",
        env: { BACKUP_DIR: "/tmp/p2f-homelab-backups" },
        after: [wiki],
        restart: Always,
    }

    service clock {
        start: "while true; do date '+tick %H:%M:%S'; sleep 2; done",
        restart: Always,
        grace: 2s,
    }
};

#[tokio::main]
async fn main() -> p2f::Result<()> {
    p2f::cli::run(&HOMELAB).await
}
