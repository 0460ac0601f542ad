"""Signals: the one policy for every signal that ends the `shmmmu` process -- clean up, then exit 128+N.

SIGINT (Ctrl-C), SIGTERM, SIGHUP (the terminal went away), SIGQUIT (Ctrl-\\)
and the other signals whose default action ends a process (limits, timers,
power, user signals) all raise `Interrupted` in the main thread, once: the
handler sets every one of them to ignored first, so the cleanup that follows
(stop the workers, unlink the region, remove the log directory) cannot itself
be cut short by a second signal.  A signal that arrives while the supervisor
is inside the MMU's own code (holding the MMU lock, inside an RCU read-side
section, between a table's allocation and its publication) is deferred until
that code returns -- a KeyboardInterrupt there would leave a lock or an RCU
nesting count for the `finally` blocks to trip over -- or until a wait in it
reaches a safe point (`checkpoint()`, which the supervisor's lock sleep
calls), and at most DEFER_MAX_S.  A signal that arrives during a teardown (a
VM's context exit, the supervisor killing its workers or removing its logs) or
a creation (create_vm, before its `with` owns the VM) waits, without a bound,
until that code returns: an exception raised inside a cleanup skips the rest
of it, which is how a VM leaked its region and semaphores on an interrupt that
had been deferred by MMU code and came due in the teardown.  Once the command has returned or raised,
`closing()` makes a signal remembered, never raised: main() ends the command as interrupted by it (an
interrupt's recheck coming due in main()'s own last lines escaped it as a traceback).  SIGKILL cannot be caught: the workers die
with the supervisor (PR_SET_PDEATHSIG) and `shmmmu rm --stale` removes what is
left.  Before the command's modules are imported and after it has finished,
a signal ends the process quietly with the same status (`early`, `finished`):
no traceback from the middle of an import or from interpreter shutdown.
A closed pipe (`shmmmu ... | head`) is the same kind of end: Python ignores
SIGPIPE, so the write fails with EPIPE instead; `closed_pipe()` recognises it,
`silence()` points stdout and stderr at /dev/null so that no later write (a
cleanup's, the interpreter's last flush) fails again, and the command exits
PIPE_STATUS, 128 + SIGPIPE, quietly, as a shell reports a writer SIGPIPE ended.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import time
from types import FrameType

import shmmmu

# the library's modules whose code may run while the MMU lock or an RCU section is held: an interrupt waits
# until the main thread is outside them; every other module of the package (the drivers, the region, the
# checks) cleans up after an exception by design, and so do the programs (shmmmu/workers/ once installed)
_PKG = os.path.dirname(os.path.abspath(shmmmu.__file__)) + os.sep
SAFE = ("run.py", "stress.py", "bench.py", "access_tracking.py", "torture.py", "exploration.py", "region.py",
        "vm.py", "validate.py", "launch.py", "spawn.py", "layout.py", "workloads.py", "integrity.py", "checks.py",
        "violations.py", "snapshot.py", "variants.py", "inspect" + os.sep, "explore" + os.sep, "trace" + os.sep,
        "campaign" + os.sep,
        "workers" + os.sep, "__init__.py")
DEFER_MAX_S = 5.0             # a deferred interrupt fires anyway after this long (a wait that never ends)
RECHECK_S = 0.005
# (file, function): the creation and teardown code an interrupt must not cut in two
CLEANUP = {("vm.py", "__exit__"), ("vm.py", "create_vm"), ("vm.py", "close"), ("vm.py", "unlink"),
           ("region.py", "__exit__"), ("region.py", "create"), ("region.py", "close"), ("region.py", "unlink"),
           ("supervisor.py", "kill_all"), ("supervisor.py", "cleanup_logs")}
_WORKERS = os.path.dirname(os.path.abspath(__file__)) + os.sep

TERMINATING: list[signal.Signals] = [getattr(signal, n) for n in (
    "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF",
    "SIGXCPU", "SIGXFSZ", "SIGPWR", "SIGIO") if hasattr(signal, n)]


PIPE_STATUS = 128 + signal.SIGPIPE        # 141: `yes | head` reports the same for `yes`


class Interrupted(KeyboardInterrupt):
    """A terminating signal arrived; `signum` says which (a KeyboardInterrupt, so every cleanup runs)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def exit_status(exc: BaseException | None) -> int:
    """The shell's status for a process ended by a signal: 128 + N (130 for a plain KeyboardInterrupt)."""
    while exc is not None and not isinstance(exc, Interrupted):
        exc = exc.__cause__ or exc.__context__
    return 128 + (exc.signum if exc is not None else signal.SIGINT)


def signal_name(exc: BaseException | None) -> str:
    try:
        return signal.Signals(exit_status(exc) - 128).name
    except ValueError:
        return f"signal {exit_status(exc) - 128}"


def _set_all(handler) -> None:
    for s in TERMINATING:
        try:
            signal.signal(s, handler)
        except (OSError, ValueError):
            pass


def in_cleanup(frame: FrameType | None) -> bool:
    """Is the main thread creating or tearing down a VM (any frame of the stack is in CLEANUP)?"""
    while frame is not None:
        code = frame.f_code
        fn = code.co_filename
        if (fn.startswith(_PKG) or fn.startswith(_WORKERS)) and (os.path.basename(fn), code.co_name) in CLEANUP:
            return True
        frame = frame.f_back
    return False


def in_finalizer(frame: FrameType | None) -> bool:
    """Is the main thread inside a finalizer or a weakref callback (`__del__`, weakref.py, _weakrefset.py)?
    An exception raised there is printed as "Exception ignored" and lost, and the interrupt with it."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or code.co_filename.endswith(("/weakref.py", "/_weakrefset.py")):
            return True
        frame = frame.f_back
    return False


def in_mmu_code(frame: FrameType | None) -> bool:
    """Is the main thread inside the library's lock-holding code (any frame of the stack)?"""
    while frame is not None:
        fn = frame.f_code.co_filename
        if fn.startswith(_PKG) and not fn[len(_PKG):].startswith(SAFE):
            return True
        frame = frame.f_back
    return False


class _Policy:
    """The armed handler: the first signal is remembered and raised at the first safe moment."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.since = 0.0
        self.reported = False
        self.fired = False
        self.closing = False         # the command has ended: remember a signal, raise none (see closing())

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is None:
            self.pending, self.since = signum, time.monotonic()
        if self.closing:
            return
        if in_cleanup(frame) or in_finalizer(frame) or \
                (in_mmu_code(frame) and time.monotonic() - self.since < DEFER_MAX_S):
            signal.setitimer(signal.ITIMER_REAL, RECHECK_S)       # look again in a moment (SIGALRM: here)
            return
        self.fire()

    def fire(self) -> None:
        """Raise the pending interrupt, once: the cleanup it starts must not meet it again."""
        if self.fired:
            return
        self.fired = True
        signum = self.pending
        _set_all(signal.SIG_IGN)             # the cleanup this starts runs to its end
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise Interrupted(signum if signum is not None else signal.SIGINT)


_armed: list[_Policy] = []                   # the process's signal disposition (signals are per process)


def arm() -> None:
    """From now on a terminating signal raises `Interrupted` (again, after a caught one: `arm()` re-arms)."""
    _armed[:] = [_Policy()]
    _set_all(_armed[0].handle)


def closing() -> None:
    """The command has returned or raised: from now on a signal is remembered, never raised, and main() ends
    the command as interrupted by it (`unraised`).  Without this, the recheck of an interrupt deferred by the
    command's last teardown could come due in main()'s own last lines, outside every handler, and end the
    process with a traceback and status 1."""
    if _armed:
        _armed[0].closing = True
    signal.setitimer(signal.ITIMER_REAL, 0)


def received() -> int | None:
    """The terminating signal received since the last `arm()` (None: none)."""
    return _armed[0].pending if _armed else None


def unraised() -> int | None:
    """A terminating signal received since the last `arm()` that never became an exception: it came
    during the command's last teardown and was held until it ended (None: none)."""
    return _armed[0].pending if _armed and not _armed[0].fired else None


def report(message: str) -> None:
    """Say once on stderr how the command ended after a signal (whoever sees it first says it)."""
    if _armed and _armed[0].reported:
        return
    if _armed:
        _armed[0].reported = True
    print(message, file=sys.stderr, flush=True)


def checkpoint() -> None:
    """A safe point inside a long wait of the library (the supervisor's sleep on the MMU lock): a deferred
    interrupt is raised here, where the waiting code expects an exception (as it does LockStuck)."""
    if _armed and _armed[0].pending is not None:
        _armed[0].fire()


def _quiet_exit(signum: int, frame: FrameType | None) -> None:
    try:
        os.write(2, b"shmmmu: interrupted\n")
    except OSError:
        pass
    os._exit(128 + signum)


def early() -> None:
    """While modules load (nothing to clean up yet): a signal ends the process at once, one line, 128+N."""
    _set_all(_quiet_exit)


def closed_pipe(exc: BaseException | None) -> bool:
    """Did this exception, or the one it was raised from, come from writing to a pipe nobody reads any more?
    (rich, which prints the help, turns EPIPE into a SystemExit raised while handling it)"""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
            return True
        exc = exc.__cause__ or (exc.__context__ if isinstance(exc, SystemExit) else None)
    return False


def silence() -> None:
    """After a closed pipe: stdout and stderr write to /dev/null from now on (what is still buffered too),
    so nothing that runs later -- a cleanup's warning, the interpreter's final flush -- meets EPIPE again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for fd in (1, 2):
        try:
            os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)


def flush_output() -> bool:
    """Flush stdout (what a command printed may still sit in its buffer); False if its reader has gone."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            silence()
            return False
        except ValueError:                   # closed by the command itself
            pass
    return True


def finished() -> None:
    """The command is done (its output written, everything removed): a signal during interpreter
    shutdown changes nothing, so it is ignored rather than printed as a traceback."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    _set_all(signal.SIG_IGN)
