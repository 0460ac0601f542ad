"""Installs: a wheel adds only `shmmmu` to site-packages and its command runs; the editable install's module names.

The programs live in the checkout's workers/ and install as `shmmmu.workers`
(pyproject.toml's package-dir): no top-level `workers` package that could clash
with another project's.  An editable install maps the name onto workers/
through setuptools' import finder, so `python -m shmmmu.workers.cli` works
from the checkout root, whose shmmmu/ has no workers/ in it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import shmmmu
from shmmmu.region import PREFIX

from conftest import new_vm_name, source_copy

ROOT = Path(__file__).resolve().parents[2]


def _venv_site(py: Path) -> Path:
    out = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return Path(out.strip())


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the checkout's files")
def test_a_wheel_adds_only_shmmmu_to_site_packages_and_its_command_runs(tmp_path: Path) -> None:
    """`pip install .` (non-editable) into a fresh venv: site-packages gains shmmmu and its dist-info, nothing
    else (no `workers`), and the installed `shmmmu run` works from anywhere and leaves nothing in /dev/shm.
    The venv sees this interpreter's dependencies through a path file, so nothing is downloaded for them."""
    src = source_copy(tmp_path / "checkout")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    py = venv / "bin" / "python"
    site = _venv_site(py)
    (site / "_shmmmu_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    before = set(os.listdir(site))

    wheels = tmp_path / "wheels"
    build = subprocess.run([str(py), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)],
                           capture_output=True, text=True, timeout=600)
    if build.returncode and ("No matching distribution" in build.stderr or "connection" in build.stderr.lower()):
        pytest.skip(f"pip cannot fetch the build requirements here: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = wheels.glob("shmmmu-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    dist_info = f"shmmmu-{shmmmu.__version__}.dist-info"
    assert {n.split("/")[0] for n in names} == {"shmmmu", dist_info}, sorted({n.split("/")[0] for n in names})
    for module in ("cli/__init__", "cli/__main__", "cli/run", "supervisor", "vcpu", "reclaimer", "notifier",
                   "torture", "explore", "signals", "common"):
        assert f"shmmmu/workers/{module}.py" in names, module

    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], capture_output=True,
                          text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-3000:]
    assert set(os.listdir(site)) - before == {"shmmmu", dist_info}
    assert not (site / "workers").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(py), "-c", "import shmmmu.workers.cli as c; print(c.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()) == site / "shmmmu" / "workers" / "cli" / "__init__.py"
    version = subprocess.run([str(py), "-m", "shmmmu.workers.cli", "--version"], cwd=elsewhere,
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout == f"shmmmu {shmmmu.__version__}\n", version.stderr

    name = new_vm_name("wheel")
    res = subprocess.run([str(venv / "bin" / "shmmmu"), "run", "--name", name, "-b", "8M", "-i", "2", "--json"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["result"] == "SUCCESS"
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(PREFIX + name) or
                f.startswith(f"sem.{PREFIX}{name}")]


def test_python_m_shmmmu_workers_cli_from_the_checkout_root() -> None:
    """With the editable install (what the tests run against), `python -m shmmmu.workers.cli` from the
    checkout root imports the checkout's shmmmu/ and its workers/ as shmmmu.workers, and runs."""
    if Path(shmmmu.__file__).resolve().parent != ROOT / "shmmmu":
        pytest.skip("shmmmu is not installed editable from this checkout")
    where = subprocess.run([sys.executable, "-c", "import shmmmu.workers.cli as c, shmmmu.workers.vcpu as v; "
                            "print(c.__file__); print(v.__file__)"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert where.returncode == 0, where.stderr
    assert [Path(p) for p in where.stdout.split()] == [ROOT / "workers" / "cli" / "__init__.py",
                                                       ROOT / "workers" / "vcpu.py"]
    res = subprocess.run([sys.executable, "-m", "shmmmu.workers.cli", "--version"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == f"shmmmu {shmmmu.__version__}\n", res.stderr
