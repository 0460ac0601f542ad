"""Explore jobs: one `shmmmu explore` search spread over N processes (`--jobs N`), with the answer one process gives.

Each process builds its own Explorer (a region of its own) from the (picklable)
options and keeps it for the whole search.

- DFS (shmmmu.explore.split): this process runs the top's enumerations and
  hands each round's subtrees to the processes; a process skips a subtree
  after the lowest one found failing so far, so every subtree before the
  first failing one runs whole, and split_search counts them in their order.
- Random and PCT take execution indices j, j + N, j + 2N, ...: the first
  finding is the one with the lowest index, and a process stops only past the
  lowest one found so far.

Counts are summed; the answer does not depend on which process is faster.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import time

from shmmmu.explore.explorer import Explorer, SearchResult, make_strategy, seed_points
from shmmmu.explore.report import ExploreOptions
from shmmmu.explore.scenarios import Scenario
from shmmmu.explore.split import SubtreeResult, explore_subtree, split_search

_NONE = 1 << 62


def _quit_on_sigterm() -> None:
    """A job process: SIGTERM ends it like Ctrl-C (its Explorer unlinks its region), with its parent too."""
    from shmmmu.workers.common import die_with_parent
    die_with_parent()
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _explorer(opts: ExploreOptions) -> Explorer:
    sc = opts.resolve()[0]
    return Explorer(sc, opts.bugs, atomic=frozenset(opts.atomic))


def _subtree_worker(opts: ExploreOptions, tasks, results, best) -> None:
    _quit_on_sigterm()
    try:
        with _explorer(opts) as ex:
            while True:
                task = tasks.get()
                if task is None:
                    return
                k, prefix, bound, points, top, limit = task
                if k > best.value:
                    results.put((k, None))            # after a failing subtree: not in the answer
                    continue
                r = explore_subtree(ex, prefix, bound, points, top, limit)
                if r.first is not None:
                    with best.get_lock():
                        best.value = min(best.value, k)
                results.put((k, r))
    except KeyboardInterrupt:
        pass


class SubtreePool:
    """`jobs` processes that explore DFS subtrees: the runner split_search takes."""

    def __init__(self, opts: ExploreOptions, jobs: int):
        ctx = mp.get_context("fork")
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.best = ctx.Value("q", _NONE)
        self.procs = [ctx.Process(target=_subtree_worker, args=(opts, self.tasks, self.results, self.best))
                      for _ in range(jobs)]
        for p in self.procs:
            p.start()

    def run(self, prefixes, bound, points, top, limit) -> list[SubtreeResult]:
        with self.best.get_lock():
            self.best.value = _NONE
        for k, p in enumerate(prefixes):
            self.tasks.put((k, p, bound, points, top, limit))
        got = dict(self.results.get() for _ in prefixes)
        out = []
        for k in range(len(prefixes)):
            r = got[k]
            if r is None:
                break
            out.append(r)
            if r.first is not None:
                break
        return out

    def close(self) -> None:
        for _ in self.procs:
            self.tasks.put(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join()


def _strided(args) -> SearchResult:
    opts, j, n, best, deadline = args
    sc, strategy, depth = opts.resolve()
    with Explorer(sc, opts.bugs, atomic=frozenset(opts.atomic)) as ex:
        seed_points(ex)                           # the same points one process starts from
        strat = make_strategy(strategy, opts.seed, depth, opts.preemptions, ex.points)
        t0, count, steps, i = time.monotonic(), 0, 0, j
        while True:
            if i > best.value or i >= opts.executions or time.monotonic() > deadline:
                return SearchResult(count, time.monotonic() - t0, steps, None,
                                    capped="time" if time.monotonic() > deadline else "")
            r = ex.execute(strat, i)
            count += 1
            steps += r.steps
            if r.finding is not None:
                with best.get_lock():
                    best.value = min(best.value, i)
                r.log = []
                return SearchResult(count, time.monotonic() - t0, steps, r, i)
            i += n


def _job(fn, args, out) -> None:
    _quit_on_sigterm()
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
    def searcher(opts: ExploreOptions, sc: Scenario, strategy: str, depth: int, ex: Explorer,
                 progress=None) -> SearchResult:
        if strategy == "dfs":
            pool = SubtreePool(opts, jobs)
            try:
                return split_search(ex, opts.preemptions, opts.executions, runner=pool.run, progress=progress,
                                    time_limit=opts.time_limit)
            finally:
                pool.close()
        ctx = mp.get_context("fork")
        best = ctx.Value("q", _NONE)
        t0 = time.monotonic()
        deadline = t0 + (opts.time_limit or 1e9)
        parts = _run_jobs(ctx, _strided, [(opts, j, jobs, best, deadline) for j in range(jobs)])
        found = [p for p in parts if p.first is not None]
        out = SearchResult(sum(p.executions for p in parts), time.monotonic() - t0, sum(p.steps for p in parts),
                           None, capped=next((p.capped for p in parts if p.capped), ""))
        if found:
            f = min(found, key=lambda p: p.first_index)
            out.first, out.first_index, out.capped = f.first, f.first_index, ""
        elif not out.capped:
            out.capped = "executions"
        return out
    return searcher
