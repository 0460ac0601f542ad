"""Strategy: who runs next at a scheduling point: random, PCT, bounded-preemption DFS with sleep sets, and replay.

Every strategy sees, at each point with a choice, the enabled actors (in id
order) and the actor that ran last (None if it just ended or blocked); it
returns the actor to run.  The scheduler records every choice in
`Scheduler.decisions`: that list, replayed by `Replay`, re-executes the same
interleaving exactly.

- `RandomStrategy`: uniform among the enabled actors.
- `PctStrategy` (Burckhardt et al., ASPLOS 2010): random priorities for the
  actors, and depth-1 change points drawn over the expected length of an
  execution; the highest-priority enabled actor runs, and at a change point
  the running actor's priority drops below every other.  A bug of depth d is
  found with probability at least 1/(n k^(d-1)) per execution.
- `DfsStrategy`: every interleaving with at most `preemptions` preemptions
  (CHESS's iterative context bounding), depth first, one execution at a time
  from the start; sleep sets prune a choice whose next operation commutes
  with one already explored from the same point (different words, or two
  loads).  `exhausted` says when every schedule within the bound was run.
- `Replay`: the recorded decisions; a decision naming an actor that is not
  enabled is a divergence (the code or the scenario changed).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field


class Strategy:
    name = "?"

    def choose(self, sched, enabled: list, current) -> object:
        raise NotImplementedError

    def begin(self, execution: int) -> None:
        """Called before each execution."""

    def yielded(self, sched, actor) -> None:
        """An actor spins or backs off: it waits for the others."""

    def end(self, sched) -> bool:
        """Called after each execution; False when the strategy has nothing more to run."""
        return True


class RandomStrategy(Strategy):
    name = "random"

    def __init__(self, seed: int):
        self.seed = seed
        self.rng = random.Random(seed)

    def begin(self, execution: int) -> None:
        self.rng = random.Random(f"{self.seed}:random:{execution}")

    def choose(self, sched, enabled, current):
        return enabled[self.rng.randrange(len(enabled))]


class PctStrategy(Strategy):
    name = "pct"

    def __init__(self, seed: int, depth: int = 3, length: int = 400):
        self.seed = seed
        self.depth = max(1, depth)
        self.length = max(1, length)        # k: the steps an execution takes (estimated from the first)
        self.prio: dict[int, int] = {}
        self.change: list[int] = []
        self.rng = random.Random(seed)

    def begin(self, execution: int) -> None:
        self.rng = random.Random(f"{self.seed}:pct:{execution}")
        self.prio = {}
        self.change = sorted(self.rng.randrange(1, self.length + 1) for _ in range(self.depth - 1))

    def choose(self, sched, enabled, current):
        prio = self.prio
        for a in sched.actors:
            if a.id not in prio:
                prio[a.id] = self.depth + self.rng.random()      # initial priorities: above every change
        while self.change and sched.steps >= self.change[0]:
            self.change.pop(0)
            if current is not None:
                prio[current.id] = len(self.change) + self.rng.random() * 0.5
        return max(enabled, key=lambda a: prio[a.id])

    def yielded(self, sched, actor) -> None:
        # a spinning actor waits for the others: below every other priority, or PCT would starve the
        # actor it waits for (a yield is a priority change, as in PCT implementations for spin loops)
        if actor.id in self.prio:
            self.prio[actor.id] = min(self.prio.values()) - 1

    def end(self, sched) -> bool:
        self.length = max(self.length, sched.steps)
        return True


@dataclass
class _Node:
    """A point with a choice in the DFS tree: what was enabled, what has been tried, and the sleep set."""

    enabled: list[int]
    pending: dict[int, tuple]           # each enabled actor's next operation
    current: int | None                 # the actor that ran last, if it is still enabled
    preemptions: int                    # preemptions on the path before this node
    done: list[int] = field(default_factory=list)
    sleep: set[int] = field(default_factory=set)
    chosen: int = -1


def _independent(p: tuple, q: tuple) -> bool:
    """Two pending operations commute: different words, or both reads."""
    return (p[0], p[1]) != (q[0], q[1]) or (not p[2] and not q[2])


class DfsStrategy(Strategy):
    name = "dfs"

    def __init__(self, preemptions: int = 2, max_executions: int = 0, *, prefix: list[int] | None = None,
                 frozen_from: int = 0):
        """`prefix`: explore only the subtree under these first choices (a part of a search spread over
        processes); `frozen_from`: never backtrack at or below this depth (enumerating such prefixes)."""
        self.bound = preemptions
        self.max_executions = max_executions
        self.prefix = list(prefix or [])
        self.frozen_from = frozen_from
        self.stack: list[_Node] = []
        self.depth = 0
        self.exhausted = False
        self.executions = 0
        self.pruned = 0

    def begin(self, execution: int) -> None:
        self.depth = 0

    def _pre(self, node_current: int | None, aid: int) -> int:
        return 1 if node_current is not None and aid != node_current else 0

    def choose(self, sched, enabled, current):
        ids = [a.id for a in enabled]
        cur = current.id if current is not None and current in enabled else None
        d = self.depth
        self.depth += 1
        if d < len(self.stack):
            node = self.stack[d]
            if node.enabled != ids:
                raise RuntimeError("the exploration diverged: the same decisions gave another set of enabled "
                                   "actors (is the scenario deterministic?)")
            return enabled[ids.index(node.chosen)]
        pre = self.stack[-1].preemptions + self._pre(self.stack[-1].current, self.stack[-1].chosen) \
            if self.stack else 0
        parent_sleep: set[int] = set()
        if self.stack:
            p = self.stack[-1]
            chosen_op = p.pending[p.chosen]
            parent_sleep = {u for u in p.sleep if u in ids and _independent(p.pending[u], chosen_op)}
        node = _Node(ids, {a.id: a.pending for a in enabled}, cur, pre, sleep=set(parent_sleep))
        if d < len(self.prefix):
            # a fixed choice of the subtree's root path: never backtracked, no sleep set across it
            if self.prefix[d] not in ids:
                raise RuntimeError("the subtree's prefix does not fit this scenario's execution")
            node.chosen, node.done, node.sleep = self.prefix[d], list(ids), set()
            self.stack.append(node)
            return enabled[ids.index(node.chosen)]
        # the first choice: not a preemption if possible, and not asleep
        order = self._order(node)
        if not order:
            # every enabled actor sleeps here: this schedule repeats one already run
            self.pruned += 1
            order = [ids[0]] if cur is None else [cur]
        node.chosen = order[0]
        node.done.append(node.chosen)
        if self.frozen_from and d >= self.frozen_from:
            node.done = list(ids)                # below the enumeration depth: one path only
        self.stack.append(node)
        return enabled[ids.index(node.chosen)]

    def _order(self, node: _Node) -> list[int]:
        """The node's untried choices within the preemption bound, not asleep, current actor first."""
        first = [node.current] if node.current is not None else []
        cand = first + [i for i in node.enabled if i != node.current]
        return [i for i in cand if i not in node.done and i not in node.sleep
                and node.preemptions + self._pre(node.current, i) <= self.bound]

    def end(self, sched) -> bool:
        """Backtrack to the deepest node with an untried choice; False when there is none (exhausted)."""
        self.executions += 1
        del self.stack[self.depth:]
        while self.stack:
            node = self.stack[-1]
            node.sleep.add(node.chosen)
            order = self._order(node)
            if order:
                node.chosen = order[0]
                node.done.append(node.chosen)
                break
            self.stack.pop()
        if not self.stack:
            self.exhausted = True
            return False
        return not (self.max_executions and self.executions >= self.max_executions)


class Replay(Strategy):
    name = "replay"

    def __init__(self, decisions: list[int]):
        self.decisions = list(decisions)
        self.pos = 0
        self.diverged = ""

    def begin(self, execution: int) -> None:
        self.pos = 0
        self.diverged = ""

    def choose(self, sched, enabled, current):
        if self.pos < len(self.decisions):
            want = self.decisions[self.pos]
            self.pos += 1
            for a in enabled:
                if a.id == want:
                    return a
            if not self.diverged:
                self.diverged = (f"decision {self.pos} names actor {want}, which is not enabled at step "
                                 f"{sched.steps} (enabled: {[a.id for a in enabled]})")
        elif not self.diverged and self.decisions:
            # past the recorded decisions: the schedule runs longer than when it was recorded
            self.diverged = f"the execution needs more than the {len(self.decisions)} recorded decisions"
            self.pos += 1
        # beyond (or off) the record: keep the current actor, as a schedule without preemptions would
        if current is not None and current in enabled:
            return current
        return enabled[0]

    @property
    def consumed_all(self) -> bool:
        return self.pos == len(self.decisions)
