"""The `shmmmu` command, run as a user runs it: in a subprocess."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import shmmmu
from shmmmu.region import segment_name

SCRIPT = Path(sys.executable).parent / "shmmmu"


def shmmmu_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmmmu.workers.cli", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.skipif(not SCRIPT.exists(), reason="the console script is not installed next to this Python")
def test_console_script_installed() -> None:
    res = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"shmmmu {shmmmu.__version__}"


def test_version() -> None:
    res = shmmmu_cmd("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "shmmmu 0.1.0\n"
    assert shmmmu.__version__ == "0.1.0"


def test_help() -> None:
    res = shmmmu_cmd("--help")
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout
    assert "run" in res.stdout and "--version" in res.stdout


def test_run_help() -> None:
    res = shmmmu_cmd("run", "--help")
    assert res.returncode == 0, res.stderr
    assert "--name" in res.stdout


def test_run_small(vm_name: str) -> None:
    res = shmmmu_cmd("run", "--name", vm_name, "-b", "8M", "-i", "2", "--json")
    assert res.returncode == 0, res.stderr
    import json
    r = json.loads(res.stdout)
    assert r["result"] == "SUCCESS" and r["faults"] > 0
    assert not Path("/dev/shm", segment_name(vm_name).lstrip("/")).exists()    # unlinked again


@pytest.mark.parametrize("bad", ["bad/name", "x" * 65, "dot.ted"])
def test_bad_name_is_one_line_and_exit_2(bad: str) -> None:
    res = shmmmu_cmd("run", "--name", bad)
    assert res.returncode == 2
    assert res.stdout == ""
    err = res.stderr.strip().splitlines()
    assert len(err) == 1, res.stderr
    assert "invalid VM name" in err[0] and "Traceback" not in res.stderr


def test_existing_vm_is_one_line_and_exit_2(vm_name: str) -> None:
    from shmmmu.region import Region
    with Region.create(vm_name, {"x": (1,)}, {}):
        res = shmmmu_cmd("run", "--name", vm_name)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "already exists" in res.stderr


def test_unknown_command_exits_2() -> None:
    res = shmmmu_cmd("frobnicate")
    assert res.returncode == 2
