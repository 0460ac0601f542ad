"""Strategy: who runs next where the scheduler offers a choice: random, PCT, iteratively bounded DFS, and replay.

A strategy is asked at every *decision*: a scheduling point where more than
one actor is enabled.  It sees the enabled actors (in id order), the
`default` (the actor that goes on if nobody switches: the current actor at a
point, else the lowest id) and whether choosing another actor is a
*preemption* (the current actor is still enabled: it is switched away from,
not blocked or finished).  One definition of a preemption serves the search,
the shrinker and the report.

Which scheduling points are decisions is the strategy's too (`is_choice`):
the searches decide only before an operation on a *conflicting* word (one that
at least two actors access, at least one of them writing, in some execution
seen so far: `Explorer.points`); an operation on any other word commutes with
everything the other actors do, so a switch before it reaches nothing a switch
at the next conflicting operation does not reach, with no more preemptions.
Replay decides at every point, so a recorded switch lands at its step whatever
the point set was when it was recorded.

- `RandomStrategy`: uniform among the enabled actors.
- `PctStrategy` (Burckhardt et al., ASPLOS 2010): random priorities, and
  depth-1 priority change points over the expected length of an execution.
- `DfsStrategy`: every schedule with at most `bound` preemptions, by iterative
  context bounding (CHESS): all schedules with 0 preemptions, then 1, then 2,
  so a shallow bug never waits behind a deep subtree.  No partial-order
  pruning: sleep sets are unsound under a preemption bound (Coons, Musuvathi
  and McKinley, OOPSLA 2013), and the conflicting-word points are the only
  reduction.  An iteration that met a new conflicting word is run again with
  it, until one completes without (a fixpoint): only then is the bound
  "exhausted".
- `Replay`: the recorded switches (step, k, actor) of an execution.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from operator import attrgetter

_ID = attrgetter("id")              # an actor's id (a C call: the decisions make lists of them)


class Diverged(Exception):
    """The same decisions gave another set of enabled actors: the scenario is not deterministic."""


class Strategy:
    name = "?"
    points: dict[str, set[int]] | None = None          # the decisions' words (None: every point decides)
    wants_events = False                                # event() is called before every operation on a decision's word
    _choice_keys: tuple | None = None                   # (points, keys, their keys): choice_keys' last answer

    def is_choice(self, section: str, word: int) -> bool:
        p = self.points
        return p is None or word in p.get(section, ())

    def choice_keys(self, keys) -> set[int] | None:
        """The decisions' words as keys (sched.SectionKeys: what the scheduler tests at every point), None for
        every point; made once per `points` (a search replaces its points, never changes them in place)."""
        p = self.points
        if p is None:
            return None
        c = self._choice_keys
        if c is None or c[0] is not p or c[1] is not keys:
            out: set[int] = set()
            for section, words in p.items():
                base = keys.base(section)
                out.update(base + w for w in words)
            c = self._choice_keys = (p, keys, out)
        return c[2]

    def choose(self, sched, enabled: list, default, preemptive: bool) -> object:
        raise NotImplementedError

    def begin(self, execution: int) -> None:
        """Called before each execution."""

    def start(self, sched) -> None:
        """The execution's actors are in place (sched.actors): it begins."""

    def yielded(self, sched, actor) -> None:
        """An actor spins or backs off: it waits for the others."""

    def end(self, sched, new_points: bool) -> bool:
        """Called after each execution (`new_points`: it met a conflicting word outside `points`); False when
        the strategy has nothing more to run."""
        return True


class RandomStrategy(Strategy):
    name = "random"

    def __init__(self, seed: int, points: dict[str, set[int]] | None = None):
        self.seed = seed
        self.points = points
        self.rng = random.Random(seed)

    def begin(self, execution: int) -> None:
        self.rng = random.Random(f"{self.seed}:random:{execution}")

    def choose(self, sched, enabled, default, preemptive):
        return enabled[self.rng.randrange(len(enabled))]


class PctStrategy(Strategy):
    name = "pct"

    def __init__(self, seed: int, depth: int = 3, length: int = 400, points: dict[str, set[int]] | None = None):
        self.seed = seed
        self.points = points
        self.depth = max(1, depth)
        self.length = max(1, length)        # k: the steps an execution takes (estimated from the first)
        self.prio: dict[int, float] = {}
        self.change: list[int] = []
        self.rng = random.Random(seed)

    def begin(self, execution: int) -> None:
        self.rng = random.Random(f"{self.seed}:pct:{execution}")
        self.prio = {}
        self.change = sorted(self.rng.randrange(1, self.length + 1) for _ in range(self.depth - 1))

    def choose(self, sched, enabled, default, preemptive):
        prio = self.prio
        for a in sched.actors:
            if a.id not in prio:
                prio[a.id] = self.depth + self.rng.random()      # initial priorities: above every change
        while self.change and sched.steps >= self.change[0]:
            self.change.pop(0)
            if preemptive:
                prio[default.id] = len(self.change) + self.rng.random() * 0.5
        return max(enabled, key=lambda a: prio[a.id])

    def yielded(self, sched, actor) -> None:
        # a spinning actor waits for the others: below every other priority, or PCT would starve the
        # actor it waits for (a yield is a priority change, as in PCT implementations for spin loops)
        if actor.id in self.prio:
            self.prio[actor.id] = min(self.prio.values()) - 1

    def end(self, sched, new_points: bool) -> bool:
        self.length = max(self.length, sched.steps)
        return True


@dataclass
class _Node:
    """A decision of the DFS tree with an alternative within the bound: what was enabled, what was tried, and
    (with the reduction) which choices a race asked for."""

    enabled: list[int]
    default: int
    preemptive: bool
    cost: int                           # preemptions on the path before this node
    done: list[int] = field(default_factory=list)
    chosen: int = -1
    backtrack: set[int] = field(default_factory=set)

    def price(self, aid: int) -> int:
        return 1 if self.preemptive and aid != self.default else 0


class DfsStrategy(Strategy):
    name = "dfs"

    def __init__(self, bound: int = 2, points: dict[str, set[int]] | None = None, *, first_bound: int = 0,
                 prefix: list[int] | None = None, frozen_from: int = 0, iterate: bool = True,
                 rerun: bool = True, reduce: bool = True, top: dict[tuple[int, ...], _Node] | None = None,
                 top_depth: int = 0):
        """Every schedule with at most `bound` preemptions, bound `first_bound` first, then one more each
        iteration (`iterate=False`: only `bound`, in one iteration).  `points` (the explorer's learned
        conflicting words, updated in place between executions; None: every point decides) is snapshotted
        at each iteration's start; `rerun=False` leaves the fixpoint to the caller (a share of a search
        spread over processes: `prefix` is the subtree's root path, and `new_points` says whether to
        run it again).  `frozen_from`: never backtrack at or below this depth (enumerating prefixes).
        `reduce`: bounded partial-order reduction (below); False enumerates every choice within the bound.
        `top`: the first `top_depth` decisions kept whole across executions (shmmmu.explore.split): this
        strategy's own nodes there are frozen, and what races ask of them goes to `top`'s nodes."""
        self.max_bound = bound
        self.reduce = reduce
        self.wants_events = reduce
        self.learned = points
        self.rerun = rerun
        self.new_points = False
        self.bound = first_bound if iterate else bound
        self.prefix = list(prefix or [])
        self.frozen_from = frozen_from
        self.top = top
        self.top_depth = top_depth if top is not None else 0
        self.stack: list[_Node] = []
        self.depth = 0
        self.cost = 0
        self.exhausted = False
        self.executions = 0
        self.reruns = 0                             # iterations run again because they met new conflicting words
        self.iteration_new = False
        self.completed: list[tuple[int, int]] = []  # (bound, executions when its iteration was exhausted)
        self._width = 32                            # a vector clock's entries: the actors (start() sets it)
        self._snapshot()

    def _snapshot(self) -> None:
        self.points = None if self.learned is None else {s: set(w) for s, w in self.learned.items()}

    def begin(self, execution: int) -> None:
        self.depth = 0
        self.cost = 0
        self.top_path: list[int] = []               # this execution's decisions in the top
        # the reduction's view of this execution: vector clocks (one entry per actor), each word's last write
        # and the reads since
        self._clock: dict[int, list[int]] = {}
        self._writes: dict[int, tuple] = {}             # by word key (sched.SectionKeys)
        self._reads: dict[int, dict[int, tuple]] = {}
        self._pending = -1                          # the node just decided: the state before the next operation
        self._first = -1                            # the first node since the last operation: where a run begins
        self._block: dict[int, int] = {}            # actor -> the node where its current run began
        self._runner = -1

    def start(self, sched) -> None:
        self._width = len(sched.actors)

    def choose(self, sched, enabled, default, preemptive):
        ids = list(map(_ID, enabled))
        cost = self.cost
        if preemptive and cost + 1 > self.bound:
            return default                          # no alternative within the bound: not a node
        d = self.depth
        self.depth += 1
        if d < len(self.stack):
            node = self.stack[d]
            if node.enabled != ids or node.default != default.id:
                raise Diverged("the exploration diverged: the same decisions gave another set of enabled "
                               "actors (is the scenario deterministic?)")
        else:
            node = _Node(ids, default.id, preemptive, cost)
            if d < self.top_depth:
                # a decision of the top: frozen here, kept whole in `top` (the prefix, then the default)
                path = tuple(n.chosen for n in self.stack)
                shared = self.top.get(path)
                if shared is None:
                    shared = self.top[path] = _Node(ids, default.id, preemptive, cost, backtrack={default.id})
                elif shared.enabled != ids or shared.default != default.id:
                    raise Diverged("the exploration diverged: the same decisions gave another set of enabled "
                                   "actors (is the scenario deterministic?)")
                node.chosen = self.prefix[d] if d < len(self.prefix) else default.id
                if node.chosen not in ids:
                    raise Diverged("the subtree's prefix does not fit this scenario's execution")
                if node.chosen not in shared.done:
                    shared.done.append(node.chosen)
                node.done = list(ids)
            elif d < len(self.prefix):
                # a fixed decision of the subtree's root path: never backtracked
                if self.prefix[d] not in ids:
                    raise Diverged("the subtree's prefix does not fit this scenario's execution")
                node.chosen, node.done = self.prefix[d], list(ids)
            else:
                node.chosen = default.id                # the first choice: no preemption
                node.done.append(node.chosen)
                node.backtrack.add(node.chosen)
                if self.frozen_from and d >= self.frozen_from:
                    node.done = list(ids)               # below the enumeration depth: one path only
            self.stack.append(node)
        if node.preemptive and node.chosen != node.default:       # node.price(node.chosen), written out
            cost += 1
        self.cost = cost
        if d < self.top_depth:
            self.top_path.append(node.chosen)
        self._pending = d
        if self._first < 0:
            self._first = d
        return enabled[ids.index(node.chosen)]

    def _untried(self, node: _Node) -> list[int]:
        """The node's untried choices within the bound, in id order (the default was tried first): with the
        reduction only those a race asked for."""
        pool = node.backtrack if self.reduce else node.enabled
        return sorted(i for i in pool if i not in node.done and node.cost + node.price(i) <= self.bound)

    # ------------------------------------------------------------------ the reduction

    def event(self, actor: int, key: int, write: bool) -> None:
        """An operation of `actor` on a word (`key`: sched.SectionKeys), about to run.  Races with earlier
        operations of other actors on the word (one of the two writing, neither ordered before the other
        through a third) ask their nodes to try `actor` first (DPOR, Flanagan and Godefroid 2005); and, as
        bounded POR requires (Coons, Musuvathi and McKinley 2013), also at the node where the other actor's run
        began, where reversing the race needs no more preemptions than the run itself took."""
        q = actor
        node = self._pending
        if node < 0:
            node = first = self.depth - 1       # no decision just before: the last one, within q's run
        else:
            first = self._first
            self._pending = self._first = -1
        if q != self._runner:
            self._runner = q
            self._block[q] = block = first      # every decision since the last operation led here
        else:
            block = self._block[q]
        clocks = self._clock
        clock = clocks.get(q)
        if clock is None:
            clock = clocks[q] = [0] * self._width
        # the operations this one depends on: the word's last write by another actor, and (a write) the reads
        # of others since; each not ordered before this operation by q's clock is a race, and its clock joins
        # q's (the races are judged by q's clock before any joins)
        new = clock.copy()
        new[q] += 1
        w = self._writes.get(key)
        if w is not None and w[0] != q:
            if w[1] > clock[w[0]]:
                self._backtrack(w[3], q)
                if w[4] != w[3]:
                    self._backtrack(w[4], q)
            new = list(map(max, new, w[2]))
        if write:
            rd = self._reads.pop(key, None)
            if rd:
                for p, v in rd.items():
                    if p != q:
                        if v[1] > clock[p]:
                            self._backtrack(v[3], q)
                            if v[4] != v[3]:
                                self._backtrack(v[4], q)
                        new = list(map(max, new, v[2]))
            clocks[q] = new
            self._writes[key] = (q, new[q], new, node, block)
        else:
            clocks[q] = new
            rd = self._reads.get(key)
            if rd is None:
                self._reads[key] = {q: (q, new[q], new, node, block)}
            else:
                rd[q] = (q, new[q], new, node, block)

    def _backtrack(self, index: int, actor: int) -> None:
        if 0 <= index < len(self.stack):
            node = self.stack[index]
            if index < self.top_depth:
                node = self.top[tuple(n.chosen for n in self.stack[:index])]
            if actor in node.enabled:
                node.backtrack.add(actor)
            else:
                node.backtrack.update(node.enabled)     # it cannot run there: every other order is asked for

    def end(self, sched, new_points: bool) -> bool:
        """Backtrack to the deepest node with an untried choice.  When the iteration is over: run it again if
        it met new conflicting words, else go on to the next bound; False when the last bound is done."""
        self.executions += 1
        self.iteration_new |= new_points
        self.new_points |= new_points
        del self.stack[self.depth:]
        while self.stack:
            node = self.stack[-1]
            order = self._untried(node)
            if order:
                node.chosen = order[0]
                node.done.append(node.chosen)
                return True
            self.stack.pop()
        # this bound's tree is done (bound 0's has no decision at a point: the points do not shape it)
        if self.iteration_new and self.rerun and self.learned is not None and self.bound > 0:
            self.reruns += 1                        # its tree had decisions it did not know of: again
        else:
            self.completed.append((self.bound, self.executions))
            if self.bound >= self.max_bound:
                self.exhausted = True
                return False
            self.bound += 1
        self.iteration_new = False
        self._snapshot()
        return True

    @property
    def exhausted_bound(self) -> int:
        """The highest bound whose every schedule ran (-1: none yet)."""
        return self.completed[-1][0] if self.completed else -1


class Replay(Strategy):
    """The switches (step, k, actor) of a recorded execution: at step `step` (k = -1: the point before that
    operation; k >= 0: the k-th wait decision at that step count) `actor` runs instead of the default."""
    name = "replay"

    def __init__(self, switches: list[tuple[int, int, int]]):
        self.switches = {(s, k): a for s, k, a in switches}
        self.used = 0
        self.diverged = ""

    def begin(self, execution: int) -> None:
        self.used = 0
        self.diverged = ""

    def choose(self, sched, enabled, default, preemptive):
        want = self.switches.get(sched.decision_key())
        if want is None:
            return default
        self.used += 1
        for a in enabled:
            if a.id == want:
                return a
        if not self.diverged:
            self.diverged = (f"the switch to actor {want} at step {sched.steps} finds it not enabled "
                             f"(enabled: {[a.id for a in enabled]})")
        return default

    def end(self, sched, new_points: bool) -> bool:
        if not self.diverged and self.used != len(self.switches):
            self.diverged = (f"{len(self.switches) - self.used} of the {len(self.switches)} recorded switches "
                             f"were never reached (the execution ended before their steps)")
        return True
