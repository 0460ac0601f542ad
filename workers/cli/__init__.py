"""The `shmmmu` command line (a typer app): the program a user starts, which becomes the supervisor of a VM.

It lives beside the worker programs because it is one: the library (shmmmu)
starts no processes, and the commands that run a VM hand it their launcher,
shmmmu.workers.supervisor.Supervisor.  Each command is a module of this
package that parses its options, makes one call into the library, prints and
exits:

  common.py    the app, command groups, one-line errors, a VM's run, conversion progress
  run.py       shmmmu run                    stress.py    shmmmu stress
  explore.py   shmmmu explore                inspect.py   shmmmu inspect
  vms.py       shmmmu ls, shmmmu rm          torture.py   shmmmu torture lock|rcu
  bench.py     shmmmu bench dirty-log|access-tracking
  selftests.py shmmmu bench nx-huge-pages|memslot-modification
  trace.py     shmmmu trace record|convert|summary
  campaign.py  shmmmu campaign (stress seeds, explorer searches on a Dask cluster)

`main()` (the console script; `python -m shmmmu.workers.cli`) runs the app:
every usage error is one line, `shmmmu: error: ...`, and exit 2, never a
traceback.
"""
from __future__ import annotations

import errno
import sys

from shmmmu.workers import signals


def _started_as_the_command() -> bool:
    """Is this process `shmmmu` itself: the console script, or `python -m shmmmu.workers.cli`, whose package
    is imported while `-m` locates its __main__ (sys.argv[0] is then '-m')?"""
    return sys.argv[0].endswith("shmmmu") or (sys.argv[0] == "-m" and __name__ in sys.orig_argv)


if _started_as_the_command():
    signals.early()                # Ctrl-C while typer and numpy load: one line, no traceback

import typer  # noqa: E402

from shmmmu.region import PREFIX_ERROR, RegionError  # noqa: E402
from shmmmu.workers.cli.common import EXIT_USAGE, app  # noqa: E402

# the commands, in the order `shmmmu --help` lists them (each module adds its own to the app)
from shmmmu.workers.cli import run, stress, explore, inspect, vms, torture, bench, selftests, trace, campaign  # noqa: E402,F401,E501

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: every usage error (an unknown command or option, a value of the wrong
    type, a RegionError) is one line, `shmmmu: error: ...`, and exit 2."""
    import typer.main

    signals.arm()
    if PREFIX_ERROR:
        print(f"shmmmu: error: {PREFIX_ERROR}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        try:
            # the command is invoked here, not through typer's own main, so that what it raises reaches the
            # handlers below as itself (typer turns a closed pipe into a bare exit 1)
            command = typer.main.get_command(app)
            with command.make_context("shmmmu", list(sys.argv[1:] if argv is None else argv)) as ctx:
                rv = command.invoke(ctx)
            code = rv if isinstance(rv, int) else 0
        finally:
            signals.closing()                  # (a signal raised on the way in is handled just below)
    except BaseException as e:
        if not signals.closed_pipe(e):
            code = _ended(e)
        else:
            signals.silence()                  # `| head`: nothing more to say, not even on stderr
            code = signals.PIPE_STATUS
    try:
        if not signals.flush_output():
            code = signals.PIPE_STATUS
    except OSError as e:                       # what was printed last never reached stdout (a full disk)
        code = _ended(e)
    sig = signals.received()
    late = signals.unraised()                  # held through the last teardown: the command still ends as
    if sig is not None and (code == 130 or late is not None):     # interrupted (typer: a silent 130)
        signals.report(f"shmmmu: interrupted ({signals.signal_name(signals.Interrupted(sig))})")
        code = 128 + sig
    signals.finished()                         # a signal during interpreter shutdown: no traceback
    sys.exit(code)


def _ended(exc: BaseException) -> int:
    """The exit status of a command that raised `exc`, its one line said on stderr (re-raised if unknown)."""
    from typer._click.exceptions import UsageError as ClickUsageError

    from shmmmu.outfile import OutputError

    try:
        raise exc
    except ClickUsageError as e:
        print(f"shmmmu: error: {e.format_message()}", file=sys.stderr)
        code = EXIT_USAGE
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt) as e:      # a signal outside a VM's run: nothing to clean up
        signals.report(f"shmmmu: interrupted ({signals.signal_name(e)})")
        code = signals.exit_status(e)
    except RegionError as e:
        print(f"shmmmu: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except OutputError as e:                   # an output file refused, or its writing failed
        print(f"shmmmu: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except OSError as e:
        if e.filename is not None or e.errno not in _WRITE_ERRORS:
            raise
        # a nameless write error escaping a command is its stdout's (files are named, or written through
        # shmmmu.outfile): one line and exit 2, as for an output file that could not be written
        print(f"shmmmu: error: cannot write the output: {e.strerror}", file=sys.stderr)
        code = EXIT_USAGE
    return code


_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
