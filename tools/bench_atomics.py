#!/usr/bin/env python3
"""Per-call cost of the atomics helper's operations, next to plain numpy and memoryview indexing.

Each figure is the median over several runs of (time of N calls - time of an
empty loop of N) / N, with the method bound to a local as hot code does
(``cas = words.cas``).  The words live in a real shmmmu region (a POSIX
shared-memory segment), which is unlinked on exit.  Prints a markdown table.

    .venv/bin/python tools/bench_atomics.py [--number 200000] [--repeat 7] [--max-cas-ns 100]

With --max-cas-ns the script exits 1 when cas costs more than that.
"""
from __future__ import annotations

import _installed  # noqa: F401  (the installed shmmmu, or one line saying how to get it)
import argparse
import os
import platform
import statistics
import sys
import timeit

import numpy as np

import shmmmu
from shmmmu.region import Region

RUN = 512      # words per batch call: one page table

# (label, statement, note); the statements run in a function whose locals the setup made.
SINGLE = [
    ("load", "load(7)", ""),
    ("store", "store(7, 5)", ""),
    ("cas", "cas(7, 5, 5)", "succeeds (expected == current)"),
    ("cas (fails)", "cas(7, 1, 2)", "returns the value seen"),
    ("xchg", "xchg(7, 5)", ""),
    ("fetch_add", "fetch_add(7, 1)", ""),
    ("fetch_or", "fetch_or(7, 8)", ""),
    ("fetch_and", "fetch_and(7, mask)", ""),
]
BATCH = [
    ("load_range", f"load_range(0, {RUN}, out)", ""),
    ("fill_range", f"fill_range(0, {RUN}, 5)", ""),
    ("xchg_range", f"xchg_range(0, {RUN}, 5, out)", ""),
    ("and_range", f"and_range(0, {RUN}, mask)", ""),
    ("or_range", f"or_range(0, {RUN}, 8)", ""),
    ("clear_where", f"clear_where(0, {RUN}, 8, 8, 2, out)", "no word matches the test: the scan alone"),
]
BASELINES = [
    ("numpy a[i]", "a[7]", ""),
    ("numpy a[i] = v", "a[7] = 5", ""),
    ("memoryview m[i]", "m[7]", "cast('Q')"),
    ("memoryview m[i] = v", "m[7] = 5", "cast('Q')"),
]
BATCH_BASELINES = [
    (f"numpy a[0:{RUN}].copy()", f"a[0:{RUN}].copy()", ""),
    (f"numpy a[0:{RUN}] &= mask", f"a[0:{RUN}] &= mask_u", ""),
]

SETUP = ("w = _w; a = _a; m = _m; out = _out; mask = _mask; mask_u = _mask_u\n"
         "load = w.load; store = w.store; cas = w.cas; xchg = w.xchg\n"
         "fetch_add = w.fetch_add; fetch_or = w.fetch_or; fetch_and = w.fetch_and\n"
         "load_range = w.load_range; fill_range = w.fill_range; xchg_range = w.xchg_range\n"
         "and_range = w.and_range; or_range = w.or_range; clear_where = w.clear_where")


def per_call_ns(stmt: str, env: dict[str, object], number: int, repeat: int) -> float:
    """Median over `repeat` runs of the cost of one `stmt`, empty-loop cost taken off, in ns."""
    op = timeit.Timer(stmt, SETUP, globals=env)
    empty = timeit.Timer("pass", SETUP, globals=env)
    samples = []
    for _ in range(repeat):
        t_empty = empty.timeit(number)
        t_op = op.timeit(number)
        samples.append((t_op - t_empty) / number * 1e9)
    return statistics.median(samples)


def measure(number: int, repeat: int) -> list[tuple[str, str, float, str]]:
    name = f"bench-{os.getpid()}"
    rows: list[tuple[str, str, float, str]] = []
    with Region.create(name, {"words": (RUN,)}, {"purpose": "bench_atomics"}) as region:
        a = region.array("words")
        env: dict[str, object] = {
            "_w": region.words("words"), "_a": a, "_m": memoryview(a).cast("B").cast("Q"),
            "_out": np.zeros(RUN, dtype=np.uint64), "_mask": (1 << 64) - 1, "_mask_u": np.uint64((1 << 64) - 1),
        }
        a[:] = 5
        batch_number = max(number // 50, 1000)
        groups = [("single word", SINGLE, number),
                  (f"batch, {RUN} words per call", BATCH, batch_number),
                  ("not atomic: single word", BASELINES, number),
                  (f"not atomic: batch, {RUN} words", BATCH_BASELINES, batch_number)]
        for group, items, n in groups:
            for label, stmt, note in items:
                rows.append((group, label, per_call_ns(stmt, env, n, repeat), note))
        env.clear()
        del a
    return rows


def table(rows: list[tuple[str, str, float, str]]) -> str:
    lines = ["| group | operation | ns per call | note |", "|---|---|---:|---|"]
    for group, label, ns, note in rows:
        per_word = f" ({ns / RUN:.1f} ns/word)" if "batch" in group else ""
        lines.append(f"| {group} | `{label}` | {ns:.0f}{per_word} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=200_000, help="calls per timed run (single-word ops)")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs; the median is reported")
    ap.add_argument("--max-cas-ns", type=float, default=None, help="exit 1 if cas costs more than this")
    args = ap.parse_args(argv)
    rows = measure(args.number, args.repeat)
    print(f"shmmmu {shmmmu.__version__}, Python {platform.python_version()}, numpy {np.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}")
    print(f"median of {args.repeat} runs, empty-loop cost subtracted\n")
    print(table(rows))
    cas_ns = next(ns for _, label, ns, _ in rows if label == "cas")
    if args.max_cas_ns is not None and cas_ns > args.max_cas_ns:
        print(f"\ncas costs {cas_ns:.0f} ns, over the limit of {args.max_cas_ns:.0f} ns", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
