//! Ports for the services a test spins (a `port:` the agent will bind).
//!
//! Binding `:0`, reading the port and closing the socket before the agent binds it is a race:
//! the kernel may hand the same port to the next `:0` bind of any test running in parallel.
//! Instead, ports come from a range below the kernel's ephemeral range (so no `:0` bind ever
//! gets one), from a counter shared by the whole test process (so no two callers in it get
//! the same one), starting at an offset derived from the pid (so two test binaries running at
//! once start far apart). A port something else on the host already holds is skipped.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where service ports are taken from, unless the ephemeral range starts below its end.
const PREFERRED: (u16, u16) = (20_000, 30_000);
/// The smallest range worth using.
const MIN_SPAN: u16 = 1_000;

/// A TCP port on loopback that no other caller of this function in this process gets, free
/// when it is handed out. Panics when the host leaves no room below its ephemeral range.
pub fn service_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = *RANGE.get_or_init(range);
    let span = u32::from(high - low);
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let turn = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + u16::try_from(offset.wrapping_add(turn) % span).unwrap_or(0);
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port left in {low}..{high}");
}

static RANGE: OnceLock<(u16, u16)> = OnceLock::new();

/// `PREFERRED`, cut at the start of the ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`).
fn range() -> (u16, u16) {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let (low, high) = PREFERRED;
    let high = high.min(ephemeral_start);
    if high >= low + MIN_SPAN {
        return (low, high);
    }
    // An unusually low ephemeral range: take what lies under it.
    let low = 10_000.min(ephemeral_start.saturating_sub(MIN_SPAN));
    assert!(
        ephemeral_start >= low + MIN_SPAN && low >= 1_024,
        "the ephemeral port range starts at {ephemeral_start}: no room for service ports below it"
    );
    (low, ephemeral_start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let (_, high) = range();
        let mut seen: Vec<u16> = (0..200).map(|_| service_port()).collect();
        assert!(seen.iter().all(|p| *p < high), "{seen:?}");
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 200, "a port was handed out twice");
    }
}
