"""Shared fixtures: unique VM names, and a guard that no test leaves shmmmu objects in /dev/shm."""
from __future__ import annotations

import os
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


@pytest.fixture(autouse=True)
def no_shm_leftovers() -> Iterator[None]:
    """Fail a test that leaves new shmmmu segments or semaphores behind, and remove them.

    The leftovers are unlinked before the failure is reported, so one leaking
    test does not make the tests after it fail too.
    """
    before = shm_entries()
    yield
    leftovers = sorted(shm_entries() - before)
    for entry in leftovers:
        remove_shm_entry(entry)
    if leftovers:
        pytest.fail(f"test left shared-memory objects in /dev/shm (now removed): {leftovers}")


def new_vm_name(tag: str = "t") -> str:
    """A VM name no other test, run or concurrent session uses."""
    return f"{tag}-{os.getpid()}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def vm_name() -> str:
    return new_vm_name()

