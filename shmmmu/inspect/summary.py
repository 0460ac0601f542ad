"""The summary of `shmmmu inspect NAME`: configuration, tables, mappings, locks, RCU, counters, workers, violations."""
from __future__ import annotations

from typing import Any

import numpy as np

from shmmmu.inspect.vms import creator_alive, process_state
from shmmmu.layout import (MAX_VIOLATIONS, Ctl, Held, Lock, Locks, MemslotFlags, Role, TableState, TMeta,
                           WorkerStatus, WState)
from shmmmu.rwlock import QR_BIAS, QW_LOCKED, QW_WAITING
from shmmmu.snapshot import Snapshot, Walk, walk_tables
from shmmmu import violations

_U = np.uint64
BACKING_NAMES = {1: "4K", 2: "2M", 3: "1G"}


def _mode_name(m: int) -> str:
    return {Held.READ: "read", Held.WRITE: "write"}.get(m, str(m))


def lock_states(snap: Snapshot) -> list[dict[str, Any]]:
    locks, ws = snap.locks, snap.wstate
    out = []
    for i in range(min(Locks.COUNT, locks.shape[0])):
        c = int(locks[i, Lock.CNTS])
        holders = []
        for k in np.flatnonzero(ws[:, WState.HELD + i]).tolist():
            holders.append({"worker": k, "pid": int(ws[k, WState.PID]), "role": Role.NAMES.get(int(ws[k, WState.ROLE]), "?"),
                            "mode": _mode_name(int(ws[k, WState.HELD + i]))})
        out.append({"name": Locks.NAMES[i], "readers": c // QR_BIAS,
                    "write_locked": (c & QW_LOCKED) == QW_LOCKED, "writer_waiting": bool(c & QW_WAITING),
                    "queue_held": int(locks[i, Lock.WAIT]) != 0, "writer": int(locks[i, Lock.WRITER]) - 1,
                    "contended": int(locks[i, Lock.CONTENDED]), "holders": holders})
    return out


def _role(snap: Snapshot, k: int) -> str:
    c = snap.config
    if k < c.n_vcpus:
        return f"vCPU {k}"
    if k == c.host_worker:
        return "supervisor"
    if k == c.reclaimer_worker:
        return "reclaimer"
    return f"host {k}"


def summary(snap: Snapshot, walk: Walk | None = None, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything `shmmmu inspect NAME` prints, as one JSON-able dict.

    `previous` (an earlier summary) gives rates per second between the two.
    """
    walk = walk or walk_tables(snap)
    c = snap.config
    g = snap.geometry
    tm = snap.tmeta
    state = tm[:, TMeta.STATE]
    ws = snap.wstate
    slots = snap.slot_rows()
    live = state == _U(TableState.LIVE)
    lv, cnt = np.unique(tm[live, TMeta.LEVEL], return_counts=True)
    maps = walk.mappings()
    st = snap.stats_total()
    workers = []
    for k in range(ws.shape[0]):
        pid = int(ws[k, WState.PID])
        status = WorkerStatus.NAMES.get(int(ws[k, WState.STATUS]), str(int(ws[k, WState.STATUS])))
        if k == c.host_worker:
            status = "-"                      # the supervisor keeps no worker status
        workers.append({"slot": k, "role": _role(snap, k), "pid": pid, "alive": process_state(pid) == "running" if pid else False,
                        "process": process_state(pid) if pid else "-",
                        "status": status,
                        "iteration": int(ws[k, WState.ITERATION]), "heartbeat": int(ws[k, WState.HEARTBEAT]),
                        "rcu_epoch": int(ws[k, WState.RCU])})
    gp = snap.word(Ctl.GP_COUNT)
    counters = {k: st[k] for k in ("faults", "fixed", "spurious", "retries", "cas_failures", "removed_seen",
                                   "link_races", "tables_allocated", "tables_retired", "tables_freed",
                                   "zapped_leaves", "huge_splits", "flushes", "accesses", "yields",
                                   "lock_contended", "roots_allocated", "roots_freed", "root_reloads",
                                   "fast_zaps", "faults_during_fast_zap", "stale_root_retries")}
    now = snap.taken_mono
    rates = None
    if previous is not None and now > previous["_mono"]:
        dt = now - previous["_mono"]
        rates = {f"{k}_per_s": (counters[k] - previous["counters"][k]) / dt
                 for k in ("faults", "retries", "cas_failures", "accesses")}
    vio = []
    nv = snap.word(Ctl.VIOLATIONS)
    who = violations.worker_names(snap.config)
    for row in snap.violations[:min(nv, MAX_VIOLATIONS, 20)]:
        vio.append(violations.from_row([int(x) for x in row]).to_json(who, g.entries))
    mapped = sum(maps[l] * g.pages(l) for l in maps) * 4096
    per_root = dict(zip(*(a.tolist() for a in np.unique(walk.t_root, return_counts=True)))) if walk.t_root.size else {}
    leaves_root = (dict(zip(*(a.tolist() for a in np.unique(walk.leaf_root, return_counts=True))))
                   if walk.leaf_root.size else {})
    roots = [{**r, "tables": int(per_root.get(r["row"], 0)), "leaves": int(leaves_root.get(r["row"], 0))}
             for r in snap.root_rows()]
    return {
        "vm": snap.name,
        "creator_pid": snap.creator_pid,
        "alive": creator_alive(snap.creator_pid, snap.creator_start, snap.created_ns),
        "region_bytes": snap.size,
        "uptime_s": max(0.0, (snap.taken_ns - snap.created_ns) / 1e9),
        "config": {"vcpus": c.n_vcpus, "lock_mode": c.lock_mode, "memory_bytes": c.guest_pages * 4096,
                   "backing": [BACKING_NAMES.get(m.backing_level, "?") for m in c.memslots],
                   "workload": c.workload.kind, "overlap": c.workload.overlap,
                   "table_bits": c.bits, "pool_tables": c.n_tables, "debug": c.debug, "bugs": list(c.bugs),
                   "seed": c.seed},
        "memslots": [{**s, "logging": bool(s["flags"] & MemslotFlags.LOG_DIRTY),
                      "active": bool(s["flags"] & MemslotFlags.ACTIVE),
                      "backing": BACKING_NAMES.get(s["backing_level"], "?")} for s in slots],
        "run": {"iteration": snap.word(Ctl.ITERATION), "stopping": bool(snap.word(Ctl.STOP))},
        "tables": {"pool": snap.n_tables, "live": int(live.sum()),
                   "free": int(np.count_nonzero(state == _U(TableState.FREE))),
                   "cached": int(np.count_nonzero(state == _U(TableState.CACHED))),
                   "retired": int(np.count_nonzero(state == _U(TableState.RETIRED))),
                   "free_stack": snap.word(Ctl.POOL_TOP),
                   "live_per_level": {str(int(a)): int(b) for a, b in sorted(zip(lv, cnt), reverse=True)},
                   "reachable": int(walk.tables.size),
                   "reachable_per_level": {str(k): v for k, v in sorted(walk.per_level().items(), reverse=True)}},
        "roots": roots,
        "roots_generation": snap.word(Ctl.ROOTS_GEN),
        "fast_zaps_running": snap.word(Ctl.FAST_ZAPS),
        "mappings": {"4K": maps[1], "2M": maps[2], "1G": maps[3], "bytes": mapped,
                     "removed_entries": walk.removed_count, "odd_entries": walk.odd_count},
        "locks": lock_states(snap),
        "rcu": {"epoch": snap.word(Ctl.EPOCH), "grace_periods": gp, "gp_max_ms": snap.word(Ctl.GP_MAX_NS) / 1e6,
                "gp_mean_ms": (snap.word(Ctl.GP_TOTAL_NS) / gp / 1e6) if gp else 0.0,
                "backlog": int((ws[:, WState.RETIRE_TAIL].astype(np.int64)
                                - ws[:, WState.RETIRE_HEAD].astype(np.int64)).sum()),
                "backlog_max": snap.word(Ctl.RCU_BACKLOG_MAX),
                "readers": [k for k in range(ws.shape[0]) if int(ws[k, WState.RCU])]},
        "counters": counters,
        "rates": rates,
        "workers": workers,
        "violations": {"count": nv, "first": vio},
        "snapshot": {"copy_ms": snap.copy_s * 1e3, "bytes": int(sum(a.nbytes for a in snap.sections.values())),
                     "changed_while_reading": snap.changed},
        "_mono": now,
    }


def public(d: dict[str, Any]) -> dict[str, Any]:
    """A summary without its private keys, for JSON."""
    return {k: v for k, v in d.items() if not k.startswith("_")}


