"""Trace.dat: tracepoint records written as the trace.dat file of `trace-cmd record`, by trace-cmd's own restore.

`trace-cmd restore` is the tool that finishes a recording whose trace-cmd
died: `trace-cmd restore -c -t TRACING_DIR -k KALLSYMS -o head.dat` writes a
trace.dat's headers (the file format, its options and sections, the events'
formats, the command lines) from a tracing directory, and `trace-cmd restore
-i head.dat -o out.dat cpu0 cpu1 ...` appends the per-CPU ring-buffer data.
Here the tracing directory is one this module makes, a stand-in for a 5.13
kernel's /sys/kernel/tracing: events/header_page and header_event (the ring
buffer's layout, as every 64-bit kernel shows them), events/SYSTEM/NAME/format
of each event (shmmmu.trace.events), events/ftrace/print (trace-cmd 3.1.6
crashes on an ftrace directory with no event), saved_cmdlines (pid and task
name), trace_clock ("mono": the emulator's timestamps are CLOCK_MONOTONIC)
and an empty printk_formats; the kallsyms file is empty.  The per-CPU files
are what the kernel's trace_pipe_raw gives: 4 KiB ring-buffer pages, each a
u64 timestamp, a u64 commit (bytes used) and the events, each a 32-bit header
(type_len: the length in 4-byte words; time_delta: 27 bits of nanoseconds since
the previous event; a TIME_EXTEND entry, type 30, before a larger gap) and the
event's record (its common fields, then its own, as its format file lays them).
trace-cmd itself writes everything the file holds around them.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from contextlib import contextmanager
from typing import BinaryIO, Iterable, Iterator

from shmmmu import outfile
from shmmmu.trace.events import EVENTS, Event
from shmmmu.trace.formats import TraceError

PAGE = 4096
PAGE_HEADER = 16                    # u64 timestamp, local_t commit
TYPE_TIME_EXTEND = 30
TS_SHIFT = 27
FIRST_ID = 1000                     # event ids: the kernel assigns them at boot; any distinct ones do

HEADER_PAGE = ("\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n"
               "\tfield: local_t commit;\toffset:8;\tsize:8;\tsigned:1;\n"
               "\tfield: int overwrite;\toffset:8;\tsize:1;\tsigned:1;\n"
               "\tfield: char data;\toffset:16;\tsize:4080;\tsigned:0;\n")
HEADER_EVENT = ("# compressed entry header\n\ttype_len    :    5 bits\n\ttime_delta  :   27 bits\n"
                "\tarray       :   32 bits\n\n\tpadding     : type == 29\n\ttime_extend : type == 30\n"
                "\ttime_stamp : type == 31\n\tdata max type_len  == 28\n")
# ftrace's print event (trace_marker), as every kernel has it
FTRACE_PRINT = ("name: print\nID: 5\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
                "\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n"
                "\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n"
                "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n"
                "\tfield:unsigned long ip;\toffset:8;\tsize:8;\tsigned:0;\n"
                "\tfield:char buf[];\toffset:16;\tsize:0;\tsigned:0;\n\n"
                'print fmt: "%ps: %s", (void *)REC->ip, REC->buf\n')
TRACE_CLOCK = "local global counter uptime perf [mono] mono_raw boot x86-tsc\n"

Record = tuple[int, int, int, str, tuple[int, ...]]     # (timestamp ns, cpu, pid, event, field values)


MAGIC = b"\x17\x08\x44tracing"        # the first bytes of every trace.dat


class TraceDatError(TraceError):
    """trace-cmd is missing or refused: one line."""


def trace_cmd() -> str:
    """The trace-cmd program, or a TraceDatError saying how to install it."""
    path = shutil.which("trace-cmd")
    if path is None:
        raise TraceDatError("writing a trace.dat needs trace-cmd, which is not installed "
                            "(Debian: apt-get install trace-cmd)")
    return path


def _pack(ev: Event, event_id: int, pid: int, values: tuple[int, ...]) -> bytes:
    """The event's record as the kernel's TP_fast_assign leaves it in the ring buffer."""
    buf = bytearray(ev.size)
    lay = ev.layout()
    struct.pack_into("<HBBi", buf, 0, event_id, 0, 0, pid)
    codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
    for (_, _, off, size, _), v in zip(lay[4:], values):
        struct.pack_into("<" + codes[size], buf, off, v & ((1 << 8 * size) - 1))
    return bytes(buf)


class _CpuPages:
    """One CPU's ring-buffer pages, written to its file as they fill."""

    def __init__(self, path: str):
        self.f = open(path, "wb")
        self.data = bytearray()
        self.page_ts = self.last = 0

    def add(self, ts: int, record: bytes) -> None:
        words = len(record) // 4
        entry = struct.pack("<I", words) + record              # type_len = words (<= 28), delta set below
        need = len(entry) + 8                                  # room for a time extend too
        if self.data and len(self.data) + need > PAGE - PAGE_HEADER:
            self.flush()
        if not self.data:
            self.page_ts = self.last = ts
        delta = ts - self.last
        if delta >= 1 << TS_SHIFT:
            self.data += struct.pack("<II", TYPE_TIME_EXTEND | (delta & ((1 << TS_SHIFT) - 1)) << 5,
                                     delta >> TS_SHIFT)
            delta = 0
        self.data += struct.pack("<I", words | delta << 5) + record
        self.last = ts

    def flush(self) -> None:
        if self.data:
            page = struct.pack("<QQ", self.page_ts, len(self.data)) + self.data
            self.f.write(page.ljust(PAGE, b"\0"))
            self.data = bytearray()

    def close(self) -> None:
        self.flush()
        self.f.close()


def write(records: Iterable[Record], tasks: dict[int, str], cpus: int, out: str) -> int:
    """Write `records` (in timestamp order) as a trace.dat at `out`; `tasks` names each pid; `cpus` CPU buffers.
    Returns the number of records."""
    exe = trace_cmd()
    outfile.check(out)
    ids = {name: FIRST_ID + i for i, name in enumerate(EVENTS)}
    with tempfile.TemporaryDirectory(prefix=".shmmmu-tracedat-", dir=outfile.scratch_dir(out)) as d:
        tracing = os.path.join(d, "tracing")
        _tracing_dir(tracing, ids, tasks)
        pages = [_CpuPages(os.path.join(d, f"cpu{c}")) for c in range(cpus)]
        n = 0
        try:
            for ts, cpu, pid, event, values in records:
                pages[cpu].add(ts, _pack(EVENTS[event], ids[event], pid, values))
                n += 1
        finally:
            for p in pages:
                p.close()
        kallsyms = os.path.join(d, "kallsyms")
        open(kallsyms, "w").close()
        head, dat = os.path.join(d, "head.dat"), os.path.join(d, "trace.dat")
        _run([exe, "restore", "-c", "-t", tracing, "-k", kallsyms, "-o", head], d)
        _run([exe, "restore", "-i", head, "-o", dat, *[os.path.join(d, f"cpu{c}") for c in range(cpus)]], d)
        with open(dat, "rb") as src, outfile.output(out, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
    return n


def _tracing_dir(root: str, ids: dict[str, int], tasks: dict[int, str]) -> None:
    files = {"events/header_page": HEADER_PAGE, "events/header_event": HEADER_EVENT,
             "events/ftrace/print/format": FTRACE_PRINT, "trace_clock": TRACE_CLOCK, "printk_formats": "",
             "saved_cmdlines": "".join(f"{pid} {comm}\n" for pid, comm in sorted(tasks.items()))}
    for name, ev in EVENTS.items():
        files[f"events/{ev.system}/{name}/format"] = ev.format_file(ids[name])
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def _run(cmd: list[str], cwd: str) -> None:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1].strip()
        raise TraceDatError(f"trace-cmd {cmd[1]} failed: {why}")


def is_trace_dat(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


@contextmanager
def open_text(path: str) -> Iterator[BinaryIO]:
    """A tracepoint file as text, streaming: the file itself, or what `trace-cmd report` prints of a trace.dat."""
    if not is_trace_dat(path):
        try:
            f = open(path, "rb")
        except OSError as e:
            raise TraceError(f"cannot read {path}: {e.strerror}") from None
        with f:
            yield f
        return
    p = subprocess.Popen([trace_cmd(), "report", "-i", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    try:
        yield p.stdout
    finally:
        p.stdout.close()
        err = p.stderr.read().decode(errors="replace")
        p.stderr.close()
        rc = p.wait()
    if rc != 0:
        why = (err.strip().splitlines() or [f"exit status {rc}"])[-1].strip()
        raise TraceDatError(f"trace-cmd report -i {path} failed: {why}")
