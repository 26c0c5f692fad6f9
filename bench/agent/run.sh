#!/usr/bin/env bash
# The node agent's figures (DESIGN.md §9): spin latency (API call -> Running) against spawning
# the same command directly, the first restart after a crash, and the agent's idle RSS/CPU with
# 0 and 50 supervised processes, each against a real release `p2f node run` on 127.0.0.1.
#
#   bash bench/agent/run.sh [extra options of examples/bench_agent.rs]
#
# Environment (all optional):
#   DATA_ROOT=/var/tmp   where the agents' data dirs go (a temp dir, deleted afterwards); put it
#                        on the filesystem a user's /var/lib/p2f would be on
#   CARGO_TARGET_DIR=<repo>/target/bench   a target dir of its own (others build in target/)
#   AGENT_LOG=info       RUST_LOG of the agents (their log goes to DATA_DIR/.../agent.log)
#   STRACE=0             1: also `strace -f -c` the agent during the spin loop and count its
#                        fdatasync and clone3 calls (slows the agent down: the spin figures of
#                        such a run are not the benchmark's)
#
# Builds `p2f` (p2f-cli) and the example in release, prints the machine, then runs the example,
# which prints the table. The output is also written to target/bench-agent/results-*.txt.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target/bench}
DATA_ROOT=${DATA_ROOT:-/var/tmp}
STRACE=${STRACE:-0}
export AGENT_LOG=${AGENT_LOG:-info}
export CARGO_TERM_COLOR=never
unset RUSTFLAGS CARGO_BUILD_RUSTFLAGS

cd "$repo"
cargo build --release --quiet -p p2f-cli --bin p2f
cargo build --release --quiet -p p2f --example bench_agent
bin=$CARGO_TARGET_DIR/release/examples/bench_agent
p2f=$CARGO_TARGET_DIR/release/p2f

out_dir=$repo/target/bench-agent
mkdir -p "$out_dir"
results=$out_dir/results-$(date +%Y%m%d-%H%M%S).txt

extra=()
if [[ $STRACE == 1 ]]; then
    extra+=(--strace "$out_dir/strace-$(date +%Y%m%d-%H%M%S).txt")
fi

# Whatever happens to the example (even SIGKILL), nothing it started outlives this script: every
# such process carries P2F_TESTKIT_RUN=<a dir under DATA_ROOT/p2f-bench-agent-*>, and the example
# deletes that dir when it ends normally. Dirs that were there before belong to someone else.
shopt -s nullglob
before=("$DATA_ROOT"/p2f-bench-agent-*)
cleanup() {
    local dir old mine
    for dir in "$DATA_ROOT"/p2f-bench-agent-*; do
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
    echo "# bench/agent/run.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "p2f $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- p2f-core p2f-cli p2f-model 2>/dev/null || echo ' (agent sources differ from HEAD)')"
    echo "machine: $(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), $(free -g | awk '/^Mem/ {print $2}') GiB, $(uname -sr), $(rustc --version)"
    echo "data root: $DATA_ROOT on $(df -T "$DATA_ROOT" | awk 'NR==2 {print $1 " (" $2 ", mounted on " $7 ")"}')"
    echo "agent: $p2f, RUST_LOG=$AGENT_LOG"
} | tee "$results"
"$bin" --p2f "$p2f" --data-root "$DATA_ROOT" "${extra[@]}" "$@" 2>&1 | tee -a "$results"
echo "written to $results"
