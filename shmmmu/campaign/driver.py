"""Driver: a campaign's tasks submitted to the cluster, retried once, written as they finish, stopped on Ctrl-C.

Stress runs and seeded searches are one Dask task each (shmmmu.campaign.tasks
runs the command in a child).  A DFS search is the split of `explore --jobs`:
its coordinator -- shmmmu.explore.report.run_explore with a searcher that runs
shmmmu.explore.split.split_search -- runs in a thread of this process, makes
the enumerations and merges the rounds, while every subtree of a round is a
Dask task; the rounds' results are taken in the split's canonical order (every
subtree before the first failing one, whole), so the answer is the one of one
process with the same budget.  At most one coordinator per worker runs at once.

A task that raises (its worker died: KilledWorker; its child crashed:
TaskFailed) is submitted again once, under a new prefix; a second failure
makes it "lost", never a finding.  Ctrl-C (or SIGTERM) cancels what is
queued, stops every child of the campaign on every worker (tasks.stop_family),
and keeps the lines already written.
"""
from __future__ import annotations

import itertools
import pickle
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import shmmmu.campaign.tasks as T
from shmmmu.campaign.plan import Task
from shmmmu.campaign.results import ResultsDir, outcome_of_explore

ATTEMPTS = 2
POLL_S = 0.25


class Cancelled(Exception):
    """The campaign is being stopped: a coordinator gives up its search."""


class SearchEnded(Exception):
    """A DFS search that cannot give an answer: a subtree was lost twice, or hung."""

    def __init__(self, verdict: str, message: str):
        super().__init__(message)
        self.verdict = verdict


@dataclass
class Counts:
    done: int = 0
    found: int = 0
    running: int = 0
    workers: set[str] = field(default_factory=set)


class Driver:
    """One campaign's run on one client: `run(tasks)` until every task has a line, or Ctrl-C."""

    def __init__(self, client: Any, results: ResultsDir, family: str, caps: Callable[[Task], float],
                 coordinators: int, shown: Callable[[Counts], None] | None = None):
        self.client, self.results, self.family, self.caps = client, results, family, caps
        self.shown = shown or (lambda c: None)
        self.serial = itertools.count()
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.counts = Counts()
        self.live: dict[str, Any] = {}              # key -> future, of the run tasks
        self.pool = ThreadPoolExecutor(max_workers=max(1, coordinators), thread_name_prefix="campaign-search")
        self.searching = 0
        self.lock = threading.Lock()

    # ------------------------------------------------------------ submission

    def _submit(self, fn: Callable, first: tuple, cap: float) -> Any:
        """fn(*first, prefix, cap) on the cluster, under a prefix (and a Dask key) no other submission has."""
        prefix = T.task_prefix(self.family, next(self.serial))
        return self.client.submit(fn, *first, prefix, cap, key=f"shmmmu-{prefix[:-1]}", pure=False, retries=0)

    def _submit_run(self, task: Task, attempt: int) -> None:
        fut = self._submit(T.run_command, (task.kind, list(task.argv)), self.caps(task))
        self.live[fut.key] = fut
        fut.add_done_callback(lambda f: self.events.put(("run", task, attempt, f)))

    # ------------------------------------------------------------ results

    def _line(self, task: Task, out: dict[str, Any], attempts: int) -> dict[str, Any]:
        line = {"id": task.id, "kind": task.kind, "switch": task.switch, "profile": task.profile,
                "args": list(task.argv), "violation": None, "first": None, "replay": None, "detect": None}
        line.update({k: v for k, v in out.items() if k not in ("seconds",)})
        line["time"] = round(float(out.get("seconds", 0.0)), 3)
        line["attempts"] = attempts
        return line

    def _record(self, line: dict[str, Any]) -> None:
        self.results.append(line)
        self.counts.done += 1
        self.counts.found += line["verdict"] == "found"
        if line.get("worker"):
            self.counts.workers.update(line["worker"].split(","))

    def _on_run(self, task: Task, attempt: int, fut: Any) -> None:
        self.live.pop(fut.key, None)
        if self.stop.is_set():
            return
        if fut.status == "finished":
            self._record(self._line(task, fut.result(), attempt))
        elif attempt < ATTEMPTS:
            self._submit_run(task, attempt + 1)
        else:
            self._record(self._line(task, {"verdict": "lost", "first": _why(fut)}, attempt))

    # ------------------------------------------------------------ DFS searches

    def _search(self, task: Task) -> None:
        """A DFS search's coordinator (in a thread): the search, shrink and trace of `shmmmu explore`, with every
        subtree a task of the cluster."""
        from shmmmu.explore.report import ExploreOptions, run_explore
        from shmmmu.explore.split import split_search
        from shmmmu.shm import semaphore_name

        t0 = time.monotonic()
        workers: set[str] = set()
        attempts = [1]

        def searcher(opts, sc, strategy, depth, ex, progress=None):
            runner = _Subtrees(self, opts, semaphore_name(ex.name, ""), workers, attempts)
            return split_search(ex, opts.preemptions, opts.executions, runner=runner.run,
                                time_limit=opts.time_limit)
        with self.lock:
            self.searching += 1
        try:
            if self.stop.is_set():
                raise Cancelled()
            rep = run_explore(ExploreOptions(**task.explore), searcher=searcher)
            out = {**outcome_of_explore(rep.to_json()), "seconds": time.monotonic() - t0}
        except SearchEnded as e:
            out = {"verdict": e.verdict, "first": str(e), "seconds": time.monotonic() - t0}
        except Cancelled:
            return
        except Exception as e:            # the coordinator itself failed: no answer, never a finding
            out = {"verdict": "lost", "first": f"the search's coordinator failed: {e!r}",
                   "seconds": time.monotonic() - t0}
        finally:
            with self.lock:
                self.searching -= 1
        out["worker"] = ",".join(sorted(workers))
        self.events.put(("line", self._line(task, out, attempts[0])))

    # ------------------------------------------------------------ the loop

    def run(self, tasks: list[Task]) -> bool:
        """Run `tasks` to their lines; False when Ctrl-C (a KeyboardInterrupt) stopped the campaign."""
        pending = 0
        try:
            for t in tasks:
                if t.split == "dfs":
                    self.pool.submit(self._search, t)
                else:
                    self._submit_run(t, 1)
                pending += 1
            last = 0.0
            while self.counts.done < pending:
                try:
                    ev = self.events.get(timeout=POLL_S)
                except queue.Empty:
                    ev = None
                if ev is not None and ev[0] == "run":
                    self._on_run(*ev[1:])
                elif ev is not None:
                    self._record(ev[1])
                if time.monotonic() - last >= 1.0:
                    self.counts.running = self._running()
                    last = time.monotonic()
                self.shown(self.counts)
            return True
        except KeyboardInterrupt:
            self.cancel()
            return False
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _running(self) -> int:
        """Tasks running now: run tasks on a worker's processor, and the DFS searches under way."""
        try:
            busy = {k for keys in self.client.processing().values() for k in keys}
        except Exception:                         # the scheduler is going away: nothing to show
            busy = set()
        return len(busy & set(self.live)) + self.searching

    def cancel(self) -> None:
        """Ctrl-C: nothing more starts, every child of the campaign is stopped on every worker."""
        self.stop.set()
        futures = list(self.live.values())
        if futures:
            self.client.cancel(futures)
        self.sweep()

    def sweep(self) -> None:
        """Stop and clean up whatever of this campaign is left on each worker's machine."""
        try:
            self.client.run(T.stop_family, self.family)
        except Exception:                         # a worker that is gone has nothing left to stop
            pass


class _Subtrees:
    """The runner split_search takes: a round's subtrees as tasks of the cluster, taken in the split's order."""

    def __init__(self, driver: Driver, opts: Any, stem: str, workers: set[str], attempts: list[int]):
        self.d, self.opts, self.stem, self.workers, self.attempts = driver, opts, stem, workers, attempts

    def _submit(self, payload: bytes, cap: float) -> Any:
        return self.d._submit(T.run_subtree, (payload,), cap)

    def run(self, prefixes, bound, points, top, limit) -> list:
        cap = self.d.caps(Task("", "explore", None, "", (), "dfs"))
        payloads = [pickle.dumps((self.opts, p, bound, points, top, limit, self.stem),
                                 protocol=pickle.HIGHEST_PROTOCOL) for p in prefixes]
        futs = [self._submit(p, cap) for p in payloads]
        out = []
        try:
            for k in range(len(prefixes)):
                res = self._result(futs, k, payloads[k], cap)
                r = pickle.loads(res["result"])
                out.append(r)
                if r.first is not None:
                    break                 # the later subtrees are not in the answer
        finally:
            left = [f for f in futs if not f.done()]
            if left:
                self.d.client.cancel(left)
        return out

    def _result(self, futs: list, k: int, payload: bytes, cap: float) -> dict[str, Any]:
        attempt = 1
        while True:
            if self.d.stop.is_set():
                raise Cancelled()
            try:
                res = futs[k].result(timeout=POLL_S)
            except TimeoutError:
                continue
            except Exception as e:        # its worker died (KilledWorker) or its child crashed (TaskFailed)
                if self.d.stop.is_set():
                    raise Cancelled() from None
                if attempt >= ATTEMPTS:
                    raise SearchEnded("lost", f"a subtree failed twice: {e!r}") from None
                attempt += 1
                self.attempts[0] = max(self.attempts[0], attempt)
                futs[k] = self._submit(payload, cap)
                continue
            self.workers.add(res["worker"])
            if res.get("hung"):
                raise SearchEnded("hung", res["first"])
            return res


def _why(fut: Any) -> str:
    try:
        return f"failed twice: {fut.exception()!r}"
    except Exception as e:                # cancelled by someone else
        return f"failed twice: {e!r}"
