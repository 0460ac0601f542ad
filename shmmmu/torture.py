"""Torture: locktorture for the MMU RWLock and rcutorture's Reader Pipe for RCU, as real processes from a seed.

Two programs, each run by a parent (`run_lock_torture`, `run_rcu_torture`, or
`python -m shmmmu.torture lock|rcu ...`) that creates a small region of its
own, starts N worker processes (`python -m shmmmu.torture worker ...`, which
attach to the region by name), lets them run for a duration, stops them and
prints a report in the manner of the kernel's torture tests
(shared/PRIOR_ART.md A.1-A.3):

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
it, so the torture uses parts of it for itself: row ROOT_TABLE of the tables
section is the control block (`TC_*` words: start barrier, stop flag, the
"inside" counters, the current pointer), each worker's row of the stats section
holds its counters (`TR_*`), and the pipe section holds the Reader-Pipe
histograms.  Worker slots: 0..N-1 the torture workers, N the parent, N+1 the
reclaimer.

Each process draws from `random.Random(f"{seed}:{program}:{worker}")`, so the
same seed, worker counts and roles replay the same random streams.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Callable, Sequence

from shmmmu.layout import (C_EPOCH, C_GP_COUNT, LINE, MMU_LOCK, PIPE_LEN, ROLE_HOST, ROLE_RECLAIMER, ROLE_VCPU,
                           ROOT_TABLE, TMETA_WORDS, T_RETIRE_EPOCH, T_STATE, TABLE_STATE_NAMES, TS_CACHED, TS_FREE,
                           TS_LIVE, TS_RETIRED, W_CACHE_COUNT, W_PID, W_RCU, WSTATE_WORDS, VMConfig)
from shmmmu.region import Region
from shmmmu.rwlock import RWLock
from shmmmu.spawn import python_module_command, worker_env

if TYPE_CHECKING:
    from shmmmu.pool import Pool

MASK64 = (1 << 64) - 1
MINUS_ONE = MASK64

# ---- control block: words of table row ROOT_TABLE, each on its own cache line
(TC_READY, TC_GO, TC_STOP, TC_WRITERS_IN, TC_READERS_IN, TC_READERS_MAX, TC_CURRENT, TC_HOLDING) = [
    k * LINE for k in range(8)]

# ---- per-worker counters: words of the worker's stats row
(TR_OPS, TR_FAIL, TR_WAIT_MAX_NS, TR_WAIT_NS, TR_CONTENDED, TR_NEEDBREAK, TR_YIELDS, TR_MAX_READERS,
 TR_LONG_HOLDS, TR_POISON, TR_STALE, TR_ALLOCATED, TR_FREED, TR_ALLOC_FAIL, TR_DONE, TR_FAIL_WRITER,
 TR_FAIL_READER, TR_GP_TIMEOUTS) = range(18)

# ---- RCU torture: the current pointer names (update number, table); every entry of the table holds
# tag(update): bits 0-11 clear (a non-present entry, like POISON, so the pool's debug checks see no live entry)
PTR_TABLE_BITS = 20
PTR_TABLE_MASK = (1 << PTR_TABLE_BITS) - 1
TAG = 0x5E << 56


def tag(seq: int) -> int:
    """The value every entry of the table published by update `seq` holds (seq < 2**44)."""
    return TAG | (seq << 12)

START_TIMEOUT = 60.0     # seconds for every worker to attach (2 cores, 9 interpreters importing numpy)
STOP_TIMEOUT = 15.0      # seconds for every worker to finish after the stop flag


def _rng(seed: int, program: str, worker: int) -> random.Random:
    return random.Random(f"{seed}:{program}:{worker}")


def _fmt_ms(ns: int) -> str:
    return f"{ns / 1e6:.2f} ms"


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


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
    ws = region.words("wstate")
    out = []
    for k in range(region.array("wstate").shape[0]):
        pid = ws.load(k * WSTATE_WORDS + W_PID)
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


def _max_min_line(label: str, counts: Sequence[int], fails: int) -> str:
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
                 _max_min_line("Writes", self.write_counts, self.write_fails)]
        if self.nreaders:
            lines.append(_max_min_line("Reads", self.read_counts, self.read_fails))
        rate = (sum(self.write_counts) + sum(self.read_counts)) / self.elapsed if self.elapsed else 0.0
        lines.append(f"Max concurrent readers: {self.max_readers}  Longest wait: {_fmt_ms(self.longest_wait_ns)}  "
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
                 f"longest {_fmt_ms(self.gp_max_ns)}  largest retire backlog {self.backlog_max}",
                 f"Leak: allocated {self.allocated} - freed {self.freed} - reachable {self.reachable} "
                 f"- pending {self.pending} = {self.leak}" + (" !!!" if self.leak else ""),
                 "Tables: " + ", ".join(f"{v} {k}" for k, v in self.census.items())]
        for f in self.failures:
            lines.append(f"!!! {f}")
        lines.append("SUCCESS" if self.ok else f"FAILURE (seed {self.seed})")
        return "\n".join(lines)


# ====================================================================== the parent


class _Run:
    """The parent's side of one torture run: the region, the worker processes, start and stop."""

    def __init__(self, program: str, n_workers: int, config: VMConfig):
        self.program = program
        self.config = config
        from shmmmu.vm import create_region
        self.region = create_region(config)
        self.procs: list[tuple[int, subprocess.Popen, IO[str]]] = []
        self.reported: set[int] = set()        # workers whose early exit is already an error
        self.ctl = self.region.words("tables")     # row ROOT_TABLE is the control block
        self.stats = self.region.words("stats")
        self.nstats = self.region.array("stats").shape[1]
        self.ws = self.region.words("wstate")
        self.errors: list[str] = []
        self.parent = config.host_worker
        self.ws.store(self.parent * WSTATE_WORDS + W_PID, os.getpid())
        self.t_go = 0.0
        self.t_stop = 0.0

    def stat(self, worker: int, idx: int) -> int:
        return self.stats.load(worker * self.nstats + idx)

    def spawn(self, worker: int, args: list[str]) -> None:
        err = tempfile.TemporaryFile(mode="w+")
        cmd = python_module_command("shmmmu.torture", "worker", self.program, "--region", self.config.name,
                                    "--worker", str(worker), *args)
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=worker_env())
        self.procs.append((worker, p, err))

    def start(self) -> None:
        """Wait until every worker has attached, then open the start barrier."""
        deadline = time.monotonic() + START_TIMEOUT
        while self.ctl.load(TC_READY) < len(self.procs):
            if self._check_exits(early=True):
                break
            if time.monotonic() > deadline:
                self.errors.append(f"workers did not attach within {START_TIMEOUT:.0f}s")
                break
            time.sleep(0.005)
        self.t_go = time.monotonic()
        self.ctl.store(TC_GO, 1)

    def run_for(self, duration: float, on_dead: Callable[[int], None] | None = None) -> None:
        """Let the workers run; a worker that dies early is a failure, and its holds are recovered."""
        end = self.t_go + duration
        while time.monotonic() < end and not self.errors:
            if self._check_exits(early=True, on_dead=on_dead):
                break
            time.sleep(min(0.02, max(0.0, end - time.monotonic())))
        self.t_stop = time.monotonic()
        self.ctl.store(TC_STOP, 1)

    def _check_exits(self, early: bool, on_dead: Callable[[int], None] | None = None) -> bool:
        found = False
        for k, p, err in self.procs:
            rc = p.poll()
            if rc is not None and early and k not in self.reported:
                self.reported.add(k)
                self.errors.append(f"worker {k} (pid {p.pid}) exited early with {_rc_text(rc)}{_tail(err)}")
                if on_dead is not None:
                    on_dead(k)
                found = True
        return found

    def join(self, on_dead: Callable[[int], None] | None = None) -> None:
        """Wait for every worker to finish; kill (and recover) those that do not."""
        deadline = time.monotonic() + STOP_TIMEOUT
        for k, p, err in self.procs:
            try:
                rc = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
                self.errors.append(f"worker {k} (pid {p.pid}) did not stop within {STOP_TIMEOUT:.0f}s "
                                   f"(killed){_tail(err)}")
                if on_dead is not None:
                    on_dead(k)
                continue
            if k in self.reported:
                continue
            if rc != 0:
                self.errors.append(f"worker {k} (pid {p.pid}) exited with {_rc_text(rc)}{_tail(err)}")
                if on_dead is not None:
                    on_dead(k)
            elif not self.stat(k, TR_DONE):
                self.errors.append(f"worker {k} (pid {p.pid}) exited without finishing")

    def close(self) -> None:
        for _, p, err in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()
        self.procs = []
        self.region.close()
        self.region.unlink()


def _rc_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


def _tail(err: IO[str]) -> str:
    try:
        err.seek(0)
        text = err.read().strip()
    except (OSError, ValueError):
        return ""
    if not text:
        return ""
    return ": " + " | ".join(text.splitlines()[-3:])


def _region_name(program: str) -> str:
    return f"torture-{program}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def run_lock_torture(nreaders: int = 2, nwriters: int = 2, duration: float = 2.0, seed: int | None = None,
                     busted: bool = False) -> LockTortureResult:
    """Run lock torture: `nreaders` + `nwriters` processes on one MMU RWLock for `duration` seconds."""
    if nwriters < 1 or nreaders < 0:
        raise ValueError("lock torture needs at least one writer")
    seed = new_seed() if seed is None else seed
    n = nreaders + nwriters
    config = torture_config(_region_name("lock"), n, seed=seed)
    res = LockTortureResult(seed=seed, nreaders=nreaders, nwriters=nwriters, duration=duration, busted=busted)
    run = _Run("lock", n, config)
    try:
        lock = RWLock(run.region, MMU_LOCK, run.parent)

        def on_dead(k: int) -> None:
            for line in lock.recover(k):
                run.errors.append(f"recovered: {line}")

        common = ["--seed", str(seed), *(["--busted"] if busted else [])]
        for k in range(n):
            run.spawn(k, ["--role", "writer" if k < nwriters else "reader", *common])
        run.start()
        run.run_for(duration, on_dead)
        run.join(on_dead)
        res.elapsed = max(1e-9, run.t_stop - run.t_go)
        for k in range(n):
            ops = run.stat(k, TR_OPS)
            if k < nwriters:
                res.write_counts.append(ops)
                res.write_fails += run.stat(k, TR_FAIL)
            else:
                res.read_counts.append(ops)
                res.read_fails += run.stat(k, TR_FAIL)
            res.longest_wait_ns = max(res.longest_wait_ns, run.stat(k, TR_WAIT_MAX_NS))
            res.contended += run.stat(k, TR_CONTENDED)
            res.needbreak_seen += run.stat(k, TR_NEEDBREAK)
            res.yields += run.stat(k, TR_YIELDS)
            res.long_holds += run.stat(k, TR_LONG_HOLDS)
        res.max_readers = run.ctl.load(TC_READERS_MAX)
        st = lock.state()
        if not busted and (st["readers"] or st["write_locked"] or st["writer_waiting"] or st["queue"]):
            run.errors.append(f"the lock is not free after the run: {st}")
        res.errors = run.errors
    finally:
        run.close()
    return res


def run_rcu_torture(nreaders: int = 2, nwriters: int = 1, duration: float = 2.0, seed: int | None = None,
                    grace_period: bool = True, n_tables: int = 0) -> RcuTortureResult:
    """Run RCU torture: `nreaders` + `nwriters` processes and a reclaimer for `duration` seconds."""
    if nwriters < 1 or nreaders < 1:
        raise ValueError("RCU torture needs at least one reader and one writer")
    seed = new_seed() if seed is None else seed
    n = nreaders + nwriters
    config = torture_config(_region_name("rcu"), n, debug=True, n_tables=n_tables, seed=seed)
    res = RcuTortureResult(seed=seed, nreaders=nreaders, nwriters=nwriters, duration=duration,
                           grace_period=grace_period)
    run = _Run("rcu", n, config)
    try:
        from shmmmu.pool import Pool
        from shmmmu.rcu import Rcu
        config = config.derived()
        pool = Pool(run.region, run.parent, config)
        pool.init_all_free()
        rcu = Rcu(run.region, run.parent)
        # the first current table, allocated by the parent
        pool.topup()
        first = pool.alloc(1, 0)
        run.region.array("tables")[first, :] = tag(0)
        run.ctl.store(TC_CURRENT, first)
        res.allocated = 1

        def on_dead(k: int) -> None:
            for line in rcu.recover(k):
                run.errors.append(f"recovered: {line}")

        common = ["--seed", str(seed), *([] if grace_period else ["--no-gp"])]
        for k in range(n):
            run.spawn(k, ["--role", "writer" if k < nwriters else "reader", *common])
        reclaimer = config.reclaimer_worker
        run.spawn(reclaimer, ["--role", "reclaimer", "--nworkers", str(n), *common])
        run.start()
        run.run_for(duration, on_dead)
        run.join(on_dead)
        res.elapsed = max(1e-9, run.t_stop - run.t_go)
        pipe = run.region.array("pipe")
        for k in range(n):
            if k < nwriters:
                res.update_counts.append(run.stat(k, TR_OPS))
                res.allocated += run.stat(k, TR_ALLOCATED)
                res.alloc_fails += run.stat(k, TR_ALLOC_FAIL)
            else:
                res.read_counts.append(run.stat(k, TR_OPS))
                res.poison_reads += run.stat(k, TR_POISON)
                res.stale_reads += run.stat(k, TR_STALE)
        res.pipe = [int(x) for x in pipe.sum(axis=0)]
        res.freed = run.stat(reclaimer, TR_FREED)
        st = rcu.stats()
        res.grace_periods, res.gp_max_ns = st["grace_periods"], st["gp_max_ns"]
        res.backlog_max, res.pending = st["backlog_max"], st["backlog"]
        res.reachable = 1
        res.census, res.census_ok = _census(run.region, config, pool, res.pending)
        res.errors = run.errors
    finally:
        run.close()
    return res


def _census(region: Region, config: VMConfig, pool: "Pool", pending: int) -> tuple[dict[str, int], bool]:
    """Count every table but the control row by state; it must match the free stack, caches and backlog."""
    states = region.array("tmeta")[:, T_STATE].copy()
    states[ROOT_TABLE] = 0xFFFF
    census = {TABLE_STATE_NAMES[s]: int((states == s).sum()) for s in (TS_FREE, TS_CACHED, TS_LIVE, TS_RETIRED)}
    ws = region.array("wstate")
    cached = int(ws[:, W_CACHE_COUNT].sum())
    ok = (sum(census.values()) == config.n_tables - 1 and census["free"] == pool.free_count()
          and census["cached"] == cached and census["live"] == 1 and census["retired"] == pending)
    return census, ok


# ====================================================================== the workers


class _Worker:
    def __init__(self, program: str, region_name: str, worker: int, seed: int, role: int):
        self.region = Region.attach(region_name)
        from shmmmu.vm import VM
        self.vm = VM(self.region)
        self.vm.register(worker, role)
        self.config = VMConfig.from_json(self.region.config)
        self.k = worker
        self.rng = _rng(seed, program, worker)
        self.ctl = self.region.words("tables")
        self.st = self.region.words("stats")
        self.row = worker * self.region.array("stats").shape[1]
        self.parent = os.getppid()
        self.polls = 0

    def put(self, idx: int, value: int) -> None:
        self.st.store(self.row + idx, value)

    def add(self, idx: int, delta: int = 1) -> None:
        self.st.fetch_add(self.row + idx, delta)

    def wait_go(self) -> None:
        self.ctl.fetch_add(TC_READY, 1)
        while not self.ctl.load(TC_GO):
            if os.getppid() != self.parent:
                raise SystemExit("torture worker: the parent died before the start")
            time.sleep(0.001)

    def stopped(self) -> bool:
        """The stop flag is up, or the parent died (then nobody would ever raise it)."""
        self.polls += 1
        if self.polls & 255 == 0 and os.getppid() != self.parent:
            return True
        return self.ctl.load(TC_STOP) != 0

    def finish(self) -> None:
        self.put(TR_DONE, 1)
        self.vm.close()


def _spin_us(us: float) -> None:
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def _cas_max(w, idx: int, value: int) -> None:
    while True:
        cur = w.load(idx)
        if value <= cur or w.cas(idx, cur, value) == cur:
            return


def lock_worker(region_name: str, worker: int, seed: int, role: str, busted: bool = False) -> None:
    """One locktorture thread: `role` is writer or reader."""
    me = _Worker("lock", region_name, worker, seed, ROLE_VCPU)
    lock = RWLock(me.region, MMU_LOCK, worker, busted=busted)
    rng, ctl = me.rng, me.ctl
    writer = role == "writer"
    ops = fails = wait_max = long_holds = max_readers = 0

    def check() -> int:
        """Who else is inside?  Writers: nobody; readers: no writer."""
        if writer:
            return int(ctl.load(TC_WRITERS_IN) != 1 or ctl.load(TC_READERS_IN) != 0)
        return int(ctl.load(TC_WRITERS_IN) != 0)

    def enter() -> int:
        nonlocal max_readers
        if writer:
            return int(ctl.fetch_add(TC_WRITERS_IN, 1) != 0) + check()
        n = ctl.fetch_add(TC_READERS_IN, 1) + 1
        if n > max_readers:
            max_readers = n
            _cas_max(ctl, TC_READERS_MAX, n)
        return check()

    def leave() -> None:
        ctl.fetch_add(TC_WRITERS_IN if writer else TC_READERS_IN, MINUS_ONE)

    lock_fn, unlock_fn = (lock.write_lock, lock.write_unlock) if writer else (lock.read_lock, lock.read_unlock)
    resched = lock.cond_resched_write if writer else lock.cond_resched_read
    # odds and lengths: writers hold briefly and rarely long; readers hold longer so that they overlap
    p_long = 1 / 100 if writer else 1 / 40
    short_us = 20 if writer else 60
    me.wait_go()
    while not me.stopped():
        t0 = time.monotonic_ns()
        lock_fn()
        dt = time.monotonic_ns() - t0
        if dt > wait_max:
            wait_max = dt
        fails += enter()
        if rng.random() < p_long:
            # a long hold: a range operation that yields when someone waits (cond_resched_*)
            long_holds += 1
            for _ in range(rng.randint(2, 6)):
                time.sleep(0.0005)
                fails += check()
                leave()                   # resched may drop the lock: we are not inside meanwhile
                resched()
                fails += enter()
        else:
            _spin_us(rng.random() * short_us)
        fails += check()
        leave()
        unlock_fn()
        ops += 1
        me.put(TR_OPS, ops)
        if fails:
            me.put(TR_FAIL, fails)
        if rng.random() < 0.5:
            os.sched_yield()
    me.put(TR_WAIT_MAX_NS, wait_max)
    me.put(TR_CONTENDED, lock.stats.contended)
    me.put(TR_NEEDBREAK, lock.stats.needbreak_seen)
    me.put(TR_YIELDS, lock.stats.yields)
    me.put(TR_LONG_HOLDS, long_holds)
    me.put(TR_MAX_READERS, max_readers)
    me.finish()


def rcu_worker(region_name: str, worker: int, seed: int, role: str, grace_period: bool = True,
               nworkers: int = 0) -> None:
    """One rcutorture thread: `role` is writer, reader or reclaimer."""
    from shmmmu.pool import POISON, PoolExhausted, Pool
    from shmmmu.rcu import Rcu, pipe_age
    me = _Worker("rcu", region_name, worker, seed, ROLE_RECLAIMER if role == "reclaimer" else ROLE_VCPU)
    config = me.config
    rcu = Rcu(me.region, worker)
    pool = Pool(me.region, worker, config)
    rng, ctl = me.rng, me.ctl
    tables = me.region.array("tables")
    tm = me.region.words("tmeta")
    gctl = me.region.words("ctl")
    ws = me.region.words("wstate")
    me.wait_go()
    if role == "writer":
        ops = fails = 0
        while not me.stopped():
            try:
                pool.topup(wait=2.0)
            except PoolExhausted:
                fails += 1
                me.put(TR_ALLOC_FAIL, fails)
                continue
            t = pool.alloc(1, 0)
            ops += 1
            seq = (worker << 32) | ops
            tables[t, :] = tag(seq)                          # ours alone until published
            old = ctl.xchg(TC_CURRENT, (seq << PTR_TABLE_BITS) | t)
            rcu.call_rcu(old & PTR_TABLE_MASK)
            me.put(TR_OPS, ops)
            me.put(TR_ALLOCATED, ops)
            r = rng.random()
            if r < 0.3:
                time.sleep(0.0002)
            elif r < 0.8:
                os.sched_yield()
    elif role == "reader":
        ops = poison = stale = 0
        pw = me.region.words("pipe")
        prow = worker * PIPE_LEN
        slot = worker * WSTATE_WORDS + W_RCU
        while not me.stopped():
            rcu.read_lock()
            my_epoch = ws.load(slot)
            ptr = ctl.load(TC_CURRENT)
            t, seq = ptr & PTR_TABLE_MASK, ptr >> PTR_TABLE_BITS
            r = rng.random()
            if r < 0.002:
                time.sleep(0.002)                            # rcutorture's rare long reader delay
            elif r < 0.05:
                os.sched_yield()                             # ... and a preemption now and then
            row = tables[t]
            want = tag(seq)
            if not (row == want).all():
                if (row == POISON).any():
                    poison += 1
                    me.put(TR_POISON, poison)
                else:
                    stale += 1
                    me.put(TR_STALE, stale)
            base = t * TMETA_WORDS
            age = pipe_age(tm.load(base + T_STATE), tm.load(base + T_RETIRE_EPOCH), my_epoch, gctl.load(C_EPOCH))
            rcu.read_unlock()
            b = prow + min(age, PIPE_LEN - 1)
            pw.store(b, pw.load(b) + 1)
            ops += 1
            me.put(TR_OPS, ops)
    else:   # reclaimer
        freed = timeouts = 0

        def free(batch: list[int]) -> None:
            nonlocal freed
            pool.free(batch)
            freed += len(batch)
            me.put(TR_FREED, freed)

        def one_pass() -> int:
            nonlocal timeouts
            before = gctl.load(C_GP_COUNT)
            n = rcu.reclaim_pass(free, timeout=1.0, wait_for_gp=grace_period)
            if n == 0 and rcu.backlog() and gctl.load(C_GP_COUNT) == before:
                timeouts += 1
                me.put(TR_GP_TIMEOUTS, timeouts)
            return n

        while not me.stopped():
            if one_pass() == 0:
                time.sleep(0.0002)
        # drain: the workers are finishing their last sections
        deadline = time.monotonic() + 3.0
        while rcu.backlog() and time.monotonic() < deadline:
            if one_pass() == 0:
                time.sleep(0.001)
    me.finish()


def hold_worker(region_name: str, worker: int, what: str) -> None:
    """Take something and keep it until killed (for the SIGKILL tests): write, read, or rcu."""
    me = _Worker("hold", region_name, worker, 0, ROLE_HOST)
    if what == "rcu":
        from shmmmu.rcu import Rcu
        held = Rcu(me.region, worker)
        held.read_lock()
    else:
        lock = RWLock(me.region, MMU_LOCK, worker)
        (lock.write_lock if what == "write" else lock.read_lock)()
    me.ctl.fetch_add(TC_HOLDING, 1)
    while os.getppid() == me.parent:          # until killed, or orphaned (then just go)
        time.sleep(0.2)


# ====================================================================== command line


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m shmmmu.torture worker")
    p.add_argument("program", choices=["lock", "rcu", "hold"])
    p.add_argument("--region", required=True)
    p.add_argument("--worker", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--role", default="reader")
    p.add_argument("--busted", action="store_true")
    p.add_argument("--no-gp", action="store_true")
    p.add_argument("--nworkers", type=int, default=0)
    a = p.parse_args(argv)
    if a.program == "lock":
        lock_worker(a.region, a.worker, a.seed, a.role, a.busted)
    elif a.program == "rcu":
        rcu_worker(a.region, a.worker, a.seed, a.role, not a.no_gp, a.nworkers)
    else:
        hold_worker(a.region, a.worker, a.role)
    return 0


class _OneLineErrors(argparse.ArgumentParser):
    """Bad usage is one line on stderr and exit 2, like every shmmmu command."""

    def error(self, message: str) -> None:        # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def main(argv: list[str] | None = None, prog: str = "python -m shmmmu.torture") -> int:
    """`shmmmu torture lock|rcu [options]`: exit 0 SUCCESS, 1 FAILURE, 2 bad usage."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return _worker_main(argv[1:])
    p = _OneLineErrors(prog=prog,
                                description="locktorture / rcutorture for shmmmu's RWLock and RCU")
    sub = p.add_subparsers(dest="program", required=True)
    pl = sub.add_parser("lock", help="reader/writer torture of the MMU lock")
    pl.add_argument("--readers", type=int, default=2)
    pl.add_argument("--writers", type=int, default=2)
    pl.add_argument("--busted", action="store_true", help="lock_busted: writers barge in (must FAIL)")
    pr = sub.add_parser("rcu", help="Reader-Pipe torture of RCU and the reclaimer")
    pr.add_argument("--readers", type=int, default=2)
    pr.add_argument("--writers", type=int, default=1)
    pr.add_argument("--no-gp", action="store_true", help="reclaimer frees without a grace period (must FAIL)")
    for q in (pl, pr):
        q.add_argument("--duration", type=float, default=3.0, help="seconds (default 3)")
        q.add_argument("--seed", type=int, default=None, help="random seed (default: drawn and printed)")
    try:
        a = p.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    try:
        if a.program == "lock":
            res = run_lock_torture(a.readers, a.writers, a.duration, a.seed, a.busted)
        else:
            res = run_rcu_torture(a.readers, a.writers, a.duration, a.seed, not a.no_gp)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(res.report())
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
