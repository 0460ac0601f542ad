"""Launch: what the library asks of whoever starts a VM's worker processes; the library itself starts none.

`run_vm`, `run_stress` and `run_bench` drive a VM through a `Launcher`, made
for the VM by the factory their caller passes: the `shmmmu` command and the
tests pass `shmmmu.workers.supervisor.Supervisor`, which spawns the vCPU
and reclaimer processes, watches them and recovers them.
"""
from __future__ import annotations

import subprocess
from typing import Callable, Protocol

from shmmmu.mmu import Mmu
from shmmmu.vm import VM


class WorkerDied(RuntimeError):
    """A worker exited while the run needed it; the message names it and how it ended."""


class LockStuck(RuntimeError):
    """The host waited past the forward-progress bound for the MMU lock."""


class Launcher(Protocol):
    """A started VM's processes, as the run drivers use them."""

    vm: VM
    mmu: Mmu                                   # the host's own Mmu (worker slot n_vcpus)
    procs: dict[int, subprocess.Popen]         # worker slot -> process
    lock_bound: float | None                   # how long a host operation may wait for the MMU lock

    def start(self) -> None: ...
    def check(self) -> None: ...
    def run_iteration(self, k: int, on_wait: Callable[[], None] | None = None,
                      timeout: float | None = None) -> None: ...
    def start_iteration(self, k: int) -> None: ...
    def wait_iteration(self, k: int, on_wait: Callable[[], None] | None = None,
                       timeout: float | None = None) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def recover(self, worker: int) -> list[str]: ...
    def restart(self, worker: int) -> None: ...
    def stop(self, timeout: float = 5.0) -> None: ...
    def drain(self) -> int: ...
    def kill_all(self) -> None: ...
    def cleanup_logs(self) -> None: ...


LauncherFactory = Callable[[VM], Launcher]
