"""Torture: locktorture for the MMU RWLock and rcutorture's Reader Pipe for RCU: the runs' configuration and reports.

Two programs, each run by a parent (workers/torture.py, `shmmmu torture
lock|rcu`) that creates a small region of its own, starts N worker processes
that attach to the region by name, lets them run for a duration, stops them and
prints a report in the manner of the kernel's torture tests (PRIOR_ART A.1-A.3,
docs/locks.md):

- **lock torture** (locktorture): writers take the MMU lock for write and
  check that no reader and no other writer is inside; readers take it for read
  and check that no writer is inside, and record how many readers are inside at
  once.  Hold times are random with occasional long holds, during which
  holders call `cond_resched_read/write`.  `busted=True` uses RWLock's
  lock_busted (writers barge in beside readers): the negative control, which
  must end in FAILURE.
- **RCU torture** (rcutorture's Reader Pipe, liburcu's poison check): writers
  replace the "current" table with a freshly allocated one and retire the old
  one with `call_rcu`; a reclaimer process frees retired tables after a grace
  period (`Rcu.reclaim_pass`); readers follow the current pointer inside a read
  section, check the table's contents (freed tables are poisoned) and record
  the table's age (`rcu.pipe_age`) in a histogram.  Any count past bucket 1, any
  poisoned or recycled read, and a non-zero leak equation is a FAILURE.
  `grace_period=False` runs the reclaimer with `wait_for_gp=False`: the
  negative control.

The torture region is a VM region without memslots.  Nothing runs an MMU in
it, so the torture uses parts of it for itself (layout.TortureCtl: row
ROOT_TABLE of the tables section is the control block; layout.TortureStat:
each worker's row of the stats section holds its counters), and the pipe
section holds the Reader-Pipe histograms.  Worker slots: 0..N-1 the torture
workers, N the parent, N+1 the reclaimer.

Each process draws from `random.Random(f"{seed}:{program}:{worker}")`, so the
same seed, worker counts and roles replay the same random streams.
`check_options` is what the command checks before a torture run starts.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from shmmmu import validate as V
from shmmmu.layout import PIPE_LEN, ROOT_TABLE, TableState, TMeta, VMConfig, WState
from shmmmu.region import Region

if TYPE_CHECKING:
    from shmmmu.pool import Pool

# ---- RCU torture: the current pointer names (update number, table); every entry of the table holds
# tag(update): bits 0-11 clear (a non-present entry, like POISON, so the pool's debug checks see no live entry)
PTR_TABLE_BITS = 20
PTR_TABLE_MASK = (1 << PTR_TABLE_BITS) - 1
TAG = 0x5E << 56


def tag(seq: int) -> int:
    """The value every entry of the table published by update `seq` holds (seq < 2**44)."""
    return TAG | (seq << 12)


def torture_rng(seed: int, program: str, worker: int) -> random.Random:
    return random.Random(f"{seed}:{program}:{worker}")


def fmt_ms(ns: int) -> str:
    return f"{ns / 1e6:.2f} ms"


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


MAX_PROCS = 64          # readers and writers each: past this it measures the scheduler, not the lock


def check_options(program: str, readers: int, writers: int, duration: float, seed: int | None) -> None:
    """`shmmmu torture lock|rcu`'s numbers, checked before anything starts (UsageError: the one line to say)."""
    V.seconds(duration, "--duration", lo=0.1)        # shorter: a writer may never get its turn
    if seed is not None:
        V.seed(seed)
    V.count(readers, "--readers", 0, MAX_PROCS)
    V.count(writers, "--writers", 1, MAX_PROCS)
    if program == "lock" and (writers < 1 or readers < 0):
        raise V.UsageError("lock torture needs at least one writer and no negative reader count")
    if program == "rcu" and (writers < 1 or readers < 1):
        raise V.UsageError("RCU torture needs at least one reader and one writer")


def torture_config(name: str, n_workers: int, *, debug: bool = False, n_tables: int = 0,
                   seed: int = 0) -> VMConfig:
    """The configuration of a torture region: N worker slots, the parent, the reclaimer; no memslots."""
    cache_capacity = 8
    if n_tables == 0:
        n_tables = 128 + (n_workers + 2) * cache_capacity
    return VMConfig(name=name, n_vcpus=n_workers, n_host=2, memslots=[], n_tables=n_tables, debug=debug,
                    cache_capacity=cache_capacity, cache_min=2, seed=seed)


def dead_workers(region: Region) -> list[tuple[int, int]]:
    """(worker, pid) of every worker slot whose recorded pid is no longer a live process (reaped)."""
    pids = region.columns("wstate", WState).pid
    out = []
    for k in range(pids.rows):
        pid = pids.load(k)
        if pid == 0 or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            out.append((k, pid))
        except PermissionError:
            pass
    return out


# ====================================================================== results


def max_min_line(label: str, counts: Sequence[int], fails: int) -> str:
    """locktorture's line: `Writes:  Total: N  Max/Min: a/b  Fail: f`, ??? when max > 2*min, !!! on failure."""
    total = sum(counts)
    mx, mn = (max(counts), min(counts)) if counts else (0, 0)
    line = f"{label + ':':8s} Total: {total}  Max/Min: {mx}/{mn}  Fail: {fails}"
    if mx > 2 * mn:
        line += " ???"
    if fails:
        line += " !!!"
    return line


@dataclass
class LockTortureResult:
    """What one lock-torture run saw; `report()` prints it locktorture's way."""

    seed: int
    nreaders: int
    nwriters: int
    duration: float
    busted: bool
    write_counts: list[int] = field(default_factory=list)
    read_counts: list[int] = field(default_factory=list)
    write_fails: int = 0
    read_fails: int = 0
    max_readers: int = 0
    longest_wait_ns: int = 0
    contended: int = 0
    needbreak_seen: int = 0
    yields: int = 0
    long_holds: int = 0
    elapsed: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        out = list(self.errors)
        if self.write_fails:
            out.append(f"{self.write_fails} writer checks found another holder inside")
        if self.read_fails:
            out.append(f"{self.read_fails} reader checks found a writer inside")
        for k, n in enumerate(self.write_counts):
            if n == 0:
                out.append(f"writer {k} made no progress")
        if self.nreaders >= 2 and self.max_readers < 2 and sum(self.read_counts):
            out.append("readers never overlapped (max concurrent readers < 2)")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def report(self) -> str:
        lines = [f"lock-torture: mmu_lock{' (lock_busted)' if self.busted else ''}  nreaders {self.nreaders}  "
                 f"nwriters {self.nwriters}  duration {self.duration:g}s  seed {self.seed}",
                 max_min_line("Writes", self.write_counts, self.write_fails)]
        if self.nreaders:
            lines.append(max_min_line("Reads", self.read_counts, self.read_fails))
        rate = (sum(self.write_counts) + sum(self.read_counts)) / self.elapsed if self.elapsed else 0.0
        lines.append(f"Max concurrent readers: {self.max_readers}  Longest wait: {fmt_ms(self.longest_wait_ns)}  "
                     f"Contended: {self.contended}  ({rate:.0f} acquisitions/s)")
        lines.append(f"Long holds: {self.long_holds}  needbreak seen: {self.needbreak_seen}  "
                     f"cond_resched yields: {self.yields}")
        for f in self.failures:
            lines.append(f"!!! {f}")
        lines.append("SUCCESS" if self.ok else f"FAILURE (seed {self.seed})")
        return "\n".join(lines)


@dataclass
class RcuTortureResult:
    """What one RCU-torture run saw; `report()` prints it rcutorture's way."""

    seed: int
    nreaders: int
    nwriters: int
    duration: float
    grace_period: bool
    pipe: list[int] = field(default_factory=lambda: [0] * PIPE_LEN)
    read_counts: list[int] = field(default_factory=list)
    update_counts: list[int] = field(default_factory=list)
    poison_reads: int = 0
    stale_reads: int = 0
    alloc_fails: int = 0
    grace_periods: int = 0
    gp_max_ns: int = 0
    backlog_max: int = 0
    allocated: int = 0
    freed: int = 0
    reachable: int = 0
    pending: int = 0
    census: dict[str, int] = field(default_factory=dict)
    census_ok: bool = True
    elapsed: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def leak(self) -> int:
        return self.allocated - self.freed - self.reachable - self.pending

    @property
    def failures(self) -> list[str]:
        out = list(self.errors)
        late = sum(self.pipe[2:])
        if late:
            out.append(f"{late} reads of a table older than one grace period (Reader Pipe past bucket 1)")
        if self.poison_reads:
            out.append(f"{self.poison_reads} reads of a poisoned (freed) table")
        if self.stale_reads:
            out.append(f"{self.stale_reads} reads of a recycled table (contents of another update)")
        if self.leak:
            out.append(f"leak equation is {self.leak}, not 0")
        if not self.census_ok:
            out.append(f"table census does not add up: {self.census}")
        for k, n in enumerate(self.update_counts):
            if n == 0:
                out.append(f"writer {k} made no progress")
        if self.grace_period and self.pending and self.grace_periods == 0:
            out.append("no grace period completed")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def report(self) -> str:
        bad = sum(self.pipe[2:]) or self.poison_reads or self.stale_reads
        el = self.elapsed or 1.0
        reads, updates = sum(self.read_counts), sum(self.update_counts)
        lines = [f"rcu-torture: nreaders {self.nreaders}  nwriters {self.nwriters}  reclaimer 1 "
                 f"({'waits for grace periods' if self.grace_period else 'wait_for_gp=False'})  "
                 f"duration {self.duration:g}s  seed {self.seed}",
                 f"Reads: {reads}  Updates: {updates}  Alloc-fail: {self.alloc_fails}  "
                 f"Poison reads: {self.poison_reads}  Stale reads: {self.stale_reads}" + (" !!!" if bad else ""),
                 "Reader Pipe: " + " ".join(str(x) for x in self.pipe) + (" !!!" if sum(self.pipe[2:]) else ""),
                 f"Grace periods: {self.grace_periods} ({self.grace_periods / el:.1f}/s)  "
                 f"longest {fmt_ms(self.gp_max_ns)}  largest retire backlog {self.backlog_max}",
                 f"Leak: allocated {self.allocated} - freed {self.freed} - reachable {self.reachable} "
                 f"- pending {self.pending} = {self.leak}" + (" !!!" if self.leak else ""),
                 "Tables: " + ", ".join(f"{v} {k}" for k, v in self.census.items())]
        for f in self.failures:
            lines.append(f"!!! {f}")
        lines.append("SUCCESS" if self.ok else f"FAILURE (seed {self.seed})")
        return "\n".join(lines)


def census(region: Region, config: VMConfig, pool: "Pool", pending: int) -> tuple[dict[str, int], bool]:
    """Count every table but the control row by state; it must match the free stack, caches and backlog."""
    states = region.array("tmeta")[:, TMeta.STATE].copy()
    states[ROOT_TABLE] = 0xFFFF
    counts = {TableState.NAMES[s]: int((states == s).sum()) for s in TableState.NAMES}
    ws = region.array("wstate")
    cached = int(ws[:, WState.CACHE_COUNT].sum())
    ok = (sum(counts.values()) == config.n_tables - 1 and counts["free"] == pool.free_count()
          and counts["cached"] == cached and counts["live"] == 1 and counts["retired"] == pending)
    return counts, ok


