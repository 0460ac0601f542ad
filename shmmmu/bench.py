"""Bench: the kernel's dirty_log_perf_test on the emulator, the two lock modes side by side, with ratios.

`run_bench(BenchOptions, launcher)` runs the selftest's phases (shmmmu.run.drive_phases:
populate, enable dirty logging, per iteration dirty memory / get dirty log /
clear dirty log, disable dirty logging) on a fresh VM per run, in each lock mode;
with both modes they alternate (shared, exclusive, shared, ...) so a change in
the machine's load hits both alike.  Each run prints the selftest's own lines
(`Populate memory time: 1.234567890s`), then faults/s, retries per fault, lock
wait share and TLB flushes; the summary takes the median of the runs per mode
and the ratios exclusive / shared per phase.

Differences from the selftest, by design: worker processes are started before
the populate clock starts (the selftest times thread creation too, which costs
microseconds there and a Python start-up here); the default -b is 128M, not 1G.
"""
from __future__ import annotations

import os
import statistics
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from shmmmu.launch import LauncherFactory
from shmmmu.run import BACKINGS, Phase, RunOptions, RunResult, UsageError, run_vm
from shmmmu.variants import PROFILE_NAMES

MODES = ("shared", "exclusive")
# the summary's phases: key -> the selftest's wording (dirty/get/clear summed over the iterations)
SUMMARY_PHASES = {
    "populate": "Populate memory time",
    "enable": "Enabling dirty logging time",
    "dirty": "Dirty memory time",
    "get": "Get dirty log time",
    "clear": "Clear dirty log time",
    "disable": "Disabling dirty logging time",
}
DEFAULT_BYTES = 128 << 20


def fmt_ts(ns: int) -> str:
    """A duration as the selftest prints a timespec: `%ld.%.9lds`."""
    ns = max(0, int(ns))
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}s"


def new_bench_name() -> str:
    """A VM name no concurrent run uses, of the TAG-PID-HEX shape other sessions' leak guards leave alone."""
    return f"bench-{os.getpid()}-{uuid.uuid4().hex[:10]}"


@dataclass
class BenchOptions:
    vcpus: int = 1                       # -v
    bytes_per_vcpu: int = DEFAULT_BYTES  # -b
    iterations: int = 2                  # -i: dirty-memory iterations after the populate pass
    backing: str = "anonymous"           # -s
    overlap: bool = False                # -o
    write_every: int = 1                 # -f (5.13-6.1): write 1 page of every N, read the rest
    write_percent: int = -1              # -w (6.2 on): each access a write with this chance in %; -1: -f decides
    random_access: bool = False          # -a (6.2 on): pages accessed in random order
    slots: int = 1                       # -x: the memory split into this many memslots
    run_while_disabling: bool = False    # -e: vCPUs keep dirtying memory while logging is disabled
    manual_protect: bool = True          # not -g: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 + INITIALLY_SET
    lock_mode: str = "both"              # shared | exclusive | both
    repeat: int = 1                      # runs per mode; the summary takes their median
    seed: int = 1                        # -r (6.2 on; 1 is the selftest's default too)
    timeline: str = ""                   # --timeline FILE.json: every run's VM, one process each (shmmmu.trace.timeline)
    kernel: str = "5.13"                 # --kernel: a profile, or two ("5.13,6.12") side by side in one lock mode

    def kernels(self) -> list[str]:
        return [k.strip() for k in self.kernel.split(",")]

    def modes(self) -> list[str]:
        """The columns, alternated run by run: the lock modes, or with two kernels the kernels."""
        if len(self.kernels()) > 1:
            return self.kernels()
        return list(MODES) if self.lock_mode == "both" else [self.lock_mode]

    def column(self, col: str) -> tuple[str, str]:
        """(lock mode, kernel) of a column."""
        ks = self.kernels()
        return (self.lock_mode, col) if len(ks) > 1 else (col, ks[0])

    def validate(self) -> None:
        """Raise UsageError (one line) for any option the selftest or the emulator refuses."""
        if self.iterations < 2:
            raise UsageError("-i/--iterations must be at least 2 (as in the selftest)")
        if self.lock_mode not in (*MODES, "both"):
            raise UsageError(f"unknown lock mode {self.lock_mode!r}: use shared, exclusive or both")
        if self.backing not in BACKINGS:
            raise UsageError(f"unknown backing source {self.backing!r}: use anonymous, anonymous_thp, "
                             f"anonymous_hugetlb (or 4k, 2m, 1g)")
        if self.write_every < 1:
            raise UsageError("-f/--write-fraction must be at least 1 (write 1 of every N pages)")
        if not -1 <= self.write_percent <= 100:
            raise UsageError("-w/--write-percent must be between 0 and 100 (as in the selftest)")
        if self.write_percent >= 0 and self.write_every != 1:
            raise UsageError("-w and -f both given: -w PERCENT is the selftest's form since 6.2, -f N the older one; "
                             "give one")
        if self.repeat < 1:
            raise UsageError("--repeat must be at least 1")
        ks = self.kernels()
        for k in ks:
            if k not in PROFILE_NAMES:
                raise UsageError(f"unknown kernel {k!r}; known: {', '.join(PROFILE_NAMES)}")
        if len(ks) > 2 or len(set(ks)) != len(ks):
            raise UsageError("--kernel takes one profile, or two different ones (5.13,6.12)")
        if len(ks) > 1 and self.lock_mode == "both":
            raise UsageError("two kernels are compared in one lock mode: add --lock-mode shared (or exclusive)")
        self.run_options(self.modes()[0], "check").config()

    def run_options(self, col: str, name: str, parts: str = "") -> RunOptions:
        mode, kernel = self.column(col)
        return RunOptions(name=name, vcpus=self.vcpus, memory=self.bytes_per_vcpu, backing=self.backing,
                          lock_mode=mode, kernel=kernel, overlap=self.overlap, workload="dirty-log",
                          iterations=self.iterations + 1, seed=self.seed, write_every=self.write_every,
                          manual_protect=self.manual_protect, write_percent=self.write_percent,
                          random_access=self.random_access, slots=self.slots,
                          run_while_disabling=self.run_while_disabling, tracepoints=parts)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def rates(vcpus: int, populate_ns: int, populate: dict[str, int], run: dict[str, int]) -> dict[str, float]:
    """The populate pass's rates from its counter deltas (`populate`), and the run's TLB flushes (`run`).

    faults_per_s       populate faults / populate time
    retries_per_fault  populate retries / populate faults
    lock_wait_share    populate lock wait / (vCPUs x populate time): the share of the
                       vCPUs' populate time spent waiting for mmu_lock
    cpus_used          vCPU processes' CPU time / populate time: how many CPUs they had
    runq_share         vCPU processes' run-queue wait / (vCPUs x populate time): the share
                       of their time they were runnable but had no CPU (a loaded machine)
    cpu_us_per_fault   vCPU processes' CPU time / populate faults (the guest accesses included)
    handoff_us         populate lock wait / contended acquisitions: what one hand-off of mmu_lock costs
                       (a spin while the holder runs: a few µs; a sleep and wake-up: tens)
    """
    secs = populate_ns / 1e9
    faults = populate.get("faults", 0)
    cpu = populate.get("vcpu_cpu_ns", 0)
    span = vcpus * populate_ns
    return {
        "faults": float(faults),
        "faults_per_s": faults / secs if secs > 0 else 0.0,
        "retries_per_fault": populate.get("retries", 0) / faults if faults else 0.0,
        "lock_wait_share": populate.get("lock_wait_ns", 0) / span if span > 0 else 0.0,
        "lock_wait_s": populate.get("lock_wait_ns", 0) / 1e9,
        "cpus_used": cpu / populate_ns if populate_ns > 0 else 0.0,
        "runq_share": populate.get("vcpu_runq_ns", 0) / span if span > 0 else 0.0,
        "cpu_us_per_fault": cpu / faults / 1e3 if faults else 0.0,
        "handoff_us": (populate.get("lock_wait_ns", 0) / populate["lock_contended"] / 1e3
                       if populate.get("lock_contended") else 0.0),
        "tlb_flushes": float(run.get("flushes", 0)),
    }


@dataclass
class BenchRun:
    """One VM's run in one lock mode."""
    mode: str
    index: int                 # 1-based, per mode
    iterations: int
    manual_protect: bool
    vcpus: int
    gpa_offset: int
    timed: list[Phase]
    result: RunResult
    rates: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pop = self.phase("populate")[0]
        self.rates = rates(self.vcpus, pop.ns, pop.delta, self.result.stats)

    def phase(self, kind: str) -> list[Phase]:
        return [p for p in self.timed if p.kind == kind]

    def ns(self, key: str) -> int:
        """A summary phase's time (dirty, get and clear: summed over the iterations)."""
        return sum(p.ns for p in self.phase(key))

    @property
    def ok(self) -> bool:
        return self.result.ok

    def lines(self, runs_per_mode: int = 1) -> list[str]:
        """The selftest's output for this run, then the emulator's rates."""
        n = self.iterations
        out = [(f"Kernel: {self.mode}" if self.mode not in MODES else f"Lock mode: {self.mode}") + (f" (run {self.index} of {runs_per_mode})" if runs_per_mode > 1 else ""),
               "Testing guest mode: PA-bits:48, VA-bits:48,  4K pages",
               f"guest physical test memory offset: {self.gpa_offset:#x}",
               f"Populate memory time: {fmt_ts(self.phase('populate')[0].ns)}",
               f"Enabling dirty logging time: {fmt_ts(self.ns('enable'))}", ""]
        get_by_k = {p.iteration: p for p in self.phase("get")}
        clear_by_k = {p.iteration: p for p in self.phase("clear")}
        for p in self.phase("dirty"):
            i = p.iteration - 1                               # the selftest counts dirty iterations from 1
            out.append(f"Iteration {i} dirty memory time: {fmt_ts(p.ns)}")
            out.append(f"Iteration {i} get dirty log time: {fmt_ts(get_by_k[p.iteration].ns)}")
            if self.manual_protect:
                out.append(f"Iteration {i} clear dirty log time: {fmt_ts(clear_by_k[p.iteration].ns)}")
        out.append(f"Disabling dirty logging time: {fmt_ts(self.ns('disable'))}")
        get = self.ns("get")
        out.append(f"Get dirty log over {n} iterations took {fmt_ts(get)}. (Avg {fmt_ts(get // n)}/iteration)")
        if self.manual_protect:
            clr = self.ns("clear")
            out.append(f"Clear dirty log over {n} iterations took {fmt_ts(clr)}. "
                       f"(Avg {fmt_ts(clr // n)}/iteration)")
        r = self.rates
        out += [f"Populate faults/s: {r['faults_per_s']:.0f} ({r['faults']:.0f} faults)",
                f"Populate retries per fault: {r['retries_per_fault']:.4f}",
                f"Populate lock wait share: {100 * r['lock_wait_share']:.1f}% "
                f"({r['lock_wait_s']:.3f}s waited / ({self.vcpus} vCPUs x "
                f"{self.phase('populate')[0].ns / 1e9:.3f}s)); hand-off {r['handoff_us']:.1f} us per contended "
                f"acquisition",
                f"Populate vCPU CPU time: {r['cpus_used']:.2f} CPUs, {r['cpu_us_per_fault']:.1f} us per fault; "
                f"run-queue wait share {100 * r['runq_share']:.1f}%",
                f"TLB flushes: {r['tlb_flushes']:.0f}"]
        for p in self.result.problems + self.result.violations:
            out.append(f"!!! {p}")
        out.append(f"Result: {'SUCCESS' if self.ok else 'FAILURE'}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"lock_mode": self.mode, "run": self.index,
                "phases": [{"phase": p.kind, "iteration": p.iteration - 1 if p.kind in ("dirty", "get", "clear")
                            else 0, "seconds": p.seconds, "faults": p.delta.get("faults", 0),
                            "fixed": p.delta.get("fixed", 0),
                            "flushes": p.delta.get("flushes", 0)} for p in self.timed],
                "totals": {k: self.ns(k) / 1e9 for k in SUMMARY_PHASES},
                "rates": self.rates, "stats": self.result.stats, "problems": self.result.problems,
                "violations": self.result.violations, "result": "SUCCESS" if self.ok else "FAILURE",
                "wall_s": self.result.wall_s}


@dataclass
class BenchResult:
    options: BenchOptions
    runs: list[BenchRun]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.runs)

    def medians(self) -> dict[str, dict[str, float]]:
        """Per mode: the median over its runs of each summary phase (seconds) and each rate."""
        out: dict[str, dict[str, float]] = {}
        for mode in self.options.modes():
            rs = [r for r in self.runs if r.mode == mode]
            if not rs:
                continue
            m = {k: statistics.median(r.ns(k) for r in rs) / 1e9 for k in SUMMARY_PHASES}
            for k in rs[0].rates:
                m[k] = statistics.median(r.rates[k] for r in rs)
            out[mode] = m
        return out

    def ratio_columns(self) -> tuple[str, str] | None:
        """(numerator, denominator) of the ratio column: exclusive/shared, or the first kernel over the second."""
        med = self.medians()
        ks = self.options.kernels()
        if len(ks) > 1:
            return (ks[0], ks[1]) if set(med) == set(ks) else None
        return ("exclusive", "shared") if set(med) == set(MODES) else None

    def ratios(self) -> dict[str, float]:
        """exclusive / shared (or 5.13 / 6.12) of each summary phase's median time (> 1: the second is faster)."""
        med = self.medians()
        cols = self.ratio_columns()
        if cols is None:
            return {}
        a, b = cols
        return {k: med[a][k] / med[b][k] if med[b][k] > 0 else float("nan")
                for k in SUMMARY_PHASES if k != "clear" or self.options.manual_protect}

    def summary_lines(self) -> list[str]:
        med = self.medians()
        modes = list(med)
        n = self.options.repeat
        ratios = self.ratios()
        it = self.options.iterations
        head = (f"Summary: median of {n} runs per mode" if n > 1 else "Summary")
        if len(modes) > 1:
            head += f" (alternated: {', '.join(modes)}, ... in one invocation)"
        out = [head + ":"]
        w = 40
        cols = self.ratio_columns()
        out.append(f"{'':<{w}}" + "".join(f"{m:>16}" for m in modes) + (f"  {cols[0]}/{cols[1]}" if ratios else ""))
        for k, label in SUMMARY_PHASES.items():
            if k == "clear" and not self.options.manual_protect:
                continue
            if k in ("dirty", "get", "clear"):
                label += f" ({it} iterations)"
            row = f"{label:<{w}}" + "".join(f"{fmt_ts(round(med[m][k] * 1e9)):>16}" for m in modes)
            if ratios:
                row += f"  {ratios[k]:>15.2f}x"
            out.append(row)
        for k, label, fmt in (("faults_per_s", "Populate faults/s", "{:.0f}"),
                              ("retries_per_fault", "Populate retries per fault", "{:.4f}"),
                              ("lock_wait_share", "Populate lock wait share", "{:.1%}"),
                              ("handoff_us", "Populate lock hand-off us (contended)", "{:.1f}"),
                              ("cpus_used", "Populate CPUs used by vCPUs", "{:.2f}"),
                              ("cpu_us_per_fault", "Populate vCPU CPU us per fault", "{:.1f}"),
                              ("runq_share", "Populate run-queue wait share", "{:.1%}"),
                              ("tlb_flushes", "TLB flushes", "{:.0f}")):
            out.append(f"{label:<{w}}" + "".join(f"{fmt.format(med[m][k]):>16}" for m in modes))
        if ratios and cols == ("exclusive", "shared"):
            out.append(f"Populate ratio exclusive/shared: {ratios['populate']:.2f}x "
                       f"(shared mode populates {ratios['populate']:.2f} times as fast"
                       + (f"; median of {n} runs per mode)" if n > 1 else ")"))
            bound = min(self.options.vcpus, os.cpu_count() or 1)
            if ratios["populate"] > bound:
                # serialising v vCPUs on c CPUs costs at most min(v, c) times their parallel run: the rest is
                # the lock's hand-off or the machine's other load, not the series' parallelism
                out.append(f"Note: the ratio is above the serialisation bound ({bound}.0x for "
                           f"{self.options.vcpus} vCPUs on {os.cpu_count()} CPUs): a measurement artefact (lock "
                           f"hand-off {med['exclusive']['handoff_us']:.1f} us, run-queue wait "
                           f"{med['exclusive']['runq_share']:.0%}), not the series' gain")
        out.append(f"Result: {'SUCCESS' if self.ok else 'FAILURE'}")
        return out

    def to_json(self) -> dict[str, Any]:
        r = self.ratios()
        return {"options": self.options.to_json(), "runs": [x.to_json() for x in self.runs],
                "median": self.medians(), "ratios": r, "populate_ratio": r.get("populate"),
                "result": "SUCCESS" if self.ok else "FAILURE"}


def run_bench(opts: BenchOptions, launcher: LauncherFactory,
              on_run: Callable[[BenchRun], None] | None = None) -> BenchResult:
    """Run every mode `repeat` times, alternating modes; `on_run` sees each run as it ends."""
    from contextlib import ExitStack

    from shmmmu.mmu.tracepoints import tracepoint_parts
    opts.validate()
    runs: list[BenchRun] = []
    with ExitStack() as stack:
        parts = stack.enter_context(tracepoint_parts(None, opts.timeline)) if opts.timeline else ""
        for i in range(1, opts.repeat + 1):
            for mode in opts.modes():
                runs.append(_one_run(opts, mode, i, parts, launcher, on_run))
    return BenchResult(opts, runs)


def _one_run(opts: BenchOptions, mode: str, i: int, parts: str, launcher: LauncherFactory,
             on_run: Callable[[BenchRun], None] | None) -> BenchRun:
    """One VM's run in one lock mode, its workers' timeline parts (if any) in `parts`."""
    ro = opts.run_options(mode, new_bench_name(), parts)
    gpa = ro.config().memslots[0].base_gfn * 4096
    result = run_vm(ro, launcher)
    run = BenchRun(mode=mode, index=i, iterations=opts.iterations, manual_protect=opts.manual_protect,
                   vcpus=opts.vcpus, gpa_offset=gpa, timed=result.timed, result=result)
    if on_run is not None:
        on_run(run)
    return run
