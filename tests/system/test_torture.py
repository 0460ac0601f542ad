"""Lock torture and RCU torture with 2, 4 and 8 processes, and their negative controls (which must FAIL)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from shmmmu.torture import LockTortureResult, RcuTortureResult, max_min_line, torture_rng
from shmmmu.workers.torture import run_lock_torture, run_rcu_torture

DURATION = 1.2


@pytest.mark.parametrize("nreaders,nwriters", [(1, 1), (2, 2), (4, 4)], ids=["2procs", "4procs", "8procs"])
def test_lock_torture_passes(nreaders: int, nwriters: int) -> None:
    res = run_lock_torture(nreaders, nwriters, DURATION, seed=11)
    report = res.report()
    assert res.ok, report
    assert report.splitlines()[-1] == "SUCCESS"
    assert "seed 11" in report.splitlines()[0]
    assert all(n > 0 for n in res.write_counts) and all(n > 0 for n in res.read_counts)
    assert res.write_fails == 0 and res.read_fails == 0
    if nreaders >= 2:
        assert res.max_readers >= 2                 # readers really share the lock
    assert res.long_holds > 0                       # the long holds ran, and with them cond_resched
    assert "Writes:  Total:" in report and "Reads:   Total:" in report


def test_busted_lock_fails() -> None:
    """lock_busted (writers barge in beside readers) is the negative control: it must be caught."""
    res = run_lock_torture(2, 2, 1.0, seed=5, busted=True)
    report = res.report()
    assert not res.ok
    assert res.write_fails + res.read_fails > 0
    assert "!!!" in report and report.splitlines()[-1].startswith("FAILURE")


@pytest.mark.parametrize("nreaders,nwriters", [(1, 1), (3, 1), (6, 2)], ids=["2procs", "4procs", "8procs"])
def test_rcu_torture_passes(nreaders: int, nwriters: int) -> None:
    res = run_rcu_torture(nreaders, nwriters, DURATION, seed=7)
    report = res.report()
    assert res.ok, report
    assert report.splitlines()[-1] == "SUCCESS"
    assert sum(res.pipe[2:]) == 0 and res.pipe[0] > 0
    assert res.poison_reads == 0 and res.stale_reads == 0
    assert res.leak == 0 and res.census_ok
    assert res.grace_periods > 0 and res.freed > 0
    assert all(n > 0 for n in res.update_counts) and all(n > 0 for n in res.read_counts)
    assert "Reader Pipe: " in report and "Leak: allocated" in report


def test_rcu_torture_without_grace_periods_fails() -> None:
    """A reclaimer that frees without waiting for readers (wait_for_gp=False) must be caught."""
    res = run_rcu_torture(2, 1, 1.5, seed=3, grace_period=False)
    report = res.report()
    assert not res.ok
    assert sum(res.pipe[2:]) + res.poison_reads + res.stale_reads > 0
    assert "!!!" in report and report.splitlines()[-1].startswith("FAILURE")


def test_seed_gives_the_same_random_streams() -> None:
    a = [torture_rng(42, "lock", 3).random() for _ in range(5)]
    assert a == [torture_rng(42, "lock", 3).random() for _ in range(5)]
    assert a != [torture_rng(42, "lock", 4).random() for _ in range(5)]
    assert a != [torture_rng(43, "lock", 3).random() for _ in range(5)]


def test_max_min_line_flags() -> None:
    assert max_min_line("Writes", [10, 9], 0) == "Writes:  Total: 19  Max/Min: 10/9  Fail: 0"
    assert max_min_line("Writes", [10, 4], 0).endswith("???")
    assert max_min_line("Reads", [10, 9], 2).endswith("!!!")


def test_results_judge_what_they_hold() -> None:
    ok = LockTortureResult(seed=1, nreaders=2, nwriters=1, duration=1, busted=False, write_counts=[5],
                           read_counts=[3, 3], max_readers=2, elapsed=1.0)
    assert ok.ok
    assert not LockTortureResult(seed=1, nreaders=2, nwriters=2, duration=1, busted=False, write_counts=[5, 0],
                                 read_counts=[3, 3], max_readers=2).ok      # a writer made no progress
    assert not LockTortureResult(seed=1, nreaders=2, nwriters=1, duration=1, busted=False, write_counts=[5],
                                 read_counts=[3, 3], max_readers=1).ok      # readers never overlapped
    r = RcuTortureResult(seed=1, nreaders=1, nwriters=1, duration=1, grace_period=True, update_counts=[4],
                         read_counts=[9], allocated=5, freed=3, reachable=1, pending=1, grace_periods=2)
    assert r.ok and r.leak == 0
    r.freed = 2
    assert not r.ok and "leak equation is 1" in r.report()
    r.freed, r.pipe = 3, [5, 1, 1] + [0] * 8
    assert not r.ok and r.report().splitlines()[2].endswith("!!!")


def test_command_line() -> None:
    cli = [sys.executable, "-m", "shmmmu.workers.cli", "torture"]
    out = subprocess.run([*cli, "lock", "--readers", "1", "--writers", "1", "--duration", "0.3", "--seed", "99"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "seed 99" in out.stdout and out.stdout.strip().splitlines()[-1] == "SUCCESS"
    failing = subprocess.run([*cli, "rcu", "--readers", "2", "--duration", "1", "--seed", "3", "--no-gp"],
                             capture_output=True, text=True, timeout=120)
    assert failing.returncode == 1 and failing.stdout.strip().splitlines()[-1] == "FAILURE (seed 3)"
    for args, words in [(["lock", "--writers", "0", "--duration", "0.1"], "--writers must be between 1 and 64"),
                        (["lock", "--duration", "0"], "--duration must be at least 0.1"),
                        (["nonsense"], "No such command 'nonsense'"), (["lock", "--bogus"], "No such option: --bogus")]:
        bad = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
        assert bad.stderr.startswith("shmmmu: error: ") and words in bad.stderr
    help_ = subprocess.run([*cli, "lock", "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--busted" in help_.stdout
