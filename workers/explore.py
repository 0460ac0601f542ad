"""Explore jobs: one `shmmmu explore` search spread over N processes (`--jobs N`), with a deterministic answer.

The processes are told what to run by the (picklable) options and resolve the
scenario themselves.

Each process builds its own Explorer (a region of its own) and runs a share:
random and PCT take execution indices j, j + N, j + 2N, ...; DFS first
enumerates the schedules' prefixes to a depth that gives every process work,
then each process explores the subtrees under its prefixes.  The answer does
not depend on which process is faster: the first finding is the one with the
lowest execution index (random, PCT) or prefix index (DFS), and a process
stops only past the lowest one found so far, so that every smaller index was
run.  Counts are summed.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import time

from shmmmu.explore.explorer import Explorer, SearchResult, make_strategy, search
from shmmmu.explore.report import ExploreOptions
from shmmmu.explore.scenarios import Scenario
from shmmmu.explore.strategy import DfsStrategy

_NONE = 1 << 62


def _strided(args) -> SearchResult:
    opts, j, n, best, deadline = args
    sc, strategy, depth = opts.resolve()
    with Explorer(sc, opts.bugs, atomic=frozenset(opts.atomic)) as ex:
        strat = make_strategy(strategy, opts.seed, depth, opts.preemptions)
        t0, count, steps, i = time.monotonic(), 0, 0, j
        while True:
            if i > best.value or (opts.executions and i >= opts.executions) or time.monotonic() > deadline:
                return SearchResult(count, time.monotonic() - t0, steps, None)
            r = ex.execute(strat, i)
            count += 1
            steps += r.steps
            if r.finding is not None:
                with best.get_lock():
                    best.value = min(best.value, i)
                r.log = []
                return SearchResult(count, time.monotonic() - t0, steps, r, i)
            i += n


def _subtrees(args) -> SearchResult:
    opts, prefixes, best, deadline = args
    sc = opts.resolve()[0]
    total = SearchResult(0, 0.0, 0, None, exhausted=True)
    t0 = time.monotonic()
    with Explorer(sc, opts.bugs, atomic=frozenset(opts.atomic)) as ex:
        for k, prefix in prefixes:
            if k > best.value:
                break
            dfs = DfsStrategy(opts.preemptions, prefix=prefix)
            while True:
                if time.monotonic() > deadline:
                    total.exhausted = False
                    total.seconds = time.monotonic() - t0
                    return total
                r = ex.execute(dfs, total.executions)
                total.executions += 1
                total.steps += r.steps
                if r.finding is not None:
                    with best.get_lock():
                        best.value = min(best.value, k)
                    r.log = []
                    total.first, total.first_index = r, k
                    total.seconds = time.monotonic() - t0
                    return total
                if not r.more:
                    break
            total.pruned += dfs.pruned
    total.seconds = time.monotonic() - t0
    return total


def _prefixes(opts: ExploreOptions, sc: Scenario, want: int, deadline: float) -> tuple[list[list[int]], SearchResult]:
    """The DFS tree's distinct decision prefixes at the smallest depth that gives `want` of them."""
    with Explorer(sc, opts.bugs, atomic=frozenset(opts.atomic)) as ex:
        for depth in range(1, 40):
            dfs = DfsStrategy(opts.preemptions, frozen_from=depth)
            seen: list[list[int]] = []
            n = steps = 0
            t0 = time.monotonic()
            while time.monotonic() < deadline:
                r = ex.execute(dfs, n)
                n += 1
                steps += r.steps
                if r.finding is not None:
                    r.log = []
                    return [], SearchResult(n, time.monotonic() - t0, steps, r, 0)
                p = r.decisions[:depth]
                if p not in seen:
                    seen.append(p)
                if not r.more:
                    break
            if len(seen) >= want or len(seen[-1] if seen else []) < depth:
                return seen, SearchResult(n, time.monotonic() - t0, steps, None)
    return seen, SearchResult(n, 0.0, steps, None)


def _job(fn, args, out) -> None:
    """A job process: SIGTERM ends it like Ctrl-C (its Explorer unlinks its region); the result goes to `out`."""
    from workers.common import die_with_parent
    die_with_parent()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        out.put(fn(args))
    except KeyboardInterrupt:
        pass


def _run_jobs(ctx, fn, arglist: list) -> list[SearchResult]:
    out = ctx.Queue()
    procs = [ctx.Process(target=_job, args=(fn, a, out)) for a in arglist]
    for p in procs:
        p.start()
    try:
        results = [out.get() for _ in procs]
    finally:
        for p in procs:
            p.join(10)                   # a job that has put its result exits by itself
            if p.is_alive():
                p.terminate()
                p.join()
    return results


def parallel_search(jobs: int):
    """A searcher for shmmmu.explore.report.run_explore that uses `jobs` processes."""
    def searcher(opts: ExploreOptions, sc: Scenario, strategy: str, depth: int) -> SearchResult:
        ctx = mp.get_context("fork")
        best = ctx.Value("q", _NONE)
        t0 = time.monotonic()
        deadline = t0 + (opts.time_limit or 1e9)
        if strategy == "dfs":
            prefixes, first = _prefixes(opts, sc, 4 * jobs, deadline)
            if first.first is not None:
                return first
            shares = [[(k, p) for k, p in enumerate(prefixes) if k % jobs == j] for j in range(jobs)]
            parts = _run_jobs(ctx, _subtrees, [(opts, s, best, deadline) for s in shares])
            parts.append(first)
        else:
            parts = _run_jobs(ctx, _strided, [(opts, j, jobs, best, deadline) for j in range(jobs)])
        found = [p for p in parts if p.first is not None]
        out = SearchResult(sum(p.executions for p in parts), time.monotonic() - t0, sum(p.steps for p in parts),
                           None, exhausted=strategy == "dfs" and all(p.exhausted for p in parts if p is not parts[-1]),
                           pruned=sum(p.pruned for p in parts))
        if found:
            f = min(found, key=lambda p: p.first_index)
            out.first, out.first_index, out.exhausted = f.first, f.first_index, False
        return out
    return searcher
