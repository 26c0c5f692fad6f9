//! wrk (Debian's `wrk`): one run with a warm-up, its figures, and the CPU of the proxy and the
//! backend over the measured part.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::spawned::{Cpu, Spawned};

/// How wrk is run: threads, connections, seconds, extra arguments (`-H ..`), and the
/// network namespace to run it in (`ip netns exec`), if any.
#[derive(Debug, Clone)]
pub(crate) struct WrkRun<'a> {
    pub(crate) threads: usize,
    pub(crate) conns: usize,
    pub(crate) secs: u64,
    pub(crate) extra: &'a [String],
    pub(crate) netns: Option<&'a str>,
}

/// What one wrk run printed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Wrk {
    pub(crate) rps: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    /// CPU of the proxy's processes, ms per 1 000 requests.
    pub(crate) proxy_cpu: f64,
    /// CPU of the backend, ms per 1 000 requests.
    pub(crate) backend_cpu: f64,
}

/// `1.23ms`, `456.00us`, `1.02s` as a duration.
fn wrk_duration(text: &str) -> Option<Duration> {
    let (number, unit) = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| text.split_at(i))?;
    let value: f64 = number.parse().ok()?;
    let secs = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

pub(crate) fn parse_wrk(text: &str) -> Result<Wrk> {
    let mut wrk = Wrk::default();
    for line in text.lines().map(str::trim) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["50%", value] => wrk.p50 = wrk_duration(value).context("p50")?,
            ["99%", value] => wrk.p99 = wrk_duration(value).context("p99")?,
            ["Requests/sec:", value] => wrk.rps = value.parse()?,
            [count, "requests", "in", ..] => wrk.requests = count.parse()?,
            ["Socket", "errors:", rest @ ..] => {
                wrk.errors += rest
                    .iter()
                    .filter_map(|f| f.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", count] => wrk.errors += count.parse::<u64>()?,
            _ => {}
        }
    }
    ensure!(
        wrk.rps > 0.0 && wrk.requests > 0,
        "wrk printed no figures:\n{text}"
    );
    Ok(wrk)
}

/// Runs wrk against `url` for `run.secs` (after a 2 s warm-up), with the CPU of `proxy` and
/// `backend` over the measured run; its output in `dir/wrk.log`.
pub(crate) async fn wrk(
    dir: &Path,
    run: &WrkRun<'_>,
    url: &str,
    proxy: Cpu,
    backend: Cpu,
) -> Result<Wrk> {
    let command = |secs: u64| {
        let mut command = match run.netns {
            Some(ns) => p2f_testkit::netns::exec_in(ns, "wrk"),
            None => Command::new("wrk"),
        };
        command
            .args([
                "-t",
                &run.threads.to_string(),
                "-c",
                &run.conns.to_string(),
                "-d",
                &format!("{secs}s"),
                "--timeout",
                "5s",
                "--latency",
            ])
            .args(run.extra)
            .arg(url);
        command
    };
    let mut warm = Spawned::start(dir, "wrk.log", &mut command(2))?;
    warm.wait(Duration::from_secs(30)).await?;
    let (proxy_before, backend_before) = (proxy.ticks(), backend.ticks());
    let mut measured = Spawned::start(dir, "wrk.log", &mut command(run.secs))?;
    let status = measured.wait(Duration::from_secs(run.secs + 30)).await?;
    let (proxy_after, backend_after) = (proxy.ticks(), backend.ticks());
    let text = std::fs::read_to_string(dir.join("wrk.log"))?;
    ensure!(status.success(), "wrk {url}: {status}\n{text}");
    let mut figures = parse_wrk(&text).with_context(|| format!("wrk {url}"))?;
    let per_k = |ticks: u64| ticks as f64 * 10.0 / (figures.requests as f64 / 1000.0);
    figures.proxy_cpu = per_k(proxy_after - proxy_before);
    figures.backend_cpu = per_k(backend_after - backend_before);
    Ok(figures)
}
