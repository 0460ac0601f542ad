"""Record: `shmmmu trace record`: run a command under valgrind's lackey tool and keep its memory trace.

lackey with --trace-mem=yes writes one line per instruction fetch and data
access ('I  ADDR,SIZE', ' L|S|M ADDR,SIZE') to valgrind's log: that log, passed
through a pipe into the output file, is the trace (shmmmu.trace.formats reads
it; valgrind's own '==PID==' lines are skipped).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess

from shmmmu import outfile
from shmmmu.trace.formats import TraceError

INSTALL_HINT = ("valgrind is not installed: install it (apt-get install valgrind, dnf install valgrind, "
                "or see https://valgrind.org) to record a trace")


def lackey_command(valgrind: str, log_fd: int, cmd: list[str]) -> list[str]:
    return [valgrind, "--tool=lackey", "--trace-mem=yes", f"--log-fd={log_fd}", "--", *cmd]


def record(cmd: list[str], out: str, valgrind: str | None = None) -> int:
    """Run `cmd` under lackey, its trace written to `out`; returns the command's exit status, 128 + N if a
    signal N ended it (as a shell reports it).

    valgrind writes its log into a pipe that this process copies into `out` (shmmmu.outfile): valgrind
    would follow a link planted at the name, and ignores its own write errors (a full disk was a
    success); here a failed write stops the command and is an OutputError."""
    if not cmd:
        raise TraceError("trace record needs a command: shmmmu trace record [-o FILE] -- CMD [ARGS...]")
    exe = valgrind or shutil.which("valgrind")
    if exe is None or shutil.which(exe) is None:
        raise TraceError(INSTALL_HINT)
    if shutil.which(cmd[0]) is None:
        raise TraceError(f"no such command: {cmd[0]}")
    outfile.check(out)
    with outfile.output(out, "wb") as f:
        r, w = os.pipe()
        try:
            proc = subprocess.Popen(lackey_command(exe, w, cmd), pass_fds=(w,))
        except OSError as e:
            os.close(r)
            raise TraceError(f"cannot run {exe}: {e.strerror}") from None
        finally:
            os.close(w)
        try:
            with os.fdopen(r, "rb", buffering=0) as log:
                failed: outfile.OutputError | None = None
                while block := log.read(1 << 20):
                    if failed is None:
                        try:
                            f.write(block)
                        except outfile.OutputError as e:
                            failed = e
                            proc.kill()              # the trace is lost: no use running on (read on to EOF)
            rc = proc.wait()
            if failed is not None:
                raise failed
        finally:
            if proc.poll() is None:              # an interrupt: the command does not outlive its recording
                proc.kill()
                proc.wait()
    return 128 - rc if rc < 0 else rc


def recorded_line(cmd: list[str], rc: int, out: str) -> str:
    """What `shmmmu trace record` says at the end: whose trace is where, how the command ended if not with 0,
    and how to replay it."""
    status = ""
    if rc > 128 and rc - 128 in {sg.value for sg in signal.Signals}:
        status = f" (it was killed by {signal.Signals(rc - 128).name})"
    elif rc:
        status = f" (it exited with status {rc})"
    return f"trace of {' '.join(cmd)}{status} in {out} (replay: shmmmu run --trace {out} --vcpus 1 --backing 4k)"
