"""Shared fixtures: unique VM names, and a guard that no test leaves shmmmu objects in /dev/shm."""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Iterator

import posix_ipc
import pytest

SHM_DIR = Path("/dev/shm")


def shm_entries() -> set[str]:
    """Names in /dev/shm that belong to shmmmu (segments `shmmmu-*`, semaphores `sem.shmmmu-*`)."""
    try:
        return {f for f in os.listdir(SHM_DIR) if "shmmmu" in f}
    except OSError:
        return set()


def remove_shm_entry(entry: str) -> None:
    """Unlink one /dev/shm entry by its file name, with the matching posix_ipc call."""
    try:
        if entry.startswith("sem."):
            posix_ipc.unlink_semaphore("/" + entry[len("sem."):])
        else:
            posix_ipc.unlink_shared_memory("/" + entry)
    except posix_ipc.ExistentialError:
        pass


def owned_by_other_live_process(entry: str) -> bool:
    """True for the objects of a VM whose creator is another process that is still running.

    Those belong to a concurrent test run or a user's VM, not to this test: this
    test's own VMs are created by this process or by a child that has exited.
    """
    from shmmmu.region import PREFIX, Region, RegionError
    name = entry[len("sem."):] if entry.startswith("sem.") else entry
    if not name.startswith(PREFIX):
        return False
    vm = name[len(PREFIX):].split(".")[0]
    # a name made by new_vm_name() in another test session that still runs is that session's, whatever
    # its state: stale and foreign segments are what some tests make on purpose (shmmmu ls / rm tests)
    session = NEW_NAME_RE.match(vm)
    if session and int(session.group(1)) != os.getpid() and not _is_our_child(int(session.group(1))):
        try:
            os.kill(int(session.group(1)), 0)
            return True
        except ProcessLookupError:
            pass
        except PermissionError:
            return True
    try:
        r = Region.attach(vm, readonly=True)
    except RegionError:
        return False
    try:
        pid = r.creator_pid
    finally:
        r.close()
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        ppid, state = _parent_and_state(pid)
    except (OSError, ValueError, IndexError):
        return True
    return not (ppid == os.getpid() or state == "Z")


def _parent_and_state(pid: int) -> tuple[int, str]:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[1]), rest[0]


def _is_our_child(pid: int) -> bool:
    """A process this test started (a CLI run): its VMs are this test's to check."""
    try:
        return _parent_and_state(pid)[0] == os.getpid()
    except (OSError, ValueError, IndexError):
        return False


@pytest.fixture(autouse=True)
def no_shm_leftovers() -> Iterator[None]:
    """Fail a test that leaves new shmmmu segments or semaphores behind, and remove them.

    The leftovers are unlinked before the failure is reported, so one leaking
    test does not make the tests after it fail too.
    """
    before = shm_entries()
    yield
    leftovers = sorted(e for e in shm_entries() - before if not owned_by_other_live_process(e))
    for entry in leftovers:
        remove_shm_entry(entry)
    if leftovers:
        pytest.fail(f"test left shared-memory objects in /dev/shm (now removed): {leftovers}")


NEW_NAME_RE = re.compile(r"^.+-(\d+)-[0-9a-f]{10}$")     # what new_vm_name() makes: TAG-PID-HEX


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

