"""Aging (5.13's clear_young / test_young) and `shmmmu bench access-tracking`: through the real processes.

The bench runs small; nothing here asserts a timing.  The young-page check is
exact, so each case also says how many pages must read young: all of them when
a vCPU's leaves overflow its TLB (every access walks again and sets A), none
when they fit (clear_young does not flush: a cached translation sets no A).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shmmmu import spte as S
from shmmmu import violations
from shmmmu.layout import HostPage, MemslotSpec, VMConfig, Workload
from shmmmu.vm import create_vm
from shmmmu.workers.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[2]
CMD = [sys.executable, "-m", "shmmmu.workers.cli", "bench", "access-tracking"]
SELFTEST_LINES = ["Populating memory", "Writing to populated memory", "Reading from populated memory",
                  "Mark memory idle", "Writing to idle memory", "Mark memory idle", "Reading from idle memory"]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("memory, backing, walked", [("32M", "4k", True), ("8M", "4k", False),
                                                     ("32M", "2m", False)])
def test_bench_prints_the_selftest_lines_and_its_exact_young_check_passes(memory: str, backing: str,
                                                                          walked: bool) -> None:
    p = bench("-v", "2", "-b", memory, "-s", backing, "--lock-mode", "shared")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    lines = p.stdout.splitlines()
    got = [ln for ln in lines if re.fullmatch(r".{30}: \d+\.\d{9}s", ln)]
    assert [ln[:30].rstrip() for ln in got] == SELFTEST_LINES
    assert all(ln[:30] == f"{ln[:30].rstrip():<30}" for ln in got)
    touched = 2 * (int(memory[:-1]) << 20) // 4096
    young = next(ln for ln in lines if ln.startswith("Young pages"))
    n = touched if walked else 0
    assert young.startswith(f"Young pages after marking idle / after the next pass: 0 / {n}, 0 / {n} "
                            f"(of {touched} touched, {n} of them walked again"), young


def test_bench_both_modes_json_with_ratios() -> None:
    p = bench("-v", "2", "-b", "16M", "-s", "4k", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(p.stdout)
    assert doc["result"] == "SUCCESS"
    assert [r["lock_mode"] for r in doc["runs"]] == ["shared", "exclusive"]
    assert set(doc["ratios"]) == {"populate", "write-populated", "read-populated", "mark-idle-1", "write-idle",
                                  "mark-idle-2", "read-idle"}
    assert all(r["phases"][0]["seconds"] > 0 for r in doc["runs"])


@pytest.mark.parametrize("args, message", [(["--lock-mode", "both-ish"], "unknown lock mode"),
                                           (["-b", "1x"], "bad size"), (["--repeat", "0"], "--repeat")])
def test_bench_usage_errors_are_one_line(args: list[str], message: str) -> None:
    p = bench(*args)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and message in p.stderr and not p.stdout


def _vm(name: str, debug: bool = True) -> VMConfig:
    wl = Workload(kind="access-tracking", pages=64, n_vcpus=1)
    return VMConfig(name=name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 1)], debug=debug, workload=wl,
                    tlb_entries=16)


def test_clear_young_clears_a_test_young_reports_it_and_the_next_walk_sets_it_again(vm_name: str) -> None:
    with create_vm(_vm(vm_name)) as vm:
        sup = Supervisor(vm)
        try:
            sup.start()
            mmu = sup.mmu
            sup.run_iteration(1)                           # every page written: leaves with A and D
            assert mmu.test_young(0, 64) and mmu.young_pages(0, 64).all()
            hm = vm.region.array("host_map")[:64].astype(np.intp)
            assert mmu.clear_young(0, 64) is True          # clear_flush_young: A cleared, TLBs flushed
            assert not mmu.test_young(0, 64) and not mmu.young_pages(0, 64).any()
            assert mmu.clear_young(0, 64) is False         # nothing young any more
            leaves = mmu.present_leaves(0, 64)
            assert len(leaves) == 64 and all(v & S.DIRTY and not v & S.ACCESSED for _, _, v in leaves)
            # the host heard of the accesses before A went away (kvm_set_pfn_accessed is not needed: the
            # notifier's caller marks the page referenced), and of nothing else
            assert (vm.region.array("host_ad")[hm] & HostPage.DIRTY == 0).all()
            sup.run_iteration(3)                           # a read pass: the flush emptied the TLB
            assert mmu.young_pages(0, 64).all()
            sup.stop()
            assert not violations.read_all(vm.region)
        finally:
            sup.kill_all()
            sup.cleanup_logs()
