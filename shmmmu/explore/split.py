"""Split: the bounded DFS as rounds of subtrees under a shared top, the same answer in one process or in many.

The first `TOP_DEPTH` decisions of the DFS tree are kept whole (the *top*:
node by path).  A round first runs one execution down each alternative of the
top that a race asked for and nobody has run (an *enumeration*: the path, then
the default choice to the end), which yields the *prefixes* (the first
TOP_DEPTH decisions of an execution); then it explores, fully, the subtree
under each new prefix, with the bounded partial-order reduction below the top.
What races in a subtree ask of a top node goes to the top, and the next round
runs it.  Rounds go on until the top has nothing left to run; then the bound is
done (unless an execution met a conflicting word the round did not know: then
the bound is run again with it), and the next bound starts.

The set of schedules run is the reduction's fixpoint, whatever order the
subtrees run in; the answer is the first finding in the canonical order
(bound, round, enumerations then subtrees in the order they were found, each
subtree depth first), and executions are counted in that order against the
budget.  A process pool that runs a round's subtrees side by side
(workers/explore.py, shmmmu campaign) therefore gives exactly the answer one
process gives: it runs every subtree before the first failing one whole, and
counts them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from shmmmu.explore.explorer import Explorer, Result, SearchResult, seed_points
from shmmmu.explore.strategy import DfsStrategy, _Node

TOP_DEPTH = 3


@dataclass
class SubtreeResult:
    """What one subtree's exploration gives back: how many executions, its first finding (and where), what its
    races asked of the top, and the conflicting words its executions met."""

    executions: int
    steps: int
    first: Result | None = None
    first_index: int = -1
    requests: list[tuple[tuple[int, ...], int]] = field(default_factory=list)
    points: dict[str, set[int]] = field(default_factory=dict)


class _TopProxy(dict):
    """The top as a subtree's strategy sees it: the nodes it needs, and its requests recorded."""

    def __init__(self, nodes: dict[tuple[int, ...], _Node]):
        super().__init__({p: _Node(n.enabled, n.default, n.preemptive, n.cost, list(n.done), n.chosen,
                                   set(n.backtrack)) for p, n in nodes.items()})
        self.requests: list[tuple[tuple[int, ...], int]] = []


def explore_subtree(explorer: Explorer, prefix: tuple[int, ...], bound: int, points: dict[str, set[int]],
                    top: dict[tuple[int, ...], _Node], limit: int,
                    observe: Callable[[Result], None] | None = None, stop: bool = True) -> SubtreeResult:
    """Every schedule under `prefix` within `bound` (reduced), at most `limit` executions; stops at the first
    finding.  `top` is read, never changed: its requests come back in the result.  `observe` sees every
    execution, with its final state (the crosscheck's)."""
    proxy = _TopProxy(top)
    before = {s: set(w) for s, w in explorer.points.items()}
    dfs = DfsStrategy(bound, points, prefix=list(prefix), iterate=False, rerun=False, top=proxy,
                      top_depth=TOP_DEPTH)
    out = SubtreeResult(0, 0)
    while out.executions < limit:
        r = explorer.execute(dfs, out.executions, state=observe is not None)
        if observe is not None:
            observe(r)
        out.executions += 1
        out.steps += r.steps
        if r.finding is not None and out.first is None:
            r.log = []
            out.first, out.first_index = r, out.executions - 1
            if stop:
                break
        if not r.more:
            break
    for path, n in proxy.items():
        base = top.get(path)
        for a in sorted(n.backtrack - (base.backtrack if base is not None else set())):
            out.requests.append((path, a))
    out.points = {s: w - before.get(s, set()) for s, w in explorer.points.items() if w - before.get(s, set())}
    return out


SubtreeRunner = Callable[[list[tuple[int, ...]], int, dict[str, set[int]], dict[tuple[int, ...], _Node], int],
                         list[SubtreeResult]]


def sequential_runner(explorer: Explorer, observe: Callable[[Result], None] | None = None,
                      stop: bool = True) -> SubtreeRunner:
    """Subtrees one after another in this process; stops after the first that fails (the later ones do not
    count in the canonical order), unless `stop` is False."""
    def run(prefixes, bound, points, top, limit):
        out = []
        for p in prefixes:
            r = explore_subtree(explorer, p, bound, points, top, limit, observe, stop)
            out.append(r)
            limit -= r.executions
            if (r.first is not None and stop) or limit <= 0:
                break
        return out
    return run


def split_search(explorer: Explorer, max_bound: int, max_executions: int, runner: SubtreeRunner | None = None,
                 progress: Callable[[int, float, int], None] | None = None, first_bound: int = 0,
                 observe: Callable[[Result], None] | None = None, stop: bool = True,
                 time_limit: float = 0.0) -> SearchResult:
    """The bounded DFS of shmmmu explore --strategy dfs: bounds first_bound..max_bound, each in rounds
    (above).  `observe` sees every execution in this process with its final state, and `stop=False` goes on
    past findings (the crosscheck's).  `time_limit` (seconds, 0: none) is the only limit whose answer depends
    on the machine: it is checked between rounds."""
    import time
    t0 = time.monotonic()
    seed_points(explorer)
    run = runner or sequential_runner(explorer, observe, stop)
    total = SearchResult(0, 0.0, 0, None)
    bound_done = -1
    reruns = 0

    def over(first: Result | None = None, index: int = -1, capped: str = "", exhausted: bool = False) -> SearchResult:
        total.first, total.first_index, total.capped, total.exhausted = first, index, capped, exhausted
        total.bound_done, total.reruns, total.seconds = bound_done, reruns, time.monotonic() - t0
        return total

    bound = first_bound
    while bound <= max_bound:
        points = {s: set(w) for s, w in explorer.points.items()}
        top: dict[tuple[int, ...], _Node] = {}
        seen: set[tuple[int, ...]] = set()
        todo: list[tuple[int, ...]] = [()]            # paths to run as enumerations
        met_new = False
        while todo:
            # the enumerations of this round, in path order
            prefixes = []
            for path in sorted(todo):
                dfs = DfsStrategy(bound, points, prefix=list(path), iterate=False, rerun=False, top=top,
                                  top_depth=TOP_DEPTH, frozen_from=TOP_DEPTH)
                r = explorer.execute(dfs, total.executions, state=observe is not None)
                if observe is not None:
                    observe(r)
                total.executions += 1
                total.steps += r.steps
                met_new |= r.new_points
                if r.finding is not None and stop:
                    r.log = []
                    return over(r, total.executions - 1)
                p = tuple(dfs.top_path)
                if p not in seen:
                    seen.add(p)
                    prefixes.append(p)
                if max_executions and total.executions >= max_executions:
                    return over(capped="executions")
            todo = []
            # the round's subtrees, in the order their prefixes were found
            results = run(prefixes, bound, points, top, max_executions - total.executions if max_executions
                          else 1 << 62)
            for r in results:
                base = total.executions
                if max_executions and base + r.executions > max_executions:
                    # the canonical order stops inside this subtree: its finding counts only before that
                    if r.first is not None and stop and base + r.first_index < max_executions:
                        total.executions = base + r.first_index + 1
                        return over(r.first, base + r.first_index)
                    total.executions = max_executions
                    return over(capped="executions")
                total.executions += r.executions
                total.steps += r.steps
                for s, w in r.points.items():
                    if not w <= points.get(s, set()):
                        met_new = True
                    explorer.points.setdefault(s, set()).update(w)
                if r.first is not None and stop:
                    return over(r.first, base + r.first_index)
                for path, a in r.requests:
                    node = top[path]
                    if a in node.enabled:
                        node.backtrack.add(a)
                    else:
                        node.backtrack.update(node.enabled)
            if max_executions and total.executions >= max_executions:
                return over(capped="executions")
            if time_limit and time.monotonic() - t0 >= time_limit:
                return over(capped="time")
            if progress is not None:
                progress(total.executions, time.monotonic() - t0, 0)
            # the top's alternatives a race asked for that no enumeration has run yet
            for path in sorted(top):
                node = top[path]
                for a in sorted(node.backtrack):
                    if a not in node.done and node.cost + node.price(a) <= bound:
                        node.done.append(a)
                        todo.append(path + (a,))
        if met_new and bound > 0:
            reruns += 1                 # the bound's tree had decisions its round did not know: again
            continue
        bound_done = bound
        bound += 1
    return over(exhausted=True)
