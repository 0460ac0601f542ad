"""Shared fixtures: a prefix of this test session's own for every object it makes, and leak checks limited to it.

Every /dev/shm segment and semaphore, supervisor log directory and worker
process a test makes carries this session's SHMMMU_PREFIX (set here, before
shmmmu is imported, and inherited by every child).  The leak checks look at
that prefix only and remove only what carries it, so two test runs, or a test
run beside a user's VMs, never see or touch each other's objects.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

SESSION_PREFIX = f"shmmmu_t{uuid.uuid4().hex[:12]}-"
os.environ["SHMMMU_PREFIX"] = SESSION_PREFIX             # before any shmmmu import: region.PREFIX reads it

import posix_ipc  # noqa: E402
import pytest  # noqa: E402

from shmmmu.region import PREFIX  # noqa: E402

assert PREFIX == SESSION_PREFIX, "shmmmu.region was imported before conftest set the session's prefix"

SHM_DIR = Path("/dev/shm")


def shm_entries() -> set[str]:
    """This session's entries in /dev/shm (segments PREFIX*, semaphores sem.PREFIX*)."""
    try:
        return {f for f in os.listdir(SHM_DIR) if f.startswith(PREFIX) or f.startswith("sem." + PREFIX)}
    except OSError:
        return set()


def remove_shm_entry(entry: str) -> None:
    """Unlink one of this session's /dev/shm entries by its file name, with the matching posix_ipc call."""
    assert entry.startswith(PREFIX) or entry.startswith("sem." + PREFIX), entry
    try:
        if entry.startswith("sem."):
            posix_ipc.unlink_semaphore("/" + entry[len("sem."):])
        else:
            posix_ipc.unlink_shared_memory("/" + entry)
    except posix_ipc.ExistentialError:
        pass


def log_dirs() -> set[str]:
    """This session's directories in the temporary directory (supervisor logs, converted traces)."""
    tmp = tempfile.gettempdir()
    try:
        return {os.path.join(tmp, d) for d in os.listdir(tmp) if d.startswith(PREFIX)}
    except OSError:
        return set()


def session_processes() -> set[int]:
    """Processes other than this one started with this session's prefix in their environment."""
    me = os.getpid()
    marker = f"SHMMMU_PREFIX={PREFIX}".encode() + b"\0"
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if marker in f.read() + b"\0":
                    out.add(int(d))
        except OSError:
            pass                                    # gone, a zombie, or not ours to read
    return out


def _settle(found: Callable[[], set], before: set, grace_s: float = 10.0) -> set:
    """What is new against `before` once things that are on their way out (an exiting worker, a teardown
    finishing after its parent's exit status was read) have had `grace_s` to go."""
    new = found() - before
    deadline = time.monotonic() + grace_s
    while new and time.monotonic() < deadline:
        time.sleep(0.1)
        new = found() - before
    return new


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail a test that leaves shared-memory objects, log directories or processes of this session behind,
    and remove them (only this session's) so one leaking test does not make the tests after it fail too."""
    before_shm, before_logs, before_procs = shm_entries(), log_dirs(), session_processes()
    yield
    procs = _settle(session_processes, before_procs)
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shm = _settle(shm_entries, before_shm, 2.0 if not procs else 5.0)
    for entry in shm:
        remove_shm_entry(entry)
    logs = _settle(log_dirs, before_logs, 2.0)
    for d in logs:
        shutil.rmtree(d, ignore_errors=True)
    left = [f"/dev/shm/{e}" for e in sorted(shm)] + sorted(logs) + [f"process {p}" for p in sorted(procs)]
    if left:
        pytest.fail(f"test left this session's objects behind (now removed): {left}")


# How long a test waits for something that must happen (a worker starting, a root being freed) before it calls
# it a hang.  A guard against hangs, not a speed requirement: a loaded machine is slow, but it does not stop.
HANG_GUARD_S = 300.0


def wait_until(condition: Callable[[], bool], what: str, poll_s: float = 0.005,
               guard_s: float = HANG_GUARD_S) -> None:
    """Poll `condition` until it holds; AssertionError naming `what` only past the hang guard."""
    deadline = time.monotonic() + guard_s
    while not condition():
        assert time.monotonic() < deadline, f"hung: {what} (nothing after {guard_s:.0f} s)"
        time.sleep(poll_s)


def new_vm_name(tag: str = "t") -> str:
    """A VM name no other test, run or concurrent session uses."""
    return f"{tag}-{os.getpid()}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def vm_name() -> str:
    return new_vm_name()


def default_sigint() -> None:
    """preexec_fn for a child the test will Ctrl-C: SIGINT at its default, whatever we inherited.

    A shell that starts a job in the background (`.ci/run &`) makes it ignore SIGINT,
    and Python then never raises KeyboardInterrupt in the children; the tests that
    send SIGINT must not depend on how the test run itself was started.
    """
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)



def source_copy(dest: Path) -> Path:
    """The checkout's files as a fresh clone has them (tracked and new, no build outputs: no compiled helpers)."""
    root = Path(__file__).resolve().parent.parent
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, check=True).stdout.split(b"\0")
    for f in filter(None, files):
        src = root / f.decode()
        if src.is_file():
            (dest / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            (dest / f.decode()).write_bytes(src.read_bytes())
    return dest
