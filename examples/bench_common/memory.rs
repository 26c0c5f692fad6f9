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
