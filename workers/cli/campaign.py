"""Campaign: `shmmmu campaign`: stress runs or explorer searches as tasks of a Dask cluster (shmmmu.campaign)."""
from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from shmmmu.workers.cli.common import app, fail_on, print_lines


@app.command()
def campaign(
    what: Annotated[str, typer.Argument(help="stress, explore, or a TOML plan file (docs/campaign.md).",
                                        show_default=False)] = "",
    seeds: Annotated[str | None, typer.Option("--seeds", help="seeds A..B (both included): stress runs, or "
                                              "random/PCT searches (default 1..10).")] = None,
    switch: Annotated[list[str] | None, typer.Option("--switch", help="a bug switch, none, all or (explore) "
                                                     "targets; repeatable (default none; explore: "
                                                     "targets).")] = None,
    lock_mode: Annotated[list[str] | None, typer.Option("--lock-mode", help="stress: shared, exclusive; "
                                                        "repeatable (default shared).")] = None,
    kernel: Annotated[list[str] | None, typer.Option("--kernel", help="kernel profile; repeatable (default "
                                                     "the default profile).")] = None,
    scenario: Annotated[list[str] | None, typer.Option("--scenario", help="explore: a scenario or all; "
                                                       "repeatable (default all).")] = None,
    duration: Annotated[float | None, typer.Option("--duration", "-d", help="stress: seconds per run.")] = None,
    vcpus: Annotated[int | None, typer.Option("--vcpus", "-v", help="stress: vCPUs per run.")] = None,
    bits: Annotated[int | None, typer.Option("--bits", help="stress: index bits per level, 3 or 9.")] = None,
    strategy: Annotated[str | None, typer.Option("--strategy", help="explore: random, pct or dfs (default the "
                                                 "scenario's).")] = None,
    preemptions: Annotated[int | None, typer.Option("--preemptions", help="explore: DFS bound.")] = None,
    executions: Annotated[int | None, typer.Option("--executions", "-n", help="explore: each search's "
                                                   "budget.")] = None,
    directory: Annotated[str, typer.Option("--dir", "-o", help="the campaign directory to write (default "
                                           "campaign-DATE-TIME).")] = "",
    resume: Annotated[str, typer.Option("--resume", help="finish the campaign in this directory (its plan; "
                                        "finished tasks are skipped).")] = "",
    scheduler: Annotated[str, typer.Option("--scheduler", help="tcp://HOST:PORT of a running `dask scheduler` "
                                           "(default a local cluster).")] = "",
    workers: Annotated[int, typer.Option("--workers", "-w", help="local cluster: worker processes (0: one per "
                                         "CPU).")] = 0,
    task_timeout: Annotated[float, typer.Option("--task-timeout", help="a task's wall cap in seconds; past it "
                                                "the task is hung, never a finding (0: automatic).")] = 0.0,
) -> None:
    """Run stress seeds or explorer searches as tasks of a Dask cluster; a JSON line per task, then a summary.

    Exit 0: every task finished and none found anything; 1: a finding; 2: bad usage; 130: interrupted (the
    summary of what finished is printed).  docs/campaign.md has examples.
    """
    from shmmmu.campaign import CampaignRequest, run_campaign
    from shmmmu.campaign.plan import plan_from_options
    from shmmmu.validate import UsageError

    given = {k: v for k, v in dict(seeds=seeds, switches=switch, lock_modes=lock_mode, kernels=kernel,
                                    scenarios=scenario, duration=duration, vcpus=vcpus, bits=bits, strategy=strategy,
                                    preemptions=preemptions, executions=executions).items() if v is not None}
    bar = _Bar() if sys.stderr.isatty() else None
    with fail_on(UsageError):
        plan = plan_from_options(what, given, resume)
        try:
            out = run_campaign(CampaignRequest(plan, directory, resume, scheduler, workers, task_timeout), bar)
        finally:
            if bar is not None:
                bar.close()
    print_lines(out.summary)
    if not out.complete:
        print("shmmmu: interrupted: the tasks that finished are kept; --resume " + out.directory + " finishes "
              "the campaign", file=sys.stderr)
        raise typer.Exit(130)
    raise typer.Exit(1 if out.findings else 0)


class _Bar:
    """The campaign's progress on a terminal's stderr (rich): done of total, running, findings, ETA."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.progress = Progress(TextColumn("campaign"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("running {task.fields[running]}  findings {task.fields[found]}"),
                                 TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.task: Any = None

    def __call__(self, counts: Any, total: int, workers: int) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("campaign", total=total, running=0, found=0)
        self.progress.update(self.task, completed=counts.done, running=counts.running, found=counts.found)

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()
