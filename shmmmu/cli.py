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


# ---------------------------------------------------------------- PLACEHOLDER `run`
# Stands in for the real `run` (supervisor, vCPU workers, reclaimer) until that lands;
# replace this block whole.

def _placeholder_run(name: str) -> None:
    """Create a small region, print its layout, unlink it."""
    with Region.create(name, {"tables": (8, 512), "data": (64,)}, {"placeholder": True}, ["mmu"]) as region:
        for line in region.layout_lines():
            typer.echo(line)


@app.command()
def run(name: str = typer.Option("demo", "--name", help="VM name (the region is /dev/shm/shmmmu-NAME).")) -> None:
    """Create a VM region, show its layout and remove it (placeholder for the real run)."""
    _placeholder_run(name)

# ---------------------------------------------------------------- end of PLACEHOLDER


def main() -> None:
    """Console-script entry point: run the app, turning RegionError into one line and exit 2."""
    try:
        app()
    except RegionError as e:
        print(f"shmmmu: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
