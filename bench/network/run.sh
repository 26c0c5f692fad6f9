#!/usr/bin/env bash
# The network's figures (DESIGN.md §9, issue 4): failover of a SIGKILLed node (3 real release
# agents on 127.0.0.1-3, 10 trials, beside the documented defaults of Nomad, Docker Swarm and
# fleet), the time a record change takes to reach every node (in-process meshes of 3, 10 and 30
# nodes), and `list_processes` with 10 000 records (a real root and member).
#
#   bash bench/network/run.sh [extra options of examples/bench_network.rs]
#
# e.g. `--only failover`, `--trials 20`, `--sizes 3,10,30`, `--records 10000`, `--calls 50`.
#
# Environment (all optional):
#   DATA_ROOT=/var/tmp   where the agents' data dirs go (a temp dir, deleted afterwards)
#   CARGO_TARGET_DIR=<repo>/target/bench   a target dir of its own (others build in target/)
#   AGENT_LOG=info       RUST_LOG of the agents (their logs go to DATA_ROOT/p2f-bench-network-*/)
#   PERF=0               1: also `perf record` each agent of the list benchmark during its
#                        back-to-back calls (after the timed calls, so the figures are not
#                        disturbed); reports go to target/bench-network/perf-*-{member,root}.txt
#
# Builds `p2f` (p2f-cli) and the example in release, prints the machine, then runs the example,
# which prints the table. The output is also written to target/bench-network/results-*.txt.
# Needs 127.0.0.2 and 127.0.0.3 (Linux answers for all of 127.0.0.0/8 on lo).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target/bench}
DATA_ROOT=${DATA_ROOT:-/var/tmp}
export AGENT_LOG=${AGENT_LOG:-info}
export CARGO_TERM_COLOR=never
unset RUSTFLAGS CARGO_BUILD_RUSTFLAGS

cd "$repo"
cargo build --release --quiet -p p2f-cli --bin p2f
cargo build --release --quiet -p p2f --example bench_network
bin=$CARGO_TARGET_DIR/release/examples/bench_network
p2f=$CARGO_TARGET_DIR/release/p2f

out_dir=$repo/target/bench-network
mkdir -p "$out_dir"
stamp=$(date +%Y%m%d-%H%M%S)
results=$out_dir/results-$stamp.txt

extra=()
if [[ ${PERF:-0} == 1 ]]; then
    extra+=(--perf "$out_dir/perf-$stamp")
fi

# Whatever happens to the example (even SIGKILL), nothing it started outlives this script: every
# such process carries P2F_TESTKIT_RUN=<a dir under DATA_ROOT/p2f-bench-network-*>, and the example
# deletes that dir when it ends normally. Dirs that were there before belong to someone else.
shopt -s nullglob
before=("$DATA_ROOT"/p2f-bench-network-*)
cleanup() {
    local dir old mine
    for dir in "$DATA_ROOT"/p2f-bench-network-*; do
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
    echo "# bench/network/run.sh $*, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "p2f $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- p2f-core p2f-cli p2f-model 2>/dev/null || echo ' (runtime sources differ from HEAD)')"
    echo "machine: $(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), $(free -g | awk '/^Mem/ {print $2}') GiB, $(uname -sr), $(rustc --version)"
    echo "data root: $DATA_ROOT on $(df -T "$DATA_ROOT" | awk 'NR==2 {print $1 " (" $2 ", mounted on " $7 ")"}')"
    echo "agent: $p2f, RUST_LOG=$AGENT_LOG"
} | tee "$results"
"$bin" --p2f "$p2f" --data-root "$DATA_ROOT" "${extra[@]}" "$@" 2>&1 | tee -a "$results"
echo "written to $results"
