"""The `shmmmu` command line (a typer app).

Errors a user can cause (a bad VM name, a VM that exists or does not) are
`RegionError`s: they print one line on stderr and exit 2, never a traceback.
"""
from __future__ import annotations

import sys
import typer

from shmmmu import __version__
from shmmmu.region import Region, RegionError

EXIT_USAGE = 2

app = typer.Typer(
    name="shmmmu",
    help="An emulator of the Linux KVM x86 TDP MMU with parallel page faults, "
         "run as processes sharing one memory region.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shmmmu {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    pass


# ---------------------------------------------------------------- run

def _fail(message: str, code: int = EXIT_USAGE) -> "typer.Exit":
    print(f"shmmmu: error: {message}", file=sys.stderr)
    return typer.Exit(code)


def _print_run(result, console) -> None:
    from rich.table import Table
    s = result.stats
    j = result.to_json()
    t = Table(title=f"shmmmu run: {result.options['name']}", show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right")
    for name, secs in result.phases:
        t.add_row(f"{name} time", f"{secs:.6f}s")
    rows = [
        ("faults", f"{s['faults']}"),
        ("faults/s (populate)", f"{j['faults_per_s']:.0f}"),
        ("fixed / spurious / retries", f"{s['fixed']} / {s['spurious']} / {s['retries']}"),
        ("CAS failures", f"{s['cas_failures']}"),
        ("tables allocated / in use", f"{s['tables_allocated']} / {result.tables['live']}"),
        ("tables retired / freed at once", f"{s['tables_retired']} / {s['tables_freed']}"),
        ("huge pages split / collapsible zaps", f"{s['huge_splits']} / {s['collapsible_zaps']}"),
        ("grace periods (longest)", f"{result.rcu['grace_periods']} ({result.rcu['gp_max_ns'] / 1e6:.2f} ms)"),
        ("TLB flushes", f"{s['flushes']}"),
        ("lock wait (total)", f"{s['lock_wait_ns'] / 1e6:.1f} ms"),
        ("guest accesses", f"{s['accesses']}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    for p in result.problems + result.violations:
        console.print(f"[red]{p}[/red]")
    console.print("SUCCESS" if result.ok else "[red]FAILURE[/red]")


@app.command()
def run(
    name: str = typer.Option("demo", "--name", help="VM name (the region is /dev/shm/shmmmu-NAME)."),
    vcpus: int = typer.Option(2, "--vcpus", "-v", help="vCPU worker processes."),
    memory: str = typer.Option("256M", "--memory", "-b", help="guest memory per vCPU (K, M, G suffixes)."),
    backing: str = typer.Option("2m", "--backing", "-s", help="host page size backing guest memory: 4k, 2m, 1g."),
    lock_mode: str = typer.Option("shared", "--lock-mode", help="shared (the series) or exclusive (baseline)."),
    overlap: bool = typer.Option(False, "--overlap", "-o", help="all vCPUs share one range instead of one each."),
    workload: str = typer.Option("dirty-log", "--workload", "-w",
                                 help="populate, random, dirty-log or trace (with --trace FILE)."),
    trace: str = typer.Option(None, "--trace", help="trace file: one 'R ADDR' or 'W ADDR' per line."),
    iterations: int = typer.Option(3, "--iterations", "-i", help="iterations (the first populates)."),
    seed: int = typer.Option(1, "--seed", help="seed of every random choice."),
    keep: bool = typer.Option(False, "--keep", help="keep the VM alive after the workload until Ctrl-C."),
    debug: bool = typer.Option(False, "--debug", help="poison freed tables and check every table read."),
    json_out: bool = typer.Option(False, "--json", help="results as one JSON object on stdout."),
) -> None:
    """Launch a VM: vCPU processes fault its memory in, a reclaimer frees tables; print the results."""
    import json
    import os
    import signal
    import time

    from rich.console import Console

    from shmmmu.run import RunOptions, UsageError, parse_size, run_vm
    from shmmmu.workloads import parse_trace

    try:
        trace_data = None
        if workload == "trace" or trace:
            if not trace:
                raise UsageError("--workload trace needs --trace FILE")
            try:
                with open(trace) as f:
                    trace_data = parse_trace(f.read())
            except OSError as e:
                raise UsageError(f"cannot read trace {trace}: {e.strerror}") from None
            except ValueError as e:
                raise UsageError(str(e)) from None
            workload = "trace"
        opts = RunOptions(name=name, vcpus=vcpus, memory=parse_size(memory), backing=backing.lower(),
                          lock_mode=lock_mode, overlap=overlap, workload=workload, trace=trace_data,
                          iterations=iterations, seed=seed, debug=debug)
        opts.config()
    except (UsageError, ValueError) as e:
        raise _fail(str(e))
    console = Console(stderr=True)
    quiet = json_out or not sys.stdout.isatty()
    progress_cb = None
    prog = None
    if not quiet:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        prog = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=console, transient=True)
        task = prog.add_task("iterations", total=iterations)
        fault_task = prog.add_task("faults", total=None)

        def progress_cb(kind: str, done: int, total: int) -> None:
            if kind == "iteration":
                prog.update(task, completed=done)
            else:
                prog.update(fault_task, completed=done)

    def keep_alive(sup) -> None:
        if not keep:
            return
        console.print(f"VM {name} is kept alive (pid {os.getpid()}): `shmmmu inspect {name}`; Ctrl-C to stop.")
        while True:
            sup.check()
            time.sleep(0.2)

    # SIGTERM behaves as Ctrl-C: stop everything and unlink
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if prog is not None:
            with prog:
                result = run_vm(opts, progress=progress_cb, keep=keep_alive)
        else:
            result = run_vm(opts, keep=keep_alive)
    except KeyboardInterrupt:
        print("shmmmu: interrupted; every worker stopped and the VM removed", file=sys.stderr)
        raise typer.Exit(130)
    except RegionError as e:
        raise _fail(str(e))
    except RuntimeError as e:                      # WorkerDied, PoolExhausted, FlushStuck
        if isinstance(e, typer.Exit):
            raise
        raise _fail(str(e), 1)
    if json_out:
        print(json.dumps(result.to_json()))
    else:
        _print_run(result, Console())
    if not result.ok:
        raise typer.Exit(1)

# ---------------------------------------------------------------- end of run


def main() -> None:
    """Console-script entry point: run the app, turning RegionError into one line and exit 2."""
    try:
        app()
    except RegionError as e:
        print(f"shmmmu: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
