#!/usr/bin/env python3
"""Cost of the MMU RWLock and of RCU: uncontended lock/unlock pairs, grace-period latency, throughput of 1-8 processes.

Measures, in a real shmmmu region (unlinked on exit):
- one process, nobody else: read_lock+read_unlock, write_lock+write_unlock,
  rcu read_lock+read_unlock (best of several timed runs, empty-loop cost
  subtracted, per pair);
- grace-period latency: `Rcu.synchronize()` with no reader, and started while
  another process is inside a read section of about 200 µs (it runs them back
  to back, so the grace period waits for the rest of that section);
- throughput: 1, 2, 4, 8 processes each doing short read sections, or short
  write sections, for a while (a section is 100 atomic loads of a shared word,
  about 3 µs): read sections should scale or at least not collapse, write
  sections serialize.

Prints markdown tables.

    .venv/bin/python tools/bench_locks.py [--seconds 1] [--runs 3] [--procs 1,2,4,8] [--repeat 7]

Figures from a machine that other work keeps busy are low and noisy: the
load average is printed first; uncontended figures are the best of several
runs, throughput the best of several runs per point.
"""
from __future__ import annotations

import _installed  # noqa: F401  (the installed shmmmu, or one line saying how to get it)
import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import timeit
import uuid

import numpy as np

import shmmmu
from shmmmu.layout import Ctl, Locks, TortureCtl, WState
from shmmmu.rcu import Rcu
from shmmmu.region import Region
from shmmmu.rwlock import RWLock
from shmmmu.torture import torture_config
from shmmmu.vm import create_region

SECTION_LOADS = 100
MAX_PROCS = 8


# ---------------------------------------------------------------- one process

def per_pair_ns(stmt: str, env: dict[str, object], number: int, repeat: int) -> float:
    """Best of `repeat` timed runs (the least disturbed by other load), empty-loop cost taken off, in ns."""
    op = timeit.Timer(stmt, globals=env)
    empty = timeit.Timer("pass", globals=env)
    return (min(op.timeit(number) for _ in range(repeat))
            - min(empty.timeit(number) for _ in range(repeat))) / number * 1e9


def uncontended(region: Region, number: int, repeat: int) -> list[tuple[str, float, str]]:
    lock = RWLock(region, Locks.MMU, 0)
    rcu = Rcu(region, 0)
    env = {"rl": lock.read_lock, "ru": lock.read_unlock, "wl": lock.write_lock, "wu": lock.write_unlock,
           "lock": lock, "cl": rcu.read_lock, "cu": rcu.read_unlock}
    rows = [
        ("read_lock + read_unlock", per_pair_ns("rl(); ru()", env, number, repeat), "fast path: one fetch_add each"),
        ("write_lock + write_unlock", per_pair_ns("wl(); wu()", env, number, repeat), "fast path: cas, fetch_add"),
        ("with lock.read():", per_pair_ns("with lock.read(): pass", env, number, repeat), "context manager"),
        ("rcu read_lock + read_unlock", per_pair_ns("cl(); cu()", env, number, repeat), "epoch slot store"),
    ]
    return rows


# ---------------------------------------------------------------- grace periods

def gp_latency(region: Region, n: int, pinned_by: int | None = None) -> tuple[float, float, float]:
    """(median, p90, max) µs of synchronize() over n calls.

    With `pinned_by`, each call starts only once that worker is inside a read section that
    began before it (its slot holds an epoch not newer than the current one), so every
    figure is a grace period that really had to wait for a reader.
    """
    rcu = Rcu(region, 0)
    rcu_of, ctl = region.columns("wstate", WState).rcu, region.words("ctl")
    lat = []
    for _ in range(n):
        if pinned_by is not None:
            end = time.monotonic() + 10
            while not 0 < rcu_of.load(pinned_by) <= ctl.load(Ctl.EPOCH):
                if time.monotonic() > end:
                    raise RuntimeError("the pinning reader never entered a read section")
        t0 = time.perf_counter()
        if not rcu.synchronize(timeout=5.0):
            raise RuntimeError("a grace period did not end within 5 s")
        lat.append((time.perf_counter() - t0) * 1e6)
    lat.sort()
    return statistics.median(lat), lat[int(0.9 * (len(lat) - 1))], lat[-1]


def spawn(region: Region, worker: int, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", mode, region.name, str(worker)],
                            stdin=subprocess.DEVNULL)


def start_barrier(region: Region, n: int) -> None:
    ctl = region.words("tables")
    end = time.monotonic() + 60
    while ctl.load(TortureCtl.READY) < n:
        if time.monotonic() > end:
            raise RuntimeError("benchmark workers did not start")
        time.sleep(0.005)
    ctl.store(TortureCtl.GO, 1)


def reset(region: Region) -> None:
    ctl = region.words("tables")
    for i in (TortureCtl.READY, TortureCtl.GO, TortureCtl.STOP):
        ctl.store(i, 0)
    region.array("stats")[:] = 0


def stop_workers(region: Region, procs: list[subprocess.Popen]) -> None:
    region.words("tables").store(TortureCtl.STOP, 1)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stop_all(region: Region, procs: list[subprocess.Popen]) -> None:
    stop_workers(region, procs)
    reset(region)


# ---------------------------------------------------------------- throughput

def cpu_seconds(procs: list[subprocess.Popen]) -> float:
    """User + system CPU time the processes have used so far (from /proc, clock-tick resolution)."""
    total = 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])          # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def throughput(region: Region, mode: str, nprocs: int, seconds: float) -> tuple[float, float, int, float]:
    """(sections per second over all processes, CPUs the processes used, contended acquisitions,
    longest wait ms).

    The window opens once every process has done its first sections (interpreter start-up left out)
    and the rate is the growth of the processes' published counts over the window.  CPUs used is
    the CPU time the processes consumed in the window over its length: on a machine that other
    work keeps busy it is what they got, and sections/s divided by it (sections per CPU-second)
    is the lock's cost apart from that share.
    """
    procs = [spawn(region, k, mode) for k in range(nprocs)]
    st = region.array("stats")
    sw = region.words("stats")
    row = st.shape[1]

    def total() -> int:
        return sum(sw.load(k * row) for k in range(nprocs))

    try:
        start_barrier(region, nprocs)
        end = time.monotonic() + 10
        while any(sw.load(k * row) == 0 for k in range(nprocs)) and time.monotonic() < end:
            time.sleep(0.002)
        n0, t0, c0 = total(), time.perf_counter(), cpu_seconds(procs)
        time.sleep(seconds)
        n1, t1, c1 = total(), time.perf_counter(), cpu_seconds(procs)
    finally:
        stop_workers(region, procs)             # the counters are read below: no reset yet
    contended = int(st[:nprocs, 2].sum())
    wait_max = float(st[:nprocs, 3].max()) / 1e6
    reset(region)
    return (n1 - n0) / (t1 - t0), (c1 - c0) / (t1 - t0), contended, wait_max


def worker(mode: str, name: str, k: int) -> None:
    """A benchmark process: sections of `mode` (read, write, rcu-pin) until the stop flag."""
    region = Region.attach(name)
    region.columns("wstate", WState).pid.store(k, os.getpid())
    ctl = region.words("tables")
    st = region.words("stats")
    row = k * region.array("stats").shape[1]
    data = region.words("data")
    load = data.load
    parent = os.getppid()
    ctl.fetch_add(TortureCtl.READY, 1)
    while not ctl.load(TortureCtl.GO):
        time.sleep(0.0005)

    def stop(i: int) -> bool:
        return bool(ctl.load(i)) or os.getppid() != parent      # orphaned: nobody will raise the flag

    if mode == "rcu-pin":
        rcu = Rcu(region, k)
        while not stop(TortureCtl.STOP):
            for _ in range(16):
                rcu.read_lock()
                end = time.perf_counter() + 200e-6
                while time.perf_counter() < end:
                    pass
                rcu.read_unlock()
    else:
        lock = RWLock(region, Locks.MMU, k)
        acquire, release = (lock.read_lock, lock.read_unlock) if mode == "read" else (lock.write_lock,
                                                                                      lock.write_unlock)
        ops = 0
        put = st.store
        while not stop(TortureCtl.STOP):
            for _ in range(64):
                acquire()
                for _ in range(SECTION_LOADS):
                    load(0)
                release()
            ops += 64
            put(row, ops)                       # published as we go: the parent measures a window
        st.store(row + 2, lock.stats.contended)
        st.store(row + 3, lock.stats.wait_max_ns)
    region.close()


# ---------------------------------------------------------------- report

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], argv[2], int(argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per throughput run")
    ap.add_argument("--runs", type=int, default=3, help="throughput runs per point; the best is reported")
    ap.add_argument("--procs", default="1,2,4,8", help="process counts for the throughput table")
    ap.add_argument("--number", type=int, default=100_000, help="pairs per timed run (uncontended)")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs (uncontended); the best is reported")
    ap.add_argument("--gp", type=int, default=300, help="grace periods per latency figure")
    args = ap.parse_args(argv)
    procs = [int(x) for x in args.procs.split(",")]
    if not procs or max(procs) > MAX_PROCS or min(procs) < 1:
        ap.error(f"--procs takes counts from 1 to {MAX_PROCS}")
    name = f"bench-locks-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with create_region(torture_config(name, MAX_PROCS + 1)) as region:
        print(f"shmmmu {shmmmu.__version__}, Python {platform.python_version()}, numpy {np.__version__}, "
              f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
        print("load average before the run: " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + "\n")

        print(f"### One process, no contention (best of {args.repeat} runs, empty-loop cost subtracted)\n")
        print("| operation | ns per pair | note |\n|---|---:|---|")
        for label, ns, note in uncontended(region, args.number, args.repeat):
            print(f"| `{label}` | {ns:.0f} | {note} |")

        print(f"\n### Grace-period latency: `Rcu.synchronize()`, {args.gp} calls\n")
        print("| readers | median µs | p90 µs | max µs |\n|---|---:|---:|---:|")
        med, p90, mx = gp_latency(region, args.gp)
        print(f"| none | {med:.1f} | {p90:.1f} | {mx:.1f} |")
        pin = spawn(region, 1, "rcu-pin")
        try:
            start_barrier(region, 1)
            med, p90, mx = gp_latency(region, args.gp, pinned_by=1)
        finally:
            stop_all(region, [pin])
        print(f"| another process is inside a ~200 µs read section (it runs them back to back) "
              f"| {med:.1f} | {p90:.1f} | {mx:.1f} |")

        print(f"\n### Throughput: each process loops over short sections ({SECTION_LOADS} atomic loads); "
              f"best of {args.runs} runs of {args.seconds:g} s")
        for mode in ("read", "write"):
            print(f"\n{mode} sections:\n")
            print("| processes | sections/s | vs 1 | CPUs used | sections per CPU-s | contended | longest wait |")
            print("|---:|---:|---:|---:|---:|---:|---:|")
            base = None
            for n in procs:
                rate, cpus, contended, wait_ms = max(throughput(region, mode, n, args.seconds)
                                                     for _ in range(args.runs))
                base = base or rate
                print(f"| {n} | {rate:,.0f} | {rate / base:.2f}x | {cpus:.2f} | {rate / max(cpus, 1e-3):,.0f} "
                      f"| {contended:,} | {wait_ms:.2f} ms |")
                sys.stdout.flush()
        print("\nload average after the run: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
