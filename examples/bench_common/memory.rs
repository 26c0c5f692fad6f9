//! A process's memory and descriptors, from `/proc`.

use std::time::Duration;

/// VmRSS and RssAnon of `pid`, in KiB.
pub(crate) fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// RSS after settling: the last of five reads a second apart.
pub(crate) async fn settled_rss(pid: u32) -> (u64, u64) {
    let mut last = rss(pid);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        last = rss(pid);
    }
    last
}

pub(crate) fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

pub(crate) fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Hooks for a look at a root's memory, read from `{PREFIX}_ROOT_WRAP`, `{PREFIX}_SMAPS` and
/// `{PREFIX}_HOLD` (`PREFIX`: the benchmark's, e.g. `BENCH_RELAY`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Inspect(pub(crate) &'static str);

impl Inspect {
    fn var(self, name: &str) -> Option<String> {
        std::env::var(format!("{}_{name}", self.0)).ok()
    }

    /// The program the root runs: `p2f`, or with `{PREFIX}_ROOT_WRAP` (a command prefix, e.g.
    /// `heaptrack -o /tmp/root` or `env MALLOC_ARENA_MAX=1`) a script in `dir` that runs
    /// `p2f node run` under it (other subcommands as they are).
    pub(crate) fn root_program(
        self,
        p2f: &std::path::Path,
        dir: &std::path::Path,
    ) -> anyhow::Result<std::path::PathBuf> {
        let Some(wrap) = self.var("ROOT_WRAP") else {
            return Ok(p2f.to_owned());
        };
        let p2f = std::fs::canonicalize(p2f)?;
        let script = dir.join("root-p2f.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nif [ \"$1\" = node ] && [ \"$2\" = run ]; then exec {wrap} {p2f} \"$@\"; fi\nexec {p2f} \"$@\"\n",
                p2f = p2f.display()
            ),
        )?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        Ok(script)
    }

    /// With `{PREFIX}_SMAPS=DIR`: `/proc/PID/{smaps,smaps_rollup,status}` copied to
    /// `DIR/NAME.*`, for a diff of what grew.
    pub(crate) fn snapshot(self, pid: u32, name: &str) {
        let Some(out) = self.var("SMAPS") else {
            return;
        };
        let _ = std::fs::create_dir_all(&out);
        for file in ["smaps", "smaps_rollup", "status"] {
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/{file}")) {
                let _ = std::fs::write(format!("{out}/{name}.{file}"), text);
            }
        }
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.count())
            .unwrap_or(0);
        println!("  snapshot {name}: root pid {pid}, {threads} threads, in {out}");
    }

    /// With `{PREFIX}_HOLD=SECS`: waits that long (everything still up, to inspect it).
    pub(crate) async fn hold(self) {
        if let Some(secs) = self.var("HOLD").and_then(|s| s.parse::<u64>().ok()) {
            println!("  holding {secs} s");
            tokio::time::sleep(Duration::from_secs(secs)).await;
        }
    }
}
