#!/usr/bin/env bash
# Build cost of `deployment!` (DESIGN.md §9): a crate holding a generated 500-service
# `deployment!` against the same deployment written as plain `ProcessSpec::from_parts(SpecParts
# { .. })` literals, rebuilt alternately in the same run. Goal: macro / by-hand <= 1.25x.
#
#   bash bench/macro-build/run.sh
#
# Environment (all optional):
#   RUNS=5          rebuilds of each crate (alternating)
#   SERVICES=500    services in the deployment
#   RELEASE=0       1: also measure `--release` rebuilds (builds the dependencies in release once)
#   COLD=1          0: keep the benchmark's target dir (skips the one-time dependency figure)
#   BENCH_DIR=<repo>/target/bench-macro-build   where the crates and their target dir go
#
# Writes the generated crates, the `--dump` of both binaries and results.txt under BENCH_DIR.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
RUNS=${RUNS:-5}
SERVICES=${SERVICES:-500}
RELEASE=${RELEASE:-0}
COLD=${COLD:-1}
BENCH_DIR=${BENCH_DIR:-$repo/target/bench-macro-build}
export CARGO_TARGET_DIR=$BENCH_DIR/target
# The repo's toolchain, wherever BENCH_DIR is.
if [[ -z ${RUSTUP_TOOLCHAIN:-} && -f $repo/rust-toolchain.toml ]]; then
    RUSTUP_TOOLCHAIN=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$repo/rust-toolchain.toml")
    export RUSTUP_TOOLCHAIN
fi
export CARGO_TERM_COLOR=never
unset RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_INCREMENTAL

crates=(with-macro by-hand empty)
results=$BENCH_DIR/results.txt
times=$BENCH_DIR/times.tsv

log() { printf '%s\n' "$*" | tee -a "$results"; }
now() { date +%s%N; }
secs() { python3 -c "import sys; print(f'{(int(sys.argv[2]) - int(sys.argv[1])) / 1e9:.3f}')" "$1" "$2"; }

mkdir -p "$BENCH_DIR"
: >"$results"
: >"$times"

python3 "$here/gen.py" "$BENCH_DIR" "$repo" "$SERVICES"
for c in "${crates[@]}"; do
    # Same dependency versions as the repo.
    cp "$repo/Cargo.lock" "$BENCH_DIR/$c/Cargo.lock"
done

log "# deployment! build cost: $SERVICES services, $RUNS rebuilds each"
log "date:      $(date -u '+%Y-%m-%d %H:%M UTC')"
log "machine:   $(nproc) cores, $(uname -sm), $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
log "toolchain: $(rustc -V) / $(cargo -V)"
log "repo:      $repo ($(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$repo" diff --quiet HEAD -- p2f-macros p2f-model 2>/dev/null || echo ', p2f-macros/p2f-model modified'))"
log "source:    with-macro $(wc -c <"$BENCH_DIR/with-macro/src/main.rs") bytes, by-hand $(wc -c <"$BENCH_DIR/by-hand/src/main.rs") bytes"
log "load avg at start: $(cut -d' ' -f1-3 /proc/loadavg)"

build() { # crate, extra cargo args...
    local c=$1
    shift
    (cd "$BENCH_DIR/$c" && cargo build --quiet "$@")
}

# ---- one-time cost: every dependency, from a cold target dir --------------------------------
if [[ $COLD == 1 ]]; then
    rm -rf "$CARGO_TARGET_DIR"
    # `cargo fetch` first so that no download is timed.
    (cd "$BENCH_DIR/empty" && cargo fetch --quiet)
    t0=$(now)
    (cd "$BENCH_DIR/empty" && cargo build --quiet --timings)
    t1=$(now)
    log ""
    log "one-time: cold build of p2f and all its dependencies (dev): $(secs "$t0" "$t1") s wall"
    python3 "$here/stats.py" timings "$BENCH_DIR"/empty/target/cargo-timings/cargo-timing.html \
        "$CARGO_TARGET_DIR"/cargo-timings/cargo-timing.html 2>/dev/null | tee -a "$results" || true
fi

# Warm-up: the first build of each crate (not counted).
for c in "${crates[@]}"; do build "$c"; done

profiles=(dev)
if [[ $RELEASE == 1 ]]; then
    t0=$(now)
    for c in "${crates[@]}"; do build "$c" --release; done
    t1=$(now)
    log "one-time: release build of the dependencies + first release builds: $(secs "$t0" "$t1") s wall"
    profiles+=(release)
fi

# ---- the same value? -------------------------------------------------------------------------
for profile in "${profiles[@]}"; do
    dir=debug
    [[ $profile == release ]] && dir=release
    for c in with-macro by-hand; do
        "$CARGO_TARGET_DIR/$dir/$c" --dump >"$BENCH_DIR/$c.$profile.dump"
    done
    if ! diff -q "$BENCH_DIR/with-macro.$profile.dump" "$BENCH_DIR/by-hand.$profile.dump" >/dev/null; then
        diff "$BENCH_DIR/with-macro.$profile.dump" "$BENCH_DIR/by-hand.$profile.dump" | head -40 >&2
        echo "FAIL: with-macro and by-hand hold different deployments ($profile)" >&2
        exit 1
    fi
    head=$(head -2 "$BENCH_DIR/with-macro.$profile.dump" | tr '\n' ' ')
    if [[ $head != "$SERVICES valid: true " ]]; then
        echo "FAIL: expected $SERVICES services that validate, got '$head'" >&2
        exit 1
    fi
done
log ""
log "check: both binaries print the same {:#?} dump of HOME ($SERVICES services, validate() ok)"

# ---- rebuilds of the benchmark crate only, alternating ---------------------------------------
for profile in "${profiles[@]}"; do
    args=()
    [[ $profile == release ]] && args=(--release)
    for ((run = 1; run <= RUNS; run++)); do
        order=(with-macro by-hand empty)
        ((run % 2 == 0)) && order=(by-hand with-macro empty)
        for c in "${order[@]}"; do
            touch "$BENCH_DIR/$c/src/main.rs"
            t0=$(now)
            build "$c" "${args[@]}"
            t1=$(now)
            printf '%s\t%s\t%s\t%s\t%s\n' "$profile" "$c" "$run" "$(secs "$t0" "$t1")" \
                "$(cut -d' ' -f1 /proc/loadavg)" >>"$times"
        done
    done
done

log "load avg at end:   $(cut -d' ' -f1-3 /proc/loadavg)"
log ""
python3 "$here/stats.py" summary "$times" | tee -a "$results"
log ""
log "raw times: $times; this summary: $results"
