"""Tracepoints: the kernel's kvm and kvmmmu tracepoint lines of one Mmu, written by wrapping its functions when asked.

`install(mmu, directory)` wraps, on this one Mmu instance, the functions at
whose kernel counterparts 5.13 fires the TDP MMU's tracepoints, and writes
each event as `trace-cmd report` prints it, in the event's own printk format
(arch/x86/kvm/trace.h and arch/x86/kvm/mmu/mmutrace.h of 5.13):

  kvm_page_fault            handle_ept_violation, before kvm_mmu_page_fault    "address %lx error_code %x"
  kvm_mmu_spte_requested    kvm_tdp_mmu_map, after kvm_mmu_hugepage_adjust     "gfn %llx pfn %llx level %d"
  kvm_tdp_mmu_spte_changed  __handle_changed_spte, for every change            "as id %d gfn %llx level %d
                            (also each entry handle_removed_tdp_mmu_page        old_spte %llx new_spte %llx"
                            freezes)
  kvm_mmu_get_page          alloc_tdp_mmu_page (always "new")                  KVM_MMU_PAGE_PRINTK() " %s"
  kvm_mmu_prepare_zap_page  handle_removed_tdp_mmu_page                         KVM_MMU_PAGE_PRINTK()

KVM_MMU_PAGE_PRINTK() is "sp gen %u gfn %llx l%u %u-byte q%u%s %s%s %snxe %sad root %u %s": a TDP
page's role is direct, 8-byte, quadrant 0, access wux, efer_nx clear (the TDP root role never sets
it), A/D enabled, mmu_valid_gen 0 (the TDP MMU does not use it), sync.

The error code of kvm_page_fault is VMX's EPT-violation exit qualification:
bit 0 a read, 1 a write, 2 a fetch, and bits 7 and 8 (the guest linear address
is valid and the access was a translation of it) as a guest's data access has
them; bits 3-5 (what the entry allowed) are left 0.

Nothing of this runs unless the VM's configuration names a directory
(`--tracepoints FILE`): then each worker writes its own part there, and
`collect()` merges the parts by timestamp into FILE.  The timestamp is the
wait layer's clock: CLOCK_MONOTONIC in a run, the step count (one step a
microsecond) under the explorer; the [CPU] column is the worker slot; the task
is QEMU's name for a vCPU thread ("CPU 0/KVM") or the role of a host process.
"""
from __future__ import annotations

import atexit
import heapq
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterator

import numpy as np

from shmmmu import outfile
from shmmmu import spte as S
from shmmmu.mmu.instruments import site_target
from shmmmu.region import PREFIX

Mmu = Any                    # shmmmu.mmu.Mmu (not imported: the front imports this module)

# the printk formats, as the kernel's headers have them (tests check every line against these)
KVM_MMU_PAGE_PRINTK = "sp gen %u gfn %llx l%u %u-byte q%u%s %s%s %snxe %sad root %u %s"
FORMATS = {
    "kvm_page_fault": "address %lx error_code %x",
    "kvm_mmu_spte_requested": "gfn %llx pfn %llx level %d",
    "kvm_tdp_mmu_spte_changed": "as id %d gfn %llx level %d old_spte %llx new_spte %llx",
    "kvm_mmu_get_page": KVM_MMU_PAGE_PRINTK + " %s",
    "kvm_mmu_prepare_zap_page": KVM_MMU_PAGE_PRINTK,
}
EPT_READ, EPT_WRITE, EPT_FETCH = 0x1, 0x2, 0x4
EPT_GLA = 0x180                  # bits 7 and 8: a translation of a valid guest linear address


def _sp(gfn: int, level: int) -> str:
    """KVM_MMU_PAGE_PRINTK() of a TDP MMU page."""
    return f"sp gen 0 gfn {gfn:x} l{level} 8-byte q0 direct wux !nxe ad root 0 sync"


def task(kvm) -> str:
    """The task name a line carries: QEMU's name of a vCPU thread, or the host process's role."""
    c, w = kvm.config, kvm.worker
    if w < c.n_vcpus:
        return f"CPU {w}/KVM"
    return {c.host_worker: "shmmmu", c.reclaimer_worker: "shmmmu-reclaim"}.get(w, "shmmmu-notifier")


class Writer:
    """One worker's part: lines in trace-cmd report's layout.  A vCPU's are buffered and flushed when it
    publishes its counters; a host process's go out line by line (the supervisor merges the parts
    before it exits, and its operations are few), and so do the explorer's actors (one process)."""

    def __init__(self, path: str, comm: str, pid: int, cpu: int, buffered: bool, clock: Callable[[], int]):
        self.f: IO[str] = open(path, "a", buffering=1 << 16 if buffered else 1)
        self.prefix = f"{comm:>16}-{pid:<5} [{cpu:03d}] "
        self.clock = clock
        atexit.register(self.f.flush)

    def emit(self, event: str, text: str) -> None:
        t = self.clock() // 1000
        self.f.write(f"{self.prefix}{t // 1000000:5d}.{t % 1000000:06d}: {event + ':':<25} {text}\n")


def install(mmu: Mmu, directory: str) -> Writer:
    """Put every tracepoint in place over its site of this one Mmu; its lines go to a part file of its own
    in `directory`."""
    kvm = mmu.kvm
    w = Writer(os.path.join(directory, f"{kvm.worker:03d}-{os.getpid()}.txt"), task(kvm), os.getpid(), kvm.worker,
               buffered=kvm.worker < kvm.config.n_vcpus and not kvm.waits.deterministic, clock=kvm.waits.now_ns)
    for key, wrap in TRACE.items():
        target = site_target(mmu, key, "trace")
        name = key.split(".")[1]
        setattr(target, name, wrap(kvm, w, getattr(target, name)))
    return w


def _spte_changed(w: Writer, gfn: int, level: int, old: int, new: int) -> None:
    w.emit("kvm_tdp_mmu_spte_changed", f"as id 0 gfn {gfn:x} level {level} old_spte {old:x} new_spte {new:x}")


def _page_fault(kvm, w: Writer, page_fault: Callable) -> Callable:
    def traced_page_fault(gfn: int, write: bool, exec_fault: bool = False) -> int:
        code = EPT_GLA | (EPT_WRITE if write else EPT_FETCH if exec_fault else EPT_READ)
        w.emit("kvm_page_fault", f"address {gfn << 12:x} error_code {code:x}")
        return page_fault(gfn, write, exec_fault)
    return traced_page_fault


def _map(kvm, w: Writer, tdp_map: Callable) -> Callable:
    pages = kvm.pages

    def traced_map(vcpu, fault, shared: bool) -> int:
        level = fault.goal_level
        w.emit("kvm_mmu_spte_requested",
               f"gfn {fault.gfn:x} pfn {fault.pfn | (fault.gfn & (pages[level] - 1)):x} level {level}")
        return tdp_map(vcpu, fault, shared)
    return traced_map


def _handle_changed(kvm, w: Writer, handle_changed: Callable) -> Callable:
    def traced_handle_changed(gfn: int, old: int, new: int, level: int, shared: bool,
                              record_dirty_log: bool = True, record_acc_track: bool = True) -> None:
        if old != new:                           # __handle_changed_spte returns before its trace when equal
            _spte_changed(w, gfn, level, old, new)
        handle_changed(gfn, old, new, level, shared, record_dirty_log, record_acc_track)
    return traced_handle_changed


def _remove_table(kvm, w: Writer, remove_table: Callable) -> Callable:
    """handle_removed_tdp_mmu_page: trace_kvm_mmu_prepare_zap_page(sp), then every entry it freezes goes
    through handle_changed_spte (shared: all of them, exchanged to REMOVED, traced by the freeze below;
    exclusive: the present ones)."""
    tmeta, tables, E, pages = kvm.tmeta, kvm.tables, kvm.E, kvm.pages

    def traced_remove_table(table: int, shared: bool, removed_list: list[int]) -> None:
        level = tmeta.level.load(table)
        base = tmeta.gfn.load(table)
        w.emit("kvm_mmu_prepare_zap_page", _sp(base, level))
        if shared:
            remove_table(table, shared, removed_list)
            return
        before = np.empty(E, dtype=np.uint64)
        tables.load_range(table * E, E, before)
        remove_table(table, shared, removed_list)
        for i in np.flatnonzero(before & np.uint64(S.MMU_PRESENT)).tolist():
            _spte_changed(w, base + i * pages[level], level, int(before[i]), S.REMOVED)
    return traced_remove_table


def _freeze(kvm, w: Writer, freeze: Callable) -> Callable:
    tmeta, tables, pages = kvm.tmeta, kvm.tables, kvm.pages

    def traced_freeze(start: int, base: int, table: int, old: np.ndarray) -> None:
        freeze(start, base, table, old)
        level = tmeta.level.load(table)
        after = tables.load(start)                       # REMOVED (or 0 with K6)
        step = pages[level]
        for i, v in enumerate(old.tolist()):
            if v != after:
                _spte_changed(w, base + i * step, level, v, after)
    return traced_freeze


def _alloc(kvm, w: Writer, alloc: Callable) -> Callable:
    def traced_alloc(level: int, gfn: int) -> int:
        table = alloc(level, gfn)
        w.emit("kvm_mmu_get_page", _sp(gfn, level) + " new")
        return table
    return traced_alloc


def _publish(kvm, w: Writer, publish: Callable) -> Callable:
    def traced_publish() -> None:
        publish()
        w.f.flush()
    return traced_publish


TRACE: dict[str, Callable] = {
    "fault.page_fault": _page_fault,
    "map.kvm_tdp_mmu_map": _map,
    "tdp.handle_changed_spte": _handle_changed,
    "tdp.remove_table": _remove_table,
    "tdp.freeze_removed_entries": _freeze,
    "map.alloc_tdp_mmu_page": _alloc,
    "kvm.publish_stats": _publish,
}


# ---------------------------------------------------------------- the file: parts made, merged, removed

@contextmanager
def tracepoint_parts(out: str) -> Iterator[str]:
    """A directory for the workers' parts beside `out`; on leaving, the parts merged into `out` and removed
    (also on an error or Ctrl-C: what was written until then is kept).  `out` is checked first and written
    as every output is (shmmmu.outfile: never through a link; a failure is an OutputError, exit 2)."""
    outfile.check(out)
    try:
        d = tempfile.mkdtemp(prefix=f".{PREFIX}tracepoints-", dir=os.path.dirname(os.path.abspath(out)))
    except OSError as e:
        raise outfile.OutputError(f"cannot write {out}: {e.strerror}") from None
    try:
        yield d
    finally:
        try:
            collect(d, out)
        finally:
            shutil.rmtree(d, ignore_errors=True)


def _ts(line: str) -> float:
    return float(line.split("] ", 1)[1].split(":", 1)[0])


def collect(directory: str, out: str) -> int:
    """Merge the parts of `directory` by timestamp into `out` (streaming); returns the number of events."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(".txt"))
    files = [open(os.path.join(directory, n)) for n in names]
    n = 0
    try:
        with outfile.output(out, "w") as f:
            f.write("# tracer: shmmmu (kvm and kvmmmu events in the kernel's formats, Linux 5.13)\n#\n"
                    "#           TASK-PID     CPU   TIMESTAMP  FUNCTION\n"
                    "#              | |        |         |         |\n")
            batch: list[str] = []
            for line in heapq.merge(*files, key=_ts):
                batch.append(line)
                if len(batch) >= 4096:
                    f.write("".join(batch))
                    n += len(batch)
                    batch.clear()
            f.write("".join(batch))
            n += len(batch)
    finally:
        for fh in files:
            fh.close()
    return n
