"""Record: `shmmmu trace record`: run a command under valgrind's lackey tool and keep its memory trace.

lackey with --trace-mem=yes writes one line per instruction fetch and data
access ('I  ADDR,SIZE', ' L|S|M ADDR,SIZE') to valgrind's log: that log is the
trace (shmmmu.trace.formats reads it; valgrind's own '==PID==' lines are skipped).
"""
from __future__ import annotations

import shutil
import subprocess

from shmmmu.trace.formats import TraceError

INSTALL_HINT = ("valgrind is not installed: install it (apt-get install valgrind, dnf install valgrind, "
                "or see https://valgrind.org) to record a trace")


def lackey_command(valgrind: str, out: str, cmd: list[str]) -> list[str]:
    return [valgrind, "--tool=lackey", "--trace-mem=yes", f"--log-file={out}", "--", *cmd]


def record(cmd: list[str], out: str, valgrind: str | None = None) -> int:
    """Run `cmd` under lackey, its trace written to `out`; returns the command's exit status."""
    if not cmd:
        raise TraceError("trace record needs a command: shmmmu trace record [-o FILE] -- CMD [ARGS...]")
    exe = valgrind or shutil.which("valgrind")
    if exe is None or shutil.which(exe) is None:
        raise TraceError(INSTALL_HINT)
    if shutil.which(cmd[0]) is None:
        raise TraceError(f"no such command: {cmd[0]}")
    try:
        with open(out, "a"):
            pass
    except OSError as e:
        raise TraceError(f"cannot write {out}: {e.strerror}") from None
    return subprocess.call(lackey_command(exe, out, cmd))
