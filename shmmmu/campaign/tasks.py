"""Tasks: what a Dask worker runs for a campaign: one child process under a prefix of its own, then its cleanup.

Every task gets a SHMMMU_PREFIX of its own (`task_prefix`): the campaign's
*family* (`shmmmu_` + the campaign process's own prefix + a random token)
and the task's serial number.  Its child's region, semaphores, log
directories and worker processes all carry that prefix, so no two tasks
share a /dev/shm object, and whatever a task leaves -- it was killed at its
wall cap, it crashed -- is found by prefix and removed after it
(`cleanup_prefix`: processes SIGKILLed, /dev/shm entries unlinked, log
directories removed).  The child dies with the worker (shmmmu.campaign.child),
so a worker SIGKILLed mid-task leaves nothing running; `stop_family`, run on
every worker by the driver (`Client.run`), ends and cleans up everything of
one campaign on a machine (Ctrl-C, and the sweep at the end).

A child that ends without a verdict (a crash, not a finding) raises
TaskFailed: the driver retries the task once and reports it lost after a
second failure.  A child past its wall cap (a generous bound in seconds: the
verdict itself never depends on time) is stopped and reported hung.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from shmmmu.campaign.results import outcome_of_explore, outcome_of_stress
from shmmmu.shm import SHM_DIR, unlink_entry

STOP_GRACE_S = 10.0          # SIGTERM (the child cleans up) to SIGKILL
ENV = "SHMMMU_PREFIX"
ALNUM = "0123456789abcdefghijklmnopqrstuvwxyz"


class TaskFailed(RuntimeError):
    """A task's child ended without a verdict (crashed, killed by someone else, printed no report)."""


def family_of(prefix: str, token: str) -> str:
    """The campaign's family of prefixes: `shmmmu_` + the campaign process's own prefix (its middle, so a test
    session's leak checks see them) + a random token; at most 25 letters and digits, room for 6 of serial."""
    middle = prefix[len("shmmmu_"):-1] if prefix.startswith("shmmmu_") else ""
    return "shmmmu_" + middle[:25 - len(token)] + token


def task_prefix(family: str, serial: int) -> str:
    digits = ""
    while True:
        serial, d = divmod(serial, 36)
        digits = ALNUM[d] + digits
        if not serial:
            return f"{family}{digits}-"


def _worker_name() -> str:
    try:
        from distributed import get_worker
        return get_worker().address
    except (ImportError, ValueError):
        return os.uname().nodename


def _prefix_of(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None                     # gone, or not ours to read
    for item in env.split(b"\0"):
        if item.startswith(ENV.encode() + b"="):
            return item[len(ENV) + 1:].decode(errors="replace")
    return None


def processes_where(match: Callable[[str], bool]) -> list[int]:
    """Processes other than this one whose SHMMMU_PREFIX matches."""
    me = os.getpid()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != me:
            p = _prefix_of(d)
            if p is not None and match(p):
                out.append(int(d))
    return out


def _remove_named(start: str) -> None:
    """Unlink /dev/shm entries and remove temporary directories whose names start with `start`."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        entries = []
    for e in entries:
        if e.startswith(start) or e.startswith("sem." + start):
            unlink_entry(e)                 # only a regular file of this user
    tmp = tempfile.gettempdir()
    for d in os.listdir(tmp):
        path = os.path.join(tmp, d)
        if d.startswith(start) and os.path.isdir(path) and not os.path.islink(path) \
                and os.lstat(path).st_uid == os.geteuid():
            shutil.rmtree(path, ignore_errors=True)


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def cleanup_prefix(prefix: str) -> None:
    """After a task: every process still carrying its prefix SIGKILLed, its objects and log directories removed."""
    pids = processes_where(lambda p: p == prefix)
    _kill(pids, signal.SIGKILL)
    deadline = time.monotonic() + STOP_GRACE_S
    while pids and time.monotonic() < deadline:       # a killed process may still hold its mappings a moment
        time.sleep(0.02)
        pids = processes_where(lambda p: p == prefix)
    _remove_named(prefix)


def stop_family(family: str) -> int:
    """Every process of a campaign on this machine told to stop (SIGTERM), SIGKILLed after a grace, and
    everything under the campaign's prefixes removed; the number of processes found.  Run on each worker by
    the driver (Client.run) on Ctrl-C and at the end."""
    mine = lambda p: p.startswith(family)              # noqa: E731
    pids = processes_where(mine)
    _kill(pids, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while processes_where(mine) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = processes_where(mine)
    _kill(left, signal.SIGKILL)
    while processes_where(mine) and time.monotonic() < deadline + STOP_GRACE_S:
        time.sleep(0.05)
    _remove_named(family)
    return len(pids)


def _run_child(mode: str, args: list[str], prefix: str, cap_s: float,
               stdin: bytes | None = None) -> tuple[bool, int, bytes, bytes]:
    """Run one child under `prefix`: (hung, exit status, stdout, stderr); cleaned up after, whatever happened."""
    env = dict(os.environ, **{ENV: prefix})
    cmd = [sys.executable, "-m", "shmmmu.campaign.child", mode, str(os.getpid())] + (["--", *args] if args else [])
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    hung = False
    try:
        try:
            out, err = p.communicate(stdin, timeout=cap_s)
        except subprocess.TimeoutExpired:
            hung = True
            p.send_signal(signal.SIGTERM)                   # its signal policy stops its workers, unlinks
            try:
                out, err = p.communicate(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, err = p.communicate()
    finally:
        if p.poll() is None:                                # an exception here (the worker is closing)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        cleanup_prefix(prefix)
    return hung, p.returncode, out, err


def _tail(err: bytes, lines: int = 3) -> str:
    return " | ".join(err.decode(errors="replace").strip().splitlines()[-lines:])


def run_command(kind: str, argv: list[str], prefix: str, cap_s: float) -> dict[str, Any]:
    """`shmmmu ARGV --json` in a child: the task's outcome (verdict found/clean/hung, first violation, replay,
    time to detect), with the worker and the seconds it took."""
    t0 = time.monotonic()
    hung, rc, out, err = _run_child("exec", [sys.executable, "-m", "shmmmu.workers.cli", *argv, "--json"],
                                    prefix, cap_s)
    base = {"worker": _worker_name(), "seconds": time.monotonic() - t0}
    if hung:
        return {**base, "verdict": "hung", "first": f"stopped at the wall cap of {cap_s:g} s: {_tail(err)}"}
    if rc not in (0, 1):
        raise TaskFailed(f"`shmmmu {' '.join(argv)}` exited {rc}: {_tail(err)}")
    try:
        report = json.loads(out)
    except ValueError:
        raise TaskFailed(f"`shmmmu {' '.join(argv)}` printed no report: {_tail(err)}") from None
    return {**base, **(outcome_of_stress(report) if kind == "stress" else outcome_of_explore(report))}


def run_subtree(payload: bytes, prefix: str, cap_s: float) -> dict[str, Any]:
    """One DFS subtree (a pickle of explore_subtree's arguments) in a child: {"result": the pickled
    SubtreeResult, or "hung": True}, with the worker and the seconds it took."""
    t0 = time.monotonic()
    hung, rc, out, err = _run_child("subtree", [], prefix, cap_s, stdin=payload)
    base = {"worker": _worker_name(), "seconds": time.monotonic() - t0}
    if hung:
        return {**base, "hung": True, "first": f"a subtree stopped at the wall cap of {cap_s:g} s: {_tail(err)}"}
    if rc != 0 or not out:
        raise TaskFailed(f"a subtree's child exited {rc}: {_tail(err)}")
    return {**base, "result": out}
