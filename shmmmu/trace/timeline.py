"""Timeline: the MMU's work as Chrome trace-event JSON, the file Perfetto and chrome://tracing open offline.

Recorded (`install`, `--timeline FILE.json` on run, stress, explore and
bench): on one Mmu instance, the instrument sites of kind "timeline"
(shmmmu.mmu.instruments) are wrapped and each worker writes a part of its
own beside the tracepoint parts (shmmmu.mmu.tracepoints.tracepoint_parts),
one line a record, timestamps from the wait layer's clock:

  F  a page fault: its GFN, access, RET_PF_* result       fault.page_fault
  W  a wait for mmu_lock, read or write                  lock.read_lock / lock.write_lock
  H  mmu_lock held, read or write                        ... until lock.read_unlock / lock.write_unlock
  Z  a zap of a GFN range under one root                  zap.zap_gfn_range
  Q  kvm_flush_remote_tlbs, with the flush generation     kvm.kvm_flush_remote_tlbs
  K  its wait for the vCPUs' acknowledgements             tlbctl.flush_remote_tlbs
  A  a vCPU taking a flush request at guest entry         tlbctl.process_requests (when one was pending)
  G  a grace period (synchronize_rcu; the reclaimer's      rcu.synchronize, rcu.reclaim_pass
     with the tables it then freed)
  S  the worker's counters: faults, tables allocated, freed (kvm.publish_stats)

`write_json` turns the parts into the trace-event format ("JSON Object
Format": traceEvents; ph X complete slices in microseconds, M metadata naming
processes and threads, C counters, s/f flow events bound to their enclosing
slices): a process per VM, a thread per worker (each vCPU, the reclaimer, the
notifier, the host's ioctls), the slices above, counters of faults per second
and page tables in use, and a flow arrow from each flush request to each
vCPU's acknowledgement of it.  `from_tracepoints` makes the same kind of
file from tracepoint lines (ours or any kernel's, shmmmu.trace.kernel_lines).
"""
from __future__ import annotations

import atexit
import json
import os
from collections import defaultdict
from typing import IO, Any, BinaryIO, Callable, Iterator

Mmu = Any                    # shmmmu.mmu.Mmu (not imported: the front imports shmmmu.mmu.tracepoints, which imports us)

RET_NAMES = ("RETRY", "EMULATE", "INVALID", "FIXED", "SPURIOUS")      # shmmmu.mmu.records
LOCK_TRACK = 1000            # a worker's mmu_lock waits and holds go on a track of their own, tid 1000 + slot: a
                             # hold is no call (it can start before a zap that drops the lock), slices must nest
ACCESS = ("read", "write", "fetch")
MODES = ("read", "write")
PART_SUFFIX = ".tl"


class Recorder:
    """One worker's timeline part: "#comm<TAB>pid<TAB>slot<TAB>vm" then a record a line."""

    def __init__(self, path: str, comm: str, pid: int, slot: int, vm: str, buffered: bool,
                 clock: Callable[[], int], epoch: int = 0):
        self.f: IO[str] = open(path, "a", buffering=1 << 16 if buffered else 1)
        self.f.write(f"#{comm}\t{pid}\t{slot}\t{vm}\n")
        self.clock = clock
        self.epoch = epoch
        self.acquired = [0, 0]                   # when this worker took mmu_lock, read and write
        atexit.register(self.f.flush)

    def now(self) -> int:
        return self.clock() + self.epoch

    def emit(self, code: str, *values: int) -> None:
        self.f.write(code + " " + " ".join(map(str, values)) + "\n")

    def begin(self, code: str) -> int:
        """The start of a call's slice, written before the call: a call that never returns (the explorer stops
        at a failing step, a killed worker) still shows, open to the end of the recording."""
        t = self.now()
        self.f.write(f"b {code} {t}\n")
        return t


def install(mmu: Mmu, directory: str, task: str, explorer: bool) -> Recorder:
    """Put every timeline instrument in place over its site of this one Mmu; its records go to a part file of
    its own in `directory`."""
    from shmmmu.mmu.instruments import site_target
    kvm = mmu.kvm
    pid = os.getpid() + 1 + kvm.worker if explorer else os.getpid()
    part = f"{kvm.worker:03d}-{os.getpid()}-{kvm.config.name}{PART_SUFFIX}"      # (bench: one process, many VMs)
    rec = Recorder(os.path.join(directory, part), task, pid, kvm.worker,
                   kvm.config.name, buffered=kvm.worker < kvm.config.n_vcpus and not explorer,
                   clock=kvm.waits.now_ns, epoch=1_000_000_000 if explorer else 0)
    for key, wrap in TIMELINE.items():
        target = site_target(mmu, key, "timeline")
        name = key.split(".")[1]
        setattr(target, name, wrap(kvm, rec, getattr(target, name)))
    return rec


# ---------------------------------------------------------------- the wrappers

def _page_fault(kvm, rec: Recorder, page_fault: Callable) -> Callable:
    def timed_page_fault(gfn: int, write: bool, exec_fault: bool = False) -> int:
        t0 = rec.begin("F")
        ret = page_fault(gfn, write, exec_fault)
        rec.emit("F", t0, rec.now(), gfn, 1 if write else 2 if exec_fault else 0, ret)
        return ret
    return timed_page_fault


def _lock(mode: int) -> Callable:
    def wrap(kvm, rec: Recorder, lock: Callable) -> Callable:
        def timed_lock() -> None:
            t0 = rec.now()
            lock()
            t1 = rec.acquired[mode] = rec.now()
            rec.emit("W", t0, t1, mode)
        return timed_lock
    return wrap


def _unlock(mode: int) -> Callable:
    def wrap(kvm, rec: Recorder, unlock: Callable) -> Callable:
        def timed_unlock() -> None:
            unlock()
            rec.emit("H", rec.acquired[mode], rec.now(), mode)
        return timed_unlock
    return wrap


def _zap(kvm, rec: Recorder, zap: Callable) -> Callable:
    def timed_zap(root: int, start: int, end: int, can_yield: bool, flush: bool, shared: bool, min_level: int = 1,
                  zap_all: bool = False) -> bool:
        t0 = rec.begin("Z")
        out = zap(root, start, end, can_yield, flush, shared, min_level, zap_all)
        rec.emit("Z", t0, rec.now(), start, end, int(shared))
        return out
    return timed_zap


def _flush(kvm, rec: Recorder, flush: Callable) -> Callable:
    tlbctl = kvm.tlbctl

    def timed_flush() -> None:
        t0, n = rec.begin("Q"), tlbctl.flushes
        flush()
        rec.emit("Q", t0, rec.now(), n, tlbctl.flushes)
    return timed_flush


def _ack_wait(kvm, rec: Recorder, wait: Callable) -> Callable:
    def timed_ack_wait(*args: Any, **kw: Any) -> None:
        t0 = rec.begin("K")
        wait(*args, **kw)
        rec.emit("K", t0, rec.now())
    return timed_ack_wait


def _ack(kvm, rec: Recorder, process: Callable) -> Callable:
    from shmmmu.layout import Request
    tlbctl = kvm.tlbctl
    ws, req = tlbctl.ws, tlbctl.req_word

    def timed_process_requests() -> None:
        t0, pending = rec.now(), ws.load(req) & Request.TLB_FLUSH
        process()
        if pending:
            rec.emit("A", t0, rec.now(), 0, 0)
    return timed_process_requests


def _grace_period(kvm, rec: Recorder, synchronize: Callable) -> Callable:
    def timed_synchronize(timeout: float | None = None) -> bool:
        t0 = rec.begin("G")
        ok = synchronize(timeout)
        rec.emit("G", t0, rec.now(), int(bool(ok)), -1)
        return ok
    return timed_synchronize


def _reclaim(kvm, rec: Recorder, reclaim_pass: Callable) -> Callable:
    def timed_reclaim_pass(free: Callable, timeout: float | None = None, alive: Callable | None = None,
                           wait_for_gp: bool = True) -> int:
        if kvm.rcu.backlog() == 0:
            return reclaim_pass(free, timeout, alive, wait_for_gp)      # nothing retired: no grace period
        t0 = rec.begin("G")
        n = reclaim_pass(free, timeout, alive, wait_for_gp)
        rec.emit("G", t0, rec.now(), 1, n)
        return n
    return timed_reclaim_pass


def _publish(kvm, rec: Recorder, publish: Callable) -> Callable:
    from shmmmu.layout import STAT
    rows = kvm.region.array("stats")
    cols = [STAT["faults"], STAT["tables_allocated"], STAT["tables_freed"]]

    def timed_publish() -> None:
        publish()
        row = rows[kvm.worker]
        rec.emit("S", rec.now(), *(int(row[c]) for c in cols))
        rec.f.flush()
    return timed_publish


TIMELINE: dict[str, Callable] = {
    "fault.page_fault": _page_fault,
    "lock.read_lock": _lock(0),
    "lock.write_lock": _lock(1),
    "lock.read_unlock": _unlock(0),
    "lock.write_unlock": _unlock(1),
    "zap.zap_gfn_range": _zap,
    "kvm.kvm_flush_remote_tlbs": _flush,
    "tlbctl.flush_remote_tlbs": _ack_wait,
    "tlbctl.process_requests": _ack,
    "rcu.synchronize": _grace_period,
    "rcu.reclaim_pass": _reclaim,
    "kvm.publish_stats": _publish,
}


# ---------------------------------------------------------------- the file

def _us(ns: int) -> float:
    return round(ns / 1000, 3)


def _track_name(comm: str, slot: int) -> str:
    if comm.startswith("CPU ") and comm.endswith("/KVM"):
        return f"vCPU {comm[4:-4]}"
    return {"shmmmu": "ioctls (host)", "shmmmu-reclaim": "reclaimer", "shmmmu-notifier": "notifier"}.get(comm, comm)


def _parts(directory: str) -> list[str]:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(PART_SUFFIX))


class JsonOut:
    """The trace-event JSON, written an event at a time (a run's timeline can be large).  Times are written
    in microseconds from `base` (ns): small numbers keep a slice's end and the next one's start apart in a
    double, where absolute CLOCK_MONOTONIC microseconds would round them into each other."""

    def __init__(self, f: IO[str], meta: dict[str, Any], base: int = 0):
        self.f = f
        self.n = 0
        self.meta = meta
        self.base = base
        f.write('{"traceEvents": [\n')

    def us(self, ns: int) -> float:
        return round((ns - self.base) / 1000, 3)

    def event(self, ev: dict[str, Any]) -> None:
        self.f.write((",\n" if self.n else "") + json.dumps(ev, separators=(",", ":")))
        self.n += 1

    def close(self) -> None:
        meta = {**self.meta, "time origin (ns of the recording clock)": self.base}
        self.f.write('\n], "displayTimeUnit": "ns", "otherData": ' + json.dumps(meta) + "}\n")


def write_json(directory: str, out: str, bins: int = 200) -> int:
    """The timeline parts of `directory` as one trace-event JSON file at `out`; returns the number of events."""
    from shmmmu import outfile
    parts = _parts(directory)
    heads = []
    for p in parts:
        with open(p) as f:
            head = f.readline()
        if head.startswith("#"):
            comm, pid, slot, vm = head[1:].rstrip("\n").split("\t")
            heads.append((p, comm, int(pid), int(slot), vm))
    vms = list(dict.fromkeys(h[4] for h in heads))
    base = min((_first_time(h[0]) for h in heads), default=0)
    with outfile.output(out, "w") as f:
        js = JsonOut(f, {"source": "shmmmu --timeline", "clock": "CLOCK_MONOTONIC (the explorer: steps, 1 us each)"},
                     base)
        for i, vm in enumerate(vms, 1):
            js.event({"ph": "M", "name": "process_name", "pid": i, "tid": 0, "args": {"name": f"VM {vm}"}})
        tracks: dict[tuple[int, int], str] = {}
        for _, comm, _, slot, vm in heads:
            key = (vms.index(vm) + 1, slot)
            if key not in tracks:
                tracks[key] = _track_name(comm, slot)
                js.event({"ph": "M", "name": "thread_name", "pid": key[0], "tid": slot, "args": {"name": tracks[key]}})
                js.event({"ph": "M", "name": "thread_sort_index", "pid": key[0], "tid": slot,
                          "args": {"sort_index": 2 * slot}})
                js.event({"ph": "M", "name": "thread_name", "pid": key[0], "tid": LOCK_TRACK + slot,
                          "args": {"name": tracks[key] + ": mmu_lock"}})
                js.event({"ph": "M", "name": "thread_sort_index", "pid": key[0], "tid": LOCK_TRACK + slot,
                          "args": {"sort_index": 2 * slot + 1}})
        flushes: dict[int, list[tuple[int, int, int]]] = defaultdict(list)   # pid -> (gen, ts, tid)
        acks: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)  # pid -> (from, to, ts, tid)
        faults: dict[int, list[int]] = defaultdict(list)
        samples: dict[int, list[tuple[int, int, int]]] = defaultdict(list)    # pid -> (ts, slot, tables in use)
        unfinished: list[tuple[int, int, str, int]] = []                      # (pid, tid, code, t0)
        end: dict[int, int] = defaultdict(int)                                # pid -> the last time recorded
        for path, comm, _, slot, vm in heads:
            pid = vms.index(vm) + 1
            opened: dict[str, list[int]] = defaultdict(list)
            held: list[int | None] = [None, None]                             # a lock taken, not yet dropped
            for code, v in _records(path):
                if code == "b":
                    opened[_CODES[v[0]]].append(v[1])
                    end[pid] = max(end[pid], v[1])
                    continue
                end[pid] = max(end[pid], v[1] if code != "S" else v[0])
                if code in opened and opened[code] and opened[code][-1] == v[0]:
                    opened[code].pop()
                if code == "W":
                    held[v[2]] = v[1]
                elif code == "H":
                    held[v[2]] = None
                _slice(js, code, v, pid, slot, flushes, acks, faults, samples)
            unfinished += [(pid, slot, code, t0) for code, ts in opened.items() for t0 in ts]
            unfinished += [(pid, LOCK_TRACK + slot, f"H{mode}", t0) for mode, t0 in enumerate(held) if t0 is not None]
        for pid, tid, code, t0 in sorted(unfinished, key=lambda u: u[3]):
            name = UNFINISHED[code[0]] + (f" ({MODES[int(code[1])]})" if code[0] == "H" else "")
            _x(js, name, "unfinished", t0, end[pid], pid, tid, {"unfinished": True})
        _flows(js, flushes, acks)
        _counters(js, faults, samples, bins)
        js.close()
        return js.n


def _first_time(path: str) -> int:
    """A part's earliest time: its first record's (each worker writes its records as they happen)."""
    for code, v in _records(path):
        return v[1] if code == "b" else v[0]
    return 1 << 62


_CODES = {c: c for c in "FZQKG"}
UNFINISHED = {"F": "page fault", "Z": "zap_gfn_range", "Q": "kvm_flush_remote_tlbs", "K": "flush: waiting for acks",
              "G": "synchronize_rcu (grace period)", "H": "mmu_lock held"}


def _records(path: str) -> Iterator[tuple[str, list[Any]]]:
    with open(path) as f:
        f.readline()
        for line in f:
            if not line.endswith("\n"):
                return                                  # the last line of a worker killed while writing it
            code, *vals = line.split()
            yield code, ([vals[0], int(vals[1])] if code == "b" else [int(x) for x in vals])


def _x(js: JsonOut, name: str, cat: str, t0: int, t1: int, pid: int, tid: int, args: dict[str, Any]) -> None:
    js.event({"ph": "X", "name": name, "cat": cat, "ts": js.us(t0), "dur": _us(max(0, t1 - t0)), "pid": pid,
              "tid": tid, "args": args})


def _slice(js: JsonOut, code: str, v: list[int], pid: int, tid: int, flushes: dict, acks: dict, faults: dict,
           samples: dict) -> None:
    if code == "F":
        t0, t1, gfn, access, ret = v
        _x(js, "page fault", "fault", t0, t1, pid, tid,
           {"gfn": f"{gfn:#x}", "access": ACCESS[access], "RET_PF": RET_NAMES[ret] if 0 <= ret < 5 else ret})
        faults[pid].append(t0)
    elif code in ("W", "H"):
        t0, t1, mode = v
        what = "wait" if code == "W" else "held"
        _x(js, f"mmu_lock {what} ({MODES[mode]})", "lock", t0, t1, pid, LOCK_TRACK + tid, {"mode": MODES[mode]})
    elif code == "Z":
        t0, t1, start, end, shared = v
        _x(js, "zap_gfn_range", "zap", t0, t1, pid, tid,
           {"start": f"{start:#x}", "end": f"{end:#x}", "shared": bool(shared)})
    elif code == "Q":
        t0, t1, lo, hi = v
        _x(js, "kvm_flush_remote_tlbs", "flush", t0, t1, pid, tid, {"flush": lo + 1})
        flushes[pid].append((lo + 1, t0, tid))
    elif code == "K":
        _x(js, "flush: waiting for acks", "flush", v[0], v[1], pid, tid, {})
    elif code == "A":
        t0, t1, _, _ = v
        _x(js, "TLB flush ack", "flush", t0, t1, pid, tid, {"request": "KVM_REQ_TLB_FLUSH"})
        acks[pid].append((0, 0, t0, tid))
    elif code == "G":
        args: dict[str, Any] = {"completed": bool(v[2])}
        if v[3] >= 0:
            args["tables freed"] = v[3]
        _x(js, "synchronize_rcu (grace period)", "rcu", v[0], v[1], pid, tid, args)
    elif code == "S":
        samples[pid].append((v[0], tid, v[2] - v[3]))


def _flows(js: JsonOut, flushes: dict, acks: dict) -> None:
    """An arrow from each flush request to the request's taking on each vCPU: the vCPU's first after it (the
    request bit is one bit, so that taking covers every flush requested before it)."""
    n = 0
    for pid, reqs in flushes.items():
        by_vcpu: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for frm, to, ts, tid in acks.get(pid, []):
            by_vcpu[tid].append((frm, to, ts))
        for gen, ts, tid in reqs:
            for vtid, lst in by_vcpu.items():
                hit = next(((frm, to, ats) for frm, to, ats in lst if ats >= ts), None)
                if hit is None or vtid == tid:
                    continue
                n += 1
                common = {"name": "TLB flush", "cat": "flush", "id": n, "pid": pid}
                js.event({**common, "ph": "s", "ts": js.us(ts), "tid": tid})
                js.event({**common, "ph": "f", "bp": "e", "ts": js.us(hit[2]), "tid": vtid})


def _counters(js: JsonOut, faults: dict, samples: dict, bins: int) -> None:
    for pid, ts in faults.items():
        if not ts:
            continue
        ts.sort()
        lo, hi = ts[0], ts[-1]
        width = max(1000, (hi - lo) // bins + 1)                  # at least a microsecond a bin
        counts: dict[int, int] = defaultdict(int)
        for t in ts:
            counts[(t - lo) // width] += 1
        for b in range((hi - lo) // width + 2):
            js.event({"ph": "C", "name": "faults/s", "pid": pid, "tid": 0, "ts": js.us(lo + b * width),
                      "args": {"faults/s": round(counts.get(b, 0) * 1e9 / width, 1)}})
    for pid, ss in samples.items():
        last: dict[int, int] = {}
        for t, slot, in_use in sorted(ss):
            last[slot] = in_use
            js.event({"ph": "C", "name": "page tables in use", "pid": pid, "tid": 0, "ts": js.us(t),
                      "args": {"tables": sum(last.values())}})


# ---------------------------------------------------------------- tracepoint lines in

def from_tracepoints(f: BinaryIO, name: str, out: str, bins: int = 200) -> tuple[int, int]:
    """A tracepoint file (ours or any kernel's, text or read through trace-cmd) as trace-event JSON at `out`:
    a thread per task, a page-fault slice from each kvm_page_fault to the task's last event before its next
    fault or VM entry, every other kvm/kvmmmu event an instant with its fields, counters of faults/s and of
    page tables in use (kvm_mmu_get_page new minus kvm_mmu_prepare_zap_page).  Returns (events written,
    lines skipped); a TraceError when no event can be read."""
    from shmmmu import outfile
    from shmmmu.trace.formats import TraceError
    from shmmmu.trace.kernel_lines import Reader
    reader = Reader(f, name)
    tids: dict[tuple[str, int], int] = {}
    open_fault: dict[int, list[Any]] = {}                 # tid -> [t0 ns, last ns, args]
    faults: list[int] = []
    tables: list[tuple[int, int]] = []
    with outfile.output(out, "w") as fh:
        js = JsonOut(fh, {"source": f"shmmmu trace timeline {os.path.basename(name)}"})
        js.event({"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": os.path.basename(name)}})
        seen = 0
        for ev in reader:
            seen += 1
            key = (ev.comm, ev.tid)
            if key not in tids:
                tids[key] = ev.tid
                js.event({"ph": "M", "name": "thread_name", "pid": 1, "tid": ev.tid,
                          "args": {"name": f"{ev.comm}-{ev.tid}"}})
            t = round(ev.ts * 1e9)
            if seen == 1:
                js.base = (t // 1_000_000_000 - 1) * 1_000_000_000     # a second before the first event's
            fault = open_fault.get(ev.tid)
            ends = ev.name in ("kvm_page_fault", "kvm_entry", "kvm_exit")
            if fault is not None and ends:
                _x(js, "page fault", "fault", fault[0], fault[1], 1, ev.tid, fault[2])
                del open_fault[ev.tid]
            elif fault is not None:
                fault[1] = t
            if ev.name == "kvm_page_fault" and ev.fields is not None:
                from shmmmu.trace.formats import fault_kind
                open_fault[ev.tid] = [t, t, {"address": f"{ev.fields['address']:#x}",
                                             "access": fault_kind(ev.fields["error_code"])}]
                faults.append(t)
                continue
            if ev.name == "kvm_mmu_get_page" and ev.fields and ev.fields.get("created") == "new":
                tables.append((t, 1))
            elif ev.name == "kvm_mmu_prepare_zap_page":
                tables.append((t, -1))
            js.event({"ph": "i", "s": "t", "name": ev.name, "cat": "kvm", "ts": js.us(t), "pid": 1, "tid": ev.tid,
                      "args": _jsonable(ev.fields)})
        for tid, fault in open_fault.items():
            _x(js, "page fault", "fault", fault[0], fault[1], 1, tid, fault[2])
        if not seen:
            why = "no kvm or kvmmmu tracepoint events"
            if reader.first_skipped:
                why += f"; the first unreadable line: line {reader.first_skipped[0]}: {reader.first_skipped[1]!r}"
            raise TraceError(f"{name}: {why}")
        _counters(js, {1: faults} if faults else {}, {}, bins)
        level = 0
        for t, d in sorted(tables):
            level += d
            js.event({"ph": "C", "name": "page tables in use", "pid": 1, "tid": 0, "ts": js.us(t),
                      "args": {"tables (new minus zapped)": level}})
        js.close()
        return js.n, reader.skipped


def _jsonable(fields: dict[str, Any] | None) -> dict[str, Any]:
    return {k: (f"{v:#x}" if isinstance(v, int) and k not in ("level", "vcpu", "as_id", "root_count", "spurious",
                                                              "fixed", "errno", "quadrant") else v)
            for k, v in (fields or {}).items()}
