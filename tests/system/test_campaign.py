"""shmmmu campaign: plans, a local cluster, a real `dask scheduler` with two `dask worker`s, a worker SIGKILLed,
Ctrl-C and --resume, and DFS searches split over the cluster giving one process's findings (issue 26)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import HANG_GUARD_S, default_sigint, wait_until
from shmmmu.campaign.plan import Task, plan_from_options, plan_tasks, read_plan
from shmmmu.campaign.results import RUN_FIELDS, outcome_of_explore, percentile, summary
from shmmmu.region import PREFIX
from shmmmu.validate import UsageError

distributed = pytest.importorskip("distributed", reason="Dask distributed is not installed (pip install -e '.[test]')")

DASK = Path(sys.executable).parent / "dask"
# the family of every prefix a campaign of this session makes: shmmmu_ + this session's middle + a token
FAMILY_START = "shmmmu_" + PREFIX[len("shmmmu_"):-1]
# measured on this machine (docs/campaign.md): each of these is found in every run of the mode named, and
# pages-lock-in-read-fault never in exclusive mode (the read-lock fault path does not run there)
SWITCHES = ["no-forward-progress", "pages-lock-in-read-fault", "yield-with-owed-flush"]
STRESS_PLAN = ["stress", "--seeds", "1..2", "--lock-mode", "shared", "--lock-mode", "exclusive", "-d", "1.5",
               "-v", "2"] + [a for s in SWITCHES for a in ("--switch", s)]


def campaign(*args: str, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmmmu.workers.cli", "campaign", *args], capture_output=True,
                          text=True, timeout=timeout)


def lines_of(directory: Path) -> dict[str, dict]:
    out = {}
    for text in (directory / "results.jsonl").read_text().splitlines():
        d = json.loads(text)
        out[d["id"]] = d
    return out


def without_run_fields(lines: dict[str, dict]) -> dict[str, dict]:
    return {k: {f: v for f, v in d.items() if f not in RUN_FIELDS} for k, d in lines.items()}


def family_objects() -> set[str]:
    """What campaigns of this session left: /dev/shm entries and processes under their prefixes."""
    shm = {e for e in os.listdir("/dev/shm") if e.startswith((FAMILY_START, "sem." + FAMILY_START))}
    procs = set()
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{d}/environ").read_bytes()
        except OSError:
            continue
        if b"SHMMMU_PREFIX=" + FAMILY_START.encode() in env and f"SHMMMU_PREFIX={PREFIX}\0".encode() not in env:
            procs.add(f"process {d}")
    return shm | procs


# ---------------------------------------------------------------- plans (no cluster)


def test_a_stress_plan_is_seeds_x_switches_x_modes_x_profiles_with_stress_arguments() -> None:
    tasks = plan_tasks(plan_from_options("stress", {"seeds": "3..5", "switches": ["none", "no-forward-progress"],
                                                    "lock_modes": ["shared", "exclusive"], "duration": 2.0}))
    assert len(tasks) == 3 * 2 * 2
    t = next(t for t in tasks if t.id == "stress/5.13/no-forward-progress/exclusive/seed4")
    assert t.argv == ("stress", "--seed", "4", "--lock-mode", "exclusive", "--duration", "2", "--vcpus", "4",
                      "--bug", "no-forward-progress")
    assert "--kernel" not in " ".join(a for t in tasks for a in t.argv)       # the default profile: not passed
    assert Task.from_json(json.loads(json.dumps(t.to_json()))) == t


def test_an_explore_plan_is_a_dfs_search_per_scenario_and_switch_or_a_search_per_seed(tmp_path: Path) -> None:
    from shmmmu.explore.scenarios import SCENARIOS
    dfs = plan_tasks({"explore": {"preemptions": 2}})
    # every scenario with each switch it targets in the default profile (5.13); one that targets none there
    # (mix, or a 6.12 switch's scenario) with the fixed code
    from shmmmu.variants import bugs_of
    known = set(bugs_of("5.13"))
    assert {(t.argv[2], t.switch) for t in dfs} == {(n, b) for n, s in SCENARIOS.items()
                                                     for b in ([x for x in s.targets if x in known] or [None])}
    assert all(t.split == "dfs" and t.explore["preemptions"] == 2 for t in dfs)
    plan = tmp_path / "plan.toml"
    plan.write_text('[explore]\nscenarios = ["fault-zap"]\nswitches = ["none", "rcu-free-immediately"]\n'
                    'strategy = "random"\nseeds = [4, 9]\nexecutions = 500\n[campaign]\ntask_timeout = 60\n')
    seeded = plan_tasks(read_plan(str(plan)))
    assert [t.id for t in seeded] == ["explore/5.13/fault-zap/none/random/seed4",
                                      "explore/5.13/fault-zap/none/random/seed9",
                                      "explore/5.13/fault-zap/rcu-free-immediately/random/seed4",
                                      "explore/5.13/fault-zap/rcu-free-immediately/random/seed9"]
    assert seeded[3].argv[-2:] == ("--seed", "9") and seeded[3].split == "run"


@pytest.mark.parametrize("plan,message", [
    ({"stress": {"switches": ["no-such-switch"]}}, "unknown switch 'no-such-switch'"),
    ({"stress": {"seeds": "5..2"}}, "B is less than A"),
    ({"stress": {"seeds": "x"}}, "seeds must be A..B"),
    ({"stress": {"vcpus": 0}}, "--vcpus must be between 1 and 64"),
    ({"stress": {"duration": "long"}}, "duration must be a float"),
    ({"stress": {"lock_modes": ["shared", "loose"]}}, "unknown lock mode 'loose'"),
    ({"stress": {"kernels": ["2.6"]}}, "unknown kernel profile '2.6'"),
    ({"stress": {"scenarios": ["fault-zap"]}}, "[stress] has no key 'scenarios'"),
    ({"explore": {"scenarios": ["nope"]}}, "unknown scenario 'nope'"),
    ({"explore": {"strategy": "bfs"}}, "unknown strategy 'bfs'"),
    ({"explore": {"preemptions": 9}}, "--preemptions must be between 0 and 6"),
    ({"stresss": {}}, "unknown plan table [stresss]"),
    ({}, "the plan has no task"),
])
def test_a_bad_plan_is_one_sentence(plan: dict, message: str) -> None:
    with pytest.raises(UsageError) as e:
        plan_tasks(plan)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args,message", [
    ([], "name what the campaign runs"),
    (["stress", "--scenario", "fault-zap"], "--scenario is not an option of a stress campaign"),
    (["stress", "--seeds", "1..2", "--scheduler", "localhost:8786"], "--scheduler must be tcp://HOST:PORT"),
    (["nothing.toml"], "cannot read the plan nothing.toml"),
    (["--resume", "no-such-dir"], "not a campaign directory"),
])
def test_bad_usage_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "shmmmu.workers.cli", "campaign", *args], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stdout == "" and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert os.listdir(tmp_path) == []                  # nothing written for a refused campaign


def test_the_summary_counts_each_switch_and_profile_with_median_and_p90() -> None:
    mk = lambda i, sw, v, s=None: {"id": f"t{i}", "kind": "stress", "switch": sw, "profile": "5.13", "args": ["stress"],
                                   "verdict": v, "violation": "x" if v == "found" else None,
                                   "replay": f"shmmmu stress --seed {i}" if v == "found" else None,
                                   "detect": {"seconds": s} if s is not None else None}    # noqa: E731
    lines = [mk(1, "a", "found", 1.0), mk(2, "a", "found", 3.0), mk(3, "a", "clean"), mk(4, None, "hung"),
             mk(5, "a", "found", 2.0), mk(6, "a", "lost")]
    text = summary(lines, planned=7, seconds=1.0, workers=2)
    assert text[0].startswith("campaign: 6 of 7 tasks finished") and "3 found, 1 clean, 1 hung, 1 lost" in text[0]
    row = next(r for r in text if r.startswith("stress  a "))
    assert row.split()[3:] == ["3", "of", "5", "2.00", "s", "3.00", "s", "0", "1"], row
    assert sum("replay: shmmmu stress --seed" in r for r in text) == 3
    assert percentile([5, 1, 4, 2, 3, 6, 7, 8, 9, 10], 0.9) == 9


# ---------------------------------------------------------------- on a cluster


def test_ctrl_c_keeps_what_finished_and_resume_finishes_it(tmp_path: Path) -> None:
    """A local campaign Ctrl-C'd after its first result: exit 130, the summary of what finished, every child
    stopped and nothing left in /dev/shm; --resume runs only the rest, and the whole campaign is there."""
    d = tmp_path / "c"
    p = subprocess.Popen([sys.executable, "-m", "shmmmu.workers.cli", "campaign", "stress", "--seeds", "1..3",
                          "--switch", "no-forward-progress", "-d", "3", "-v", "2", "-w", "2", "-o", str(d)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        wait_until(lambda: (d / "results.jsonl").exists() and (d / "results.jsonl").read_text().strip(),
                   "the campaign's first result", poll_s=0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=HANG_GUARD_S)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130, err
    first = lines_of(d)
    assert 1 <= len(first) < 3 and all(v["verdict"] == "found" for v in first.values())
    assert f"campaign: {len(first)} of 3 tasks finished" in out and "cancelled" in out, out
    assert f"--resume {d}" in err and "Traceback" not in err, err
    assert family_objects() == set()

    res = campaign("--resume", str(d), "-w", "2")
    assert res.returncode == 1, res.stderr                          # findings
    lines = lines_of(d)
    assert len(lines) == 3 and all(v["verdict"] == "found" and v["violation"] == "no-forward-progress"
                                   for v in lines.values())
    assert all(lines[k] == v for k, v in first.items())             # the finished ones did not run again
    assert "campaign: 3 of 3 tasks finished" in res.stdout and "stress  no-forward-progress  5.13    3 of 3" \
        in res.stdout, res.stdout
    assert (d / "summary.txt").read_text().splitlines() == res.stdout.splitlines()
    assert family_objects() == set()


def test_a_task_past_its_wall_cap_is_stopped_and_hung_never_a_finding(tmp_path: Path) -> None:
    """A 60 s stress run under a 3 s --task-timeout: stopped (its child and the VM's processes), reported hung
    with the cap in its text, exit 0 (no finding), and nothing of it left in /dev/shm or running."""
    res = campaign("stress", "--seeds", "7", "-d", "60", "-v", "1", "--task-timeout", "3", "-w", "1",
                   "-o", str(tmp_path / "c"))
    assert res.returncode == 0, res.stderr
    (line,) = lines_of(tmp_path / "c").values()
    assert line["verdict"] == "hung" and "wall cap of 3 s" in line["first"], line
    assert "0 found, 0 clean, 1 hung, 0 lost" in res.stdout and "hung: stress/5.13/none/shared/seed7" in res.stdout
    assert family_objects() == set()


def test_a_dfs_search_split_over_the_cluster_gives_one_process_answer(tmp_path: Path) -> None:
    """The fixed code of zap-zap-roots at bound 2 (no finding: every one of its 16 subtrees runs) and its
    switch (a finding in the third round): the same counts, finding and token as one process; and Dask's
    default HTTP port in use makes no warning on the user's terminal."""
    from shmmmu.explore.report import ExploreOptions, run_explore
    with socket.socket() as taken:               # Dask's default HTTP port held (if nobody holds it already)
        try:
            taken.bind(("127.0.0.1", 8787))
            taken.listen()
        except OSError:
            pass
        res = campaign("explore", "--scenario", "zap-zap-roots", "--switch", "none", "--switch", "targets",
                       "--preemptions", "2", "-w", "2", "-o", str(tmp_path / "c"))
    assert res.returncode == 1, res.stderr
    assert res.stderr == ""                      # not a word from Dask (a port in use, a worker's log)
    lines = lines_of(tmp_path / "c")
    for bugs, verdict in (([], "clean"), (["root-refcount-not-atomic"], "found")):
        line = lines[f"explore/5.13/zap-zap-roots/{bugs[0] if bugs else 'none'}/dfs/bound2"]
        alone = outcome_of_explore(run_explore(ExploreOptions(scenario="zap-zap-roots", bugs=bugs,
                                                              preemptions=2)).to_json())
        assert line["verdict"] == verdict
        assert {k: line[k] for k in alone if k not in RUN_FIELDS} == {k: v for k, v in alone.items()
                                                                      if k not in RUN_FIELDS}
        assert line["first"] == alone["first"] and line["detect"] == alone["detect"]   # deterministic here
    assert family_objects() == set()


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A real `dask scheduler` on 127.0.0.1 (a free port: it writes its address to a scheduler file) and two
    single-threaded `dask worker`s without nannies; allowed-failures 0, as docs/campaign.md says."""
    if not DASK.exists():
        pytest.skip("the dask command is not installed next to this Python")
    env = dict(os.environ, DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0")
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(sched_file)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        wait_until(lambda: sched_file.exists() and sched_file.read_text().strip(), "the scheduler's address",
                   poll_s=0.05)
        address = json.loads(sched_file.read_text())["address"]
        for i in range(2):
            procs.append(subprocess.Popen([str(DASK), "worker", address, "--nthreads", "1", "--no-nanny",
                                           "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client
        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=HANG_GUARD_S)
        yield address, procs
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_a_campaign_on_a_dask_scheduler_detects_every_switch_as_the_local_default_does(
        tmp_path: Path, dask_cluster: tuple[str, list[subprocess.Popen]]) -> None:
    """12 stress tasks (3 switches x 2 seeds x 2 lock modes) through `--scheduler` on two `dask worker`s, then on
    the default local cluster: every switch detected, and the same lines but for how each ran."""
    address, _ = dask_cluster
    remote = campaign(*STRESS_PLAN, "--scheduler", address, "-o", str(tmp_path / "remote"))
    assert remote.returncode == 1, remote.stderr
    local = campaign(*STRESS_PLAN, "-w", "2", "-o", str(tmp_path / "local"))
    assert local.returncode == 1, local.stderr
    r, l_ = lines_of(tmp_path / "remote"), lines_of(tmp_path / "local")
    # a stress run's first violation is whichever checker fired first, a matter of timing (K11 in exclusive
    # mode: lock-dropped-unflushed or install-before-flush); the verdicts, replays and arguments are the plan's
    same = lambda lines: {k: {f: v for f, v in d.items() if f != "violation"} for k, d in without_run_fields(lines).items()}  # noqa: E731,E501
    assert len(r) == 12 and same(r) == same(l_)
    assert len({v["worker"] for v in r.values()}) == 2                  # both workers ran tasks
    for s in SWITCHES:
        assert any(v["switch"] == s and v["verdict"] == "found" for v in r.values()), s
    assert "campaign: 12 of 12 tasks finished" in remote.stdout
    assert family_objects() == set()


@pytest.mark.slow
def test_a_worker_sigkilled_mid_campaign_loses_no_task_and_leaves_nothing(
        tmp_path: Path, dask_cluster: tuple[str, list[subprocess.Popen]]) -> None:
    """SIGKILL one `dask worker` while it runs a task's child: the task runs again on the other worker, every
    task still ends with a verdict (none lost), and nothing of the campaign is left in /dev/shm or running."""
    address, procs = dask_cluster
    victim = procs[1]
    d = tmp_path / "c"
    p = subprocess.Popen([sys.executable, "-m", "shmmmu.workers.cli", "campaign", *STRESS_PLAN, "--scheduler",
                          address, "-o", str(d)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def victim_runs_a_child() -> bool:
        for c in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{c}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == victim.pid:
                return True
        return False
    try:
        wait_until(lambda: (d / "results.jsonl").exists() and victim_runs_a_child(),
                   "a result, then a task's child under the worker to kill", poll_s=0.02)
        victim.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=HANG_GUARD_S)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 1, err
    lines = lines_of(d)
    assert len(lines) == 12 and {v["verdict"] for v in lines.values()} <= {"found", "clean"}, lines
    assert any(v["attempts"] == 2 for v in lines.values())         # the killed one ran again
    assert all(v["verdict"] == "found" for v in lines.values()
               if v["switch"] != "pages-lock-in-read-fault" or "shared" in v["id"])
    assert family_objects() == set()


@pytest.mark.slow
def test_explore_over_every_scenario_at_bound_2_finds_what_one_process_finds(tmp_path: Path) -> None:
    """Every scenario with each switch it targets (those that target none: the fixed code), DFS at bound 2 split
    over the local cluster, against run_explore in this process with the same budget."""
    from shmmmu.explore.report import ExploreOptions, run_explore
    res = campaign("explore", "--preemptions", "2", "--executions", "2000", "-w", "2", "-o", str(tmp_path / "c"),
                   timeout=1800)
    assert res.returncode == 1, res.stderr
    lines = lines_of(tmp_path / "c")
    assert len(lines) == len(plan_tasks({"explore": {"preemptions": 2}}))
    for line in lines.values():
        scenario = line["args"][2]
        alone = run_explore(ExploreOptions(scenario=scenario, bugs=[line["switch"]] if line["switch"] else [],
                                           preemptions=2, executions=2000))
        want = outcome_of_explore(alone.to_json())
        assert {k: line[k] for k in want if k not in ("time", "worker", "attempts")} == \
            {k: v for k, v in want.items() if k not in ("time", "worker", "attempts")}, line["id"]
    # every switch is found; the fixed code of the scenarios that target none (mix, the coverage family) is clean
    assert {k: v["verdict"] for k, v in lines.items()} == {k: "found" if v["switch"] else "clean"
                                                           for k, v in lines.items()}
    assert family_objects() == set()
