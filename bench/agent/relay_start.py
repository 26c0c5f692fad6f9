#!/usr/bin/env python3
"""Time from starting a process's log relay to its `pid N` line, against `sh` alone.

    python3 bench/agent/relay_start.py [PATH_TO_RELEASE_P2F]

Run as root on a machine with a writable cgroup v2 (it makes and removes
CGROUP_V2/p2f-relay-bench-PID/cN). Each mode runs 30 times straight and 30 times with a
100 ms pause before each start (a restart waits 100 ms before it starts again). Prints the
median in milliseconds. The relay runs `sh -c 'exec sleep 0.01'`, as the agent would.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

P2F = sys.argv[1] if len(sys.argv) > 1 else "target/bench/release/p2f"
RUNS = 30


def cgroup2_mount():
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields, _, tail = line.partition(" - ")
            if tail.split()[0] == "cgroup2":
                return fields.split()[4]
    sys.exit("no cgroup v2 hierarchy is mounted")


def main():
    base = os.path.join(cgroup2_mount(), f"p2f-relay-bench-{os.getpid()}")
    os.mkdir(base)
    scratch = tempfile.mkdtemp()
    count = [0]

    def relay(cgroup):
        args = [P2F, "__p2f-relay", "--log", f"{scratch}/r.log", "--max-bytes", "100000",
                "--keep", "1", "--exit", f"{scratch}/r.exit"]
        if cgroup:
            count[0] += 1
            cell = f"{base}/c{count[0]}"
            os.mkdir(cell)
            args += ["--cgroup", cell]
        return args + ["--", "sh", "-c", "exec sleep 0.01"]

    try:
        rows = [
            ("sh -c 'echo pid $$' (no relay)", lambda: ["sh", "-c", "echo pid $$"]),
            ("relay, process tree (no cgroup)", lambda: relay(False)),
            ("relay, born in a cgroup", lambda: relay(True)),
        ]
        for name, make in rows:
            results = [timed_each(make, pause) for pause in (0.0, 0.1)]
            print(f"{name:40} straight {results[0]:6.2f} ms   after 100 ms {results[1]:6.2f} ms")
    finally:
        for cell in os.listdir(base):
            path = os.path.join(base, cell)
            if os.path.isdir(path):
                os.rmdir(path)
        os.rmdir(base)


def timed_each(make, pause):
    samples = []
    for _ in range(RUNS):
        time.sleep(pause)
        command = make()
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE)
        child.stdout.readline()
        samples.append((time.perf_counter() - start) * 1000)
        child.wait()
    return statistics.median(samples)


if __name__ == "__main__":
    main()
