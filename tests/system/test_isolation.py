"""Sessions keep apart: SHMMMU_PREFIX gives a session's objects a prefix of their own, and `ls`, `rm --stale`,
`rm --all` and the test suite's leak checks see and remove only the objects of their own prefix.

Two test runs on one machine, or a test run beside a user's VMs, never list, check or delete each other's
segments, semaphores or log directories (the suite's fixture in conftest.py sets a prefix per session).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from conftest import SESSION_PREFIX, log_dirs, session_processes, shm_entries, wait_until

ROOT = Path(__file__).resolve().parents[2]
CMD = [sys.executable, "-m", "shmmmu.workers.cli"]


def shmmmu(*args: str, prefix: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHMMMU_PREFIX": prefix}
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def other_prefix() -> str:
    return f"shmmmu_o{uuid.uuid4().hex[:12]}-"


def objects(prefix: str) -> list[str]:
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(prefix) or f.startswith("sem." + prefix))


def test_a_stale_vm_of_another_session_is_neither_listed_nor_removed() -> None:
    """Another session's VM whose supervisor was SIGKILLed (stale, with its log directory) survives this
    session's `rm --stale` and `rm --all --force`; its own session lists and removes it."""
    other = other_prefix()
    env = {**os.environ, "SHMMMU_PREFIX": other}
    p = subprocess.Popen([*CMD, "run", "--name", "theirs", "-b", "8M", "--keep"], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stderr is not None
        for line in p.stderr:                     # --keep names the inspect command once the VM runs
            if "inspect" in line:
                break
        os.killpg(p.pid, signal.SIGKILL)          # the whole VM dies at once: nothing cleans up
        p.wait()
        theirs = objects(other)
        assert f"{other}theirs" in theirs
        tmp_theirs = [d for d in os.listdir("/tmp") if d.startswith(other)]
        assert tmp_theirs, "a supervisor's log directory carries its session's prefix"

        mine = shmmmu("ls", prefix=SESSION_PREFIX)
        assert mine.returncode == 0 and "theirs" not in mine.stdout, mine
        for args in (("rm", "--stale"), ("rm", "--all", "--force")):
            r = shmmmu(*args, prefix=SESSION_PREFIX)
            assert r.returncode == 0, r
        assert objects(other) == theirs
        assert sorted(d for d in os.listdir("/tmp") if d.startswith(other)) == sorted(tmp_theirs)

        listed = shmmmu("ls", prefix=other)
        assert "theirs" in listed.stdout and "stale" in listed.stdout, listed
        r = shmmmu("rm", "--stale", prefix=other)
        assert r.returncode == 0, r
        assert objects(other) == []
        assert [d for d in os.listdir("/tmp") if d.startswith(other)] == []
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        shmmmu("rm", "--all", "--force", prefix=other)


def test_the_session_checks_see_only_this_sessions_objects() -> None:
    """The leak checks' view (conftest) holds no object of another prefix, and a worker started by this
    session is found by its environment."""
    other = other_prefix()
    import posix_ipc
    sem = posix_ipc.Semaphore(f"/{other}x.q", posix_ipc.O_CREX, mode=0o600)
    try:
        assert not any(other in e for e in shm_entries())
        assert all(e.startswith(SESSION_PREFIX) or e.startswith("sem." + SESSION_PREFIX) for e in shm_entries())
        assert all(os.path.basename(d).startswith(SESSION_PREFIX) for d in log_dirs())
    finally:
        sem.unlink()
        sem.close()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        # Popen returns once exec has closed the error pipe, a moment before the kernel records where the new
        # program's environment is: until then /proc/PID/environ reads empty (seen on a loaded machine)
        wait_until(lambda: child.pid in session_processes(), "the child to be found by its environment")
    finally:
        child.kill()
        child.wait()
    assert child.pid not in session_processes()


def test_an_invalid_prefix_is_one_line_and_exit_2() -> None:
    for bad in ("other-", "shmmmu", "shmmmu_a/b-", "shmmmu_" + "x" * 40 + "-"):
        r = shmmmu("ls", prefix=bad)
        assert r.returncode == 2, (bad, r)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("shmmmu: error: invalid SHMMMU_PREFIX"), (bad, r.stderr)
        assert "Traceback" not in r.stderr
