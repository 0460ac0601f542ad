"""Multi-process MMU: 2, 4 and 8 vCPU processes fault one range while the host zaps and unmaps it.

The race paths must really run (CAS failures, frozen entries seen, lost link
races) and every checker must stay quiet; the same populate workload in shared
and exclusive mode must leave the same translations.
"""
from __future__ import annotations

import pytest

from shmmmu.checks import leaves_by_gfn
from shmmmu.run import RunOptions, run_vm
from shmmmu.stress import StressOptions, run_stress
from shmmmu.workers.supervisor import Supervisor


@pytest.mark.parametrize("vcpus", [2, 4, 8])
def test_faults_race_with_zaps_and_unmaps(vcpus: int) -> None:
    r = run_stress(StressOptions(duration=3, vcpus=vcpus, seed=11, ops=["zap-range", "host-unmap", "zap-all"]), Supervisor)
    assert r.ok, r.problems[:5]
    s = r.stats
    assert s["faults"] > 1000
    assert s["retries"] > 0
    assert s["cas_failures"] + s["removed_seen"] + s["link_races"] > 0, "no race path ran"
    assert r.rcu["grace_periods"] > 0
    assert sum(r.pipe[2:]) == 0


@pytest.mark.parametrize("backing", ["4k", "2m"])
def test_shared_and_exclusive_leave_the_same_tables(backing: str, vm_name: str) -> None:
    seen = {}
    for mode in ("shared", "exclusive"):
        opts = RunOptions(name=f"{vm_name}-{mode[0]}", vcpus=4, memory=4 << 20, backing=backing, lock_mode=mode,
                          workload="populate", iterations=2)
        result = run_vm(opts, Supervisor, keep=lambda sup, mode=mode: seen.__setitem__(mode, leaves_by_gfn(sup.vm)))
        assert result.ok, result.problems + result.violations
    assert seen["shared"] and seen["shared"] == seen["exclusive"]
