//! What the benchmark examples (`bench_agent`, `bench_network`) share beyond `p2f_testkit`
//! (which runs their agents, marks and sweeps their processes, and reads `/proc`): running
//! until Ctrl-C or SIGTERM, bounded API calls, nearest-rank percentiles, and the report table;
//! the backend server and its clients ([`backend`]), programs run beside the agents
//! ([`spawned`]), wrk ([`wrk`]) and memory from `/proc` ([`memory`]). Each example uses a part
//! of it.
#![allow(dead_code)]

pub(crate) mod backend;
pub(crate) mod memory;
pub(crate) mod spawned;
pub(crate) mod wrk;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use comfy_table::{Cell, Table, presets::ASCII_MARKDOWN};

/// The longest any one API call may take.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `benchmark` on a 2-worker runtime; Ctrl-C or SIGTERM ends it (and so cleans up, by the
/// guards' `Drop`).
pub(crate) fn run_interruptible(benchmark: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                result = benchmark => result,
                _ = tokio::signal::ctrl_c() => bail!("interrupted"),
                _ = term.recv() => bail!("terminated"),
            }
        })
}

/// One API call, bounded by [`CALL_TIMEOUT`].
pub(crate) async fn call<T, E: std::error::Error + Send + Sync + 'static>(
    what: &str,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T> {
    tokio::time::timeout(CALL_TIMEOUT, work)
        .await
        .with_context(|| format!("{what}: no answer within {CALL_TIMEOUT:?}"))?
        .with_context(|| what.to_owned())
}

/// The 1-, 5- and 15-minute load averages.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Statistics and the report

/// Nearest-rank percentiles of a sample of durations.
#[derive(Debug, Clone)]
pub(crate) struct Sample(pub(crate) Vec<Duration>);

impl Sample {
    pub(crate) fn new(mut values: Vec<Duration>) -> Sample {
        values.sort_unstable();
        Sample(values)
    }

    pub(crate) fn pct(&self, p: f64) -> Duration {
        let n = self.0.len();
        if n == 0 {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.0[rank.clamp(1, n) - 1]
    }

    pub(crate) fn max(&self) -> Duration {
        self.0.last().copied().unwrap_or_default()
    }

    /// `p50 / max` in seconds.
    pub(crate) fn secs(&self) -> String {
        format!(
            "{:.2} / {:.2} s (n={})",
            self.pct(50.0).as_secs_f64(),
            self.max().as_secs_f64(),
            self.0.len()
        )
    }

    /// `p50 / max` in ms.
    pub(crate) fn ms_max(&self) -> String {
        format!(
            "{} / {} ms (n={})",
            ms(self.pct(50.0)),
            ms(self.max()),
            self.0.len()
        )
    }

    /// `p50 / p99 / max` in ms.
    pub(crate) fn ms_p99(&self) -> String {
        format!(
            "{} / {} / {} ms (n={})",
            ms(self.pct(50.0)),
            ms(self.pct(99.0)),
            ms(self.max()),
            self.0.len()
        )
    }

    /// Every value in seconds, in order of size.
    pub(crate) fn all_secs(&self) -> String {
        self.0
            .iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Milliseconds, with two decimals under 10 ms and one above.
pub(crate) fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.1}")
    }
}

pub(crate) fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// The rows of the final table (figure, measured, baseline, goal, verdict) and the lines
/// printed under it.
#[derive(Debug)]
pub(crate) struct Report {
    /// The headers of the measured and the baseline columns.
    columns: [&'static str; 2],
    rows: Vec<[String; 5]>,
    pub(crate) notes: Vec<String>,
}

impl Report {
    pub(crate) fn new(measured: &'static str, baseline: &'static str) -> Report {
        Report {
            columns: [measured, baseline],
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub(crate) fn row(
        &mut self,
        figure: &str,
        measured: impl Into<String>,
        baseline: impl Into<String>,
        goal: &str,
        verdict: &str,
    ) {
        self.rows.push([
            figure.to_owned(),
            measured.into(),
            baseline.into(),
            goal.to_owned(),
            verdict.to_owned(),
        ]);
    }

    pub(crate) fn print(&self) {
        let mut table = Table::new();
        let [measured, baseline] = self.columns;
        table
            .load_preset(ASCII_MARKDOWN)
            .set_header(vec!["figure", measured, baseline, "goal", "verdict"]);
        for row in &self.rows {
            table.add_row(row.iter().map(Cell::new));
        }
        println!("\n{table}");
        for note in &self.notes {
            println!("- {note}");
        }
    }
}
