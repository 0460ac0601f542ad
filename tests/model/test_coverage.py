"""explore --coverage: the conflicting access pairs a search reached and in which orders, the functions it ran."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shmmmu.explore.coverage_report import coverage_report
from shmmmu.explore.scenarios import SCENARIOS

CLI = [sys.executable, "-m", "shmmmu.workers.cli", "explore", "--coverage"]


def test_a_fault_racing_a_zap_reaches_the_cmpxchg_and_the_zappers_walk_in_both_orders() -> None:
    p = subprocess.run([*CLI, "--scenario", "fault-zap", "--preemptions", "1", "-n", "500", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    s = r["scenarios"][0]
    assert s["scenario"] == "fault-zap" and s["exhausted"]
    pairs = {(x["section"], x["first"], x["second"]): x["orders"] for x in s["pairs_list"]}
    assert pairs[("tables", "tdp_mmu_set_spte_atomic (write)", "zap_gfn_range > TdpIter.next (read)")] == "both"
    assert s["pairs"] == len(pairs) == s["both_orders"] + s["one_order"]
    assert "tdp_map.py:TdpMap.kvm_tdp_mmu_map" not in s["never_ran"]
    assert "tdp_zap.py:TdpZap.kvm_tdp_mmu_zap_all" in s["never_ran"]          # fault-zap zaps a range only


@pytest.mark.parametrize("kernel", ["5.13", "6.12"])
def test_every_kernel_function_is_run_by_some_scenario(kernel: str) -> None:
    """The scenarios (with the coverage family) run every MMU function that mirrors kernel code, in each
    profile (its own variants' functions included)."""
    r = coverage_report(list(SCENARIOS), [], "pct", 2, 1, 0, 20, kernel)
    assert r["never_ran_by_any"] == [], r["never_ran_by_any"]


def test_the_text_report_marks_one_order_pairs_and_bad_usage_is_one_line() -> None:
    p = subprocess.run([*CLI, "--scenario", "zap-zap-roots", "-n", "100"], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and "conflicting pairs" in p.stdout and "[both]" in p.stdout
    bad = subprocess.run([*CLI, "--jobs", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--coverage runs in one process" in bad.stderr
