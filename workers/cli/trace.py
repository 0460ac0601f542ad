"""Trace: `shmmmu trace record|convert|summary`: real traces in, tracepoint lines summarized (shmmmu.trace does the work)."""
from __future__ import annotations

import sys
from typing import Annotated

import typer

from shmmmu.workers.cli.common import conversion_progress, fail_on, group, print_lines

trace_app = group("trace", "Real traces in (record, convert), the kernel's tracepoint lines summarized and "
                           "drawn as a timeline (docs/trace.md).")


@trace_app.command("record", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def trace_record(
    cmd: Annotated[list[str] | None, typer.Argument(help="the command to trace, after --.")] = None,
    out: Annotated[str, typer.Option("--output", "-o", help="the trace file to write.")] = "trace.lackey",
) -> None:
    """Run CMD under valgrind's lackey tool (--trace-mem=yes) and write its memory trace; exit with CMD's status."""
    from shmmmu.trace.formats import TraceError
    from shmmmu.trace.record import record, recorded_line

    with fail_on(TraceError):
        rc = record(list(cmd or []), out)
    print(f"shmmmu: {recorded_line(list(cmd or []), rc, out)}", file=sys.stderr)
    raise typer.Exit(rc)


@trace_app.command("convert")
def trace_convert(
    src: Annotated[str, typer.Argument(help="a trace in any format `run --trace` reads.")],
    out: Annotated[str, typer.Option("--output", "-o", help="the converted file (replay it with run --trace).")],
    trace_format: Annotated[str | None, typer.Option("--trace-format", help="lackey, pinatrace, perf, kvm or "
                                                     "plain (default: detected).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="what was converted, as one JSON object.")] = False,
) -> None:
    """Convert a trace once into the binary form vCPUs stream (first-touch page mapping, a part per thread)."""
    import json

    from shmmmu.trace.formats import TraceError
    from shmmmu.trace.store import convert_new

    with fail_on(TraceError), conversion_progress() as shown:
        info = convert_new(src, out, trace_format, progress=shown)
    print(json.dumps(info.to_json()) if json_out else info.line(src))


@trace_app.command("summary")
def trace_summary(
    path: Annotated[str, typer.Argument(help="a --tracepoints file, or `trace-cmd report` / `perf script` "
                                        "output.")],
    json_out: Annotated[bool, typer.Option("--json", help="the summary as one JSON object.")] = False,
) -> None:
    """Summarize kvm/kvmmmu tracepoint lines: events by kind, levels, splits, zaps, changes per GFN."""
    import json

    from shmmmu.trace.formats import TraceError
    from shmmmu.trace.summary import report, summarize

    with fail_on(TraceError):
        s = summarize(path)
    if json_out:
        print(json.dumps(s.to_json()))
    else:
        print_lines(report(s, path))


@trace_app.command("timeline")
def trace_timeline(
    path: Annotated[str, typer.Argument(help="a --tracepoints file (text or .dat), or any kernel's `trace-cmd "
                                        "report` / `perf script` / trace file output.")],
    out: Annotated[str, typer.Option("--output", "-o", help="the Chrome trace-event JSON to write (Perfetto, "
                                     "chrome://tracing).")],
) -> None:
    """Draw kvm/kvmmmu tracepoint lines as a trace-event timeline: a track per task, page-fault slices, the
    other events as instants, faults/s and page tables in use as counters."""
    from shmmmu.outfile import OutputError
    from shmmmu.trace.formats import TraceError
    from shmmmu.trace.timeline import from_tracepoints
    from shmmmu.trace.tracedat import open_text

    with fail_on(TraceError, OutputError), open_text(path) as f:
        n, skipped = from_tracepoints(f, path, out)
    print(f"{path}: {n} trace events -> {out}" + (f" ({skipped} line{'s' if skipped != 1 else ''} skipped)" if skipped else ""))
