"""Campaign: many stress runs and explorer searches as tasks of a Dask cluster, local by default, written as they end.

`shmmmu campaign` (workers/cli/campaign.py) hands `run_campaign` a plan: its
command line's axes, or a TOML file's.  The parts:

  plan.py      the plan, checked and expanded into tasks with stable ids
  cluster.py   the Dask client: a LocalCluster started and stopped here, or a scheduler by address
  driver.py    the tasks submitted, retried once, written as they end; DFS searches split into subtrees
  tasks.py     what a worker runs: a child under a prefix of its own, cleaned up after
  child.py     the child program: a `shmmmu` command that dies with its worker, or one DFS subtree
  results.py   the campaign directory (plan.json, results.jsonl) and the summary

Unlike the rest of the library this package starts processes (the local
cluster, the tasks' children): a campaign is a launcher by nature.
"""
from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from shmmmu.campaign.plan import Task, campaign_settings, plan_tasks
from shmmmu.campaign.results import ResultsDir, summary
from shmmmu.validate import UsageError

__all__ = ["CampaignRequest", "CampaignOutcome", "run_campaign"]

FINAL = ("found", "clean", "hung")            # a line with one of these is done; a lost task runs again on --resume
EXPLORE_CAP_S = 3600.0


@dataclass
class CampaignRequest:
    plan: dict[str, Any] = field(default_factory=dict)    # {"stress": {...}, "explore": {...}, "campaign": {...}}
    directory: str = ""                 # where the campaign writes (default: campaign-DATE-TIME here)
    resume: str = ""                    # a campaign directory to finish (its plan.json is the plan)
    scheduler: str = ""                 # tcp://HOST:PORT of a running `dask scheduler` ('': a local cluster)
    workers: int = 0                    # local cluster: worker processes (0: one per CPU)
    task_timeout: float = 0.0           # a task's wall cap in seconds: past it, "hung" (0: automatic)


@dataclass
class CampaignOutcome:
    directory: str
    summary: list[str]
    complete: bool                      # False: stopped by Ctrl-C before every task had its line
    findings: int


def _cap(task: Task, given: float) -> float:
    """A task's wall cap: generous, since it only ever marks a task hung (stress: ten times its duration and
    5 minutes; a search or a subtree: an hour)."""
    if given:
        return given
    if task.kind == "stress":
        duration = float(task.argv[task.argv.index("--duration") + 1]) if "--duration" in task.argv else 10.0
        return 10 * duration + 300.0
    return EXPLORE_CAP_S


def _open(req: CampaignRequest) -> tuple[ResultsDir, list[Task], dict[str, Any], bool]:
    """The campaign directory and its tasks: a new one from the plan (created by the caller once the cluster is
    there: a refused campaign writes nothing), or the plan of the one resumed; True for a new one."""
    if req.resume:
        rdir = ResultsDir(req.resume)
        try:
            saved = rdir.read_plan()
            tasks = [Task.from_json(t) for t in saved["tasks"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--resume {req.resume}: not a campaign directory ({e})") from None
        return rdir, tasks, campaign_settings(saved.get("plan", {})), False
    tasks = plan_tasks(req.plan)
    settings = campaign_settings(req.plan)
    path = req.directory or f"campaign-{time.strftime('%Y%m%d-%H%M%S')}"
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UsageError(f"{path} exists: give another --dir, or --resume {path} to finish that campaign")
    return ResultsDir(path), tasks, settings, True


def _create(rdir: ResultsDir, plan: dict[str, Any], tasks: list[Task]) -> None:
    try:
        rdir.create(plan, [t.to_json() for t in tasks])
    except OSError as e:
        raise UsageError(f"cannot write the campaign directory {rdir.path}: {e.strerror or e}") from None


def run_campaign(req: CampaignRequest, shown: Callable[[Any, int, int], None] | None = None) -> CampaignOutcome:
    """Run (or finish) a campaign; `shown(counts, total, workers)` is called as results arrive (the progress bar).
    A KeyboardInterrupt (Ctrl-C, SIGTERM through the signal policy) stops it and keeps what finished."""
    import shmmmu.campaign.tasks as T
    from shmmmu.campaign.cluster import check_address, connected, need_dask, worker_count
    from shmmmu.campaign.driver import Driver
    from shmmmu.region import PREFIX

    need_dask()
    if req.scheduler:
        check_address(req.scheduler)
    rdir, tasks, settings, fresh = _open(req)
    done = rdir.lines()
    todo = [t for t in tasks if done.get(t.id, {}).get("verdict") not in FINAL]
    family = T.family_of(PREFIX, "".join(secrets.choice(T.ALNUM) for _ in range(6)))
    given = req.task_timeout or settings["task_timeout"]
    t0 = time.monotonic()
    complete, workers = True, 0
    try:
        with connected(req.scheduler, req.workers or settings["workers"]) as client:
            if fresh:
                _create(rdir, req.plan, tasks)
            workers = worker_count(client)
            driver = Driver(client, rdir, family, lambda t: _cap(t, given), coordinators=workers,
                            shown=(lambda c: shown(c, len(todo), workers)) if shown else None)
            try:
                complete = driver.run(todo)
            finally:
                driver.sweep()
    finally:
        T.stop_family(family)             # this machine: what a worker that died here left
    lines = rdir.lines()
    ordered = [lines[t.id] for t in tasks if t.id in lines]
    text = summary(ordered, len(tasks), time.monotonic() - t0, workers,
                   cancelled=0 if complete else sum(t.id not in lines or lines[t.id]["verdict"] not in FINAL
                                                    for t in todo))
    text = [f"campaign directory: {rdir.path}"] + text
    rdir.write_summary(text)
    return CampaignOutcome(rdir.path, text, complete, sum(ln["verdict"] == "found" for ln in ordered))
