"""Recorder: one execution replayed with its state at every step, and the same decisions run again with the fix.

A `Recorder` is a replay strategy that also watches: between two operations
(the scheduler's event before each one) it compares the small region's
sections the explanation shows (tables, their metadata, roots, locks, the VM
words, the workers' words), every vCPU's TLB and the actors' scheduling
states with what they were, and keeps what changed as deltas charged to the
step that ran last.  A `Recording` is the traced execution with those deltas:
the state at any step is the initial state plus the deltas up to it.

The same decisions with a bug switch off (`--with-fix`) cannot be keyed by
step numbers: the fixed code takes a different number of steps before the
point where the schedule switched (5.13's list_add under its lock is a dozen
operations 6.2's count does not have).  So each switch of the recorded
execution is keyed by an *anchor*: the actor that had the processor, its last
operation (op, word) and how many times it had done that operation, and the
kind of decision (before an operation, or a wait).  With the fix the switch
is made at the decision with the same anchor; a switch whose anchor never
comes is reported as not placed.  Nothing of the scheduler changes: this is a
strategy, and the watching costs only the executions that record.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shmmmu.explore.explorer import Explorer, Result
from shmmmu.explore.sched import STATE_NAMES, Step
from shmmmu.explore.strategy import Strategy

# the sections the explanation shows, watched between operations
WATCHED = ("tables", "tmeta", "roots", "locks", "ctl", "wstate")
_HERE = os.path.dirname(os.path.abspath(__file__))
_QUIET = ("wait.py", "atomics.py")

Anchor = tuple[int, tuple, str, int]      # (actor, (r/w, section, word, occurrence) of its last operation, kind, j)


def sem_purpose(section: str) -> str:
    """A semaphore's section without its VM's name (sem:/shmmmu-NAME.mmu_lock.w -> sem:mmu_lock.w): two
    explorers' executions name the same semaphore alike."""
    if section.startswith("sem:") and "." in section:
        return "sem:" + section.split(".", 1)[1]
    return section


@dataclass
class Pending:
    """What a preempted actor was about to do: its next operation, never run before the switch."""

    actor: int
    section: str
    word: int
    write: bool
    function: str


@dataclass
class Recording:
    """One execution, traced, with its state at every step as deltas."""

    result: Result
    actors: list[str]
    workers: dict[int, str]                  # worker slot -> the actor using it
    entries: int
    initial: dict[str, np.ndarray]           # the watched sections before the first step
    # each change charged to the log position of the step that ran last (-1: before the first)
    deltas: list[tuple[int, str, int, int, int]] = field(default_factory=list)   # (position, section, word, old, new)
    tlbs: list[tuple[int, int, tuple]] = field(default_factory=list)   # (position, vcpu, its entries) when changed
    states: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)     # (position, each actor's state)
    pending: dict[int, Pending] = field(default_factory=dict)        # preemption step -> the preempted op
    anchors: dict[Anchor, int] = field(default_factory=dict)           # anchor -> the actor switched to
    placed: list[tuple[int, Anchor, int]] = field(default_factory=list)   # (step, anchor, actor) made here
    unplaced: list[Anchor] = field(default_factory=list)               # anchors that never came
    violations: list = field(default_factory=list)                     # violations.Violation

    @property
    def log(self) -> list[Step]:
        return self.result.log

    def who(self, worker: int) -> str:
        return self.workers.get(worker, f"worker {worker}")


def _caller_function() -> str:
    """The innermost library function on the stack outside the explorer and the wait layer (file:qualname)."""
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if not fn.startswith(_HERE) and os.path.basename(fn) not in _QUIET:
            return f"{os.path.basename(fn)}:{f.f_code.co_qualname}"
        f = f.f_back
    return "?"


class Recorder(Strategy):
    """Replay by step (`switches`, as Replay does) or by anchor (`anchors`: the with-fix run), recording the
    state between operations."""

    name = "replay"
    wants_events = True

    def __init__(self, explorer: Explorer, switches: list[tuple[int, int, int]] | None = None,
                 anchors: dict[Anchor, int] | None = None):
        self.ex = explorer
        self.switches = {(s, k): a for s, k, a in switches or []}
        self.follow = anchors
        self.diverged = ""
        self.used = 0
        self.arrays = {s: explorer.region.array(s).reshape(-1) for s in WATCHED}
        self.ctx: Any = None

    def begin(self, execution: int) -> None:
        self.used = 0
        self.diverged = ""
        self.prev = {s: a.copy() for s, a in self.arrays.items()}
        self.initial = {s: a.copy() for s, a in self.prev.items()}
        self.deltas: list[tuple[int, str, int, int, int]] = []
        self.tlbs: list[tuple[int, int, tuple]] = []
        self.tlb_prev: dict[int, tuple] = {}
        self.states: list[tuple[int, tuple[str, ...]]] = []
        self.state_prev: tuple[str, ...] = ()
        self.pending: dict[int, Pending] = {}
        self.anchors: dict[Anchor, int] = {}
        self.placed: list[tuple[int, Anchor, int]] = []
        self.handles: dict[int, int] = {}         # id(handle) seen -> actor (which actor made which handle)
        self.workers: dict[int, str] = {}
        self._seen = 0                            # log entries folded into the counts below
        self._count: dict[tuple, int] = {}
        self._last: dict[int, tuple] = {}
        self._since: dict[tuple[int, str], int] = {}

    # ------------------------------------------------------------------ deciding

    def _sync(self, sched) -> None:
        log = sched.log
        for s in log[self._seen:]:
            # a write is a write whatever its form (the fix may exchange where the bug stored)
            sig = ("r" if s.op == "load" or (s.op == "touch" and not s.args[1]) else "w", sem_purpose(s.section),
                   s.word)
            n = self._count[(s.actor, sig)] = self._count.get((s.actor, sig), 0) + 1
            self._last[s.actor] = sig + (n,)
            self._since.pop((s.actor, "p"), None)
            self._since.pop((s.actor, "w"), None)
        self._seen = len(log)

    def choose(self, sched, enabled, default, preemptive):
        self._sync(sched)
        key = sched.decision_key()
        cur = sched.current
        cid = cur.id if cur is not None else -1
        kind = "p" if key[1] == -1 else "w"
        j = self._since.get((cid, kind), 0)
        self._since[(cid, kind)] = j + 1
        anchor: Anchor = (cid, self._last.get(cid, ()), kind, j)
        if self.follow is None:
            want = self.switches.get(key)
        else:
            want = self.follow.get(anchor)
        if want is None:
            return default
        self.used += 1
        for a in enabled:
            if a.id == want:
                if a is not default:
                    self.anchors[anchor] = want
                    self.placed.append((sched.steps, anchor, want))
                    if preemptive and cur is not None:
                        section, word, write = cur.pending
                        self.pending[sched.steps] = Pending(cur.id, section, word, write, _caller_function())
                return a
        if not self.diverged:
            self.diverged = (f"the switch to actor {want} at step {sched.steps} finds it not enabled "
                             f"(enabled: {[a.id for a in enabled]})")
        return default

    # ------------------------------------------------------------------ watching

    def event(self, actor: int, key: int, write: bool) -> None:
        self._watch()

    def _watch(self) -> None:
        sched = self.ex.ref.sched
        if sched is None:
            return
        step = len(sched.log) - 1                 # the log position of the step that ran last
        for s, now in self.arrays.items():
            before = self.prev[s]
            changed = np.flatnonzero(now != before)
            if changed.size:
                for w in changed.tolist():
                    self.deltas.append((step, s, w, int(before[w]), int(now[w])))
                before[changed] = now[changed]
        ctx = self.ctx
        if ctx is not None:
            self._handles(sched, ctx)
            for i, v in ctx._vcpus.items():
                tlb = getattr(v.tlb, "maps", None)
                if tlb is None:
                    continue
                entries = tuple((lv + 1, k, e) for lv, m in enumerate(tlb) for k, e in sorted(m.items()))
                if self.tlb_prev.get(i) != entries:
                    self.tlb_prev[i] = entries
                    self.tlbs.append((step, i, entries))
        states = tuple(STATE_NAMES[a.state] for a in sched.actors)
        if states != self.state_prev:
            self.state_prev = states
            self.states.append((step, states))

    def _handles(self, sched, ctx) -> None:
        """Which actor uses which worker slot: a handle made while an actor runs is that actor's."""
        cur = sched.current
        for h in list(ctx._vcpus.values()) + list(ctx._hosts.values()):
            if id(h) not in self.handles and cur is not None:
                self.handles[id(h)] = cur.id
                w = (h.mmu if hasattr(h, "mmu") else h).kvm.worker
                self.workers[w] = cur.name
        rec = ctx._reclaimer
        if rec is not None and "reclaimer" not in self.handles and cur is not None:
            self.handles["reclaimer"] = cur.id
            self.workers[ctx.config.reclaimer_worker] = cur.name

    def end(self, sched, new_points: bool) -> bool:
        self._sync(sched)
        self._watch()
        if self.follow is None and not self.diverged and self.used != len(self.switches):
            self.diverged = (f"{len(self.switches) - self.used} of the {len(self.switches)} recorded switches "
                             f"were never reached (the execution ended before their steps)")
        return True


def record(explorer: Explorer, switches: list[tuple[int, int, int]] | None = None,
           anchors: dict[Anchor, int] | None = None) -> Recording:
    """Run one execution from the explorer's initial state, traced and watched: by its switches (step, k,
    actor), or by anchors (the same decisions in code that takes other steps)."""
    from shmmmu import violations
    rec = Recorder(explorer, switches, anchors)
    scenario = explorer.scenario

    def build(ctx) -> None:
        rec.ctx = ctx
        scenario.build(ctx)
    explorer.scenario = dataclasses.replace(scenario, build=build)
    try:
        r = explorer.execute(rec, 0, trace=True)
    finally:
        explorer.scenario = scenario
        rec.ctx = None
    r.diverged = rec.diverged
    unplaced = [a for a in (anchors or {}) if a not in rec.anchors]
    workers = dict(rec.workers)
    cfg = explorer.config
    for w in range(cfg.n_workers):          # slots no actor used this time, by their role
        workers.setdefault(w, f"vCPU{w}" if w < cfg.n_vcpus else "host" if w == cfg.host_worker
                           else "reclaimer" if w == cfg.reclaimer_worker else f"host{w - cfg.reclaimer_worker}")
    return Recording(r, r.actors, workers, cfg.geometry.entries, rec.initial, rec.deltas, rec.tlbs, rec.states,
                     rec.pending, rec.anchors, rec.placed, unplaced, violations.read_all(explorer.region))


# ---------------------------------------------------------------- the same decisions with the fix


@dataclass
class Divergence:
    """Where two executions first differ: the position in both logs, and each side's step there."""

    position: int                       # index into both logs (-1: they never differ)
    bug: Step | None
    fix: Step | None


def first_difference(a: list[Step], b: list[Step]) -> Divergence:
    """The first step at which the two executions differ: another actor, function, operation or word."""
    for i, (x, y) in enumerate(zip(a, b)):
        if (x.actor, x.function, x.op, sem_purpose(x.section), x.word) != \
                (y.actor, y.function, y.op, sem_purpose(y.section), y.word):
            return Divergence(i, x, y)
    if len(a) != len(b):
        i = min(len(a), len(b))
        return Divergence(i, a[i] if i < len(a) else None, b[i] if i < len(b) else None)
    return Divergence(-1, None, None)
