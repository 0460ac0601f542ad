"""Legacy: the commands not yet moved into a module of their own (typer.Option defaults, their orchestration inline).

Each later commit moves a group of them out, into a module that parses its
options, calls the library once and prints; this module then goes.
"""
from __future__ import annotations

import sys

import typer

from shmmmu.workers.cli.common import ConversionProgress, fail, group


# ---------------------------------------------------------------- trace

trace_app = group("trace", "Real traces in (record, convert) and the kernel's tracepoint lines summarized "
                            "(docs/trace.md).")


@trace_app.command("record", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def trace_record(
    cmd: list[str] = typer.Argument(None, help="the command to trace, after --."),
    out: str = typer.Option("trace.lackey", "--output", "-o", help="the trace file to write."),
) -> None:
    """Run CMD under valgrind's lackey tool (--trace-mem=yes) and write its memory trace; exit with CMD's status."""
    import signal

    from shmmmu.trace.formats import TraceError
    from shmmmu.trace.record import record
    try:
        rc = record(list(cmd or []), out)
    except TraceError as e:
        raise fail(str(e))
    status = ""
    if rc > 128 and rc - 128 in {sg.value for sg in signal.Signals}:
        status = f" (it was killed by {signal.Signals(rc - 128).name})"
    elif rc:
        status = f" (it exited with status {rc})"
    print(f"shmmmu: trace of {' '.join(cmd)}{status} in {out} (replay: shmmmu run --trace {out} --vcpus 1 "
          f"--backing 4k)", file=sys.stderr)
    raise typer.Exit(rc)


@trace_app.command("convert")
def trace_convert(
    src: str = typer.Argument(..., help="a trace in any format `run --trace` reads."),
    out: str = typer.Option(..., "--output", "-o", help="the converted file (replay it with run --trace)."),
    trace_format: str = typer.Option(None, "--trace-format", help="lackey, pinatrace, perf, kvm or plain "
                                     "(default: detected)."),
    json_out: bool = typer.Option(False, "--json", help="what was converted, as one JSON object."),
) -> None:
    """Convert a trace once into the binary form vCPUs stream (first-touch page mapping, a part per thread)."""
    import json

    from shmmmu.trace.formats import TraceError
    from shmmmu.trace.store import convert, is_converted
    try:
        if is_converted(src):
            raise TraceError(f"{src} is converted already")
        shown = ConversionProgress()
        try:
            info = convert(src, out, trace_format, progress=shown)
        finally:
            shown.end()
    except TraceError as e:
        raise fail(str(e))
    d = {"output": out, "format": info.format, "accesses": info.accesses, "pages": info.pages,
         "threads": [{"tid": t, "accesses": n} for t, _, n in info.parts]}
    if json_out:
        print(json.dumps(d))
    else:
        print(f"{src}: {info.format}, {info.accesses} accesses, {info.pages} distinct pages, "
              f"{len(info.parts)} thread{'s' if len(info.parts) != 1 else ''} -> {out}")


@trace_app.command("summary")
def trace_summary(
    path: str = typer.Argument(..., help="a --tracepoints file, or `trace-cmd report` / `perf script` output."),
    json_out: bool = typer.Option(False, "--json", help="the summary as one JSON object."),
) -> None:
    """Summarize kvm/kvmmmu tracepoint lines: events by kind, levels, splits, zaps, changes per GFN."""
    import json

    from shmmmu.trace.formats import TraceError
    from shmmmu.trace.summary import report, summarize
    try:
        s = summarize(path)
    except TraceError as e:
        raise fail(str(e))
    if json_out:
        print(json.dumps(s.to_json()))
    else:
        print("\n".join(report(s, path)))

# ---------------------------------------------------------------- end of trace
