"""The explorer's faster executions change nothing: handles put back equal new ones, and the searches are the same.

An execution's actors get their handles put back in place rather than made
afresh (shmmmu.explore.handles), and the points that decide nothing are noted
in C (shmmmu/_sched.c) rather than by Scheduler._point.  Both must leave every
search exactly as it was: the same steps, decisions, switches, findings,
learned points and final states, execution by execution.  A handle put back is
compared with a new one field by field (every attribute, slot and C member of
every object it reaches, the closures of its debug checkers included), after
executions that used it.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from shmmmu.explore.explorer import Context, Explorer, make_strategy, seed_points
from shmmmu.explore.points import PointColumn, PointWords
from shmmmu.explore.scenarios import SCENARIOS, for_bug
from shmmmu.explore.sched import KEY_SHIFT, Scheduler
from shmmmu.explore.strategy import RandomStrategy
from shmmmu.mmu import Mmu

# scenarios that between them use every kind of handle and wait: vCPUs and hosts, the reclaimer (a daemon),
# the exclusive lock, semaphore sleeps, memslot changes, dirty logging and an oracle's notes, huge pages
SOME = ["fault-fault", "fault-zap", "split-huge", "walk-zap-reclaim", "zap-yield", "reader-vs-waiting-writer",
        "memslot-unmap", "dirty-log", "unmap-reload"]
_SHARED = ("Region", "VMConfig", "Geometry", "Semaphore", "SchedRef", "ExploreWaits", "Explorer", "greenlet",
           "Random", "Scheduler", "Context", "Columns", "Column")


def state_of(root: object, region) -> object:
    """Everything `root` reaches, as plain data: each object's attributes, slots and C members (by path, so two
    graphs of the same shape compare equal), region views by section, functions with their closures."""
    base = np.frombuffer(region.mm, dtype=np.uint8).__array_interface__["data"][0]
    seen: dict[int, str] = {}

    def members(o: object) -> list[tuple[str, object]]:
        names = []
        for cls in type(o).__mro__:
            for n, v in vars(cls).items():
                if isinstance(v, types.MemberDescriptorType) and n not in names:
                    names.append(n)
        out = [(n, getattr(o, n, "<unset>")) for n in names]
        return out + list(getattr(o, "__dict__", {}).items())

    def walk(x: object, path: str) -> object:
        t = type(x)
        if x is None or t in (int, float, str, bool, bytes):
            return x
        if t in (tuple, list):
            return (t.__name__, [walk(v, f"{path}[{i}]") for i, v in enumerate(x)])
        if t is dict:
            return ("dict", [(walk(k, path), walk(v, f"{path}[{k!r}]")) for k, v in x.items()])
        if t in (set, frozenset):
            return (t.__name__, sorted(repr(walk(v, path)) for v in x))
        if isinstance(x, np.ndarray):
            at = x.__array_interface__["data"][0] - base
            if 0 <= at < len(region.mm):
                return ("region", at, x.shape)
            return ("array", x.shape, str(x.dtype), x.tobytes())
        if isinstance(x, PointWords):
            return ("words", x._sec)
        if isinstance(x, PointColumn):
            return ("column", x._p._sec, x.width, x.field)
        if isinstance(x, types.MethodType):
            return ("method", x.__func__.__qualname__, walk(x.__self__, path + ".__self__"))
        if isinstance(x, types.BuiltinMethodType):
            s = x.__self__
            return ("builtin", x.__name__, s.__name__ if isinstance(s, types.ModuleType) else walk(s, path))
        if isinstance(x, types.FunctionType):
            cells = [walk(c.cell_contents, f"{path}<{i}>") for i, c in enumerate(x.__closure__ or ())]
            return ("function", x.__qualname__, cells)
        if isinstance(x, (type, types.ModuleType)):
            return ("type", getattr(x, "__qualname__", getattr(x, "__name__", "")))
        if id(x) in seen:
            return ("ref", seen[id(x)])
        seen[id(x)] = path
        mod = getattr(t, "__module__", "") or ""
        if t.__name__ in _SHARED or not (mod.startswith("shmmmu") or mod.startswith("_")):
            return ("shared", t.__name__)
        return ("object", t.__qualname__, [(n, walk(v, f"{path}.{n}")) for n, v in members(x)])

    return walk(root, "handle")


def _put_back_and_new(name: str, executions: int, bug: str = "") -> tuple[list[tuple[str, object, object]], int]:
    """After each of a few executions (PCT; with a bug switch the DFS, whose executions end at its findings,
    actors stopped anywhere): the explorer's handles put back, beside new ones made on the same (initial)
    region; and how many executions found something."""
    out, found = [], 0
    with Explorer(for_bug(bug) if bug else SCENARIOS[name], [bug] if bug else []) as ex:
        seed_points(ex)
        strategy = make_strategy("dfs" if bug else "pct", 1, points=ex.points)
        for i in range(executions):
            found += ex.execute(strategy, i).finding is not None
            h = ex.handles
            ex.reset()
            new = Context(ex, None)
            pairs = [(f"vCPU{k}", h.vcpu(k), new.vcpu(k)) for k in list(h._vcpus)]
            pairs += [(f"host worker {w}", h.host(w), Mmu(new._vm(w), w)) for w in list(h._hosts)]
            if h._reclaimer is not None:
                pairs.append(("reclaimer", h.reclaimer(), new.reclaimer()))
            assert pairs, f"{name}: no handle was kept"
            out += [(f"{name} execution {i}: {who}", state_of(a, ex.region), state_of(b, ex.region))
                    for who, a, b in pairs]
    return out, found


@pytest.mark.parametrize("name", SOME)
def test_a_handle_put_back_equals_a_new_one(name: str) -> None:
    for who, put_back, new in _put_back_and_new(name, 4)[0]:
        assert put_back == new, who


@pytest.mark.parametrize("bug", ["fault-plain-store", "zero-removed-children", "rcu-free-immediately",
                                 "fault-zap-flush-late", "fault-into-invalid-root"])
def test_a_handle_put_back_after_an_execution_stopped_anywhere_equals_a_new_one(bug: str) -> None:
    """An execution that fails stops its actors wherever they are (a lock held, inside an RCU read section, a
    flush owed): what they leave is put back too."""
    pairs, found = _put_back_and_new(bug, 16, bug)
    assert found, f"{bug}: no execution failed"
    for who, put_back, new in pairs:
        assert put_back == new, who


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(SCENARIOS) - set(SOME)))
def test_a_handle_put_back_equals_a_new_one_in_every_scenario(name: str) -> None:
    for who, put_back, new in _put_back_and_new(name, 6)[0]:
        assert put_back == new, who


def test_the_comparison_sees_a_field_left_as_an_execution_left_it() -> None:
    """The field-by-field comparison can fail: a vCPU's TLB left full is not a new one's."""
    with Explorer(SCENARIOS["fault-fault"], []) as ex:
        ex.execute(make_strategy("pct", 1), 0)
        used = ex.handles._vcpus[0]
        assert used.tlb.size > 0
        ex.reset()
        new = Context(ex, None).vcpu(0)
        assert state_of(used, ex.region) != state_of(new, ex.region)


def _records(sc, bugs: list[str], strategy: str, seed: int, n: int, reuse: bool, fast: bool) -> list[tuple]:
    """Every execution of a search (after the points' seeding) as its steps, decisions, switches, finding,
    learned points and final state."""
    out = []
    with Explorer(sc, bugs) as ex:
        if not reuse:
            ex.handles = None
        ex.fast_points = fast
        seed_points(ex)
        st = make_strategy(strategy, seed, preemptions=2, points=ex.points)
        for i in range(n):
            r = ex.execute(st, i, state=True)
            out.append((i, r.steps, r.preemptions, r.switches, r.decisions, str(r.finding), r.new_points, r.state))
            if not r.more:
                break
        # a semaphore's pseudo-section is named by the region's (each explorer's own) name
        out.append(sorted((s.replace(ex.name, "VM"), sorted(w)) for s, w in ex.points.items()))
    return out


@pytest.mark.parametrize("name, strategy, seed", [(n, "dfs", 1) for n in SOME] + [
    ("fault-zap", "pct", 1), ("walk-zap-reclaim", "pct", 3), ("reader-vs-waiting-writer", "random", 2),
    ("mix", "pct", 1)])
def test_the_search_is_the_same_with_new_handles_and_python_points(name: str, strategy: str, seed: int) -> None:
    sc = SCENARIOS[name]
    fast = _records(sc, [], strategy, seed, 60, reuse=True, fast=True)
    assert fast == _records(sc, [], strategy, seed, 60, reuse=False, fast=True)
    assert fast == _records(sc, [], strategy, seed, 60, reuse=True, fast=False)


@pytest.mark.parametrize("bug", ["fault-plain-store", "zero-removed-children", "rcu-free-immediately",
                                 "no-forward-progress", "root-refcount-not-atomic"])
def test_a_bug_is_found_at_the_same_execution_the_same_way(bug: str) -> None:
    """Executions that fail (a violation, a crash, an end check) and those after them are the same too."""
    runs = [_records(for_bug(bug), [bug], "dfs", 1, 60, reuse, fast) for reuse, fast in ((True, True),
                                                                                         (False, False))]
    assert runs[0] == runs[1]
    assert any(rec[5] != "None" for rec in runs[0][:-1]), f"{bug}: no finding in 60 executions"


def test_conflicts_are_the_words_two_actors_met_on_one_writing() -> None:
    """SchedCore._note notes a point that decides nothing (the step counted); a decision's word is handed back
    to Scheduler._point untouched; conflicts() names the words two actors touched, one of them writing; a
    write wakes the actor that touched the word since it last spun."""
    strategy = RandomStrategy(0, {"tables": {7}})
    s = Scheduler(strategy, step_bound=100)
    strategy.begin(0)
    a, b = s.add("a", lambda: None), s.add("b", lambda: None)
    tables, ctl = s.keys.base("tables"), s.keys.base("ctl")
    s.current = a
    assert s._note(tables + 1, False) is False and s._note(ctl + 3, True) is False
    assert s._note(tables + 7, True) is True and s.steps == 2          # the decision's word: not counted here
    s.current = b
    a.dirty = False
    a.reads = {tables + 1}
    for key, write in ((tables + 1, True), (ctl + 3, False), (ctl + 4, True), (tables + 2, False)):
        assert s._note(key, write) is False
    s._wrote(tables + 1)
    assert a.dirty
    assert s.steps == 6
    assert s.conflicts() == {"tables": {1}, "ctl": {3}}
    assert s.keys.split(ctl + 3) == ("ctl", 3) and ctl >> KEY_SHIFT == 1
