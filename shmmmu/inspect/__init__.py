"""Inspect: a read-only look at a running VM: summary, page-table dump, one GFN's walk, invariant checks, and the VM list.

`shmmmu inspect NAME` copies the VM's sections (shmmmu.snapshot: a read-only
mapping, no lock, no semaphore, so it never waits on the VM and never makes it
wait) and decodes only the copies:

  summary.py   the summary (configuration, tables, mappings, locks, RCU, counters, workers)
  tree.py      the page-table dump: leaves coalesced into GFN ranges
  gfn.py       one GFN's walk, entry by entry
  vms.py       the VMs in /dev/shm (shmmmu ls, shmmmu rm)
  removal.py   `shmmmu rm`: what refuses a removal, and the removal
  check.py     `--check`: shmmmu.checks on passes until two agree (a running VM's differences are in flight)
  view.py      what `shmmmu inspect` shows for its options: one look, or a watch
  render.py    all of it as text lines

The invariant checks are shmmmu.checks on the same snapshot and walk.
"""
from __future__ import annotations

from shmmmu.inspect.check import CheckResult, check_vm, run_checks
from shmmmu.inspect.gfn import gfn_walk, parse_gfn
from shmmmu.inspect.removal import remove_vms
from shmmmu.inspect.render import check_lines, gfn_lines, summary_lines, tree_lines, vm_list_lines
from shmmmu.inspect.summary import lock_states, public, summary
from shmmmu.inspect.tree import Dump, tree
from shmmmu.inspect.view import InspectRequest, StaleVM, View, look, watch
from shmmmu.inspect.vms import VmEntry, describe_vm, list_vms, pid_alive, remove_vm
from shmmmu.snapshot import Snapshot, take_snapshot, walk_tables

__all__ = ["CheckResult", "Dump", "InspectRequest", "Snapshot", "StaleVM", "View", "check_lines", "check_vm", "VmEntry",
           "describe_vm", "gfn_lines", "gfn_walk", "list_vms", "lock_states", "look", "parse_gfn", "pid_alive",
           "public", "remove_vm", "remove_vms", "run_checks", "summary", "summary_lines", "take_snapshot", "tree",
           "tree_lines", "vm_list_lines", "walk_tables", "watch"]


