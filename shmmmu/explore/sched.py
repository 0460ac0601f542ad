"""Sched: the explorer's scheduler: actors as greenlets, one at a time, switched at scheduling points by a strategy.

One execution runs a few actors (vCPUs, host operations, the reclaimer) as
greenlets in this process, exactly one at a time.  Every operation on a word of
the region goes through a PointWords (shmmmu.explore.points), which first calls
`Scheduler.point`: there the strategy picks which enabled actor performs its
next operation, and the greenlet switch hands it the processor.

Every wait of the library goes through ExploreWaits (points.py): a spin, a
yield or a bounded sleep blocks the actor until another actor writes a word it
read; a semaphore is a counter of the scheduler's own; the clock counts
steps.  An execution in which every actor is blocked is a deadlock (timed
semaphore sleeps time out first, a bounded number of times); one longer than
the step bound is a livelock.  A violation recorded by a checker, or an
exception in an actor, stops the execution at that step.

The library is not written a second time: the actors call the same entry
points the worker processes call, on a real (small) region.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from greenlet import greenlet

from shmmmu.explore.coverage import Coverage, access_site
from shmmmu._sched import ActorCore, SchedCore
from shmmmu.atomics import Words
from shmmmu.layout import ViolationRow

OP_NAMES = ("load", "store", "cas", "xchg", "fetch_add", "fetch_or", "fetch_and", "sem_acquire", "sem_release",
            "touch")
LOAD, STORE, CAS, XCHG, ADD, OR, AND, SEM_P, SEM_V, TOUCH = range(10)
RUN, SPIN, SEM, DONE = range(4)          # RUN and SPIN are shmmmu/_sched.c's STATE_RUN and STATE_SPIN too
ACTOR_DONE = "actor-done"    # a word of no section: actor k's end, written when it ends, read by daemons
STATE_NAMES = ("runnable", "spinning", "asleep", "done")
KEY_SHIFT = 32               # a word's key: its section's number << KEY_SHIFT | the word (SectionKeys)
WORD_MASK = (1 << KEY_SHIFT) - 1
MAX_TIMEOUTS = 40            # all actors asleep this often in one execution, only timeouts moving them: a deadlock
_VIO_KIND = ViolationRow.KIND       # the first violation's kind: its word in the violations section
_HERE = os.path.dirname(os.path.abspath(__file__))
_QUIET_FILES = (os.path.join(os.path.dirname(_HERE), "wait.py"), os.path.join(os.path.dirname(_HERE), "atomics.py"))


class Abort(BaseException):
    """Thrown into the actors still running when an execution ends: not an Exception, so no handler of the
    library catches it; their `finally` blocks run and every operation they try raises it again."""


@dataclass
class Finding:
    """What ended an execution badly: kind is violation, crash, deadlock, livelock or check."""

    kind: str
    message: str
    step: int
    actor: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass
class Step:
    """One executed operation, for the step table (recorded only when the scheduler traces)."""

    index: int
    actor: int
    op: str
    section: str
    word: int
    args: tuple
    result: Any
    function: str                 # the innermost library function it was in (file:qualname)
    preempted: bool = False       # this step began by switching from another runnable actor
    before: int = 0               # the word's value before the operation


class SectionKeys:
    """A number for each section (and pseudo-section: a semaphore, an actor's end) the scheduler sees: a word's
    key is `base(section) + word`, one int, so the bookkeeping at every point makes no tuple and hashes no
    string.  One per explorer: the numbers stay the same from one execution to the next."""

    __slots__ = ("bases", "names")

    def __init__(self) -> None:
        self.bases: dict[str, int] = {}
        self.names: list[str] = []

    def base(self, section: str) -> int:
        b = self.bases.get(section)
        if b is None:
            b = self.bases[section] = len(self.names) << KEY_SHIFT
            self.names.append(section)
        return b

    def split(self, key: int) -> tuple[str, int]:
        return self.names[key >> KEY_SHIFT], key & WORD_MASK


class Actor(ActorCore):
    """One actor: a function run as a greenlet, with its scheduling state (what every point touches is the C
    base's: state, dirty, reads, rset, wset; shmmmu/_sched.c)."""

    __slots__ = ("id", "name", "fn", "g", "sem", "timed", "got_sem", "pending", "daemon", "sleep_seq", "backoff")

    def __init__(self, aid: int, name: str, fn: Callable[[], None], daemon: bool = False):
        self.id = aid
        self.name = name
        self.fn = fn
        self.g: greenlet | None = None
        self.state = RUN
        self.dirty = True          # another actor wrote a word this one touched since it last spun
        # the words (keys) it touched since it last spun, noted only while it is not dirty (a dirty actor's next
        # spin forgets them unread: it looks again at once)
        self.reads: set[int] = set()
        self.rset: set[int] = set()           # every word it read, and wrote, in this execution (conflicts())
        self.wset: set[int] = set()
        self.sem = ""
        self.timed = False
        self.got_sem = False
        # (section, word, is_write) of its next operation: kept only when the scheduler traces (the recorder's)
        self.pending: tuple = ("start", 0, False)
        self.daemon = daemon                             # runs until the others are done (the reclaimer)
        self.sleep_seq = 0
        self.backoff = False                             # spinning in a back-off (a yield), not on a condition


class Stop(Exception):
    """Internal: unwinds the scheduler's main loop."""


class Scheduler(SchedCore):
    """Runs one execution of actors under a strategy (shmmmu.explore.strategy); the points that decide nothing,
    the wake-up and the enabled actors are the C base's (SchedCore._note, _wrote, enabled: shmmmu/_sched.c)."""

    def __init__(self, strategy, *, step_bound: int, trace: bool = False, no_points: frozenset[str] = frozenset(),
                 atomic: frozenset[str] = frozenset(), violation_words: Any = None,
                 coverage: Coverage | None = None, keys: SectionKeys | None = None, ref: Any = None):
        """`violation_words`: the violations section, unwrapped (its first row's kind is read at every point,
        no point itself): a Words or a numpy array.  `keys`: the explorer's section numbers (SectionKeys).
        `ref`: the region's points' SchedRef (points.py), whose `fast` is this scheduler while it runs an
        execution neither traced nor covered: its operations then take _point's path."""
        self.strategy = strategy
        self.step_bound = step_bound
        self.trace = trace
        self.no_points = no_points           # sections whose words are no scheduling points
        self.atomic = atomic                 # functions whose operations are no scheduling points (one step)
        if violation_words is None:
            violation_words = np.zeros(_VIO_KIND + 1, dtype=np.uint64)      # none recorded, ever
        if isinstance(violation_words, np.ndarray):
            violation_words = Words(violation_words.reshape(-1))
        self._vio_load = violation_words.load
        self._vio_owner = violation_words               # the C fast path reads the same word by its address
        self._vio_addr = violation_words.address + 8 * _VIO_KIND
        self.coverage = coverage             # shmmmu.explore.coverage, when --coverage asks
        self.keys = keys if keys is not None else SectionKeys()
        self.ref = ref
        # what the strategy decides by, fixed for an execution: the keys of the decisions' words (None: every
        # point) and whether it wants the operations on them (strategy.py's is_choice and event)
        self._choices: set[int] | None = strategy.choice_keys(self.keys)
        self._events: bool = strategy.wants_events
        self.actors: list[Actor] = []
        self.current: Actor | None = None
        self.on = False
        self.aborting = False
        self.steps = 0
        self.timeouts = 0
        self.sems: dict[str, int] = {}
        self.sleepers: dict[str, list[Actor]] = {}
        self.sleep_seq = 0
        self.log: list[Step] = []
        self.finding: Finding | None = None
        self.decisions: list[int] = []       # the chosen actor at every decision (the DFS tree's path)
        self.switches: list[tuple[int, int, int]] = []    # (step, k, actor) where the choice was not the default
        self.preemptions = 0
        self._key = (0, -1)                  # the decision being made: (step, -1) at a point, (step, k) a wait's
        self._wait_step = -1
        self._wait_k = 0
        self._main: greenlet | None = None
        self._preempted = -1                 # the actor a preemption just handed the processor to

    # ------------------------------------------------------------------ running

    def add(self, name: str, fn: Callable[[], None], daemon: bool = False) -> Actor:
        a = Actor(len(self.actors), name, fn, daemon)
        self.actors.append(a)
        return a

    def run(self) -> Finding | None:
        """Run the actors to the end (or to a finding); returns the finding, if any."""
        self._main = greenlet.getcurrent()
        for a in self.actors:
            a.g = greenlet(self._body(a), parent=self._main)
        self.strategy.start(self)
        self.on = True
        ref = self.ref
        if ref is not None and not self.trace and self.coverage is None:
            ref.fast = self
        try:
            while self.finding is None:
                en = self.enabled()
                if not en:
                    en = self._unstick(None)
                    if not en:
                        break
                nxt = self._decide(en, None, False, True)
                self.current = nxt
                nxt.g.switch()                   # back here when an actor ends, or the execution stops
        except Stop:
            pass
        finally:
            self.on = False
            if ref is not None:
                ref.fast = None
            self._kill()
        return self.finding

    def _body(self, a: Actor) -> Callable[[], None]:
        def body() -> None:
            try:
                a.fn()
                # its end is a write the daemons' "are the others done" reads see (Context.others_done)
                key = self.keys.base(ACTOR_DONE) + a.id
                self._did(a, key, True)
                self._wrote(key)
            except Abort:
                pass
            except Stop:
                pass
            except BaseException as e:             # an actor crashed: an assertion, a LockError, ...
                if self.finding is None and not self.aborting:
                    self.finding = Finding("crash", f"{a.name}: {type(e).__name__}: {e}", self.steps, a.name)
            finally:
                a.state = DONE
        return body

    def _kill(self) -> None:
        self.aborting = True
        for a in self.actors:
            if a.g is not None and not a.g.dead:
                try:
                    a.g.throw(Abort)
                except (Abort, Stop):
                    pass
        self.aborting = False

    def stop(self, finding: Finding | None) -> None:
        """End the execution now (from an actor): back to the main loop, which unwinds the others."""
        if finding is not None and self.finding is None:
            self.finding = finding
        if greenlet.getcurrent() is self._main:
            raise Stop
        self._main.switch()
        raise Abort                              # resumed only to be killed

    # ------------------------------------------------------------------ points

    def point(self, section: str, word: int, write: bool, decide: bool = True) -> None:
        """Before an operation on a shared word: let the strategy pick who runs the next operation (unless
        `decide` is False: the debug checkers' own records), then note the operation as the actor's.  What
        a traced or covered execution notes besides (the operation pending, the access's site) is here; the
        rest is _point's."""
        a = self.current
        if self.trace:
            a.pending = (section, word, write)
        self._point(section, self.keys.base(section) + word, word, write, decide)
        if self.coverage is not None and decide:
            self.coverage.access(a.id, section, word, write, access_site())

    def _point(self, section: str, key: int, word: int, write: bool, decide: bool) -> None:
        """point() with the word's key made by the caller (PointWords keeps its section's base): the path of
        every operation of an execution neither traced nor covered, so written out in one function."""
        if self.aborting:
            raise Abort
        a = self.current
        steps = self.steps = self.steps + 1
        if steps > self.step_bound:
            self.stop(Finding("livelock", f"no end after {self.step_bound} steps (step bound): the actors keep "
                                          f"running without finishing", steps, a.name))
        if self._vio_load(_VIO_KIND):
            self.stop(Finding("violation", "", steps, a.name))
        choices = self._choices
        choice = choices is None or key in choices
        if choice and decide and section not in self.no_points and not (self.atomic and _inside(self.atomic)):
            en = self.enabled()
            if len(en) > 1:
                nxt = self._decide(en, a, True, False)
                if nxt is not a:
                    self._switch(a, nxt)
        # `a` runs its operation now: noted for the conflicting words, the spinners' wake-up and the reduction
        (a.wset if write else a.rset).add(key)
        if not a.dirty:
            a.reads.add(key)
        # the reduction sees the operations on conflicting words only: a word one actor alone touches orders
        # nothing; one that turns out to conflict is new to the points, and the iteration runs again with it
        if choice and self._events:
            self.strategy.event(a.id, key, write)

    def _did(self, a: Actor, key: int, write: bool) -> None:
        """An operation of `a` runs without a point of its own (an actor's end, the rest of a bulk access): noted
        as _point notes its operation."""
        (a.wset if write else a.rset).add(key)
        if not a.dirty:
            a.reads.add(key)
        if self._events:
            choices = self._choices
            if choices is None or key in choices:
                self.strategy.event(a.id, key, write)

    def touch(self, section: str, start: int, n: int, write: bool) -> None:
        """A bulk access through numpy (Words.touch: a freed table poisoned, a host page moved, a checker's
        snapshot): one scheduling point before it, and every word of it noted (and woken, if written)."""
        base = self.keys.base(section)
        self.point(section, start, write)
        a = self.current
        cov = self.coverage
        site = access_site() if cov is not None else ""
        for w in range(start + 1, start + n):
            if cov is not None:
                cov.access(a.id, section, w, write, site)
            self._did(a, base + w, write)
        if write:
            for w in range(start, start + n):
                self._wrote(base + w)

    def wrote(self, section: str, word: int) -> None:
        """A word changed: an actor that touched it since it last spun may now see something new (a spinner
        wakes).  One that touched nothing that changed would repeat its last turn exactly: it sleeps on.
        (SchedCore._wrote, by key.)"""
        self._wrote(self.keys.base(section) + word)

    def _decide(self, en: list[Actor], cur: Actor | None, preemptive: bool, wait: bool) -> Actor:
        """Ask the strategy who runs among `en`.  The default is `cur` if it is enabled, else the lowest id;
        another choice is a preemption when `preemptive` (the current actor could go on).  A decision is
        named by its step: (step, -1) before that step's operation, (step, k) the k-th decision of a wait
        (a block, a spin, an actor's end) at that step count: what Replay keys its switches by."""
        if len(en) == 1:
            return en[0]
        if wait:
            if self._wait_step == self.steps:
                self._wait_k += 1
            else:
                self._wait_step, self._wait_k = self.steps, 0
            self._key = (self.steps, self._wait_k)
        else:
            self._key = (self.steps, -1)
        default = cur if cur is not None and cur in en else en[0]
        nxt = self.strategy.choose(self, en, default, preemptive)
        self.decisions.append(nxt.id)
        if nxt is not default:
            self.switches.append((self._key[0], self._key[1], nxt.id))
            if preemptive:
                self.preemptions += 1
                self._preempted = nxt.id
        return nxt

    def decision_key(self) -> tuple[int, int]:
        return self._key

    def conflicts(self) -> dict[str, set[int]]:
        """The words of this execution that two actors touched, at least one of them writing."""
        actors = self.actors
        touched = [a.rset | a.wset for a in actors]
        found: set[int] = set()
        for i, a in enumerate(actors):
            if a.wset:
                for j, t in enumerate(touched):
                    if j != i:
                        found |= a.wset & t
        names = self.keys.names
        out: dict[str, set[int]] = {}
        for key in sorted(found):
            out.setdefault(names[key >> KEY_SHIFT], set()).add(key & WORD_MASK)
        return out

    def _switch(self, a: Actor, nxt: Actor) -> None:
        self.current = nxt
        nxt.g.switch()
        # back in `a`: whoever switched here chose it
        self.current = a
        if self.aborting:
            raise Abort

    def _block(self) -> None:
        """The current actor cannot go on: run someone else until it may."""
        a = self.current
        en = self.enabled()
        if not en:
            en = self._unstick(a)
            if not en:
                self.stop(None)
        nxt = self._decide(en, a, False, True)
        if nxt is not a:
            self._switch(a, nxt)
        if self.aborting:
            raise Abort

    def _unstick(self, cur: Actor | None) -> list[Actor]:
        """Every actor waits: end (the others done), time a sleeper out, or a deadlock."""
        live = [a for a in self.actors if a.state != DONE and not a.daemon]
        if not live:
            if cur is not None:
                self.stop(None)              # only daemons left, all waiting: the execution is over
            return []
        backoff = [a for a in self.actors if a.state == SPIN and a.backoff]
        if backoff:
            # a back-off yield with nobody else to run returns at once, as sched_yield does
            b = backoff[0]
            b.state = RUN
            return [b]
        timed = [a for a in self.actors if a.state == SEM and a.timed]
        if timed and self.timeouts < MAX_TIMEOUTS:
            self.timeouts += 1
            t = min(timed, key=lambda x: x.sleep_seq)
            self.sleepers[t.sem].remove(t)
            t.state, t.got_sem = RUN, False
            return [t]
        waits = ", ".join(f"{a.name} {STATE_NAMES[a.state]}" + (f" on {a.sem}" if a.state == SEM else "")
                          for a in self.actors if a.state != DONE)
        self.stop(Finding("deadlock", f"every actor waits ({waits})", self.steps, cur.name if cur else ""))
        return []

    # ------------------------------------------------------------------ the wait layer's side

    def spin(self, backoff: bool = False) -> None:
        """relax (a spin on a condition): block until another actor writes a word this one touched since its
        last spin (until then another turn would read the same values and spin again).  yield / pause
        (`backoff`): the same, but with nobody else able to run it goes on, as sched_yield returns at once."""
        a = self.current
        self.strategy.yielded(self, a)
        if a.dirty:
            # a word it touched changed since it last spun (maybe between the reads of this turn of its
            # loop): the turn must not sleep through it; it looks again at once (another actor may still
            # preempt it at its next conflicting operation)
            a.dirty = False
            a.reads = set()
            return
        a.state, a.backoff = SPIN, backoff
        self._block()
        a.dirty = False
        a.reads = set()

    def sem_acquire(self, name: str, timed: bool) -> bool:
        self.point("sem:" + name, 0, True)
        if self.trace:
            self.record(SEM_P, "sem:" + name, 0, (), None, self.sems.get(name, 0))
        n = self.sems.get(name, 0)
        if n:
            self.sems[name] = n - 1
            return True
        a = self.current
        a.state, a.sem, a.timed, a.got_sem = SEM, name, timed, False
        self.sleep_seq += 1
        a.sleep_seq = self.sleep_seq
        self.sleepers.setdefault(name, []).append(a)
        self._block()
        return a.got_sem

    def sem_release(self, name: str) -> None:
        self.point("sem:" + name, 0, True)
        if self.trace:
            self.record(SEM_V, "sem:" + name, 0, (), None, self.sems.get(name, 0))
        self.wrote("sem:" + name, 0)
        q = self.sleepers.get(name)
        if q:
            w = q.pop(0)
            w.state, w.got_sem = RUN, True
        else:
            self.sems[name] = self.sems.get(name, 0) + 1

    # ------------------------------------------------------------------ tracing

    def record(self, op: int, section: str, word: int, args: tuple, result: Any, before: int) -> None:
        a = self.current
        preempted = self._preempted == a.id
        if preempted:
            self._preempted = -1
        self.log.append(Step(self.steps, a.id, OP_NAMES[op], section, word, args, result, _function(),
                             preempted, before))


def _function() -> str:
    """The innermost library function on the stack (not the explorer's wrappers or the wait layer);
    "...:__init__" when a handle is being made (the step is part of a constructor)."""
    f = sys._getframe(2)
    name = "?"
    while f is not None:
        fn = f.f_code.co_filename
        if not fn.startswith(_HERE) and fn not in _QUIET_FILES:
            if name == "?":
                name = f"{os.path.basename(fn)}:{f.f_code.co_qualname}"
            if f.f_code.co_name == "__init__":
                return f"{os.path.basename(fn)}:__init__"
        f = f.f_back
    return name


def _inside(functions: frozenset[str]) -> bool:
    """Is a function of this set on the stack?"""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name in functions:
            return True
        f = f.f_back
    return False
