"""Run: `shmmmu run`: one VM launched, its workload driven, its results printed (shmmmu.run does the work)."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Annotated, Callable, Iterator

import typer

from shmmmu.workers import signals
from shmmmu.workers.cli.common import KERNEL_HELP, Timeline, app, conversion_progress, fail_on, running_a_vm


@app.command()
def run(
    name: Annotated[str | None, typer.Option("--name", help="VM name (the region is /dev/shm/shmmmu-NAME); default "
                                             "demo, or the first free of demo-2, demo-3, ...")] = None,
    vcpus: Annotated[int | None, typer.Option("--vcpus", "-v", help="vCPU worker processes (default 2; a trace "
                                              "with threads: one per thread).")] = None,
    memory: Annotated[str, typer.Option("--memory", "-b", help="guest memory per vCPU (K, M, G suffixes).")] = "256M",
    backing: Annotated[str, typer.Option("--backing", "-s", help="host page size backing guest memory: 4k, 2m, "
                                         "1g.")] = "2m",
    lock_mode: Annotated[str, typer.Option("--lock-mode", help="shared (the series) or exclusive "
                                           "(baseline).")] = "shared",
    kernel: Annotated[str, typer.Option("--kernel", help=KERNEL_HELP)] = "5.13",
    overlap: Annotated[bool, typer.Option("--overlap", "-o", help="all vCPUs share one range instead of one "
                                          "each.")] = False,
    workload: Annotated[str, typer.Option("--workload", "-w", help="populate, random, dirty-log or trace (with "
                                          "--trace FILE).")] = "dirty-log",
    trace: Annotated[str | None, typer.Option("--trace", help="a trace to replay (implies -w trace): valgrind "
                                              "lackey, pinatrace, perf script page faults, kvm_page_fault "
                                              "tracepoint text, or 'R|W|X ADDR' lines; any length (converted "
                                              "once, streamed). docs/trace.md.")] = None,
    trace_format: Annotated[str | None, typer.Option("--trace-format", help="lackey, pinatrace, perf, kvm or "
                                                     "plain (default: detected from the first lines).")] = None,
    tracepoints: Annotated[str | None, typer.Option("--tracepoints", help="write the kernel's kvm/kvmmmu "
                                                    "tracepoint lines (trace-cmd report's form) to FILE; `shmmmu "
                                                    "trace summary FILE` reads it.")] = None,
    timeline: Timeline = None,
    iterations: Annotated[int, typer.Option("--iterations", "-i", help="iterations (the first populates).")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="seed of every random choice.")] = 1,
    keep: Annotated[bool, typer.Option("--keep", help="keep the VM alive after the workload until Ctrl-C.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="poison freed tables and check every table read.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="results as one JSON object on stdout.")] = False,
    stall_timeout: Annotated[float, typer.Option("--stall-timeout", help="end the run when a vCPU makes no "
                                                 "progress for this many seconds (stopped, or stuck).")] = 30.0,
) -> None:
    """Launch a VM: vCPU processes fault its memory in, a reclaimer frees tables; print the results."""
    import functools
    import json

    from rich.console import Console

    from shmmmu.run import RunRequest, prepare_run, run_prepared
    from shmmmu.workers.supervisor import Supervisor

    req = RunRequest(name=name, vcpus=vcpus, memory=memory, backing=backing, lock_mode=lock_mode, overlap=overlap,
                     workload=workload, trace=trace, trace_format=trace_format, tracepoints=tracepoints,
                     timeline=timeline, iterations=iterations, seed=seed, debug=debug,
                     stall_timeout=stall_timeout, kernel=kernel)
    with fail_on(ValueError), conversion_progress() as shown:
        prepared = prepare_run(req, progress=shown)
    console = Console(stderr=True)
    kept = _Kept(console) if keep else None
    quiet = json_out or not sys.stdout.isatty()
    with running_a_vm(), prepared, _progress_bars(console, iterations, quiet) as progress:
        result = run_prepared(prepared, functools.partial(Supervisor, stall_s=stall_timeout), progress=progress,
                              keep=kept, renamed=_say_renamed)
    if json_out:
        print(json.dumps(result.to_json()))
    else:
        _print_table(result, Console())
    if not result.ok:
        raise typer.Exit(1)
    if kept is not None and kept.status:   # reported, then the status of a process ended by that signal
        print(f"shmmmu: interrupted ({signals.signal_name(signals.Interrupted(kept.status - 128))}); every "
              f"worker stopped and the VM removed", file=sys.stderr)
        raise typer.Exit(kept.status)


def _say_renamed(asked: str, name: str) -> None:
    print(f"shmmmu: the VM name {asked} is taken: this VM is {name}", file=sys.stderr, flush=True)


class _Kept:
    """--keep: the VM stays alive after its workload until a signal, whose exit status the command ends with
    once the VM is torn down, checked and reported."""

    def __init__(self, console) -> None:
        self.console = console
        self.status = 0

    def __call__(self, sup) -> None:
        from shmmmu.run import keep_until_interrupted
        name = sup.vm.name
        self.console.print(f"VM {name} is kept alive (pid {os.getpid()}): `shmmmu inspect {name}`; Ctrl-C to stop.")
        self.status = signals.exit_status(keep_until_interrupted(sup))
        signals.arm()                      # the end of --keep, not of the run: tear down, check, report


@contextmanager
def _progress_bars(console, iterations: int, quiet: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """Bars for the iterations and the faults on a terminal, transient (None: no bars)."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    prog = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=True)
    task = prog.add_task("iterations", total=iterations)
    fault_task = prog.add_task("faults", total=None)

    def progress(kind: str, done: int, total: int) -> None:
        prog.update(task if kind == "iteration" else fault_task, completed=done)

    with prog:
        yield progress


def _print_table(result, console) -> None:
    from rich.table import Table
    t = Table(title=f"shmmmu run: {result.options['name']}", show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, v in result.rows():
        t.add_row(k, v)
    console.print(t)
    for p in result.problems + result.violations:
        console.print(f"[red]{p}[/red]")
    console.print("SUCCESS" if result.ok else "[red]FAILURE[/red]")
