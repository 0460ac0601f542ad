"""Explorer: one scenario on one small real region, executed again and again under a strategy; shrinking.

`Explorer(scenario, bugs)` creates the scenario's VM (a real region with 8-entry
tables, its words wrapped in scheduling points), runs the prologue with
nobody racing, and keeps a copy of the whole mapping.  `execute(strategy, i)`
puts the copy back (a memcpy of a few hundred KiB), puts the actors' handles
back as new (each actor is its own worker slot: a VM, an Mmu, a Vcpu of its
own; shmmmu.explore.handles), runs them under the scheduler and then the
oracles.  `search` runs executions until a finding, a limit, or (DFS) the
bound is exhausted; `shrink` reduces a failing schedule to the fewest
preemptions, then the fewest steps; a `Token` (shmmmu.explore.tokens) holds
everything needed to run it again.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shmmmu import violations
from shmmmu.variants import DEFAULT_PROFILE, check_names
from shmmmu.atomics import Words
from shmmmu.checks import check_all
from shmmmu.explore.coverage import Coverage
from shmmmu.explore.handles import Handles
from shmmmu.explore.scenarios import SCENARIOS, Scenario
from shmmmu.explore.points import ExploreWaits, PointWords, SchedRef
from shmmmu.explore.sched import ACTOR_DONE, DONE, Finding, Scheduler, Step
from shmmmu.explore.strategy import DfsStrategy, PctStrategy, RandomStrategy, Replay, Strategy
from shmmmu.explore.tokens import TOKEN_PREFIX, Token  # noqa: F401  (a token is made from an explorer's result)
from shmmmu.guest import Vcpu
from shmmmu.integrity import check_guest_memory, guest_values
from shmmmu.layout import Lock, Locks, VMConfig, WState
from shmmmu.mmu import Mmu
from shmmmu.pool import Pool
from shmmmu.rcu import Rcu
from shmmmu.snapshot import SECTIONS as SNAPSHOT_SECTIONS, Snapshot
from shmmmu.vm import VM, create_vm

class Context:
    """One execution's world: the actors' handles, and notes the scenario keeps for its oracle."""

    def __init__(self, explorer: "Explorer", sched: Scheduler | None):
        self.explorer = explorer
        self.scenario = explorer.scenario
        self.config = explorer.config
        self.region = explorer.region
        self.waits = explorer.waits
        self.sched = sched
        # what the prologue noted (a snapshot for an oracle) starts every execution's notes
        self.notes: dict[str, Any] = dict(getattr(explorer, "prologue_notes", {}))
        self._vcpus: dict[int, Vcpu] = {}
        self._hosts: dict[int, Mmu] = {}
        self._reclaimer: tuple[Rcu, Pool] | None = None
        # the explorer's handles, put back in place (shmmmu.explore.handles), or made afresh: in the prologue,
        # where steps are traced (a step in a constructor is named so), and where coverage or tracepoints are on
        self._handles: Handles | None = None
        if sched is not None and explorer.handles is not None and not sched.trace and sched.coverage is None \
                and not self.config.tracepoints:
            self._handles = explorer.handles

    def _vm(self, worker: int) -> VM:
        return VM(self.region, worker, waits=self.waits, config=self.config)

    def vcpu(self, i: int) -> Vcpu:
        v = self._vcpus.get(i)
        if v is None:
            h = self._handles
            # its counters carry on from the prologue's
            v = self._vcpus[i] = h.vcpu(i) if h is not None else Vcpu(self._vm(i), i)
        return v

    def host(self, k: int = 0) -> Mmu:
        m = self._hosts.get(k)
        if m is None:
            c = self.config
            worker = c.host_worker if k == 0 else c.reclaimer_worker + k
            h = self._handles
            m = self._hosts[k] = h.host(worker) if h is not None else Mmu(self._vm(worker), worker)
        return m

    def reclaimer(self) -> tuple[Rcu, Pool]:
        if self._reclaimer is None:
            h = self._handles
            if h is not None:
                self._reclaimer = h.reclaimer()
            else:
                vm = self._vm(self.config.reclaimer_worker)
                self._reclaimer = (vm.rcu, vm.pool)
        return self._reclaimer

    def actor(self, name: str, fn: Callable[[], None], daemon: bool = False) -> None:
        self.sched.add(name, fn, daemon)

    def others_done(self) -> bool:
        """Every actor but the daemons has finished (the reclaimer's cue to stop): a read of each actor's end,
        so the reduction and the spinners' wake-up see it as they see a word."""
        sched = self.sched
        done = True
        for a in sched.actors:
            if not a.daemon:
                sched.point(ACTOR_DONE, a.id, False)
                done = done and a.state == DONE
        return done

    def guest_values(self) -> np.ndarray:
        """What the guest's memory holds now: the host reads it (one step, every page)."""
        data = self.region.words("data")
        data.touch(0, data.n, False)
        return guest_values(self.explorer.vm)

    def mmus(self) -> list[Mmu]:
        return [v.mmu for v in self._vcpus.values()] + list(self._hosts.values())


@dataclass
class Result:
    """One execution: its finding (None: every oracle passed), how long it ran, and its schedule."""

    finding: Finding | None
    steps: int
    preemptions: int
    switches: list[tuple[int, int, int]]    # (step, k, actor): where it did not run the default actor
    decisions: list[int] = field(default_factory=list)   # every decision's choice (the DFS tree's path)
    log: list[Step] = field(default_factory=list)
    actors: list[str] = field(default_factory=list)
    diverged: str = ""
    more: bool = True                   # the strategy has more executions to run
    new_points: bool = False            # it met a conflicting word the explorer did not know
    state: str = ""                     # execute(state=True): a digest of the state the actors left


# debug instrumentation (the zap ledger, the guest's record of its accesses) and the counters (a root's
# allocation is published as it happens): noted, never a decision
UNDECIDED_SECTIONS = frozenset({"zap_pending", "touched", "stats"})


class Explorer:
    """A scenario's region, reset and executed as often as a search needs."""

    def __init__(self, scenario: Scenario, bugs: list[str], *, no_points: frozenset[str] = frozenset(),
                 atomic: frozenset[str] = frozenset(), name: str | None = None, step_bound: int | None = None,
                 kernel: str = DEFAULT_PROFILE):
        self.scenario = scenario
        self.kernel = kernel
        self.bugs = check_names(list(bugs), kernel)
        # the conflicting words seen in any execution so far (section -> words): the searches' decisions
        self.points: dict[str, set[int]] = {}
        self.no_points = no_points
        self.atomic = atomic
        self.step_bound = step_bound or scenario.step_bound
        self.ref = SchedRef()
        self.coverage: Coverage | None = None     # set to record what the executions reach (--coverage)
        # the end-of-execution checks' verdicts by final state (see _oracles); None: every execution checks
        self.oracle_memo: dict[bytes, list[str]] | None = {}
        self.oracle_memo_hits = 0
        self.handles: Handles | None = None          # the actors' handles, kept across executions (below)
        # the points that decide nothing noted in C (sched.SchedCore._note); False: every point is Python's
        # Scheduler._point (the same steps: tests/model/test_explore_handles.py runs both)
        self.fast_points = True
        self.waits = ExploreWaits(self.ref)
        self.name = name or f"explore-{os.getpid()}-{uuid.uuid4().hex[:10]}"
        cfg = VMConfig(name=self.name, n_vcpus=scenario.n_vcpus, n_host=1 + scenario.n_host, bits=3,
                       memslots=scenario.memslot_specs(), lock_mode=scenario.lock_mode, bugs=self.bugs, kernel=kernel,
                       mmu_seq_start=scenario.mmu_seq_start,
                       root_roles=scenario.root_roles, nx_huge_pages=scenario.nx_huge_pages,
                       debug=True, tlb_entries=64, cache_capacity=8, cache_min=5)
        self.vm = create_vm(cfg)
        try:
            self.region = self.vm.region
            self.config = self.vm.config
            ref = self.ref
            # the checkers' own records are no kernel step: never a place to switch, but noted
            self.region.wrap_words(lambda section, words: PointWords(section, words, ref,
                                                                     section not in UNDECIDED_SECTIONS))
            self.violations_np = self.region.array("violations")
            self.violations_raw = Words(self.violations_np.reshape(-1))     # read at every point, no point itself
            ctx = Context(self, None)
            # every vCPU has run before the race starts: each holds its root (kvm_mmu_load), so the
            # actors race in the MMU, not in loading their first roots under the write lock
            for i in range(scenario.n_vcpus):
                v = ctx.vcpu(i)
                v.enter()
                v.exit()
            if scenario.prologue is not None:
                scenario.prologue(ctx)
            self.prologue_notes = dict(ctx.notes)
            for m in ctx.mmus():
                m.publish_stats()
            self._drain(ctx)
            if violations.count(self.region):
                raise RuntimeError(f"the prologue of scenario {scenario.name} recorded a violation: "
                                   f"{violations.read_all(self.region)[0]}")
            self.initial = bytes(self.region.mm)
            self._words_initial = np.frombuffer(self.initial, dtype=np.uint64)
            self._words_now = np.frombuffer(self.region.mm, dtype=np.uint64)
            # the configuration the end checks see, read from the header once (as a snapshot reads it)
            self._check_config = VMConfig.from_json(self.region.config)
            self.handles = Handles(self.region, self.config, self.waits)
        except BaseException:
            self.vm.close()
            self.vm.unlink()
            raise

    def close(self) -> None:
        self.handles = None                  # their views of the mapping go before it is closed
        self._words_now = None
        self.vm.close()
        self.vm.unlink()

    def __enter__(self) -> "Explorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self) -> None:
        self.region.mm[:] = self.initial

    def execute(self, strategy: Strategy, index: int = 0, trace: bool = False, state: bool = False) -> Result:
        """One execution from the initial state; the region is left as it ended (for --keep).  `state`: the
        Result carries a digest of the MMU's state as the actors left it (before the oracles)."""
        self.reset()
        cov = self.coverage
        sched = Scheduler(strategy, step_bound=self.step_bound, trace=trace, no_points=self.no_points,
                          atomic=self.atomic, violation_words=self.violations_raw, coverage=cov, keys=self.ref.keys,
                          ref=self.ref if self.fast_points else None)
        ctx = Context(self, sched)
        strategy.begin(index)
        self.ref.sched = sched
        if cov is not None:
            cov.begin()
            sys.setprofile(cov.profile)
        try:
            self.scenario.build(ctx)
            finding = sched.run()
        finally:
            if cov is not None:
                sys.setprofile(None)
            self.ref.sched = None
        if finding is not None and finding.kind == "violation":
            finding.message = "; ".join(str(v).removeprefix("!!! ") for v in violations.read_all(self.region)[:3])
        digest = self.state_digest() if state and finding is None else ""
        if finding is None:
            finding = self._oracles(ctx, memo=not trace)
        new_points = self._learn(sched.conflicts())
        more = strategy.end(sched, new_points)
        return Result(finding, sched.steps, sched.preemptions, list(sched.switches), list(sched.decisions),
                      sched.log, [a.name for a in sched.actors],
                      strategy.diverged if isinstance(strategy, Replay) else "", more, new_points, digest)

    # what an execution leaves that its order decides: the tables and everything the MMU keeps about them and
    # about guest memory (not the counters, lock statistics or the spinners' turns, which count steps)
    STATE_SECTIONS = ("tables", "tmeta", "roots", "memslots", "host_map", "data", "dirty", "host_ad", "retire",
                      "pool")

    def state_digest(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for section in self.STATE_SECTIONS:
            h.update(self.region.array(section).tobytes())
        return h.hexdigest()

    def _learn(self, conflicts: dict[str, set[int]]) -> bool:
        """Add an execution's conflicting words to the points; True if any was new."""
        new = False
        points = self.points
        for section, words in conflicts.items():
            known = points.get(section)
            if known is None:
                points[section] = set(words)
                new = True
            elif not words <= known:
                known |= words
                new = True
        return new

    def _drain(self, ctx: Context) -> None:
        rcu, pool = ctx.reclaimer()
        for _ in range(20):
            if not rcu.backlog() or not rcu.reclaim_pass(pool.free, timeout=None):
                break

    def locks_left(self) -> list[str]:
        """Every actor has ended, so every lock is free: no qrwlock count (a reader's bias, the writer byte,
        WAITING), no wait-queue owner, no worker's record of a hold.  A lock left taken is a finding here,
        before the drain and the destruction below take the locks again outside the scheduler (and would
        spin for ever on a count nobody will release)."""
        w = self.region.words("locks")
        lk = self.region.columns("locks", Lock)
        ws = self.region.words("wstate")
        found = []
        for i, name in enumerate(Locks.NAMES):
            cnts, wait, writer = w.load(lk.cnts.word(i)), w.load(lk.wait.word(i)), w.load(lk.writer.word(i))
            held = ws.column(WState.WORDS, WState.HELD + i)
            holders = [k for k in range(self.region.array("wstate").shape[0]) if held.load(k)]
            if cnts or wait or writer or holders:
                found.append(f"lock-left-held: {name} after every actor ended: cnts {cnts:#x}, wait queue {wait}, "
                             f"writer {writer - 1}, held by workers {holders}")
        return found

    MEMO_LIMIT = 1 << 18             # final states remembered (16-byte keys): a bounded cache, not a budget

    def _memo_key(self, ctx: Context) -> bytes | None:
        """The final state the checks below read: every byte of the region (tables, stats, the checkers'
        records, ...) and what the actors noted for the scenario's oracle; None when the notes cannot be
        written down.  Executions that end in the same state get the same verdict (the checks are functions
        of it), and most do: a bounded DFS of fault-zap ends 1,218 executions in 206 states."""
        try:
            notes = pickle.dumps(sorted(ctx.notes.items()), protocol=5)
        except Exception:                       # noqa: BLE001 (a note that does not pickle: check every time)
            return None
        # the state by the words that differ from the initial one (which every execution starts from): the
        # same partition of final states as a digest of every byte, for a compare and a few KiB hashed
        now = self._words_now
        changed = np.flatnonzero(now != self._words_initial)
        h = hashlib.blake2b(changed.tobytes(), digest_size=16)
        h.update(now[changed].tobytes())
        h.update(notes)
        return h.digest()

    def _oracles(self, ctx: Context, memo: bool = True) -> Finding | None:
        """After the actors: the locks, the violations, the whole-VM invariants, guest memory, the scenario's own,
        destruction.  With `memo`, a final state already checked gets its verdict again without the checks
        (a replay traces every step and checks in full)."""
        steps = ctx.sched.steps
        left = self.locks_left()
        if left:
            return Finding("check", "; ".join(left[:3]), steps)
        self._drain(ctx)
        for m in ctx.mmus():
            m.publish_stats()
        cache = self.oracle_memo if memo else None
        key = self._memo_key(ctx) if cache is not None else None
        if key is not None and key in cache:
            self.oracle_memo_hits += 1
            found = cache[key]
        else:
            found = self._final_checks(ctx)
            if key is not None and len(cache) < self.MEMO_LIMIT:
                cache[key] = found
        if not found:
            return None
        return Finding("check", "; ".join(found[:3]), steps)

    def _snapshot(self) -> Snapshot:
        """What shmmmu.snapshot copies of the region, with the configuration parsed once: the explorer's own
        small region, copied between executions (no memory check, no header to parse again)."""
        r = self.region
        return Snapshot(name=r.name, config=self._check_config,
                        sections={s: np.array(r.array(s), copy=True) for s in SNAPSHOT_SECTIONS},
                        creator_pid=r.creator_pid, creator_start=r.creator_start, size=r.size,
                        created_ns=r.created_ns)

    def _final_checks(self, ctx: Context) -> list[str]:
        found = [str(v).removeprefix("!!! ") for v in violations.read_all(self.region)]
        if not found:
            found = [str(p) for p in check_all(self._snapshot())] + check_guest_memory(self.vm)
        if not found and self.scenario.oracle is not None:
            found = self.scenario.oracle(ctx)
        if not found:
            left = ctx.host(0).destroy()
            if left:
                found = [f"table-leak: {left} tables still on the page list after the VM was destroyed "
                         f"(kvm_mmu_uninit_tdp_mmu's WARN)"]
        return found


def scenario_with(name: str, params: dict) -> Scenario:
    import dataclasses
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    s = SCENARIOS[name]
    return dataclasses.replace(s, params={**s.params, **params}) if params else s


# ---------------------------------------------------------------- search


def same_failure(a: Finding | None, b: Finding) -> bool:
    """The same kind of failure: the finding's kind and the kind of its first problem."""
    if a is None:
        return False
    return a.kind == b.kind and a.message.split(":")[0] == b.message.split(":")[0]


SEED_EXECUTIONS = 16        # random executions that seed an explorer's points before a search


def seed_points(explorer: Explorer) -> None:
    """Learn the conflicting words of a few random executions (the same ones every time), so that a search
    starts with decisions where the actors meet; the searches learn the rest as they go."""
    if explorer.points:
        return
    probe = RandomStrategy(0)
    for i in range(SEED_EXECUTIONS):
        explorer.execute(probe, i)


def make_strategy(name: str, seed: int, depth: int = 3, preemptions: int = 2,
                  points: dict[str, set[int]] | None = None) -> Strategy:
    """A search strategy; `points` are its decisions' words (PCT and random take a frozen copy, DFS the
    explorer's live set, which it snapshots at each iteration)."""
    frozen = None if points is None else {s: set(w) for s, w in points.items()}
    if name == "random":
        return RandomStrategy(seed, frozen)
    if name == "pct":
        return PctStrategy(seed, depth, points=frozen)
    if name == "dfs":
        return DfsStrategy(preemptions, points)
    raise ValueError(f"unknown strategy {name!r}: use random, pct or dfs")


@dataclass
class SearchResult:
    executions: int
    seconds: float
    steps: int                          # summed over the executions
    first: Result | None                # the first failing execution
    first_index: int = -1
    exhausted: bool = False             # DFS: every schedule within the bound was run
    bound_done: int = -1                # DFS: the highest bound whose every schedule ran
    reruns: int = 0                     # DFS: iterations run again with conflicting words they had not known
    capped: str = ""                    # why the search stopped short: "executions" or "time" (--time)

    @property
    def per_second(self) -> float:
        return self.executions / self.seconds if self.seconds else 0.0


def search(explorer: Explorer, strategy: Strategy, *, max_executions: int, time_limit: float = 0.0,
           start: int = 0, stride: int = 1,
           progress: Callable[[int, float, int], None] | None = None) -> SearchResult:
    """Executions start, start + stride, ... until a finding, `max_executions`, an exhausted DFS, or the
    optional `time_limit` (seconds; the only limit whose answer depends on the machine)."""
    t0 = time.monotonic()
    n = 0
    steps = 0
    i = start
    last_report = t0

    def result(first: Result | None, idx: int = -1, capped: str = "") -> SearchResult:
        dfs = strategy if isinstance(strategy, DfsStrategy) else None
        return SearchResult(n, time.monotonic() - t0, steps, first, idx,
                            exhausted=bool(dfs and dfs.exhausted), bound_done=dfs.exhausted_bound if dfs else -1,
                            reruns=dfs.reruns if dfs else 0, capped=capped)

    while True:
        r = explorer.execute(strategy, i)
        n += 1
        steps += r.steps
        if r.finding is not None:
            return result(r, i)
        now = time.monotonic()
        if progress is not None and now - last_report >= 1.0:
            progress(n, now - t0, 0)
            last_report = now
        if not r.more:
            return result(None)
        if max_executions and n >= max_executions:
            return result(None, capped="executions")
        if time_limit and now - t0 >= time_limit:
            return result(None, capped="time")
        i += stride


# ---------------------------------------------------------------- shrinking


def replay(explorer: Explorer, switches: list[tuple[int, int, int]], trace: bool = False) -> Result:
    return explorer.execute(Replay(switches), 0, trace=trace)


def shrink(explorer: Explorer, failing: Result, budget: int = 3000) -> tuple[Result, int]:
    """The same failure with the fewest preemptions, then the fewest steps; returns it and the executions run.

    First iterative context bounding (CHESS): every schedule with 0, then 1, ...
    preemptions, fewer than the failing one has, depth first, at most `budget`
    executions in all; the first that fails the same way is kept.  Then greedy
    delta debugging on its switches: drop one, or move one earlier, kept when it
    fails the same way in fewer steps with no more preemptions.
    """
    best = replay(explorer, failing.switches)
    runs = 1
    if not same_failure(best.finding, failing.finding):
        return failing, runs                 # not reproducible: keep what we have
    target = failing.finding
    if best.preemptions:
        dfs = DfsStrategy(best.preemptions - 1, explorer.points)
        for n in range(budget):
            r = explorer.execute(dfs, n)
            runs += 1
            if same_failure(r.finding, target):
                best = replay(explorer, r.switches)
                runs += 1
                break
            if not r.more:
                break

    def better(r: Result) -> bool:
        return same_failure(r.finding, target) and (
            r.preemptions < best.preemptions or (r.preemptions == best.preemptions and r.steps < best.steps))

    improved, spent = True, 0
    while improved and spent < budget // 4:
        improved = False
        sw = best.switches
        candidates = [sw[:k] + sw[k + 1:] for k in range(len(sw))]
        for k, (step, wk, actor) in enumerate(sw):
            if wk != -1:
                continue                     # a wait's decision has no earlier step of its own
            floor = sw[k - 1][0] + 1 if k else 1
            d = 1
            while step - d >= floor:
                candidates.append(sw[:k] + [(step - d, -1, actor)] + sw[k + 1:])
                d *= 2
        for cand in candidates:
            if spent >= budget // 4:
                break
            r = replay(explorer, cand)
            spent += 1
            if better(r):
                best, improved = replay(explorer, r.switches), True
                spent += 1
                break
    return best, runs + spent
