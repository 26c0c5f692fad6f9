#!/usr/bin/env bash
# The relay's figures (issue 14, "Benchmarks"), each against its baselines from the same run, on
# a LAN of network namespaces with a member behind a real NAT (masquerading router, no way in):
# TCP download throughput and 64-byte echo p50/p99 through the relay (the root's ingress,
# upgraded to raw bytes, reaching the member through its link), straight to the backend, and
# through rathole relaying the same backend; a small HTTP answer with wrk along the same paths
# and through the ingress to a LAN member (agent tunnel); the root's RSS without a link, with
# one idle link and with 1 000 idle streams through it (rathole's server with as many beside
# it); reconnect time after the root's restart.
#
#   sudo bash bench/relay/run.sh [extra options of examples/bench_relay.rs]
#
# Needs root (network namespaces), iproute2, nftables and wrk (apt-get install -y wrk), and
# rathole built from crates.io (not part of this repository):
#   cargo install rathole --root /work/rathole-bin
# Environment (all optional):
#   RATHOLE=/work/rathole-bin/bin/rathole   the rathole binary ("" to leave rathole out)
#   DATA_ROOT=/var/tmp   where the run's temp dir goes (agents, configs, logs; deleted afterwards)
#   CARGO_TARGET_DIR=<repo>/target/bench   a target dir of its own (others build in target/)
#   AGENT_LOG=info       RUST_LOG of the agents
#
# Builds `p2f` (p2f-cli) and the example in release, prints the machine, then runs the example,
# which prints the table. The output is also written to target/bench-relay/results-*.txt.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target/bench}
DATA_ROOT=${DATA_ROOT:-/var/tmp}
RATHOLE=${RATHOLE-/work/rathole-bin/bin/rathole}
export AGENT_LOG=${AGENT_LOG:-info}
export CARGO_TERM_COLOR=never
unset RUSTFLAGS CARGO_BUILD_RUSTFLAGS

((EUID == 0)) || { echo "run as root (network namespaces)" >&2; exit 1; }
for tool in ip nft wrk; do
    command -v "$tool" >/dev/null || { echo "$tool is missing (iproute2, nftables, wrk)" >&2; exit 1; }
done
rathole_args=()
if [[ -n $RATHOLE ]]; then
    [[ -x $RATHOLE ]] || {
        echo "no rathole at $RATHOLE: cargo install rathole --root /work/rathole-bin, or RATHOLE= to leave it out" >&2
        exit 1
    }
    rathole_args=(--rathole "$RATHOLE")
fi

cd "$repo"
cargo build --release --quiet -p p2f-cli --bin p2f
cargo build --release --quiet -p p2f --example bench_relay
bin=$CARGO_TARGET_DIR/release/examples/bench_relay
p2f=$CARGO_TARGET_DIR/release/p2f

out_dir=$repo/target/bench-relay
mkdir -p "$out_dir"
results=$out_dir/results-$(date +%Y%m%d-%H%M%S).txt

# Whatever happens to the example (even SIGKILL), nothing it started outlives this script: its
# namespaces are named p2f-tk-PID-brelay-*, and deleting one after killing the processes in it
# (`ip netns pids`) takes its links and nftables tables along; the agents, rathole and wrk are
# also found by the run's temp dir (`bench_relay sweep`). What was there before is not ours.
shopt -s nullglob
before=("$DATA_ROOT"/p2f-bench-relay-*)
ns_before=$(ip netns list | awk '{print $1}' | grep -- '-brelay-' || true)
cleanup() {
    local dir old mine ns pid
    for dir in "$DATA_ROOT"/p2f-bench-relay-*; do
        mine=1
        for old in "${before[@]}"; do [[ $dir == "$old" ]] && mine=0; done
        if ((mine)); then
            "$bin" sweep "$dir" || true
            rm -rf -- "$dir"
        fi
    done
    for ns in $(ip netns list | awk '{print $1}' | grep -- '-brelay-' || true); do
        grep -qxF -- "$ns" <<<"$ns_before" && continue
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
}
trap cleanup EXIT

{
    echo "# bench/relay/run.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "p2f $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- p2f-core p2f-cli p2f-model 2>/dev/null || echo ' (sources differ from HEAD)')"
    echo "machine: $(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), $(free -g | awk '/^Mem/ {print $2}') GiB, $(uname -sr), $(rustc --version)"
    echo "tools: $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)${RATHOLE:+, rathole $("$RATHOLE" --version 2>&1 | sed -n "s/^Build Version: *//p")}"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$results"
"$bin" --p2f "$p2f" --data-root "$DATA_ROOT" "${rathole_args[@]}" "$@" 2>&1 | tee -a "$results"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$results"
echo "written to $results"
