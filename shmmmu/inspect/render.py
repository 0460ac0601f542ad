"""Rendering for `shmmmu inspect` and `shmmmu ls`: the summary, the page-table dump, one GFN's walk, the check's verdict and the VM list as text lines."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shmmmu import spte as S
from shmmmu.inspect.summary import BACKING_NAMES
from shmmmu.inspect.tree import Dump
from shmmmu.layout import MemslotFlags

if TYPE_CHECKING:
    from shmmmu.inspect.check import CheckResult
    from shmmmu.inspect.vms import VmEntry


def _mib(n: int) -> str:
    if n >= 1 << 30 and n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.0f} MiB" if n % (1 << 20) == 0 else f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def summary_lines(s: dict[str, Any]) -> list[str]:
    c, t, m, r, k = s["config"], s["tables"], s["mappings"], s["rcu"], s["counters"]
    out = [f"VM {s['vm']}: creator pid {s['creator_pid']} ({'alive' if s['alive'] else 'stale: not running'}), "
           f"region {_mib(s['region_bytes'])}, up {s['uptime_s']:.1f} s"]
    backing = "/".join(c["backing"]) or "-"
    out.append(f"config      {c['vcpus']} vCPUs, lock mode {c['lock_mode']}, memory {_mib(c['memory_bytes'])} "
               f"backed by {backing} pages, workload {c['workload'] or '-'}"
               + (" (overlapping)" if c["overlap"] else "") + f", seed {c['seed']}"
               + (f", bugs {','.join(c['bugs'])}" if c["bugs"] else "") + (", debug" if c["debug"] else ""))
    for ms in s["memslots"]:
        out.append(f"memslot {ms['slot']}   GFN {ms['base_gfn']:#x}-{ms['base_gfn'] + ms['npages']:#x} "
                   f"({_mib(ms['npages'] * 4096)}), {ms['backing']} backing"
                   + (", dirty logging" if ms["logging"] else "") + ("" if ms["active"] else ", INACTIVE"))
    out.append(f"run         iteration {s['run']['iteration']}" + (", stopping" if s["run"]["stopping"] else ""))
    per = ", ".join(f"L{a} {b}" for a, b in t["reachable_per_level"].items())
    out.append(f"tables      pool {t['pool']}: {t['live']} live, {t['free']} free, {t['cached']} cached, "
               f"{t['retired']} retired; reachable {t['reachable']} ({per})")
    for rt in s["roots"]:
        held = ", ".join(_role_of(s, w) for w in rt["holders"]) or "nobody"
        out.append(f"root {rt['row']:<6d} table #{rt['table']}, role {rt['role']}, count {rt['count']} "
                   f"(held by {held}), "
                   + ("INVALID" + (", zapped" if rt["zapped"] else ", zap pending") if rt["invalid"] else "valid")
                   + f"; {rt['tables']} tables, {rt['leaves']} leaves")
    if not s["roots"]:
        out.append("roots       none (no vCPU has loaded one yet)")
    out.append(f"roots       generation {s['roots_generation']}" +
               (f", {s['fast_zaps_running']} fast zap(s) running" if s["fast_zaps_running"] else "") +
               f"; allocated {k['roots_allocated']}, freed {k['roots_freed']}, loads {k['root_reloads']}, "
               f"fast zaps {k['fast_zaps']} ({k['faults_during_fast_zap']} faults fixed during one, "
               f"{k['stale_root_retries']} retried on an invalid root)")
    out.append(f"mappings    4K {m['4K']}, 2M {m['2M']}, 1G {m['1G']}: {_mib(m['bytes'])} mapped"
               + (f"; {m['removed_entries']} REMOVED entries" if m["removed_entries"] else "")
               + (f"; {m['odd_entries']} odd entries" if m["odd_entries"] > m["removed_entries"] else ""))
    for lk in s["locks"]:
        state = []
        if lk["write_locked"]:
            state.append("write-locked")
        if lk["readers"]:
            state.append(f"{lk['readers']} readers")
        if lk["writer_waiting"]:
            state.append("writer waiting")
        if lk["queue_held"]:
            state.append("queue held")
        holders = ", ".join(f"worker {h['worker']} ({h['role']}, pid {h['pid']}) {h['mode']}" for h in lk["holders"])
        out.append(f"{lk['name']:<11s} {' + '.join(state) or 'free'}; contended {lk['contended']} times"
                   + (f"; held by {holders}" if holders else ""))
    out.append(f"rcu         epoch {r['epoch']}, {r['grace_periods']} grace periods (longest {r['gp_max_ms']:.2f} ms, "
               f"mean {r['gp_mean_ms']:.2f} ms), retire backlog {r['backlog']} (max {r['backlog_max']})"
               + (f", readers in a section: {', '.join(map(str, r['readers']))}" if r["readers"] else ""))
    out.append(f"faults      {k['faults']} (fixed {k['fixed']}, spurious {k['spurious']}), retries {k['retries']}, "
               f"CAS failures {k['cas_failures']}, REMOVED seen {k['removed_seen']}, link races {k['link_races']}")
    out.append(f"tables      allocated {k['tables_allocated']}, retired {k['tables_retired']}, freed at once "
               f"{k['tables_freed']}; zapped leaves {k['zapped_leaves']}, huge splits {k['huge_splits']}, "
               f"TLB flushes {k['flushes']}, guest accesses {k['accesses']}")
    if s["rates"] is not None:
        rt = s["rates"]
        out.append(f"rates       {rt['faults_per_s']:.0f} faults/s, {rt['retries_per_s']:.0f} retries/s, "
                   f"{rt['cas_failures_per_s']:.0f} CAS failures/s, {rt['accesses_per_s']:.0f} accesses/s")
    out.append("workers     slot  role        pid      process  status    iteration  heartbeat")
    for w in s["workers"]:
        out.append(f"            {w['slot']:<5d} {w['role']:<11s} {w['pid'] or '-':<8} "
                   f"{w['process'] if w['process'] != 'running' else 'alive':<8s} {w['status']:<9s} "
                   f"{w['iteration']:<10d} {w['heartbeat']}")
    v = s["violations"]
    out.append(f"violations  {v['count']}")
    for x in v["first"]:
        out.append(f"            !!! {x['kind']}: worker {x['worker']} gfn {x['gfn']:#x} ({x['a']:#x}, {x['b']:#x})")
        out.append(f"                {x['sentence']}")
    sn = s["snapshot"]
    out.append(f"snapshot    {_mib(sn['bytes'])} copied in {sn['copy_ms']:.1f} ms"
               + (f"; {sn['changed_while_reading']} entries changed while reading" if sn["changed_while_reading"]
                  else "; no entry changed while reading"))
    return out



def _role_of(s: dict[str, Any], k: int) -> str:
    for wk in s["workers"]:
        if wk["slot"] == k:
            return wk["role"]
    return f"worker {k}"


def gfn_lines(w: dict[str, Any]) -> list[str]:
    root = w.get("root")
    out = [f"GFN {w['gfn']:#x} in VM {w['vm']}" + (f", from root {root['row']} (table #{root['table']}, role "
                                                   f"{root['role']}{', INVALID' if root['invalid'] else ''}):"
                                                   if root else ": no root is loaded")]
    for s in w["steps"]:
        out.append(f"  L{s['level']} table #{s['table']:<6d} [{s['index']:3d}] = {s['raw']:#018x}  "
                   f"{s['kind']:<8s} {s.get('meaning', '')}" + (f"  [{s['flags']}]" if s["flags"] else ""))
        if s["table_state"] != "live" or s["table_level"] != s["level"]:
            out.append(f"      table #{s['table']} is {s['table_state']} at level {s['table_level']}: "
                       f"the walk stands in a table that is not live at its level")
    out.append(f"  => {w['result']}")
    slot = w["memslot"]
    if slot is None:
        out.append("  no memslot holds this GFN (an access would be MMIO / emulated)")
    else:
        line = (f"  memslot {slot['slot']}: GFNs {slot['base_gfn']:#x}-{slot['base_gfn'] + slot['npages']:#x}, "
                f"{BACKING_NAMES.get(slot['backing_level'], '?')} backing"
                + (", dirty logging on" if slot["flags"] & MemslotFlags.LOG_DIRTY else ""))
        if "memslot_host_page" in w:
            line += f"; the host backs this GFN with page {w['memslot_host_page']:#x}"
            if w["host_page"] is not None and w["host_page"] != w["memslot_host_page"]:
                line += " (THE MAPPING POINTS ELSEWHERE)"
        out.append(line)
    if w["changed_while_reading"]:
        out.append(f"  ({w['changed_while_reading']} entries changed while reading)")
    return out


def tree_lines(dump: Dump) -> list[str]:
    """The --tree dump: one line per coalesced range, then what the walk could not follow."""
    w = dump.width
    levels = ", ".join(f"L{k} {v}" for k, v in dump.tables_per_level.items())
    out = [f"# VM {dump.vm}: page tables reachable from the roots: {levels}; {dump.leaves} leaves "
           f"in {len(dump)} ranges (GFN ranges end exclusive)"]
    rw = 2 * (w + 2) + 1
    out.append(f"{'# GFN range':<{rw}s}  {'size':>4s} {'count':<8s} {'flags':<32s} first pfn")
    if not len(dump):
        out.append("(nothing mapped)")
    fmt = f"0x%0{w}x-0x%0{w}x  %4s x%-7d %-32s pfn 0x%x"
    sizes = [S.LEVEL_NAMES[lv] for lv in dump.level.tolist()]
    cur = None
    for t in zip(dump.root.tolist(), dump.start.tolist(), dump.end.tolist(), sizes, dump.count.tolist(),
                 dump.flags(), dump.pfn.tolist()):
        if t[0] != cur:
            cur = t[0]
            out.append(f"# root {cur}: {dump.root_notes.get(cur, '')}")
        out.append(fmt % t[1:])
    for o in dump.odd:
        out.append(f"0x{o.gfn:0{w}x}  L{o.level} table #{o.table}[{o.index}] = {o.raw:#018x}: {o.what}")
    if dump.odd_count > len(dump.odd):
        out.append(f"... and {dump.odd_count - len(dump.odd)} more such entries")
    if dump.changed:
        out.append(f"# {dump.changed} entries changed while reading (the VM is running; a copy is not atomic)")
    return out


IN_FLIGHT_LISTED = 10        # a running VM shows many passing differences: the first few say what they are


def check_lines(res: "CheckResult") -> list[str]:
    """`inspect --check`: each violation (`!!! ...`), each difference in flight, then the verdict."""
    from shmmmu.snapshot import walk_tables

    lines = [f"!!! {v}" for v in res.violations]
    lines += [f"in flight: {p} (in {res.seen.get(p, 1)} of {res.passes} passes)"
              for p in res.in_flight[:IN_FLIGHT_LISTED]]
    if len(res.in_flight) > IN_FLIGHT_LISTED:
        lines.append(f"in flight: ... and {len(res.in_flight) - IN_FLIGHT_LISTED} more (--json lists them)")
    t = walk_tables(res.snap)
    where = f"{t.tables.size} tables reachable, {t.leaf_gfn.size} leaves"
    moving = (f" ({len(res.in_flight)} difference{'s' if len(res.in_flight) != 1 else ''} in flight over "
              f"{res.passes} passes: the VM is running{': ' + res.busy if res.busy else ''}; not violations)"
              if res.in_flight else "")
    lines.append(f"check: {len(res.violations)} violations in VM {res.name} ({where}){moving}" if res.violations
                 else f"check: OK: VM {res.name}: {where}, every invariant holds{moving}")
    return lines


def fmt_bytes(n: int | None) -> str:
    """A size as `shmmmu ls` shows it: 256M, 1.5G, 512K, bytes below 1K, '-' for unknown."""
    if n is None:
        return "-"
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return str(n)


def vm_list_lines(vms: list[VmEntry]) -> list[str]:
    """`shmmmu ls`: one aligned row per VM under a header (the note last, unpadded)."""
    if not vms:
        return ["no VMs in /dev/shm"]
    rows = [("NAME", "PID", "STATE", "REGION", "MEMORY", "VCPUS", "LOCK MODE", "NOTE")]
    for v in vms:
        rows.append((v.name, str(v.creator_pid or "-"), v.state, fmt_bytes(v.size or None),
                     fmt_bytes(v.memory_bytes), str(v.vcpus) if v.vcpus is not None else "-", v.lock_mode or "-",
                     v.note))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, width)) + ("  " + r[-1] if r[-1] else "") for r in rows]
