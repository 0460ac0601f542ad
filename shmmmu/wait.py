"""Wait: every way a worker waits for another, in one place; production binds the real thing, the explorer its scheduler.

A worker of a VM waits in exactly these ways, and only through a `Waits`
object (each process handle -- lock, RCU, pool, TLB, MMU -- is given one when
it is made, from its VM):

- `relax()`: one turn of a spin loop (cpu_relax): another processor may change
  the word being polled;
- `yield_cpu()`: sched_yield, let another process run;
- `pause(s)`: a bounded sleep, backing off while another worker makes progress;
- `sem_acquire(sem, timeout)` / `sem_release(sem)`: sleep on a semaphore, wake a
  sleeper (the slow paths of the locks);
- `wait_while(words, i, value, spins)`: poll one word until it changes;
- `now()`, `now_ns()`: the clock every timeout and progress bound reads.

`REAL` is production: C pause, os.sched_yield, time.sleep, POSIX semaphores,
the C helper's bounded poll, time.monotonic.  The interleaving explorer
(shmmmu.explore) binds the same names to its scheduler: a spin becomes "block
this actor until another one writes a shared word", a semaphore a counter of
its own, and the clock counts steps, so every wait is an interleaving point
and nothing in the MMU, the locks, RCU or the TLB protocol is written twice.
"""
from __future__ import annotations

import os
import time
from typing import Any

import posix_ipc

from shmmmu.atomics import cpu_relax


class Waits:
    """Production waits (the base class is the real thing; the explorer subclasses it)."""

    __slots__ = ()

    def relax(self) -> None:
        cpu_relax()

    def yield_cpu(self) -> None:
        os.sched_yield()

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def sem_acquire(self, sem: posix_ipc.Semaphore, timeout: float | None) -> bool:
        """Sleep on `sem`; False when the timeout passed first, or a signal cut the sleep short."""
        try:
            sem.acquire(timeout)
            return True
        except posix_ipc.BusyError:
            return False
        except posix_ipc.SignalError:
            # EINTR: a signal whose handler returned (an interrupt deferred out of MMU code, and the
            # recheck timer behind it).  The sleep ends as a timeout does, so the waiter reaches its
            # safe point (the supervisor's on_sleep) instead of unwinding the MMU's code mid-operation.
            return False

    def sem_release(self, sem: posix_ipc.Semaphore) -> None:
        sem.release()

    def wait_while(self, words: Any, i: int, value: int, spins: int) -> int:
        """Poll words[i] while it holds `value`, at most `spins` rounds; the last value seen."""
        return words.wait_while(i, value, spins)

    def spins(self, n: int) -> int:
        """How many turns a spin loop takes before it sleeps (n; the explorer takes one: its spins block)."""
        return n

    def spin_ns(self, ns: int) -> int:
        """How long a spin loop may go on past its turns before it sleeps (ns; the explorer: 0, its clock counts
        steps, not time)."""
        return ns

    def now(self) -> float:
        return time.monotonic()

    def now_ns(self) -> int:
        return time.monotonic_ns()

    @property
    def deterministic(self) -> bool:
        """True under the explorer: timeouts count steps, nothing sleeps."""
        return False


REAL = Waits()
