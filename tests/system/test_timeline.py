"""--timeline and `trace timeline`: Chrome trace-event JSON, checked against the format's own definition.

The schema below is written from the Trace Event Format document (Google's "Trace Event Format", the JSON
Object Format that chrome://tracing and Perfetto import): the top level an object with a traceEvents list
(displayTimeUnit "ms" or "ns", otherData an object); every event a ph, pid and tid, and but for metadata a
name and a ts in microseconds; complete events (X) a dur; instant events (i) a scope s of g, p or t; counter
events (C) args of numbers; flow events (s, t, f) an id, the same name and category across one flow, a
finishing f binding to its enclosing slice with bp "e"; metadata events (M) process_name, process_labels,
process_sort_index, thread_name or thread_sort_index with their args.  The viewers also want the complete
events of one thread to nest (a slice inside another ends before it does): checked per track.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
CMD = [sys.executable, "-m", "shmmmu.workers.cli"]

PHASES = {"B", "E", "X", "i", "I", "C", "b", "n", "e", "s", "t", "f", "M", "P", "O", "N", "D", "R", "c", "(", ")"}
METADATA = {"process_name": "name", "process_labels": "labels", "process_sort_index": "sort_index",
            "thread_name": "name", "thread_sort_index": "sort_index"}


def check_trace_events(doc: object) -> Counter:
    """Every rule of the format this file uses, and nesting per thread; returns (ph, name) counts."""
    assert isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list)
    assert doc.get("displayTimeUnit", "ms") in ("ms", "ns")
    assert isinstance(doc.get("otherData", {}), dict)
    counts: Counter = Counter()
    slices: dict[tuple, list[tuple[float, float, str]]] = defaultdict(list)
    flows: dict[object, list[dict]] = defaultdict(list)
    for ev in doc["traceEvents"]:
        assert isinstance(ev, dict), ev
        ph = ev.get("ph")
        assert ph in PHASES, ev
        assert isinstance(ev.get("pid"), int) and isinstance(ev.get("tid"), int), ev
        counts[(ph, ev.get("name"))] += 1
        if ph == "M":
            assert ev.get("name") in METADATA, ev
            assert METADATA[ev["name"]] in ev.get("args", {}), ev
            value = ev["args"][METADATA[ev["name"]]]
            assert isinstance(value, int if ev["name"].endswith("sort_index") else str), ev
            continue
        assert isinstance(ev.get("name"), str) and ev["name"], ev
        assert isinstance(ev.get("ts"), (int, float)) and ev["ts"] >= 0, ev
        assert isinstance(ev.get("cat", ""), str) and isinstance(ev.get("args", {}), dict), ev
        if ph == "X":
            assert isinstance(ev.get("dur"), (int, float)) and ev["dur"] >= 0, ev
            slices[(ev["pid"], ev["tid"])].append((ev["ts"], ev["ts"] + ev["dur"], ev["name"]))
        elif ph == "i":
            assert ev.get("s", "t") in ("g", "p", "t"), ev
        elif ph == "C":
            assert ev["args"] and all(isinstance(v, (int, float)) for v in ev["args"].values()), ev
        elif ph in ("s", "t", "f"):
            assert "id" in ev, ev
            flows[(ev.get("cat"), ev["id"])].append(ev)
            if ph == "f":
                assert ev.get("bp") == "e", ev
    for key, evs in flows.items():
        assert [e["ph"] for e in evs][0] == "s" and evs[-1]["ph"] == "f", evs
        assert len({e["name"] for e in evs}) == 1
        assert evs[0]["ts"] <= evs[-1]["ts"], evs
        # bound to a slice: each end of the arrow lies inside a complete event of its thread
        for e in (evs[0], evs[-1]):
            assert any(t0 <= e["ts"] <= t1 for t0, t1, _ in slices[(e["pid"], e["tid"])]), e
    for track, xs in slices.items():
        stack: list[tuple[float, float, str]] = []
        for t0, t1, name in sorted(xs, key=lambda x: (x[0], -x[1])):
            while stack and stack[-1][1] <= t0 + 1e-9 and not (stack[-1][0] == t0 == t1):
                stack.pop()
            assert not stack or t1 <= stack[-1][1] + 1e-6, (track, stack[-1], (t0, t1, name))
            stack.append((t0, t1, name))
    return counts


def shmmmu(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def load(path: Path) -> tuple[dict, Counter]:
    doc = json.loads(path.read_text())
    return doc, check_trace_events(doc)


def tracks(doc: dict) -> list[str]:
    return [e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"]


def test_the_checker_refuses_what_the_format_forbids() -> None:
    good = {"traceEvents": [{"ph": "X", "name": "a", "ts": 0, "dur": 5, "pid": 1, "tid": 1}]}
    check_trace_events(good)
    for bad in ({"ph": "X", "name": "a", "ts": 0, "pid": 1, "tid": 1},                    # no dur
                {"ph": "Q", "name": "a", "ts": 0, "pid": 1, "tid": 1},                    # no such phase
                {"ph": "C", "name": "c", "ts": 0, "pid": 1, "tid": 0, "args": {"v": "x"}},  # a counter of text
                {"ph": "M", "name": "thread_name", "pid": 1, "tid": 0, "args": {}},       # a name without one
                {"ph": "i", "name": "a", "ts": -1, "pid": 1, "tid": 0}):                  # before time began
        with pytest.raises(AssertionError):
            check_trace_events({"traceEvents": [bad]})
    overlap = [{"ph": "X", "name": "a", "ts": 0, "dur": 5, "pid": 1, "tid": 1},
               {"ph": "X", "name": "b", "ts": 3, "dur": 5, "pid": 1, "tid": 1}]          # not nested
    with pytest.raises(AssertionError):
        check_trace_events({"traceEvents": overlap})
    unbound = [{"ph": "s", "name": "f", "id": 1, "ts": 9, "pid": 1, "tid": 1},
               {"ph": "f", "bp": "e", "name": "f", "id": 1, "ts": 9, "pid": 1, "tid": 2}]  # no slice around
    with pytest.raises(AssertionError):
        check_trace_events({"traceEvents": unbound})


def test_bench_dirty_log_timeline(tmp_path: Path) -> None:
    """`bench dirty-log -v 2 --timeline`: a process per VM (shared, exclusive), a track per vCPU and host
    process and one for each one's mmu_lock; a fault slice per fault the runs took, with its RET_PF result;
    lock waits and holds in both modes; zaps; flushes with their ack waits, and an arrow from a flush to each
    vCPU's acknowledgement; the counters."""
    out = tmp_path / "bench.json"
    p = shmmmu("bench", "dirty-log", "-v", "2", "-b", "4M", "--json", "--timeline", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    runs = json.loads(p.stdout)["runs"]
    doc, counts = load(out)
    assert counts[("M", "process_name")] == 2
    assert {"vCPU 0", "vCPU 1", "ioctls (host)", "vCPU 0: mmu_lock"} <= set(tracks(doc))
    assert counts[("X", "page fault")] == sum(r["stats"]["faults"] for r in runs)
    results = Counter(e["args"]["RET_PF"] for e in doc["traceEvents"] if e.get("name") == "page fault")
    assert results["FIXED"] == sum(r["stats"]["fixed"] for r in runs)
    for what in ("mmu_lock wait (read)", "mmu_lock held (read)", "mmu_lock wait (write)", "mmu_lock held (write)",
                 "kvm_flush_remote_tlbs", "flush: waiting for acks"):
        assert counts[("X", what)] > 0, what
    assert counts[("s", "TLB flush")] == counts[("f", "TLB flush")] > 0
    assert counts[("C", "faults/s")] > 0 and counts[("C", "page tables in use")] > 0


@pytest.mark.slow
def test_stress_timeline_has_zaps_and_grace_periods(tmp_path: Path) -> None:
    out = tmp_path / "stress.json"
    p = shmmmu("stress", "--duration", "1.5", "--vcpus", "2", "--seed", "3", "--timeline", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    doc, counts = load(out)
    assert {"reclaimer", "notifier"} <= set(tracks(doc))
    assert counts[("X", "zap_gfn_range")] > 0 and counts[("X", "synchronize_rcu (grace period)")] > 0
    assert counts[("X", "TLB flush ack")] > 0


def test_run_timeline_beside_tracepoints(tmp_path: Path) -> None:
    """Both outputs of one run: the timeline's faults are the tracepoint file's kvm_page_fault lines."""
    tl, tp = tmp_path / "run.json", tmp_path / "run.txt"
    p = shmmmu("run", "--name", f"tl-{os.getpid()}", "-v", "2", "-b", "2M", "-i", "2", "--json",
               "--tracepoints", str(tp), "--timeline", str(tl))
    assert p.returncode == 0, p.stderr[-3000:]
    doc, counts = load(tl)
    assert counts[("X", "page fault")] == tp.read_text().count(" kvm_page_fault: ") == json.loads(p.stdout)["faults"]
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []


def test_explore_timeline_shows_the_unfinished_fault(tmp_path: Path) -> None:
    """The explorer stops the counterexample at its failing step: the fault in flight is a slice open to the
    end, marked unfinished."""
    out = tmp_path / "k18.json"
    p = shmmmu("explore", "--bug", "link-after-publish", "--json", "--timeline", str(out))
    assert p.returncode == 1, p.stderr[-2000:]
    doc, counts = load(out)
    unfinished = [e for e in doc["traceEvents"] if e.get("cat") == "unfinished"]
    assert any(e["name"] == "page fault" for e in unfinished) and all(e["args"]["unfinished"] for e in unfinished)
    assert {"vCPU 0", "ioctls (host)"} <= set(tracks(doc))


def test_trace_timeline_of_tracepoint_files(tmp_path: Path) -> None:
    """`trace timeline FILE` of every real kernel's excerpt and our sample: a page-fault slice per
    kvm_page_fault, every other event an instant on its task's track (the library's call, in this process:
    the command is run below and by test_trace_timeline_refusals)."""
    from shmmmu.trace.summary import summarize
    from shmmmu.trace.timeline import from_tracepoints
    for path in sorted((DATA / "real-kernels").glob("*.txt")) + [DATA / "kvmmmu.trace-cmd.txt"]:
        out = tmp_path / (path.stem + ".json")
        with path.open("rb") as f:
            from_tracepoints(f, str(path), str(out))
        doc, counts = load(out)
        s = summarize(str(path))
        assert counts[("X", "page fault")] == s.events.get("kvm_page_fault", 0), path
        instants = sum(n for (ph, _), n in counts.items() if ph == "i")
        assert instants == sum(s.events.values()) - counts[("X", "page fault")] + s.other_events, path
    p = shmmmu("trace", "timeline", str(DATA / "kvmmmu.trace-cmd.txt"), "-o", str(tmp_path / "cli.json"))
    assert p.returncode == 0 and p.stdout.endswith(f"-> {tmp_path / 'cli.json'}\n"), p.stderr
    assert load(tmp_path / "cli.json")[1] == load(tmp_path / "kvmmmu.trace-cmd.json")[1]


def test_trace_timeline_refusals(tmp_path: Path) -> None:
    for args, words in ((["trace", "timeline", str(DATA / "plain.txt"), "-o", str(tmp_path / "x.json")],
                         "no kvm or kvmmmu tracepoint events"),
                        (["trace", "timeline", str(tmp_path / "none.txt"), "-o", str(tmp_path / "x.json")],
                         "cannot read"),
                        (["trace", "timeline", str(DATA / "kvmmmu.trace-cmd.txt"), "-o", str(tmp_path / "no/x.json")],
                         "cannot write")):
        p = shmmmu(*args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and words in lines[0], p.stderr
    assert os.listdir(tmp_path) == []


def test_timeline_instruments_cost_nothing_when_off(vm_name: str, tmp_path: Path) -> None:
    """Without --timeline no timeline site is wrapped (the lock's, the TLB control's and RCU's methods are their
    classes'); with a timeline-only parts directory every one is, and no tracepoint is."""
    from shmmmu.layout import MemslotSpec, VMConfig
    from shmmmu.mmu import Mmu
    from shmmmu.mmu.tracepoints import TRACE, WANT_NO_TRACEPOINTS, WANT_TIMELINE
    from shmmmu.trace.timeline import TIMELINE
    from shmmmu.vm import create_vm

    def bound(m: Mmu, key: str) -> object:
        owner, fn = key.split(".")
        obj = m.kvm if owner == "kvm" else getattr(m.kvm, owner) if owner in ("lock", "tlbctl", "rcu") \
            else getattr(m, owner)
        return obj, fn

    (tmp_path / WANT_TIMELINE).touch()
    (tmp_path / WANT_NO_TRACEPOINTS).touch()
    for parts in ("", str(tmp_path)):
        cfg = VMConfig(name=f"{vm_name}-{bool(parts):d}", n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 1)],
                       tracepoints=parts)
        with create_vm(cfg) as vm:
            m = Mmu(vm, 0)
            for key in TIMELINE:
                obj, fn = bound(m, key)
                own = getattr(getattr(obj, fn), "__self__", None) is obj      # the class's method, bound
                assert own != bool(parts), (key, parts)
            for key in set(TRACE) - set(TIMELINE):
                obj, fn = bound(m, key)
                assert getattr(getattr(obj, fn), "__self__", None) is obj, key      # no tracepoint either way


@pytest.mark.slow
def test_devtools_trace_viewer_reads_the_timeline(tmp_path: Path) -> None:
    """The trace viewer Chromium ships (its DevTools Performance panel, headless, offline) reads a `bench
    dirty-log -v 2 --timeline` file: its trace engine (tools/timeline_devtools.py parse) finds each vCPU's
    track with a fault slice per fault the run took and a lock hold per fault, the host's ioctl tracks with
    the flushes, and the flow arrows.  Skips with one line where selenium, chromium or chromedriver is
    missing (.ci/run installs them)."""
    out = tmp_path / "bench.json"
    p = shmmmu("bench", "dirty-log", "-v", "2", "-b", "4M", "--lock-mode", "shared", "--json", "--timeline", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    stats = json.loads(p.stdout)["runs"][0]["stats"]
    v = subprocess.run([sys.executable, str(ROOT / "tools" / "timeline_devtools.py"), "parse", str(out)],
                       capture_output=True, text=True, timeout=600)
    if v.returncode == 2 and v.stderr.startswith("timeline_devtools: "):
        pytest.skip(v.stderr.strip())
    assert v.returncode == 0, v.stderr[-3000:]
    seen = json.loads(v.stdout)
    assert len(seen["processes"]) == 1
    threads = {t["name"]: t["events"] for t in seen["processes"][0]["threads"]}
    assert {"vCPU 0", "vCPU 1", "vCPU 0: mmu_lock", "vCPU 1: mmu_lock", "ioctls (host)"} <= set(threads)
    assert threads["vCPU 0"]["page fault"] + threads["vCPU 1"]["page fault"] == stats["faults"]
    assert sum(threads[f"vCPU {i}: mmu_lock"]["mmu_lock held (read)"] for i in (0, 1)) >= stats["faults"]
    assert threads["ioctls (host)"]["kvm_flush_remote_tlbs"] > 0
    assert seen["flows"] > 0
