"""Common: the `shmmmu` app and what its commands share: groups, one-line errors, a VM's run, conversion progress.

Errors a user can cause are one line on stderr, `shmmmu: error: ...`, and
exit 2 (`fail`, `fail_on`); a run that could not finish is one line and exit
1; a signal during a VM's run stops every worker and removes the VM first
(`running_a_vm`).  Never a traceback.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Annotated, Any, Iterator

import typer

from shmmmu import __version__
from shmmmu.region import RegionError
from shmmmu.workers import signals

# --timeline of run, stress, explore and bench (shmmmu.trace.timeline)
Timeline = Annotated[str | None, typer.Option("--timeline", help="write the MMU's work as Chrome trace-event JSON "
                                              "to FILE.json: a track per vCPU and host process, faults, "
                                              "mmu_lock waits and holds, zaps, flushes and their acks, grace "
                                              "periods (Perfetto, chrome://tracing; docs/trace.md).")]

EXIT_USAGE = 2

app = typer.Typer(
    name="shmmmu",
    help="An emulator of the Linux KVM x86 TDP MMU with parallel page faults, "
         "run as processes sharing one memory region.",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def needs_a_command(ctx: typer.Context) -> None:
    """A command group given no command: a usage error that names its commands (one line, no usage box;
    typer's no_args_is_help printed the whole help on stdout before any handler could stop it)."""
    if ctx.invoked_subcommand is None and not ctx.resilient_parsing:
        from typer._click.exceptions import UsageError as ClickUsageError
        names = ctx.command.list_commands(ctx)
        raise ClickUsageError(f"{ctx.command_path} needs a command: {', '.join(names)}", ctx=ctx)


def group(name: str, help: str) -> typer.Typer:
    """A command group of `shmmmu` (bench, torture, trace): alone, it is `needs_a_command`'s one line."""
    sub = typer.Typer(help=help, invoke_without_command=True)
    sub.callback()(needs_a_command)
    app.add_typer(sub, name=name)
    return sub


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shmmmu {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    needs_a_command(ctx)


KERNEL_HELP = ("the kernel profile to follow: 5.13 (the series, the default) or 6.12 (LTS: the fast page fault, "
               "eager page splitting, its bug switches); docs/internals.md has both.")


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Say `message` as the command's one error line; the exit to raise (2: the user's mistake)."""
    print(f"shmmmu: error: {message}", file=sys.stderr)
    return typer.Exit(code)


@contextmanager
def fail_on(*errors: type[BaseException]) -> Iterator[None]:
    """These errors, raised inside, are the user's: their text is the one line, and exit 2."""
    try:
        yield
    except errors as e:
        raise fail(str(e))


@contextmanager
def running_a_vm() -> Iterator[None]:
    """Around a command that runs a VM: SIGTERM acts as Ctrl-C (stop every worker, unlink, exit 130);
    a user error is one line and exit 2; a run that could not finish (a worker died, the pool ran
    dry, a flush never completed) is one line and exit 1.  Never a traceback."""
    signals.arm()                  # SIGTERM, SIGHUP, SIGQUIT, ... act as Ctrl-C (workers/signals.py)
    try:
        yield
    except KeyboardInterrupt as e:
        signals.report(f"shmmmu: interrupted ({signals.signal_name(e)}); every worker stopped and the VM removed")
        raise typer.Exit(signals.exit_status(e))
    except RegionError as e:
        raise fail(str(e))
    except typer.Exit:                           # a RuntimeError too: let it through
        raise
    except RuntimeError as e:                    # WorkerDied, PoolExhausted, FlushStuck
        raise fail(str(e), 1)


def print_lines(lines: list[str]) -> None:
    sys.stdout.write("\n".join(lines) + "\n")


class ConversionProgress:
    """A trace conversion's progress on stderr (shmmmu.trace.store.Progress): each report over the last
    (\\r), then one final line.  On a terminal it starts once the conversion has run about a second (a
    short one says nothing); SHMMMU_PROGRESS=1 shows every report wherever stderr goes, SHMMMU_PROGRESS=0
    none."""

    DELAY_S = 1.0
    EVERY_S = 0.2

    def __init__(self) -> None:
        env = os.environ.get("SHMMMU_PROGRESS", "")
        self.forced = env == "1"
        self.on = self.forced or (env != "0" and sys.stderr.isatty())
        self.open = False                       # a report is on the line, not ended by a newline
        self.width = 0
        self.last = 0.0

    def __call__(self, p: Any) -> None:
        if not self.on:
            return
        if not self.forced:
            if not self.open and p.seconds < self.DELAY_S:
                return                          # final too: a quick conversion has nothing to report
            if not p.final and p.seconds - self.last < self.EVERY_S:
                return
        text = p.line()
        sys.stderr.write("\r" + text + " " * max(0, self.width - len(text)) + ("\n" if p.final else ""))
        sys.stderr.flush()
        self.open, self.width, self.last = not p.final, len(text), p.seconds

    def end(self) -> None:
        """The conversion stopped (an error, Ctrl-C): what follows starts on a line of its own."""
        if self.open:
            sys.stderr.write("\n")
            self.open = False


@contextmanager
def conversion_progress() -> Iterator[ConversionProgress]:
    """A ConversionProgress for the conversions inside; whatever follows them starts on a line of its own."""
    shown = ConversionProgress()
    try:
        yield shown
    finally:
        shown.end()
