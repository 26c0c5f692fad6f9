#!/usr/bin/env bash
# The ingress's figures (issue 12, "Benchmarks"), each against its baseline from the same run:
# requests/s and p50/p99 latency of a small response through the root's ingress, Debian's nginx
# and Debian's Caddy proxying the same backend (wrk, plain HTTP and HTTPS, back to back), and,
# unless `--shared off`, through a second root whose ingress serves its connections on the
# agent's own runtime ([ingress] workers = 0, as before the ingress had worker threads), and,
# unless `--tunnel off`, through a third root whose ingress reaches its own backend through its
# agent's tunnel (P2F_INGRESS_DIRECT=0, the path before the direct one); what a
# client requesting a domain every 50 ms sees while the node running it is SIGKILLed; the
# root's RSS with 1 000 idle client connections against the same root without them.
#
#   bash bench/ingress/run.sh [extra options of examples/bench_ingress.rs]
#
# Needs Debian's nginx (nginx-light is enough), caddy and wrk:
#   apt-get install -y nginx-light caddy wrk
# Environment (all optional):
#   DATA_ROOT=/var/tmp   where the run's temp dir goes (agents, configs, logs; deleted afterwards)
#   CARGO_TARGET_DIR=<repo>/target/bench   a target dir of its own (others build in target/)
#   AGENT_LOG=info       RUST_LOG of the agents
#
# Builds `p2f` (p2f-cli) and the example in release, prints the machine, then runs the example,
# which prints the table. The output is also written to target/bench-ingress/results-*.txt.
# Loopback only: 127.0.0.1 (root, proxies, backend), 127.0.0.2 (the failover's member) and
# 127.0.0.11.. (the idle clients' source addresses).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target/bench}
DATA_ROOT=${DATA_ROOT:-/var/tmp}
export AGENT_LOG=${AGENT_LOG:-info}
export CARGO_TERM_COLOR=never
unset RUSTFLAGS CARGO_BUILD_RUSTFLAGS

for tool in nginx caddy wrk; do
    command -v "$tool" >/dev/null || {
        echo "$tool is missing: apt-get install -y nginx-light caddy wrk" >&2
        exit 1
    }
done

cd "$repo"
cargo build --release --quiet -p p2f-cli --bin p2f
cargo build --release --quiet -p p2f --example bench_ingress
bin=$CARGO_TARGET_DIR/release/examples/bench_ingress
p2f=$CARGO_TARGET_DIR/release/p2f

out_dir=$repo/target/bench-ingress
mkdir -p "$out_dir"
results=$out_dir/results-$(date +%Y%m%d-%H%M%S).txt

# Whatever happens to the example (even SIGKILL), nothing it started outlives this script: the
# agents and their processes carry P2F_TESTKIT_RUN=<a dir under DATA_ROOT/p2f-bench-ingress-*>,
# and nginx, Caddy and wrk lead process groups listed in that dir's `pgids`; `sweep` kills both.
# The example deletes the dir when it ends normally. Dirs that were there before are not ours.
shopt -s nullglob
before=("$DATA_ROOT"/p2f-bench-ingress-*)
cleanup() {
    local dir old mine
    for dir in "$DATA_ROOT"/p2f-bench-ingress-*; do
        mine=1
        for old in "${before[@]}"; do [[ $dir == "$old" ]] && mine=0; done
        if ((mine)); then
            "$bin" sweep "$dir" || true
            rm -rf -- "$dir"
        fi
    done
}
trap cleanup EXIT

{
    echo "# bench/ingress/run.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "p2f $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- p2f-core p2f-cli p2f-model 2>/dev/null || echo ' (sources differ from HEAD)')"
    echo "machine: $(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), $(free -g | awk '/^Mem/ {print $2}') GiB, $(uname -sr), $(rustc --version)"
    echo "tools: $(nginx -v 2>&1), caddy $(caddy version | cut -d' ' -f1), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$results"
"$bin" --p2f "$p2f" --data-root "$DATA_ROOT" "$@" 2>&1 | tee -a "$results"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$results"
echo "written to $results"
