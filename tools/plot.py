#!/usr/bin/env python3
"""Plot: the sweep's CSV (tools/sweep.py) as PNG figures, medians per point, with matplotlib.

    .venv/bin/pip install -e '.[plot]'            # matplotlib is an optional extra
    .venv/bin/python tools/plot.py sweep.csv -o docs/perf

Writes, for the rows present:
  vcpus.png   populate throughput (faults/s) over vCPUs, shared vs exclusive,
              partitioned vs overlapping; the exclusive/shared populate ratio;
              per-phase times (populate, dirty memory, clear dirty log) per mode
  memory.png  populate time (and the other phases) over guest memory with one
              vCPU, against the linear line through the smallest size; the
              ratio of each doubling
and prints the medians it plotted as a table on stdout.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

PHASES = [("populate_s", "populate"), ("dirty_s", "dirty memory"), ("clear_s", "clear dirty log"),
          ("get_s", "get dirty log"), ("enable_s", "enable"), ("disable_s", "disable")]


def load(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def medians(rows: list[dict[str, str]], key: tuple[str, ...], cols: list[str]) -> dict[tuple, dict[str, float]]:
    """Group rows by the `key` columns; the median of each of `cols` per group."""
    groups: dict[tuple, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in key)].append(r)
    return {g: {c: statistics.median(float(r[c]) for r in rs) for c in cols} | {"n": len(rs)}
            for g, rs in groups.items()}


def plot_vcpus(rows: list[dict[str, str]], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["faults_per_s", "lock_wait_share", "retries_per_fault"] + [c for c, _ in PHASES]
    med = medians(rows, ("lock_mode", "overlap", "vcpus"), cols)
    vcpus = sorted({int(r["vcpus"]) for r in rows})
    overlaps = sorted({r["overlap"] for r in rows})
    mb = int(rows[0]["bytes_per_vcpu"]) >> 20
    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
    style = {"shared": "-o", "exclusive": "--s"}
    lines = []
    a = ax[0][0]
    for mode in ("shared", "exclusive"):
        for ov in overlaps:
            pts = [(v, med[(mode, ov, str(v))]["faults_per_s"]) for v in vcpus if (mode, ov, str(v)) in med]
            if pts:
                a.plot(*zip(*pts), style[mode], label=f"{mode}, {'overlapping' if ov == '1' else 'partitioned'}")
    a.set(title=f"Populate throughput ({mb} MiB per vCPU)", xlabel="vCPUs", ylabel="faults/s", xscale="log",
          ylim=(0, None))
    _ticks(a, vcpus, [str(v) for v in vcpus])
    a.legend()
    a = ax[0][1]
    for ov in overlaps:
        pts = []
        for v in vcpus:
            s, e = med.get(("shared", ov, str(v))), med.get(("exclusive", ov, str(v)))
            if s and e:
                pts.append((v, e["populate_s"] / s["populate_s"]))
        if pts:
            a.plot(*zip(*pts), "-o", label="overlapping" if ov == "1" else "partitioned")
            for v, r in pts:
                a.annotate(f"{r:.2f}x", (v, r), textcoords="offset points", xytext=(4, 4), fontsize=8)
    a.axhline(1.0, color="grey", lw=0.8)
    a.set(title="Populate time ratio exclusive / shared (>1: shared faster)", xlabel="vCPUs", ylabel="ratio",
          xscale="log")
    _ticks(a, vcpus, [str(v) for v in vcpus])
    a.legend()
    for a, ov in zip(ax[1], ["0", "1"]):
        for mode in ("shared", "exclusive"):
            for (c, label), color in zip(PHASES[:3], ("C0", "C1", "C2")):
                pts = [(v, med[(mode, ov, str(v))][c]) for v in vcpus if (mode, ov, str(v)) in med]
                if pts:
                    a.plot(*zip(*pts), style[mode], color=color, label=f"{label}, {mode}")
        a.set(title=f"Phase times, {'overlapping' if ov == '1' else 'partitioned'}", xlabel="vCPUs",
              ylabel="seconds (dirty / clear: sum of iterations)", xscale="log", yscale="log")
        _ticks(a, vcpus, [str(v) for v in vcpus])
        a.legend(fontsize=7)
    fig.suptitle("shmmmu bench dirty-log: medians per point")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    lines.append(f"{'overlap':<8}{'vCPUs':>6}{'mode':>11}{'n':>3}{'faults/s':>11}{'populate':>11}{'dirty':>10}"
                 f"{'clear':>10}{'lock wait':>10}{'retries':>9}{'ex/sh':>7}")
    for ov in overlaps:
        for v in vcpus:
            for mode in ("shared", "exclusive"):
                m = med.get((mode, ov, str(v)))
                if not m:
                    continue
                s = med.get(("shared", ov, str(v)))
                ratio = f"{m['populate_s'] / s['populate_s']:.2f}" if mode == "exclusive" and s else ""
                lines.append(f"{'yes' if ov == '1' else 'no':<8}{v:>6}{mode:>11}{m['n']:>3}{m['faults_per_s']:>11.0f}"
                             f"{m['populate_s']:>10.3f}s{m['dirty_s']:>9.3f}s{m['clear_s']:>9.3f}s"
                             f"{m['lock_wait_share']:>10.1%}{m['retries_per_fault']:>9.4f}{ratio:>7}")
    return lines


def plot_memory(rows: list[dict[str, str]], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for r in rows:                  # the vCPU's CPU time in populate: immune to the machine's other load
        r["populate_cpu_s"] = str(float(r["cpu_us_per_fault"]) * float(r["faults"]) / 1e6)
    cols = [c for c, _ in PHASES[:3]] + ["faults_per_s", "populate_cpu_s"]
    med = medians(rows, ("lock_mode", "total_bytes"), cols)
    modes = sorted({r["lock_mode"] for r in rows})
    sizes = sorted({int(r["total_bytes"]) for r in rows})
    gib = [s / (1 << 30) for s in sizes]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.8))
    lines = [f"{'mode':<10}{'memory':>9}{'n':>3}{'populate':>11}{'x prev':>8}{'pop. CPU':>10}{'x prev':>8}"
             f"{'dirty':>10}{'x prev':>8}{'clear':>10}{'x prev':>8}{'faults/s':>10}"]
    for mode in modes:
        for (c, label), color in zip(PHASES[:3], ("C0", "C1", "C2")):
            ys = [med[(mode, str(s))][c] for s in sizes]
            ax[0].plot(gib, ys, "-o", color=color, label=f"{label} ({mode})")
            ax[0].plot(gib, [ys[0] * g / gib[0] for g in gib], ":", color=color, lw=0.8)
        for c, label, mark in (("populate_s", "populate time", "-o"), ("populate_cpu_s", "populate vCPU CPU time",
                                                                        "--s")):
            pop = [med[(mode, str(s))][c] for s in sizes]
            steps = [b / a for a, b in zip(pop, pop[1:])]
            ax[1].plot(gib[1:], steps, mark, label=f"{label} ({mode})")
            for g, r in zip(gib[1:], steps):
                ax[1].annotate(f"{r:.2f}x", (g, r), textcoords="offset points", xytext=(4, 4), fontsize=8)
        prev: dict[str, float] = {}
        for s in sizes:
            m = med[(mode, str(s))]
            cells = []
            for c in ("populate_s", "populate_cpu_s", "dirty_s", "clear_s"):
                x = f"{m[c] / prev[c]:.2f}" if c in prev else ""
                cells.append(f"{m[c]:>9.3f}s{x:>8}")
                prev[c] = m[c]
            lines.append(f"{mode:<10}{_size(s):>9}{m['n']:>3}" + "".join(cells) + f"{m['faults_per_s']:>10.0f}")
    ax[0].set(title="Phase times with one vCPU (dotted: linear from the smallest)", xlabel="guest memory (GiB)",
              ylabel="seconds", xscale="log", yscale="log")
    _ticks(ax[0], gib, [_size(s) for s in sizes])
    ax[0].legend(fontsize=8)
    ax[1].axhspan(2.0, 2.3, color="green", alpha=0.15, label="target 2.0-2.3x")
    ax[1].set(title="Populate time, each doubling of memory", xlabel="guest memory (GiB)",
              ylabel="time / time at half the memory", xscale="log", ylim=(1.5, 2.8))
    _ticks(ax[1], gib[1:], [_size(s) for s in sizes[1:]])
    ax[1].set_xlim(gib[0] * 1.4, gib[-1] * 1.4)
    ax[1].legend()
    fig.suptitle("shmmmu bench dirty-log: cost over guest memory (medians)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return lines


def _ticks(a, xs: list[float], labels: list[str]) -> None:
    """Major ticks at the data points only (a log axis would add minor labels of its own)."""
    from matplotlib.ticker import NullFormatter, NullLocator
    a.set_xticks(xs, labels)
    a.xaxis.set_minor_locator(NullLocator())
    a.xaxis.set_minor_formatter(NullFormatter())


def _size(b: int) -> str:
    return f"{b / (1 << 30):g}G" if b >= 1 << 30 else f"{b >> 20}M"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", type=Path, nargs="+", help="CSV files from tools/sweep.py")
    p.add_argument("-o", "--outdir", type=Path, default=Path("."), help="where the PNGs go (default .)")
    a = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot: matplotlib is not installed: pip install -e '.[plot]'", file=sys.stderr)
        return 2
    rows = [r for f in a.csv for r in load(f) if r["result"] == "SUCCESS"]
    a.outdir.mkdir(parents=True, exist_ok=True)
    for sweep, fn in (("vcpus", plot_vcpus), ("memory", plot_memory)):
        sel = [r for r in rows if r["sweep"] == sweep]
        if sel:
            out = a.outdir / f"{sweep}.png"
            print("\n".join(fn(sel, out)))
            print(f"-> {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
