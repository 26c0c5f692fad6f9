#!/usr/bin/env python3
"""Summaries for bench/macro-build/run.sh.

    stats.py summary TIMES_TSV        median / min of each crate's rebuilds and the ratios
    stats.py timings HTML [HTML..]    per-crate compile times from a `cargo build --timings` report
"""

import json
import re
import statistics
import sys

GOAL = 1.25


def summary(path):
    rows = [line.split("\t") for line in open(path, encoding="utf-8").read().splitlines() if line]
    groups = []
    times = {}
    loads = []
    for profile, mode, crate, _run, secs, load in rows:
        if (profile, mode) not in groups:
            groups.append((profile, mode))
        times.setdefault((profile, mode, crate), []).append(float(secs))
        loads.append(float(load))
    for profile, mode in groups:
        what = "touch src/main.rs" if mode == "touch" else "edit one service's start"
        print(f"## {profile} profile, {mode}: wall clock of `{what}; cargo build`")
        print()
        print("| crate | runs | median (s) | min (s) | max (s) |")
        print("| --- | --- | --- | --- | --- |")
        med, low = {}, {}
        for crate in ("with-macro", "by-hand", "empty"):
            t = times.get((profile, mode, crate))
            if not t:
                continue
            med[crate], low[crate] = statistics.median(t), min(t)
            print(
                f"| {crate} | {len(t)} | {med[crate]:.3f} | {low[crate]:.3f} | {max(t):.3f} |"
            )
        print()
        ratio = med["with-macro"] / med["by-hand"]
        verdict = "meets" if ratio <= GOAL else "MISSES"
        print(
            f"ratio with-macro / by-hand: median {ratio:.2f}x, min "
            f"{low['with-macro'] / low['by-hand']:.2f}x  ({verdict} the {GOAL}x goal)"
        )
        if "empty" in med:
            a = med["with-macro"] - med["empty"]
            b = med["by-hand"] - med["empty"]
            if b > 0:
                print(
                    f"above the empty crate ({med['empty']:.3f} s): "
                    f"with-macro +{a:.3f} s, by-hand +{b:.3f} s"
                )
        print()
    print(f"1-min load average sampled after each build: min {min(loads):.2f}, max {max(loads):.2f}")


def timings(paths):
    for path in paths:
        try:
            html = open(path, encoding="utf-8").read()
        except OSError:
            continue
        m = re.search(r"const UNIT_DATA = (\[.*?\]);\n", html, re.S)
        if not m:
            continue
        units = json.loads(m.group(1))
        per = {}
        for u in units:
            key = f"{u['name']} {u['version']}"
            per[key] = per.get(key, 0.0) + float(u["duration"])
        total = sum(per.values())
        macro = {
            k: v
            for k, v in per.items()
            if k.split()[0] in ("p2f-macros", "syn", "quote", "proc-macro2", "unicode-ident")
        }
        print(f"  sum of all compile units: {total:.1f} s (2 run in parallel)")
        print("  the macro's own part (the by-hand crate builds it too, since p2f re-exports it):")
        for k, v in sorted(macro.items(), key=lambda kv: -kv[1]):
            print(f"    {k:<28} {v:6.1f} s")
        print(
            "    (proc-macro2, quote, unicode-ident and syn 2 are needed by serde_derive anyway;"
            " syn 3 and p2f-macros are the macro's alone)"
        )
        top = sorted(per.items(), key=lambda kv: -kv[1])[:8]
        print("  slowest units: " + ", ".join(f"{k} {v:.1f} s" for k, v in top))
        return


if __name__ == "__main__":
    if sys.argv[1] == "summary":
        summary(sys.argv[2])
    else:
        timings(sys.argv[2:])
