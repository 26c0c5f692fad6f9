#!/usr/bin/env bash
# Build cost of `deployment!` (DESIGN.md §9): a crate holding a generated 500-service
# `deployment!` against the same deployment written as plain `ProcessSpec::from_parts(SpecParts
# { .. })` literals, rebuilt alternately in the same run. Goal: macro / by-hand <= 1.25x.
#
#   bash bench/macro-build/run.sh
#
# Environment (all optional):
#   RUNS=5          rebuilds of each crate in each mode (alternating between the crates)
#   SERVICES=500    services in the deployment
#   RELEASE=0       1: also measure `--release` (builds the dependencies in release once)
#   COLD=1          0: keep the benchmark's target dir (and skip the one-time dependency figure)
#   BENCH_DIR=<repo>/target/bench-macro-build   where the crates and their target dir go
#   P2F_PATH=<repo> the p2f the crates depend on (e.g. a copy with another p2f-macros, for A/B)
#   P2F_PATCH=file  depend on a copy of P2F_PATH (under BENCH_DIR) with this patch applied, e.g.
#                   bench/macro-build/expand-compact.patch
#
# Modes, each in the dev profile (and in release with RELEASE=1):
#   touch  `touch src/main.rs && cargo build`: nothing changed, so rustc's incremental cache
#          serves the by-hand crate, while a proc macro always runs again; the figure the goal
#          is checked against
#   edit   one service's `start` changes (the same edit in both crates) before each build: the
#          usual edit-rebuild loop, where the deployment is type-checked and evaluated again
# `empty` (no deployment) is built in `touch` mode too: the fixed cost of any crate using p2f.
#
# Writes the generated crates, the `--dump` of both binaries, times.tsv and results.txt under
# BENCH_DIR.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
RUNS=${RUNS:-5}
SERVICES=${SERVICES:-500}
RELEASE=${RELEASE:-0}
COLD=${COLD:-1}
BENCH_DIR=${BENCH_DIR:-$repo/target/bench-macro-build}
P2F_PATH=$(cd "${P2F_PATH:-$repo}" && pwd)
P2F_PATCH=${P2F_PATCH:+$(cd "$(dirname "$P2F_PATCH")" && pwd)/$(basename "$P2F_PATCH")}
export CARGO_TARGET_DIR=$BENCH_DIR/target
# The repo's toolchain, wherever BENCH_DIR is.
if [[ -z ${RUSTUP_TOOLCHAIN:-} && -f $repo/rust-toolchain.toml ]]; then
    RUSTUP_TOOLCHAIN=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$repo/rust-toolchain.toml")
    export RUSTUP_TOOLCHAIN
fi
export CARGO_TERM_COLOR=never
unset RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_INCREMENTAL CARGO_PROFILE_DEV_OPT_LEVEL

crates=(with-macro by-hand empty)
results=$BENCH_DIR/results.txt
times=$BENCH_DIR/times.tsv

log() { printf '%s\n' "$*" | tee -a "$results"; }
now() { date +%s%N; }
secs() { python3 -c "import sys; print(f'{(int(sys.argv[2]) - int(sys.argv[1])) / 1e9:.3f}')" "$1" "$2"; }

mkdir -p "$BENCH_DIR"
: >"$results"
: >"$times"

p2f_desc="$P2F_PATH ($(git -C "$P2F_PATH" rev-parse --short HEAD 2>/dev/null || echo '?'), $(
    git -C "$P2F_PATH" status --porcelain -- p2f-macros p2f-model 2>/dev/null | wc -l
) changed files in p2f-macros/ and p2f-model/)"
if [[ -n $P2F_PATCH ]]; then
    # A frozen copy: the patch applies to it, and edits to the repo during the run don't count.
    copy=$BENCH_DIR/p2f-patched
    rm -rf "$copy"
    mkdir -p "$copy"
    for f in Cargo.toml Cargo.lock rust-toolchain.toml src p2f-model p2f-macros p2f-core tests examples; do
        [[ -e $P2F_PATH/$f ]] && cp -r "$P2F_PATH/$f" "$copy/"
    done
    patch --quiet -p1 -d "$copy" <"$P2F_PATCH"
    p2f_desc="a copy of $p2f_desc with $(basename "$P2F_PATCH") applied"
    P2F_PATH=$copy
fi

python3 "$here/gen.py" "$BENCH_DIR" "$P2F_PATH" "$SERVICES"
for c in "${crates[@]}"; do
    # Same dependency versions as the repo.
    cp "$P2F_PATH/Cargo.lock" "$BENCH_DIR/$c/Cargo.lock"
done

log "# deployment! build cost: $SERVICES services, $RUNS rebuilds of each crate per mode"
log "date:      $(date -u '+%Y-%m-%d %H:%M UTC')"
log "machine:   $(nproc) cores, $(uname -sm), $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1), $(free -g | awk '/^Mem/ {print $2}') GB"
log "toolchain: $(rustc -V) / $(cargo -V)"
log "p2f:       $p2f_desc"
log "source:    with-macro $(wc -c <"$BENCH_DIR/with-macro/src/main.rs") bytes, by-hand $(wc -c <"$BENCH_DIR/by-hand/src/main.rs") bytes"
log "load avg at start: $(cut -d' ' -f1-3 /proc/loadavg)"

# A build of one crate; prints the seconds it took. Only the crate itself may be compiled: when
# cargo also rebuilt a dependency (someone edited p2f meanwhile), the sample is thrown away and
# the build is timed again.
timed_build() { # crate, extra cargo args...
    local c=$1 tries=0 t0 t1 out
    shift
    while :; do
        t0=$(now)
        out=$(cd "$BENCH_DIR/$c" && cargo build "$@" 2>&1) || {
            printf '%s\n' "$out" >&2
            return 1
        }
        t1=$(now)
        if ! grep -E '^\s*Compiling ' <<<"$out" | grep -qv "Compiling $c v"; then
            break
        fi
        tries=$((tries + 1))
        echo "  (discarded a $c sample: a dependency was rebuilt too)" >&2
        if ((tries >= 5)); then
            echo "FAIL: dependencies keep changing; run again when p2f is not being edited" >&2
            return 1
        fi
        touch "$BENCH_DIR/$c/src/main.rs"
    done
    secs "$t0" "$t1"
}

# ---- one-time cost: every dependency, from a cold target dir --------------------------------
if [[ $COLD == 1 ]]; then
    rm -rf "$CARGO_TARGET_DIR"
    # Downloads are not timed.
    (cd "$BENCH_DIR/empty" && cargo fetch --quiet)
    t0=$(now)
    (cd "$BENCH_DIR/empty" && cargo build --quiet --timings)
    t1=$(now)
    log ""
    log "one-time: cold build of p2f and all its dependencies (dev): $(secs "$t0" "$t1") s wall"
    python3 "$here/stats.py" timings "$CARGO_TARGET_DIR"/cargo-timings/cargo-timing.html |
        tee -a "$results"
fi

profiles=(dev)
[[ $RELEASE == 1 ]] && profiles+=(release)

for profile in "${profiles[@]}"; do
    args=()
    dir=debug
    [[ $profile == release ]] && args=(--release) && dir=release
    # Warm-up: the first build of each crate (not counted).
    t0=$(now)
    for c in "${crates[@]}"; do
        (cd "$BENCH_DIR/$c" && cargo build --quiet "${args[@]}")
    done
    t1=$(now)
    [[ $profile == release ]] &&
        log "one-time: release build of the dependencies and first release builds: $(secs "$t0" "$t1") s wall"

    # ---- the same value? ---------------------------------------------------------------------
    for c in with-macro by-hand; do
        "$CARGO_TARGET_DIR/$dir/$c" --dump >"$BENCH_DIR/$c.$profile.dump"
    done
    if ! cmp -s "$BENCH_DIR/with-macro.$profile.dump" "$BENCH_DIR/by-hand.$profile.dump"; then
        diff "$BENCH_DIR/with-macro.$profile.dump" "$BENCH_DIR/by-hand.$profile.dump" | head -40 >&2
        echo "FAIL: with-macro and by-hand hold different deployments ($profile)" >&2
        exit 1
    fi
    head=$(head -2 "$BENCH_DIR/with-macro.$profile.dump" | tr '\n' ' ')
    if [[ $head != "$SERVICES valid: true " ]]; then
        echo "FAIL: expected $SERVICES services that validate, got '$head'" >&2
        exit 1
    fi
    log "check ($profile): both binaries print the same {:#?} dump of HOME ($SERVICES services, validate() ok)"

    # ---- rebuilds of the benchmark crate only, alternating ----------------------------------
    last=$(printf 'svc_%03d' $((SERVICES - 1)))
    for mode in touch edit; do
        for ((run = 1; run <= RUNS; run++)); do
            order=(with-macro by-hand empty)
            ((run % 2 == 0)) && order=(by-hand with-macro empty)
            [[ $mode == edit ]] && order=("${order[@]:0:2}")
            for c in "${order[@]}"; do
                src=$BENCH_DIR/$c/src/main.rs
                if [[ $mode == edit ]]; then
                    # Alternates between `.. /srv/svc_499"` and `.. /srv/svc_499/v2"`.
                    if grep -q -- "--directory /srv/$last/v2\"" "$src"; then
                        sed -i "s#--directory /srv/$last/v2\"#--directory /srv/$last\"#" "$src"
                    else
                        sed -i "s#--directory /srv/$last\"#--directory /srv/$last/v2\"#" "$src"
                    fi
                else
                    touch "$src"
                fi
                s=$(timed_build "$c" "${args[@]}")
                printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$profile" "$mode" "$c" "$run" "$s" \
                    "$(cut -d' ' -f1 /proc/loadavg)" >>"$times"
            done
        done
        # The edits stayed in step: both crates hold the same text.
        a=$(grep -c -- "/srv/$last/v2\"" "$BENCH_DIR/with-macro/src/main.rs" || true)
        b=$(grep -c -- "/srv/$last/v2\"" "$BENCH_DIR/by-hand/src/main.rs" || true)
        [[ $a == "$b" ]] || { echo "FAIL: the edits of the two crates are out of step" >&2 && exit 1; }
    done
done

log "load avg at end:   $(cut -d' ' -f1-3 /proc/loadavg)"
log ""
python3 "$here/stats.py" summary "$times" | tee -a "$results"
log ""
log "raw times: $times"
