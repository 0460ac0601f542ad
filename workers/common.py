"""Common: what every worker process does at start: parse its slot, tie its life to the supervisor's, attach."""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys

from shmmmu.layout import WState
from shmmmu.region import RegionError
from shmmmu.vm import VM, attach_vm

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies, so no worker outlives a killed run."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def start_worker(description: str, role: int) -> tuple[VM, argparse.Namespace]:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--vm", required=True, help="the VM's name")
    p.add_argument("--id", type=int, required=True, help="this worker's slot")
    p.add_argument("--parent", type=int, default=0, help="the supervisor's pid")
    args = p.parse_args()
    die_with_parent()
    import faulthandler
    faulthandler.register(signal.SIGUSR1)             # `kill -USR1 PID` dumps where a worker is
    if args.parent and os.getppid() != args.parent:
        sys.exit(3)                                   # the supervisor is already gone
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the supervisor handles Ctrl-C and stops us
    try:
        vm = attach_vm(args.vm)
    except RegionError as e:
        print(f"worker {args.id}: {e}", file=sys.stderr)
        sys.exit(2)
    if not 0 <= args.id < vm.config.n_workers:
        print(f"worker {args.id}: no such slot in VM {args.vm}", file=sys.stderr)
        sys.exit(2)
    vm.register(args.id, role)
    return vm, args


def set_status(vm: VM, worker: int, status: int) -> None:
    vm.region.columns("wstate", WState).status.store(worker, status)
