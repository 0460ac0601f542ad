"""Cluster: where a campaign runs -- a Dask LocalCluster the command starts and stops, or an existing scheduler.

By default `local_cluster` starts one single-threaded worker process per CPU
(each runs one task's child at a time) and stops it at the end.  The
scheduler's `allowed-failures` is set to 0 there: a task whose worker dies
under it fails at once, and the driver's own retry (shmmmu.campaign.driver)
is then the only one, so a task lost twice is reported "lost".  An existing
cluster (`--scheduler tcp://HOST:PORT`, started with `dask scheduler` and
`dask worker`) keeps its own setting: start its scheduler with
DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0 for the same count
(docs/campaign.md).

Dask is an optional dependency (`pip install 'shmmmu[campaign]'`): without
it, a campaign is one line and exit 2.
"""
from __future__ import annotations

import logging
import os
import re
import signal
from contextlib import contextmanager
from typing import Any, Iterator

from shmmmu.validate import UsageError

ADDRESS_RE = re.compile(r"(tcp|tls)://[^\s/:]+:\d{1,5}\Z")
CONNECT_TIMEOUT_S = 20


def need_dask() -> None:
    """UsageError (one line) unless Dask distributed can be imported."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise UsageError("shmmmu campaign needs Dask distributed: pip install 'shmmmu[campaign]' "
                         "(or 'dask[distributed]')") from None


def check_address(address: str) -> str:
    if not ADDRESS_RE.match(address):
        raise UsageError(f"--scheduler must be tcp://HOST:PORT (a `dask scheduler`'s address), not {address!r}")
    return address


@contextmanager
def connected(scheduler: str, workers: int) -> Iterator[Any]:
    """A Dask Client: of the scheduler at `scheduler`, or of a LocalCluster of `workers` processes (0: one per
    CPU) started here and stopped on the way out."""
    need_dask()
    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        check_address(scheduler)
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise UsageError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
        try:
            yield client
        finally:
            client.close()
        return
    n = workers or os.cpu_count() or 1
    # the workers ignore the terminal's Ctrl-C (it reaches the whole process group): the driver stops them,
    # after it has stopped their tasks (an ignored SIGINT is inherited through spawn's exec)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            # no dashboard; the scheduler's HTTP server (always started) on a free port of the loopback: the
            # default 8787 may be another cluster's, which Dask would say in a warning on the user's terminal
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                                   scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
                                   silence_logs=logging.CRITICAL, memory_limit=0)
    finally:
        signal.signal(signal.SIGINT, old)
    try:
        client = Client(cluster, set_as_default=False)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def worker_count(client: Any) -> int:
    """The worker threads of the cluster: how many tasks run at once."""
    return sum(client.nthreads().values())
