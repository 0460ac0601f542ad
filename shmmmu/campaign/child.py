"""Child: the process a campaign task runs its work in, which dies with the worker that started it.

    python -m shmmmu.campaign.child exec PARENT -- PROGRAM ARGS...     becomes PROGRAM (execv)
    python -m shmmmu.campaign.child subtree PARENT                       one DFS subtree, pickles in and out

Both first ask the kernel for SIGTERM when their parent (the Dask worker's
thread that waits for them) dies (PR_SET_PDEATHSIG, which survives execv), and
stop at once if the parent is already gone: so a worker SIGKILLed mid-task
leaves no run behind.  SIGTERM is how `shmmmu stress` and `explore` are told
to clean up (their signal policy unlinks the region); the subtree mode makes
it a KeyboardInterrupt, so its Explorer's `with` unlinks its region.

The subtree mode reads (ExploreOptions, prefix, bound, points, top, limit,
the coordinator's semaphore-name stem) as a pickle on stdin, explores that
subtree with shmmmu.explore.split's explore_subtree in an Explorer of its own
(the one `explore --jobs` builds) and writes the SubtreeResult as a pickle on
stdout.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys

PR_SET_PDEATHSIG = 1
USAGE = "usage: python -m shmmmu.campaign.child exec PARENT -- PROGRAM [ARGS...] | subtree PARENT"


def die_with(parent: int) -> None:
    """SIGTERM to this process when its parent dies; exit now if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        sys.exit(128 + signal.SIGTERM)


def renamed(points: dict[str, set[int]], old: str, new: str) -> dict[str, set[int]]:
    """Points with the semaphore words of the region whose semaphore names start `old` named as `new`'s."""
    head = "sem:" + old
    return {("sem:" + new + k[len(head):] if k.startswith(head) else k): set(w) for k, w in points.items()}


def subtree() -> None:
    from shmmmu.explore.split import explore_subtree
    from shmmmu.shm import semaphore_name
    from shmmmu.workers.explore import _explorer        # the Explorer explore --jobs builds from the options

    opts, prefix, bound, points, top, limit, theirs = pickle.load(sys.stdin.buffer)
    with _explorer(opts) as ex:
        # a semaphore's scheduling point is named after its region's semaphore (sched.py: "sem:" + its name),
        # so the coordinator's points name its own region's: renamed to this region's, and back, this subtree
        # decides at the same points as in the coordinator's process (one process's answer)
        ours = semaphore_name(ex.name, "")
        r = explore_subtree(ex, prefix, bound, renamed(points, theirs, ours), top, limit)
        r.points = renamed(r.points, ours, theirs)
    sys.stdout.buffer.write(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.flush()


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("exec", "subtree") or not argv[1].isdigit():
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    die_with(int(argv[1]))
    if argv[0] == "exec":
        if len(argv) < 4 or argv[2] != "--":
            print(USAGE, file=sys.stderr)
            sys.exit(2)
        os.execv(argv[3], argv[3:])
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        subtree()
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main(sys.argv[1:])
