"""End to end: the real `shmmmu` command in subprocesses, as a user drives it.

`run` in each lock mode and backing size; a VM kept alive (`run --keep`) while
`inspect` in every form, `ls` and `rm` attach to it; Ctrl-C and a SIGKILLed
vCPU mid-run; and every user error: one line on stderr, exit status 2.
Every VM is stopped and unlinked, also when a test fails.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import posix_ipc
import pytest

from shmmmu.region import (HEADER_BYTES, H_MAGIC, H_SIZE, H_VERSION, LAYOUT_VERSION, MAGIC, PREFIX, segment_name,
                           unlink_all)

from conftest import HANG_GUARD_S, default_sigint, new_vm_name, source_copy

CMD = [sys.executable, "-m", "shmmmu.workers.cli"]
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["-b", "8M", "-i", "2"]


def shmmmu(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def leftovers(name: str) -> list[str]:
    try:
        files = os.listdir("/dev/shm")
    except OSError:
        return []
    return [f for f in files if f == f"{PREFIX}{name}" or f.startswith(f"sem.{PREFIX}{name}.")]


def assert_one_line_error(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("shmmmu: error: "), lines[0]
    for w in words:
        assert w in lines[0], lines[0]


class Kept:
    """A `shmmmu run --keep` in the background, its stderr in a file."""

    def __init__(self, name: str, proc: subprocess.Popen, err: Path):
        self.name = name
        self.proc = proc
        self.err = err

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Send `sig`, wait (a hang guard, not a speed requirement); returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(HANG_GUARD_S)


def wait_for(pred, what: str, proc: subprocess.Popen | None = None, err: Path | None = None):
    """Poll `pred` until it holds (a hang guard bounds it, not a speed requirement)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            text = err.read_text(errors="replace") if err else ""
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}: {text}")
        time.sleep(0.05)
    raise AssertionError(f"hung: waiting for {what}")


@contextmanager
def running(name: str, *run_args: str, keep: bool = True, ready: str = "kept alive") -> Iterator[Kept]:
    """Start `shmmmu run --name NAME ...` in the background; always stopped and unlinked on exit."""
    tmp = tempfile.NamedTemporaryFile(prefix=f"shmmmu-e2e-{name}-", suffix=".err", delete=False)
    err = Path(tmp.name)
    proc = subprocess.Popen([*CMD, "run", "--name", name, *(["--keep"] if keep else []), *run_args],
                            preexec_fn=default_sigint,
                            stdout=subprocess.DEVNULL, stderr=tmp, stdin=subprocess.DEVNULL, cwd=ROOT)
    tmp.close()
    kept = Kept(name, proc, err)
    try:
        if ready == "kept alive":
            wait_for(lambda: "kept alive" in kept.stderr(), f"VM {name} to be kept alive", proc, err)
        yield kept
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        unlink_all(name)
        err.unlink(missing_ok=True)


def inspect_json(name: str, *args: str) -> dict:
    res = shmmmu("inspect", name, "--json", *args)
    assert res.returncode in (0, 1), res.stderr
    return json.loads(res.stdout)


# ---------------------------------------------------------------- run, each mode and backing

@pytest.mark.parametrize("lock_mode", ["shared", "exclusive"])
@pytest.mark.parametrize("backing", ["4k", "2m", "1g"])
def test_run_each_lock_mode_and_backing(lock_mode: str, backing: str) -> None:
    name = new_vm_name("e2e")
    res = shmmmu("run", "--name", name, *SMALL, "-s", backing, "--lock-mode", lock_mode, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["result"] == "SUCCESS"
    assert out["options"]["lock_mode"] == lock_mode and out["options"]["backing"] == backing
    assert out["faults"] > 0
    assert out["tables"]["total"] == out["tables"]["live"] + out["tables"]["free"] + out["tables"]["cached"]
    assert not leftovers(name)



def test_workers_run_the_installed_package_not_the_current_directory(tmp_path: Path) -> None:
    """Started from a directory holding other `shmmmu`, `shmmmu.workers` and `workers` packages (a source
    checkout after `pip install .` has no compiled helpers), the console script and its workers must all
    run the package the script imported."""
    for pkg in ("shmmmu", "shmmmu/workers", "workers"):
        (tmp_path / pkg).mkdir()
        for mod in ("__init__", "cli", "vcpu", "reclaimer"):
            (tmp_path / pkg / f"{mod}.py").write_text(
                'raise SystemExit("imported the decoy package in the current directory")\n')
    script = Path(sys.executable).parent / "shmmmu"
    assert script.exists(), "the install did not create the shmmmu console script"
    name = new_vm_name("e2e")
    res = subprocess.run([str(script), "run", "--name", name, *SMALL, "--json"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["result"] == "SUCCESS"
    assert not leftovers(name)


# ---------------------------------------------------------------- a kept VM, inspected

@pytest.mark.parametrize("lock_mode,backing,workload", [("shared", "4k", "random"),
                                                         ("exclusive", "2m", "dirty-log")])
def test_inspect_a_kept_vm(lock_mode: str, backing: str, workload: str) -> None:
    name = new_vm_name("e2e")
    with running(name, *SMALL, "-s", backing, "--lock-mode", lock_mode, "-w", workload) as vm:
        # ls sees it, alive, created by the run
        res = shmmmu("ls", "--json")
        assert res.returncode == 0, res.stderr
        mine = [e for e in json.loads(res.stdout) if e["name"] == name]
        assert len(mine) == 1 and mine[0]["state"] == "alive" and mine[0]["creator_pid"] == vm.proc.pid
        assert mine[0]["vcpus"] == 2 and mine[0]["lock_mode"] == lock_mode
        res = shmmmu("ls")
        assert res.returncode == 0 and name in res.stdout

        # the summary
        res = shmmmu("inspect", name)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"VM {name}: creator pid {vm.proc.pid} (alive)")
        for word in ("mappings", "mmu_lock", "rcu ", "faults", "vCPU 0", "reclaimer"):
            assert word in res.stdout, word
        s = inspect_json(name)
        assert s["config"]["vcpus"] == 2 and s["config"]["lock_mode"] == lock_mode
        assert s["counters"]["faults"] > 0
        assert s["tables"]["reachable"] >= 1 and s["tables"]["live"] == s["tables"]["reachable"]
        assert s["tables"]["pool"] == sum(s["tables"][k] for k in ("live", "free", "cached", "retired"))
        assert all(w["alive"] for w in s["workers"]), s["workers"]
        assert [w["role"] for w in s["workers"]][:2] == ["vCPU 0", "vCPU 1"]
        assert s["locks"][0]["name"] == "mmu_lock" and not s["locks"][0]["write_locked"]
        assert s["rates"] is None and s["snapshot"]["changed_while_reading"] == 0

        # the tree: coalesced ranges that add up to the mappings
        t = inspect_json(name, "--tree")
        total = {"4K": 0, "2M": 0, "1G": 0}
        for r in t["ranges"]:
            total[r["size"]] += r["count"]
        assert total == {k: s["mappings"][k] for k in total}
        res = shmmmu("inspect", name, "--tree")
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"# VM {name}: page tables reachable from the root")
        n_roots = len({r["root"] for r in t["ranges"]})          # a "# root R" header before each root's ranges
        assert len(res.stdout.splitlines()) == 2 + max(1, len(t["ranges"])) + n_roots

        # one GFN's walk: a mapped one if any, and one far from any memslot
        if t["ranges"]:
            g = t["ranges"][0]["start"]
            res = shmmmu("inspect", name, "--gfn", hex(g))
            assert res.returncode == 0, res.stderr
            w = inspect_json(name, "--gfn", str(g))
            assert "=> mapped:" in res.stdout and f"L4 table #{w['root']['table']} " in res.stdout
            assert w["steps"][0]["table"] == w["root"]["table"] and w["root"]["row"] == t["ranges"][0]["root"]
            assert w["host_page"] == w["memslot_host_page"] == t["ranges"][0]["pfn"]
            assert [st["level"] for st in w["steps"]][0] == 4
        res = shmmmu("inspect", name, "--gfn", "5")
        assert res.returncode == 0 and "not mapped" in res.stdout and "no memslot" in res.stdout
        assert_one_line_error(shmmmu("inspect", name, "--gfn", hex(1 << 40)), "beyond")

        # the invariants hold at this quiet point
        res = shmmmu("inspect", name, "--check")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "check: OK" in res.stdout
        assert inspect_json(name, "--check")["ok"] is True

        # rm refuses a live VM; rm --all refuses too, and removes nothing
        assert_one_line_error(shmmmu("rm", name), "live", "--force")
        assert_one_line_error(shmmmu("rm", "--all"), "live", "--force")
        assert leftovers(name)

        # Ctrl-C: out within a few seconds, nothing left
        rc = vm.stop(signal.SIGINT)
        assert rc == 130, vm.stderr()
        assert "Traceback" not in vm.stderr()
        assert not leftovers(name)
    res = shmmmu("inspect", name)
    assert_one_line_error(res, f"no VM named {name!r} is running", "shmmmu ls")


def _watch_until(args: list[str], enough, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run `inspect --watch`, read its stdout until `enough(lines)` holds, then Ctrl-C it."""
    p = subprocess.Popen([*CMD, "inspect", *args], preexec_fn=default_sigint, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         cwd=ROOT)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        while not enough(lines) and time.monotonic() < deadline and p.poll() is None:
            line = p.stdout.readline()
            if line:
                lines.append(line)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, "".join(lines) + out, err


def test_inspect_watch_refreshes_with_rates_until_ctrl_c() -> None:
    name = new_vm_name("e2e")
    with running(name, *SMALL, "-s", "4k"):
        code, out, err = _watch_until([name, "--watch", "--json", "--interval", "0.3"], lambda ls: len(ls) >= 2)
        assert code == 0, err
        assert "Traceback" not in err
        snaps = [json.loads(line) for line in out.splitlines()]
        assert len(snaps) >= 2
        assert snaps[0]["rates"] is None
        assert set(snaps[1]["rates"]) == {"faults_per_s", "retries_per_s", "cas_failures_per_s", "accesses_per_s"}
        # the plain form too (stdout is not a terminal: one summary after another)
        code, out, err = _watch_until([name, "--watch", "--interval", "0.3"],
                                      lambda ls: "".join(ls).count(f"VM {name}:") >= 2 and "rates" in "".join(ls))
        assert code == 0, err
        assert out.count(f"VM {name}:") >= 2 and "rates" in out


# ---------------------------------------------------------------- processes that die

def _vcpu_pid(name: str, vcpu: int = 0) -> int:
    def pid() -> int:
        res = shmmmu("inspect", name, "--json")
        if res.returncode != 0:
            return 0
        w = json.loads(res.stdout)["workers"][vcpu]
        return w["pid"] if w["alive"] and w["status"] == "ready" else 0
    return wait_for(pid, f"vCPU {vcpu} of {name} to start")


def test_sigkill_of_a_vcpu_while_kept_ends_the_run() -> None:
    name = new_vm_name("e2e")
    with running(name, *SMALL, "-s", "4k") as vm:
        pid = _vcpu_pid(name, 1)
        os.kill(pid, signal.SIGKILL)
        rc = vm.proc.wait(15)
        err = vm.stderr()
        assert rc == 1, err
        assert "Traceback" not in err
        assert "vCPU 1" in err and f"pid {pid}" in err and "killed by SIGKILL" in err, err
        assert not leftovers(name)


def test_sigkill_of_a_vcpu_mid_workload_ends_the_run() -> None:
    name = new_vm_name("e2e")
    with running(name, "-b", "8M", "-i", "100000", "-w", "random", keep=False, ready="") as vm:
        wait_for(lambda: leftovers(name), f"VM {name} to appear", vm.proc, vm.err)
        pid = _vcpu_pid(name, 0)
        wait_for(lambda: inspect_json(name)["run"]["iteration"] >= 2, "the workload to run")
        assert vm.proc.poll() is None, "the run ended before the kill"
        os.kill(pid, signal.SIGKILL)
        rc = vm.proc.wait(15)
        err = vm.stderr()
        assert rc == 1, err
        assert "Traceback" not in err
        line = [ln for ln in err.splitlines() if ln.startswith("shmmmu: error:")]
        assert line and "vCPU 0" in line[0] and "killed by SIGKILL" in line[0], err
        assert not leftovers(name)


def test_ctrl_c_mid_workload_leaves_nothing() -> None:
    name = new_vm_name("e2e")
    with running(name, "-b", "8M", "-i", "100000", "-w", "random", keep=False, ready="") as vm:
        wait_for(lambda: leftovers(name), f"VM {name} to appear", vm.proc, vm.err)
        _vcpu_pid(name, 1)
        worker_pids = [w["pid"] for w in inspect_json(name)["workers"] if w["pid"]]
        rc = vm.stop(signal.SIGINT)
        assert rc == 130, vm.stderr()
        assert "Traceback" not in vm.stderr()
        assert not leftovers(name)
        from shmmmu.inspect import pid_alive
        assert not any(pid_alive(p) for p in worker_pids)


def test_sigterm_stops_a_kept_vm() -> None:
    name = new_vm_name("e2e")
    with running(name, *SMALL) as vm:
        rc = vm.stop(signal.SIGTERM)
        assert rc == 128 + signal.SIGTERM
        assert not leftovers(name)


# ---------------------------------------------------------------- user errors

@pytest.mark.parametrize("args,words", [
    (["-b", "12Q"], ["bad size '12Q'"]),
    (["-b", "900G"], ["more guest memory than this emulator maps"]),
    (["-v", "0"], ["--vcpus must be at least 1"]),
    (["-i", "0"], ["--iterations"]),
    (["-s", "3m"], ["unknown backing"]),
    (["--lock-mode", "sloppy"], ["unknown lock mode"]),
    (["-w", "trace"], ["--trace FILE"]),
])
def test_run_usage_errors(args: list[str], words: list[str]) -> None:
    name = new_vm_name("e2e")
    res = shmmmu("run", "--name", name, *args)
    assert_one_line_error(res, *words)
    assert res.stdout == ""
    assert not leftovers(name)


@pytest.mark.parametrize("args,words", [
    (["inspect", "no-such-vm-e2e"], ["no VM named 'no-such-vm-e2e' is running (shmmmu ls lists them)"]),
    (["inspect", "bad/name"], ["invalid VM name"]),
    (["inspect", "no-such-vm-e2e", "--gfn", "zz"], ["bad GFN 'zz'"]),
    (["inspect", "no-such-vm-e2e", "--tree", "--check"], ["--tree", "--check"]),
    (["inspect", "no-such-vm-e2e", "--watch"], ["no VM named"]),
    (["rm", "no-such-vm-e2e"], ["no VM named 'no-such-vm-e2e'"]),
    (["rm"], ["--stale or --all"]),
    (["rm", "x", "--stale"], ["--stale or --all"]),
])
def test_inspect_ls_rm_usage_errors(args: list[str], words: list[str]) -> None:
    assert_one_line_error(shmmmu(*args), *words)


def test_a_name_in_use_is_refused_and_the_first_vm_survives() -> None:
    name = new_vm_name("e2e")
    with running(name, *SMALL) as vm:
        res = shmmmu("run", "--name", name, *SMALL)
        assert_one_line_error(res, "already exists")
        assert shmmmu("inspect", name).returncode == 0
        assert vm.proc.poll() is None
        rc = vm.stop()
        assert rc == 130
    assert not leftovers(name)


class Vanished(Exception):
    """A segment this test made was unlinked by someone else meanwhile."""


def retry_if_vanished(scenario, name_tag: str = "e2e", tries: int = 3) -> None:
    """Run `scenario(name)`; a stale or foreign segment is what every concurrent test session's leak
    guard removes as its own leftover, so one may vanish under us: try again with a new name."""
    for _ in range(tries):
        name = new_vm_name(name_tag)
        try:
            scenario(name)
            return
        except Vanished:
            continue
        finally:
            unlink_all(name)
    pytest.skip("a concurrent test session removed this test's segment every time")


def present(name: str) -> None:
    if not leftovers(name):
        raise Vanished(name)


def _fake_segment(name: str, magic: int, version: int) -> None:
    shm = posix_ipc.SharedMemory(segment_name(name), posix_ipc.O_CREX, mode=0o600, size=HEADER_BYTES)
    try:
        with mmap.mmap(shm.fd, HEADER_BYTES) as mm:
            h = np.frombuffer(mm, dtype=np.uint64, count=8)
            h[H_VERSION] = version
            h[H_SIZE] = HEADER_BYTES
            h[H_MAGIC] = magic
            del h
    finally:
        shm.close_fd()


def test_a_region_from_another_version_is_refused_then_removed() -> None:
    def scenario(name: str) -> None:
        _fake_segment(name, MAGIC, LAYOUT_VERSION + 98)
        res = shmmmu("inspect", name)
        present(name)
        assert_one_line_error(res, f"layout version {LAYOUT_VERSION + 98}", f"reads version {LAYOUT_VERSION}")
        res = shmmmu("inspect", name, "--tree")
        present(name)
        assert_one_line_error(res, "layout version")
        res = shmmmu("run", "--name", name, *SMALL)
        present(name)
        assert_one_line_error(res, "already exists")
        res = shmmmu("ls", "--json")
        mine = [e for e in json.loads(res.stdout) if e["name"] == name]
        present(name)
        assert mine and mine[0]["state"] == "other-version"
        res = shmmmu("rm", name)
        if "no VM named" in res.stderr:
            raise Vanished(name)
        assert res.returncode == 0, res.stderr
        assert "warning" in res.stderr and "removing it anyway" in res.stderr and "Traceback" not in res.stderr
        assert not leftovers(name)
    retry_if_vanished(scenario)


def test_a_foreign_segment_is_refused_then_removed() -> None:
    def scenario(name: str) -> None:
        _fake_segment(name, 0x1234, 7)
        res = shmmmu("inspect", name)
        present(name)
        assert_one_line_error(res, "is not a shmmmu region")
        res = shmmmu("rm", name)
        if "no VM named" in res.stderr:
            raise Vanished(name)
        assert res.returncode == 0, res.stderr
        assert "warning" in res.stderr and "Traceback" not in res.stderr
        assert not leftovers(name)
    retry_if_vanished(scenario)


def test_a_stale_vm_is_listed_and_removed_without_force() -> None:
    def scenario(name: str) -> None:
        code = ("import os, sys\n"
                "from shmmmu.layout import MemslotSpec, VMConfig\n"
                "from shmmmu.vm import create_vm\n"
                f"vm = create_vm(VMConfig(name={name!r}, n_vcpus=1, memslots=[MemslotSpec(0, 512, 1)]))\n"
                "sys.stdout.flush(); os._exit(0)\n")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT)
        res = shmmmu("ls", "--json")
        mine = [e for e in json.loads(res.stdout) if e["name"] == name]
        present(name)
        assert mine and mine[0]["state"] == "stale" and mine[0]["live"] is False
        from shmmmu.inspect import list_vms
        stale = [e.name for e in list_vms() if not e.live]          # what rm --stale removes
        present(name)
        assert name in stale
        res = shmmmu("inspect", name)
        present(name)
        assert res.returncode == 0 and "stale: not running" in res.stdout
        res = shmmmu("rm", name)
        if "no VM named" in res.stderr:
            raise Vanished(name)
        assert res.returncode == 0, res.stderr
        assert f"removed {name} (stale)" in res.stdout
        assert not leftovers(name)
    retry_if_vanished(scenario)


def test_rm_force_unlinks_a_live_vm_and_it_still_stops_cleanly() -> None:
    name = new_vm_name("e2e")
    with running(name, *SMALL) as vm:
        res = shmmmu("rm", name, "--force")
        assert res.returncode == 0, res.stderr
        assert "live" in res.stderr
        assert not leftovers(name)
        rc = vm.stop()
        assert rc == 130, vm.stderr()
        assert "Traceback" not in vm.stderr()
    assert not leftovers(name)


def test_workers_get_a_one_thread_openblas_unless_the_user_chose_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy's OpenBLAS pool spins for ~40 ms after its import, on the CPUs a run's vCPUs need: workers
    start without it, and a user's own setting is passed through."""
    from shmmmu.spawn import worker_env
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    assert worker_env()["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    assert worker_env()["OPENBLAS_NUM_THREADS"] == "4"


# ---------------------------------------------------------------- a closed pipe, a command group alone

def into_closed_pipe(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The command with its stdout a pipe whose reader is gone (what `| head` leaves once head exits)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([*CMD, *args], stdout=w, stderr=subprocess.PIPE, text=True, timeout=timeout,
                              cwd=ROOT, stdin=subprocess.DEVNULL)
    finally:
        os.close(w)


def test_a_closed_pipe_ends_every_command_quietly() -> None:
    """`shmmmu ... | head`: every command ends at once, silent, with 141 (128 + SIGPIPE), as a shell reports
    a writer that SIGPIPE ended; a run it cut short leaves nothing behind (issue 21, item 1)."""
    name = new_vm_name("pipe")
    with running(name, "-b", "8M", "-i", "1", "-s", "4k"):
        for args in (("inspect", name, "--tree", "--json"), ("inspect", name), ("inspect", name, "--tree"),
                     ("inspect", name, "--gfn", "0x10"), ("inspect", name, "--check", "--json"),
                     ("ls",), ("ls", "--json"), ("--help",), ("stress", "--help"), ("stress", "--list-bugs"),
                     ("explore", "--list"), ("--version",), ("trace", "summary",
                                                             str(ROOT / "tests/data/kvmmmu.trace-cmd.txt"))):
            res = into_closed_pipe(*args)
            assert (res.returncode, res.stderr) == (141, ""), (args, res.returncode, res.stderr)
    stress = into_closed_pipe("stress", "--duration", "2", "--vcpus", "2", "--seed", "3")
    assert (stress.returncode, stress.stderr) == (141, ""), stress.stderr
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(PREFIX + "stress-") or
                f.startswith(f"sem.{PREFIX}stress-")]


def test_a_command_group_alone_is_one_line_naming_its_commands() -> None:
    """`shmmmu torture` (every group, and `shmmmu` itself): one line on stderr naming the commands, nothing on
    stdout (the usage box went there), exit 2 (issue 21, item 5)."""
    import typer.main

    from shmmmu.workers.cli import app

    root = typer.main.get_command(app)
    groups = [("shmmmu", [], root)] + [(f"shmmmu {n}", [n], c) for n, c in root.commands.items()
                                       if hasattr(c, "commands")]
    assert len(groups) >= 4                      # shmmmu, torture, bench, trace
    for path, args, group in groups:
        res = shmmmu(*args)
        assert_one_line_error(res, f"{path} needs a command: {', '.join(group.commands)}")
        assert res.stdout == "", res.stdout


# ---------------------------------------------------------------- output files

EXPLORE_FINDS = ["explore", "--bug", "zero-removed-children"]       # a finding in about a second


def output_commands(out: str) -> list[list[str]]:
    """Every command that writes a file the user names, writing `out` (a short run of each)."""
    trace = str(ROOT / "tests/data/plain.txt")
    return [["run", "--name", new_vm_name("out"), *SMALL, "--tracepoints", out],
            ["stress", "--duration", "0.5", "--vcpus", "1", "--tracepoints", out],
            [*EXPLORE_FINDS, "--svg", out], [*EXPLORE_FINDS, "--tracepoints", out],
            ["trace", "convert", trace, "-o", out]] + \
        ([["trace", "record", "-o", out, "--", "true"]] if shutil.which("valgrind") else [])


def test_an_output_path_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    """`ln -s /tmp/precious /tmp/evil.tp` by another user, then `shmmmu run --tracepoints /tmp/evil.tp`: the
    link is refused in one line before the work and the file it points at keeps its bytes (issue 21, item 8)."""
    precious = tmp_path / "precious"
    precious.write_text("keep me\n")
    evil = tmp_path / "evil.out"
    evil.symlink_to(precious)
    for args in output_commands(str(evil)):
        res = shmmmu(*args)
        assert_one_line_error(res, f"cannot write {evil}", "symbolic link")
        assert res.stdout == "", (args, res.stdout)                # refused before the work
        assert precious.read_text() == "keep me\n" and evil.is_symlink(), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.out", "precious"]
    hard = tmp_path / "hard.out"                   # a hard link is a regular file: replaced, not written into
    os.link(precious, hard)
    res = shmmmu("trace", "convert", str(ROOT / "tests/data/plain.txt"), "-o", str(hard))
    assert res.returncode == 0, res.stderr
    assert precious.read_text() == "keep me\n" and hard.stat().st_ino != precious.stat().st_ino


def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(tmp_path: Path) -> None:
    """A missing directory, a directory, a FIFO: one line, exit 2, nothing done (no report on stdout)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for out, words in ((tmp_path / "no" / "x.out", "No such file or directory"), (tmp_path, "is a directory"),
                       (fifo, "is a FIFO")):
        for args in output_commands(str(out)):
            res = shmmmu(*args)
            assert_one_line_error(res, f"cannot write {out}", words)
            assert res.stdout == "", (args, res.stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


def test_a_failing_write_is_one_line() -> None:
    """/dev/full (ENOSPC on every write): every output command says so in one line, exit 2; so does stdout
    on /dev/full.  `trace record -o /dev/full` claimed success (issue 21, items 8 and 10)."""
    for args in output_commands("/dev/full"):
        res = shmmmu(*args)
        assert_one_line_error(res, "cannot write /dev/full: No space left on device")
    with open("/dev/full", "w") as full:
        res = subprocess.run([*CMD, "ls"], stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert_one_line_error(res, "cannot write the output: No space left on device")


# ---------------------------------------------------------------- run without --name

def test_runs_without_a_name_at_once_each_take_the_next_free_name(tmp_path: Path) -> None:
    """Three `shmmmu run` without --name started together: demo, demo-2 and demo-3 (creation is O_EXCL: a
    taken name sends a creator on to the next), each told on stderr; the second failed before (issue 21,
    item 4)."""
    errs = [tmp_path / f"{k}.err" for k in range(3)]
    procs = [subprocess.Popen([*CMD, "run", "--keep", *SMALL], preexec_fn=default_sigint, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=e.open("w"), stdin=subprocess.DEVNULL)
             for e in errs]
    try:
        for p, e in zip(procs, errs):
            wait_for(lambda: "kept alive" in e.read_text(), "the VM to be kept alive", p, e)
        names = sorted(re.search(r"^VM (\S+) is kept alive", e.read_text(), re.M).group(1) for e in errs)
        assert names == ["demo", "demo-2", "demo-3"], [e.read_text() for e in errs]
        for e in errs:
            text = e.read_text()
            if "VM demo " not in text:
                assert "shmmmu: the VM name demo is taken: this VM is " in text, text
        ls = json.loads(shmmmu("ls", "--json").stdout)
        assert sorted(v["name"] for v in ls if v["name"].startswith("demo")) == names
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        rcs = [p.wait(30) for p in procs]
    assert rcs == [130, 130, 130]
    for n in ("demo", "demo-2", "demo-3"):
        assert not leftovers(n)


# ---------------------------------------------------------------- tools/ against an installed shmmmu

@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the checkout's files")
def test_tools_run_against_an_installed_shmmmu(tmp_path: Path) -> None:
    """README's first command (`pip install .` into a venv), then `python tools/X.py` from the checkout:
    sweep.py and profile_populate.py put the checkout first on sys.path and died with ModuleNotFoundError:
    shmmmu._atomics (only an editable install builds the helpers in the tree); bench_inspect.py and
    detect_times.py ran `-m workers.cli` from the checkout (issue 21, item 3)."""
    src = source_copy(tmp_path / "checkout")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    py = str(venv / "bin" / "python")
    inst = subprocess.run([py, "-m", "pip", "install", "-q", str(src)], capture_output=True, text=True, timeout=600)
    if inst.returncode and ("No matching distribution" in inst.stderr or "connection" in inst.stderr.lower()):
        pytest.skip(f"pip cannot fetch the dependencies here: {inst.stderr.strip().splitlines()[-1]}")
    assert inst.returncode == 0, inst.stderr[-3000:]
    assert not list((src / "shmmmu").glob("*.so"))                   # the checkout stays unbuilt
    tools = sorted((src / "tools").glob("*.py"))
    assert len(tools) >= 10
    for tool in tools:
        if tool.name.startswith("_"):
            continue
        r = subprocess.run([py, str(tool), "--help"], capture_output=True, text=True, timeout=120, cwd=src)
        assert r.returncode == 0 and "usage:" in r.stdout, (tool.name, r.stderr[-2000:])
    # a tool that starts the CLI: the installed one, not the checkout it runs from
    r = subprocess.run([py, str(src / "tools" / "bench_inspect.py"), "--runs", "1", "--memory", "4M"],
                       capture_output=True, text=True, timeout=300, cwd=src)
    assert r.returncode == 0 and "shmmmu inspect NAME --check" in r.stdout, r.stderr[-2000:]
    # without shmmmu installed: one line saying what to run
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", str(bare)], check=True, capture_output=True, timeout=120)
    r = subprocess.run([str(bare / "bin" / "python"), str(src / "tools" / "sweep.py"), "--help"],
                       capture_output=True, text=True, timeout=120, cwd=src)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "pip install" in r.stderr, r.stderr


# ---------------------------------------------------------------- inspect --check of a running VM

def test_check_of_a_running_stress_vm_reports_no_violation() -> None:
    """`inspect --check` on a live `stress` VM reported 2-4 violations in 6 of 6 tries (page count against the
    tables, root counts against holders, published counters against leaves), while stress's own checkers found
    none (issue 21, item 7): what is only seen while the VM moves is in flight, never a violation.  The run is
    long enough never to end under the checks, whatever the load (it did at 14 s on a loaded machine); its own
    checkers' record is read from the live region, and Ctrl-C ends it."""
    p = subprocess.Popen([*CMD, "stress", "--duration", "900", "--vcpus", "3"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=default_sigint)
    name = f"stress-{p.pid}"
    try:
        wait_for(lambda: shmmmu("inspect", name, "--json").returncode == 0, f"{name} to be inspectable")
        results = []
        for k in range(4):
            res = shmmmu("inspect", name, "--check", *(["--json"] if k else []))
            assert p.poll() is None, "the stress run ended under the checks"
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr
            results.append(res.stdout)
        assert "!!!" not in results[0] and "check: OK" in results[0], results[0][-2000:]
        for out in results[1:]:
            d = json.loads(out)
            assert d["ok"] and d["violations"] == [], d
            if d["in_flight"]:
                assert not d["settled"] and d["busy"], d
        summary = json.loads(shmmmu("inspect", name, "--json").stdout)
        assert summary["violations"]["count"] == 0, summary["violations"]    # stress's own checkers: none
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=HANG_GUARD_S)
        assert "interrupted (SIGINT); every worker stopped and the VM removed" in err, out[-2000:] + err[-2000:]
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            p.wait(30)


def test_check_of_a_vm_frozen_at_its_failing_step_reports_the_violations() -> None:
    """`explore --keep` holds its region still at the failing step: a view that stays the same is taken as it
    is, and what it shows is a violation (exit 1), not in flight."""
    p = subprocess.Popen([*CMD, "explore", "--bug", "link-after-publish", "--keep"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=default_sigint)
    try:
        line = p.stderr.readline()
        name = re.search(r"kept as VM (\S+):", line).group(1)
        res = shmmmu("inspect", name, "--check", "--json")
        assert res.returncode == 1, res.stdout + res.stderr
        d = json.loads(res.stdout)
        assert d["settled"] and any(v.startswith("table-leak") for v in d["violations"]), d
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=60)
