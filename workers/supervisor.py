"""Supervisor: starts a VM's worker processes, drives their iterations, notices deaths, stops and recovers them.

The supervisor lives in the CLI process.  Workers are separate programs
(`python -m shmmmu.workers.vcpu`, `python -m shmmmu.workers.reclaimer`) that attach to the
region by name; they run in their own session so Ctrl-C reaches only the
supervisor, which stops them.  A worker that exits or is killed stops the run
with a message naming it and its exit status (`WorkerDied`), unless the caller
asked to recover and restart it (crash injection).  A vCPU that stops making
progress (stopped by SIGSTOP, or stuck) ends a run after `stall_s` seconds
with a message naming it, as stress's forward-progress check does.

The worker logs go to /tmp/shmmmu-NAME-XXXXXXXX with an `owner` file (pid and
start time), so `shmmmu rm --stale` can remove the directory of a supervisor
that was killed before it could (shmmmu.inspect.vms.stale_log_dirs).
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from typing import Callable

import numpy as np

from shmmmu.launch import LockStuck, WorkerDied
from shmmmu.layout import STAT, Ctl, Role, WorkerStatus, WState
from shmmmu.inspect.vms import OWNER_FILE, process_state
from shmmmu.mmu import Mmu
from shmmmu.region import PREFIX, process_start
from shmmmu.spawn import python_module_command, worker_env
from shmmmu.vm import VM
from shmmmu.workers import signals


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    def __init__(self, vm: VM, start_timeout: float = 60.0, stall_s: float | None = 30.0):
        self.vm = vm
        self.config = vm.config
        self.region = vm.region
        self.ctl = vm.region.words("ctl")
        self.ws = vm.region.words("wstate")
        self.host = self.config.host_worker
        vm.register(self.host, Role.HOST)
        self.mmu = Mmu(vm, self.host)
        self.lock_bound: float | None = None          # stress: how long a host op may wait for the lock
        vm.mmu_lock.on_sleep = self._on_lock_sleep
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, str] = {}
        self.start_timeout = start_timeout
        self.stall_s = stall_s                        # a vCPU without progress this long ends the run
        self.logdir = tempfile.mkdtemp(prefix=f"{PREFIX}{vm.name}-")
        try:
            with open(os.path.join(self.logdir, OWNER_FILE), "w") as f:
                f.write(f"{os.getpid()} {process_start(os.getpid())}\n")
        except BaseException:
            self.cleanup_logs()
            raise
        self.stopping = False
        self.iteration = 0

    def _on_lock_sleep(self) -> None:
        """While the supervisor sleeps on the MMU lock: a dead worker, a stuck holder or a signal ends the wait."""
        signals.checkpoint()
        self.check()
        lock = self.vm.mmu_lock
        waited = time.monotonic() - lock.wait_started
        if self.lock_bound is not None and waited > self.lock_bound:
            holders = ", ".join(f"{self.role_name(w)} (pid {pid}, {'read' if m == 1 else 'write'})"
                                for w, pid, m in lock.held_by())
            raise LockStuck(f"no-forward-progress: the host waited {waited:.0f}s for the MMU lock, "
                            f"held by {holders or 'nobody recorded'}")

    # ---- processes

    def role_name(self, worker: int) -> str:
        c = self.config
        if worker < c.n_vcpus:
            return f"vCPU {worker}"
        if worker == c.reclaimer_worker:
            return "reclaimer"
        if worker in c.uffd_workers:
            return f"uffd handler {worker - c.uffd_workers.start}"
        if worker == c.notifier_worker and c.n_host >= 3:
            return "notifier"
        return f"host worker {worker}"

    def spawn(self, worker: int) -> None:
        c = self.config
        if worker < c.n_vcpus:
            module = "shmmmu.workers.vcpu"
        elif worker in c.uffd_workers:
            module = "shmmmu.workers.uffd"
        elif worker == c.notifier_worker and c.n_host >= 3:
            module = "shmmmu.workers.notifier"
        else:
            module = "shmmmu.workers.reclaimer"
        log = os.path.join(self.logdir, f"worker{worker}.log")
        self.logs[worker] = log
        self.vm.region.columns("wstate", WState).status.store(worker, WorkerStatus.STARTING)
        with open(log, "ab") as f:
            self.procs[worker] = subprocess.Popen(
                python_module_command(module, f"--vm={self.vm.name}", f"--id={worker}", f"--parent={os.getpid()}"),
                stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True, env=worker_env())

    def start(self) -> None:
        self.spawn(self.config.reclaimer_worker)
        for w in self.config.uffd_workers:
            self.spawn(w)
        if self.config.n_host >= 3 and not self.config.uffds:
            self.spawn(self.config.notifier_worker)
        for i in range(self.config.n_vcpus):
            self.spawn(i)
        self.wait_ready(list(self.procs))

    def wait_ready(self, workers: list[int]) -> None:
        deadline = time.monotonic() + self.start_timeout
        for w in workers:
            while self.vm.region.columns("wstate", WState).status.load(w) != WorkerStatus.READY:
                self.check()
                if time.monotonic() > deadline:
                    raise WorkerDied(f"{self.role_name(w)} did not start within {self.start_timeout:.0f}s"
                                     f"{self._tail(w)}")
                time.sleep(0.005)

    def _tail(self, worker: int) -> str:
        try:
            with open(self.logs[worker], "rb") as f:
                text = f.read()[-2000:].decode(errors="replace").strip()
        except (OSError, KeyError):
            return ""
        return ("\n" + text) if text else ""

    def check(self) -> None:
        """Raise WorkerDied if a worker ended while it should be running."""
        for w, p in self.procs.items():
            code = p.poll()
            if code is not None and not self.stopping:
                lines = self._tail(w)
                raise WorkerDied(f"{self.role_name(w)} (pid {p.pid}) {describe_exit(code)}"
                                 + (f"; its last output:{lines}" if lines else ""))

    def dead_workers(self) -> list[tuple[int, int]]:
        return [(w, p.returncode) for w, p in self.procs.items() if p.poll() is not None]

    # ---- iterations

    def run_iteration(self, k: int, on_wait: Callable[[], None] | None = None, timeout: float | None = None) -> None:
        """Publish iteration k and wait until every vCPU has acknowledged it."""
        self.start_iteration(k)
        self.wait_iteration(k, on_wait, timeout)

    def start_iteration(self, k: int) -> None:
        """Publish iteration k: the vCPUs start it (wait_iteration waits for them)."""
        self.iteration = k
        self.ctl.store(Ctl.ITERATION, k)

    def wait_iteration(self, k: int, on_wait: Callable[[], None] | None = None, timeout: float | None = None) -> None:
        """Wait until every vCPU has acknowledged iteration k (published by start_iteration)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cols = self.vm.region.columns("wstate", WState)
        for i in range(self.config.n_vcpus):
            seen, since = cols.progress_ns.load(i), time.monotonic()
            spins = 0
            while cols.iteration.load(i) != k:
                spins += 1
                if spins % 64 == 0:
                    self.check()
                    if on_wait is not None:
                        on_wait()
                    now = time.monotonic()
                    if deadline is not None and now > deadline:
                        raise WorkerDied(f"vCPU {i} did not finish iteration {k} within {timeout:.0f}s")
                    cur = cols.progress_ns.load(i)
                    if cur != seen:
                        seen, since = cur, now
                    elif self.stall_s is not None and now - since > self.stall_s:
                        self._stalled(i, k, now - since)
                time.sleep(0.0002 if spins < 1000 else 0.002)

    def _stalled(self, vcpu: int, k: int, secs: float) -> None:
        p = self.procs.get(vcpu)
        state = process_state(p.pid) if p is not None else "gone"
        why = " (its process is stopped: SIGSTOP or a debugger)" if state == "stopped" else ""
        raise WorkerDied(f"no-forward-progress: vCPU {vcpu} (pid {p.pid if p else '-'}) made no progress in "
                         f"iteration {k} for {secs:.0f}s{why}")

    def stats(self) -> dict[str, int]:
        """Counters summed over every worker's row."""
        self.mmu.publish_stats()
        rows = self.region.array("stats").astype(np.int64)
        tot, top = rows.sum(axis=0), rows.max(axis=0)
        return {name: int(top[i] if name.endswith("_max_ns") else tot[i]) for name, i in STAT.items()}

    def vcpu_stats(self) -> list[dict[str, int]]:
        rows = self.region.array("stats").astype(np.int64)
        return [{name: int(rows[v, i]) for name, i in STAT.items()} for v in range(self.config.n_vcpus)]

    # ---- crash recovery

    def recover(self, worker: int) -> list[str]:
        """Release what a dead worker held: locks, its RCU slot, its guest mode, its cached tables."""
        vm = self.vm
        done = []
        done += vm.mmu_lock.recover(worker)
        done += vm.pages_lock.recover(worker)
        done += vm.pool.lock.recover(worker)
        done += vm.rcu.recover(worker)
        self.mmu.tlbctl.recover(worker)
        n = vm.pool.recover(worker)
        if n:
            done.append(f"pool: returned {n} cached tables of worker {worker}")
        from shmmmu.recovery import repair_after_crash
        done += repair_after_crash(self.mmu, worker)
        return done

    def restart(self, worker: int) -> None:
        self.spawn(worker)
        self.wait_ready([worker])

    # ---- stopping

    def stop(self, timeout: float = 5.0) -> None:
        """Tell every worker to stop, wait for them, kill stragglers."""
        self.stopping = True
        self.ctl.store(Ctl.STOP, 1)
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            left = max(0.0, deadline - time.monotonic())
            try:
                p.wait(left)
            except subprocess.TimeoutExpired:
                pass
        self.kill_all()                              # the stragglers

    def kill_all(self) -> None:
        """SIGKILL every worker still running (each in its own process group) and reap them all."""
        self.stopping = True
        self.ctl.store(Ctl.STOP, 1)
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            p.wait()

    def drain(self) -> int:
        """After the workers are gone: end the last grace periods and free what is still retired."""
        from shmmmu.rcu import Rcu
        rcu = Rcu(self.region, self.config.reclaimer_worker)
        freed = 0
        for _ in range(10):
            if not rcu.backlog():
                break
            freed += rcu.reclaim_pass(self.vm.pool.free, timeout=1.0)
        return freed

    def cleanup_logs(self) -> None:
        for log in [*self.logs.values(), os.path.join(self.logdir, OWNER_FILE)]:
            try:
                os.unlink(log)
            except OSError:
                pass
        try:
            os.rmdir(self.logdir)
        except OSError:
            pass
