"""Tracepoints: the kernel's kvm and kvmmmu tracepoints of one Mmu, recorded by wrapping its functions when asked.

`install(mmu, directory)` wraps, on this one Mmu instance, the functions at
whose kernel counterparts 5.13 fires the TDP MMU's tracepoints, and records
each event with its fields as the kernel's TP_fast_assign sets them
(arch/x86/kvm/trace.h and arch/x86/kvm/mmu/mmutrace.h of 5.13; the events'
layouts and formats are shmmmu.trace.events):

  kvm_page_fault            handle_ept_violation, before kvm_mmu_page_fault    fault_address, error_code
  kvm_mmu_spte_requested    kvm_tdp_mmu_map, after kvm_mmu_hugepage_adjust     gfn, pfn, level
  kvm_tdp_mmu_spte_changed  __handle_changed_spte, for every change            gfn, old_spte, new_spte,
                            (also each entry handle_removed_tdp_mmu_page        level, as_id
                            freezes)
  kvm_mmu_get_page          alloc_tdp_mmu_page (always created)                mmu_valid_gen, gfn, role,
  kvm_mmu_prepare_zap_page  handle_removed_tdp_mmu_page                         root_count, unsync (created)

A TDP page's role is direct, 8-byte gptes, quadrant 0, access wux, nxe,
cr0_wp and ad_disabled clear, mmu_valid_gen 0 (the TDP MMU does not use it),
root_count 0, sync.

The error code of kvm_page_fault is VMX's EPT-violation exit qualification:
bit 0 a read, 1 a write, 2 a fetch, and bits 7 and 8 (the guest linear address
is valid and the access was a translation of it) as a guest's data access has
them; bits 3-5 (what the entry allowed) are left 0.

Nothing of this runs unless the VM's configuration names a directory
(`--tracepoints FILE`): then each worker writes its own part there (a line
per record: timestamp, event, field values), and `collect()` merges the parts
by timestamp into FILE: the text `trace-cmd report` prints of them, or, when
FILE ends in .dat, a trace.dat made by trace-cmd (shmmmu.trace.tracedat) that
`trace-cmd report -i FILE` and KernelShark open.  The timestamp is the wait
layer's clock: CLOCK_MONOTONIC in a run; under the explorer the step count,
one step a microsecond, after one second (trace-cmd report prints a time of a
second or less as a bare count of microseconds).  The [CPU] column is the
worker slot; the task is QEMU's name for a vCPU thread ("CPU 0/KVM") or the
role of a host process, with its pid (under the explorer, whose actors share
one process, each actor has a thread id of its own: the pid plus one plus its
worker slot, as QEMU's vCPU threads have theirs).
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

EPT_READ, EPT_WRITE, EPT_FETCH = 0x1, 0x2, 0x4
EPT_GLA = 0x180                  # bits 7 and 8: a translation of a valid guest linear address
EXPLORER_EPOCH_NS = 1_000_000_000   # under the explorer, step timestamps start after a second (see above)


def _tdp_role(level: int) -> int:
    """The role word of a TDP MMU page (shmmmu.trace.events.tdp_role, inlined: the front imports this module)."""
    return level | 1 << 4 | 1 << 7 | 7 << 8


def task(kvm) -> str:
    """The task name a line carries: QEMU's name of a vCPU thread, or the host process's role."""
    c, w = kvm.config, kvm.worker
    if w < c.n_vcpus:
        return f"CPU {w}/KVM"
    return {c.host_worker: "shmmmu", c.reclaimer_worker: "shmmmu-reclaim"}.get(w, "shmmmu-notifier")


class Writer:
    """One worker's part: its task on the first line ("#comm<TAB>pid<TAB>cpu"), then a line a record:
    "TIMESTAMP_NS EVENT VALUE..." (hex).  A vCPU's are buffered and flushed when it publishes its counters; a host
    process's go out line by line (the supervisor merges the parts before it exits, and its operations are few),
    and so do the explorer's actors (one process)."""

    def __init__(self, path: str, comm: str, pid: int, cpu: int, buffered: bool, clock: Callable[[], int],
                 epoch: int = 0):
        self.f: IO[str] = open(path, "a", buffering=1 << 16 if buffered else 1)
        self.f.write(f"#{comm}\t{pid}\t{cpu}\n")
        self.clock = clock
        self.epoch = epoch
        atexit.register(self.f.flush)

    def emit(self, event: str, *values: int) -> None:
        self.f.write(f"{self.clock() + self.epoch} {event} {' '.join(f'{v:x}' for v in values)}\n")


WANT_TIMELINE = "want-timeline"       # files the parts directory holds to say which instruments it wants (the
WANT_NO_TRACEPOINTS = "want-no-tracepoints"  # directory alone, as VMConfig.tracepoints has it: the tracepoints)


def install(mmu: Mmu, directory: str) -> Writer | None:
    """Put every tracepoint in place over its site of this one Mmu; its lines go to a part file of its own
    in `directory`.  The directory says whether it wants the timeline's records too, or only them
    (shmmmu.trace.timeline); returns the tracepoints' Writer, None when only the timeline is wanted."""
    kvm = mmu.kvm
    explorer = kvm.waits.deterministic
    if os.path.exists(os.path.join(directory, WANT_TIMELINE)):
        from shmmmu.trace import timeline
        timeline.install(mmu, directory, task(kvm), explorer)
    if os.path.exists(os.path.join(directory, WANT_NO_TRACEPOINTS)):
        return None
    pid = os.getpid() + 1 + kvm.worker if explorer else os.getpid()       # the explorer's actors: one process
    w = Writer(os.path.join(directory, f"{kvm.worker:03d}-{os.getpid()}.txt"), task(kvm), pid, kvm.worker,
               buffered=kvm.worker < kvm.config.n_vcpus and not explorer, clock=kvm.waits.now_ns,
               epoch=EXPLORER_EPOCH_NS if explorer else 0)
    for key, wrap in TRACE.items():
        target = site_target(mmu, key, "trace")
        name = key.split(".")[1]
        setattr(target, name, wrap(kvm, w, getattr(target, name)))
    return w


def _spte_changed(w: Writer, gfn: int, level: int, old: int, new: int) -> None:
    w.emit("kvm_tdp_mmu_spte_changed", gfn, old, new, level, 0)


def _page_fault(kvm, w: Writer, page_fault: Callable) -> Callable:
    def traced_page_fault(gfn: int, write: bool, exec_fault: bool = False) -> int:
        code = EPT_GLA | (EPT_WRITE if write else EPT_FETCH if exec_fault else EPT_READ)
        w.emit("kvm_page_fault", gfn << 12, code)
        return page_fault(gfn, write, exec_fault)
    return traced_page_fault


def _map(kvm, w: Writer, tdp_map: Callable) -> Callable:
    pages = kvm.pages

    def traced_map(vcpu, fault, shared: bool) -> int:
        level = fault.goal_level
        w.emit("kvm_mmu_spte_requested", fault.gfn, fault.pfn | (fault.gfn & (pages[level] - 1)), level)
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
        w.emit("kvm_mmu_prepare_zap_page", 0, base, _tdp_role(level), 0, 0)
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
        w.emit("kvm_mmu_get_page", 0, gfn, _tdp_role(level), 0, 0, 1)
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

def wants_dat(out: str) -> bool:
    """Is `out` a trace.dat (written by trace-cmd) rather than trace-cmd report's text?"""
    return out.endswith(".dat")


@contextmanager
def tracepoint_parts(out: str | None, timeline: str | None = None) -> Iterator[str]:
    """A directory for the workers' parts beside `out` (and `timeline`); on leaving, the parts merged into `out`
    (the tracepoint lines, when given) and `timeline` (the trace-event JSON, shmmmu.trace.timeline, when
    given) and removed (also on an error or Ctrl-C: what was written until then is kept).  Each output is
    checked first and written as every output is (shmmmu.outfile: never through a link; a failure is an
    OutputError, exit 2); a .dat needs trace-cmd, which is looked for first too."""
    for path in (out, timeline):
        if path is not None:
            outfile.check(path)
    if out is not None and wants_dat(out):
        from shmmmu.trace.tracedat import TraceDatError, trace_cmd
        try:
            trace_cmd()
        except TraceDatError as e:
            raise outfile.OutputError(str(e)) from None
    first = out if out is not None else timeline
    assert first is not None, "tracepoint_parts needs a tracepoint file, a timeline or both"
    try:
        d = tempfile.mkdtemp(prefix=f".{PREFIX}tracepoints-", dir=os.path.dirname(os.path.abspath(first)))
        if timeline is not None:
            open(os.path.join(d, WANT_TIMELINE), "w").close()
        if out is None:
            open(os.path.join(d, WANT_NO_TRACEPOINTS), "w").close()
    except OSError as e:
        raise outfile.OutputError(f"cannot write {first}: {e.strerror}") from None
    try:
        yield d
    finally:
        try:
            if out is not None:
                collect(d, out)
        finally:
            try:
                if timeline is not None:
                    from shmmmu.trace.timeline import write_json
                    write_json(d, timeline)
            finally:
                shutil.rmtree(d, ignore_errors=True)


Record = tuple[int, int, int, str, tuple[int, ...]]       # (timestamp ns, cpu, pid, event, field values)


def _records(f: IO[str], cpu: int, pid: int) -> Iterator[Record]:
    for line in f:
        if not line.endswith("\n"):
            return                                        # the last line of a worker killed while writing it
        ts, event, *vals = line.split()
        yield int(ts), cpu, pid, event, tuple(int(v, 16) for v in vals)


def collect(directory: str, out: str) -> int:
    """Merge the parts of `directory` by timestamp into `out` (streaming): trace-cmd report's text, or a
    trace.dat when `out` ends in .dat; returns the number of events."""
    from shmmmu.trace.events import report_line, report_text

    names = sorted(n for n in os.listdir(directory) if n.endswith(".txt"))
    files = [open(os.path.join(directory, n)) for n in names]
    try:
        tasks: dict[int, str] = {}
        streams = []
        for fh in files:
            head = fh.readline()
            if not head.startswith("#"):
                continue                                  # a worker killed before its first line
            comm, pid, cpu = head[1:].rstrip("\n").split("\t")
            tasks[int(pid)] = comm
            streams.append(_records(fh, int(cpu), int(pid)))
        cpus = max((int(n.split("-")[0]) for n in names), default=0) + 1       # the parts' worker slots
        merged = heapq.merge(*streams, key=lambda r: r[0])
        if wants_dat(out):
            from shmmmu.trace.tracedat import TraceDatError, write
            try:
                return write(merged, tasks, cpus, out)
            except TraceDatError as e:
                raise outfile.OutputError(str(e)) from None
        n = 0
        with outfile.output(out, "w") as f:
            f.write(f"cpus={cpus}\n")
            batch: list[str] = []
            for ts, cpu, pid, event, values in merged:
                batch.append(report_line(tasks[pid], pid, cpu, ts, event, report_text(event, values)))
                if len(batch) >= 4096:
                    f.write("".join(batch))
                    n += len(batch)
                    batch.clear()
            f.write("".join(batch))
            n += len(batch)
        return n
    finally:
        for fh in files:
            fh.close()

