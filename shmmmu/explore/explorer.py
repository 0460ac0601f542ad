"""Explorer: one scenario on one small real region, executed again and again under a strategy; shrinking and replay tokens.

`Explorer(scenario, bugs)` creates the scenario's VM (a real region with 8-entry
tables, its words wrapped in scheduling points), runs the prologue with
nobody racing, and keeps a copy of the whole mapping.  `execute(strategy, i)`
puts the copy back (a memcpy of a few hundred KiB), makes the actors' handles
afresh (each actor is its own worker slot: a VM, an Mmu, a Vcpu of its own),
runs them under the scheduler and then the oracles.  `search` runs executions
until a finding, a limit, or (DFS) the bound is exhausted; `shrink` reduces a
failing schedule to the fewest preemptions, then the fewest steps; a `Token`
holds everything needed to run it again.
"""
from __future__ import annotations

import base64
import json
import os
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shmmmu import violations
from shmmmu.bugs import check_names
from shmmmu.checks import check_all
from shmmmu.explore.scenarios import SCENARIOS, Scenario
from shmmmu.explore.sched import ExploreWaits, Finding, PointWords, Scheduler, SchedRef, Step
from shmmmu.explore.strategy import DfsStrategy, PctStrategy, RandomStrategy, Replay, Strategy
from shmmmu.guest import Vcpu
from shmmmu.integrity import check_guest_memory, guest_values
from shmmmu.layout import Role, VMConfig
from shmmmu.mmu import Mmu
from shmmmu.pool import Pool
from shmmmu.rcu import Rcu
from shmmmu.vm import VM, create_vm

TOKEN_PREFIX = "shx1-"


class Context:
    """One execution's world: the actors' handles, made afresh, and notes the scenario keeps for its oracle."""

    def __init__(self, explorer: "Explorer", sched: Scheduler | None):
        self.explorer = explorer
        self.scenario = explorer.scenario
        self.config = explorer.config
        self.region = explorer.region
        self.waits = explorer.waits
        self.sched = sched
        self.notes: dict[str, Any] = {}
        self._vcpus: dict[int, Vcpu] = {}
        self._hosts: dict[int, Mmu] = {}
        self._reclaimer: tuple[Rcu, Pool] | None = None

    def _vm(self, worker: int) -> VM:
        return VM(self.region, worker, waits=self.waits, config=self.config)

    def vcpu(self, i: int) -> Vcpu:
        v = self._vcpus.get(i)
        if v is None:
            v = self._vcpus[i] = Vcpu(self._vm(i), i)       # its counters carry on from the prologue's
        return v

    def host(self, k: int = 0) -> Mmu:
        m = self._hosts.get(k)
        if m is None:
            c = self.config
            worker = c.host_worker if k == 0 else c.reclaimer_worker + k
            m = self._hosts[k] = Mmu(self._vm(worker), worker)
        return m

    def reclaimer(self) -> tuple[Rcu, Pool]:
        if self._reclaimer is None:
            vm = self._vm(self.config.reclaimer_worker)
            self._reclaimer = (vm.rcu, vm.pool)
        return self._reclaimer

    def actor(self, name: str, fn: Callable[[], None], daemon: bool = False) -> None:
        self.sched.add(name, fn, daemon)

    def others_done(self) -> bool:
        """Every actor but the daemons has finished (the reclaimer's cue to stop)."""
        return all(a.state == 3 or a.daemon for a in self.sched.actors)

    def guest_values(self) -> np.ndarray:
        return guest_values(self.explorer.vm)

    def mmus(self) -> list[Mmu]:
        return [v.mmu for v in self._vcpus.values()] + list(self._hosts.values())


@dataclass
class Result:
    """One execution: its finding (None: every oracle passed), how long it ran, and its decisions."""

    finding: Finding | None
    steps: int
    preemptions: int
    decisions: list[int]
    log: list[Step] = field(default_factory=list)
    actors: list[str] = field(default_factory=list)
    diverged: str = ""
    more: bool = True                   # the strategy has more executions to run


# debug instrumentation (the zap ledger, the guest's record of its accesses) and the counters (a root's
# allocation is published as it happens): not scheduling points
UNTRACED_SECTIONS = frozenset({"zap_pending", "touched", "stats"})


class Explorer:
    """A scenario's region, reset and executed as often as a search needs."""

    def __init__(self, scenario: Scenario, bugs: list[str], *, no_points: frozenset[str] = frozenset(),
                 atomic: frozenset[str] = frozenset(), name: str | None = None, step_bound: int | None = None):
        self.scenario = scenario
        self.bugs = check_names(list(bugs))
        self.no_points = no_points
        self.atomic = atomic
        self.step_bound = step_bound or scenario.step_bound
        self.ref = SchedRef()
        self.waits = ExploreWaits(self.ref)
        self.name = name or f"explore-{os.getpid()}-{uuid.uuid4().hex[:10]}"
        cfg = VMConfig(name=self.name, n_vcpus=scenario.n_vcpus, n_host=1 + scenario.n_host, bits=3,
                       memslots=scenario.memslot_specs(), lock_mode=scenario.lock_mode, bugs=self.bugs,
                       root_roles=scenario.root_roles,
                       debug=True, tlb_entries=64, cache_capacity=8, cache_min=5)
        self.vm = create_vm(cfg)
        try:
            self.region = self.vm.region
            self.config = self.vm.config
            ref = self.ref
            # the checkers' own records are no kernel step: they stay plain operations
            self.region.wrap_words(lambda section, words: words if section in UNTRACED_SECTIONS
                                   else PointWords(section, words, ref))
            self.violations_np = self.region.array("violations")
            ctx = Context(self, None)
            # every vCPU has run before the race starts: each holds its root (kvm_mmu_load), so the
            # actors race in the MMU, not in loading their first roots under the write lock
            for i in range(scenario.n_vcpus):
                v = ctx.vcpu(i)
                v.enter()
                v.exit()
            if scenario.prologue is not None:
                scenario.prologue(ctx)
            for m in ctx.mmus():
                m.publish_stats()
            self._drain(ctx)
            if violations.count(self.region):
                raise RuntimeError(f"the prologue of scenario {scenario.name} recorded a violation: "
                                   f"{violations.read_all(self.region)[0]}")
            self.initial = bytes(self.region.mm)
        except BaseException:
            self.vm.close()
            self.vm.unlink()
            raise

    def close(self) -> None:
        self.vm.close()
        self.vm.unlink()

    def __enter__(self) -> "Explorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self) -> None:
        self.region.mm[:] = self.initial

    def execute(self, strategy: Strategy, index: int = 0, trace: bool = False) -> Result:
        """One execution from the initial state; the region is left as it ended (for --keep)."""
        self.reset()
        sched = Scheduler(strategy, step_bound=self.step_bound, trace=trace, no_points=self.no_points,
                          atomic=self.atomic, violation_words=self.violations_np)
        ctx = Context(self, sched)
        strategy.begin(index)
        self.ref.sched = sched
        try:
            self.scenario.build(ctx)
            finding = sched.run()
        finally:
            self.ref.sched = None
        if finding is not None and finding.kind == "violation":
            finding.message = "; ".join(str(v).removeprefix("!!! ") for v in violations.read_all(self.region)[:3])
        if finding is None:
            finding = self._oracles(ctx)
        more = strategy.end(sched)
        return Result(finding, sched.steps, sched.preemptions, list(sched.decisions), sched.log,
                      [a.name for a in sched.actors],
                      strategy.diverged if isinstance(strategy, Replay) else "", more)

    def _drain(self, ctx: Context) -> None:
        rcu, pool = ctx.reclaimer()
        for _ in range(20):
            if not rcu.backlog() or not rcu.reclaim_pass(pool.free, timeout=None):
                break

    def _oracles(self, ctx: Context) -> Finding | None:
        """After the actors: the violations, the whole-VM invariants, guest memory, the scenario's own, destruction."""
        steps = ctx.sched.steps
        self._drain(ctx)
        for m in ctx.mmus():
            m.publish_stats()
        found = [str(v).removeprefix("!!! ") for v in violations.read_all(self.region)]
        if not found:
            found = [str(p) for p in check_all(self.vm)] + check_guest_memory(self.vm)
        if not found and self.scenario.oracle is not None:
            found = self.scenario.oracle(ctx)
        if not found:
            left = ctx.host(0).destroy()
            if left:
                found = [f"table-leak: {left} tables still on the page list after the VM was destroyed "
                         f"(kvm_mmu_uninit_tdp_mmu's WARN)"]
        if not found:
            return None
        return Finding("check", "; ".join(found[:3]), steps)


# ---------------------------------------------------------------- tokens


@dataclass
class Token:
    """Everything needed to run one schedule again: scenario, switches, parameters, decisions, and what it found."""

    scenario: str
    bugs: list[str]
    params: dict
    decisions: list[int]
    atomic: list[str] = field(default_factory=list)
    steps: int = 0
    finding: str = ""

    def encode(self) -> str:
        doc = {"s": self.scenario, "b": self.bugs, "p": self.params, "d": self.decisions, "a": self.atomic,
               "t": self.steps, "f": self.finding}
        raw = zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 9)
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> "Token":
        t = text.strip()
        if not t.startswith(TOKEN_PREFIX):
            raise ValueError(f"not a replay token (they start with {TOKEN_PREFIX})")
        try:
            body = t[len(TOKEN_PREFIX):]
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            doc = json.loads(zlib.decompress(raw))
            return cls(doc["s"], list(doc["b"]), dict(doc["p"]), [int(x) for x in doc["d"]], list(doc["a"]),
                       int(doc["t"]), str(doc["f"]))
        except (ValueError, KeyError, TypeError, zlib.error):
            raise ValueError("the replay token is damaged (copy it whole)") from None


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


def make_strategy(name: str, seed: int, depth: int = 3, preemptions: int = 2) -> Strategy:
    if name == "random":
        return RandomStrategy(seed)
    if name == "pct":
        return PctStrategy(seed, depth)
    if name == "dfs":
        return DfsStrategy(preemptions)
    raise ValueError(f"unknown strategy {name!r}: use random, pct or dfs")


@dataclass
class SearchResult:
    executions: int
    seconds: float
    steps: int                          # summed over the executions
    first: Result | None                # the first failing execution
    first_index: int = -1
    exhausted: bool = False             # DFS: every schedule within the bound was run
    pruned: int = 0

    @property
    def per_second(self) -> float:
        return self.executions / self.seconds if self.seconds else 0.0


def search(explorer: Explorer, strategy: Strategy, *, max_executions: int = 0, time_limit: float = 0.0,
           start: int = 0, stride: int = 1,
           progress: Callable[[int, float, int], None] | None = None) -> SearchResult:
    """Executions start, start + stride, ... until a finding, a limit, or an exhausted DFS."""
    t0 = time.monotonic()
    n = 0
    steps = 0
    i = start
    last_report = t0
    while True:
        r = explorer.execute(strategy, i)
        n += 1
        steps += r.steps
        more = r.more
        if r.finding is not None:
            return SearchResult(n, time.monotonic() - t0, steps, r, i, pruned=getattr(strategy, "pruned", 0))
        now = time.monotonic()
        if progress is not None and now - last_report >= 1.0:
            progress(n, now - t0, 0)
            last_report = now
        if not more:
            return SearchResult(n, now - t0, steps, None, exhausted=True, pruned=getattr(strategy, "pruned", 0))
        if (max_executions and n >= max_executions) or (time_limit and now - t0 >= time_limit):
            return SearchResult(n, now - t0, steps, None, pruned=getattr(strategy, "pruned", 0))
        i += stride


# ---------------------------------------------------------------- shrinking


def replay(explorer: Explorer, decisions: list[int], trace: bool = False) -> Result:
    return explorer.execute(Replay(decisions), 0, trace=trace)


def shrink(explorer: Explorer, failing: Result, budget: int = 3000) -> tuple[Result, int]:
    """The same failure with the fewest preemptions, then the fewest steps; returns it and the executions run.

    First iterative context bounding (CHESS): the schedules with 0, 1, ... preemptions,
    fewer than the failing one has, are explored depth first (at most `budget` per
    bound), and the shortest failing one of the lowest bound that has one is kept.
    Then greedy delta debugging on its decisions: cut the tail of choices, or move a
    switch one choice earlier (a decision of -1 is "no preemption here"), kept when
    it fails the same way in fewer steps with no more preemptions.
    """
    best = replay(explorer, failing.decisions)
    runs = 1
    if not same_failure(best.finding, failing.finding):
        return failing, runs                 # not reproducible: keep what we have
    target = failing.finding
    for bound in range(best.preemptions):
        dfs = DfsStrategy(bound)
        found: Result | None = None
        for n in range(budget):
            r = explorer.execute(dfs, n)
            runs += 1
            if same_failure(r.finding, target) and (found is None or r.steps < found.steps):
                found = r
            if not r.more:
                break
        if found is not None:
            best = replay(explorer, found.decisions)
            runs += 1
            break

    def better(r: Result) -> bool:
        return same_failure(r.finding, target) and (
            r.preemptions < best.preemptions or (r.preemptions == best.preemptions and r.steps < best.steps))

    improved, spent = True, 0
    while improved and spent < budget // 4:
        improved = False
        candidates = [best.decisions[:k] for k in range(len(best.decisions))]
        for p in range(1, len(best.decisions)):
            cand = list(best.decisions)
            cand[p - 1], cand[p] = cand[p], -1
            candidates.append(cand)
        for cand in candidates:
            if spent >= budget // 4:
                break
            r = replay(explorer, cand)
            spent += 1
            if better(r):
                best, improved = replay(explorer, r.decisions), True
                spent += 1
                break
    return best, runs + spent
