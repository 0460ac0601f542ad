"""Spawn: the command line that starts a worker process on the very shmmmu its parent imported.

`python -m shmmmu.workers.vcpu` alone would put the current directory first
on the worker's sys.path: started from a source checkout after `pip install
.`, the workers would import the checkout (which has no compiled helpers, and
no shmmmu/workers/) instead of the installed package the parent runs. `-P`
(Python 3.11+) drops that entry and PYTHONPATH names the parent's package root
instead.  In an editable install that root is the checkout, and
`shmmmu.workers` is its workers/ folder through the install's import finder
(pyproject.toml's package-dir), which the worker's interpreter loads as its
parent's did.
"""
from __future__ import annotations

import os
import sys

import shmmmu

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(shmmmu.__file__)))


def python_module_command(module: str, *args: str) -> list[str]:
    """argv for `python -m module args...` in a worker, with the parent's interpreter."""
    return [sys.executable, "-P", "-m", module, *args]


def worker_env() -> dict[str, str]:
    """The parent's environment with its package root first on PYTHONPATH, and a one-thread OpenBLAS."""
    env = dict(os.environ)
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = PACKAGE_ROOT + (os.pathsep + rest if rest else "")
    # Workers do no linear algebra, but numpy's import starts OpenBLAS threads (one per further CPU) that spin for
    # about 40 ms before it sleeps: just when a run starts, on the CPUs its vCPUs need (a user's own
    # setting is kept)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env
