"""Hardening (issue 16): the real `shmmmu` command against hostile /dev/shm entries, lying headers, other users,
a small or read-only /dev/shm, every terminating signal, name reuse, bad numbers and stalls.

Each scenario runs in a private mount namespace with its own small tmpfs on /dev/shm (`unshare -m`, as
root), so `rm --stale` and `rm --all` see only what the scenario made and nothing can leak into the real
/dev/shm; the scenarios that need a second user run commands as `nobody` (the interpreter under /root is
made reachable inside the namespace only).  A scenario is a function below (`scenario_*`) that the test
runs inside the namespace and that returns what it saw as JSON; the test asserts on it.  Without the
privileges for that, the test is skipped with the reason.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from shmmmu.region import PREFIX

ROOT = Path(__file__).resolve().parents[2]
CMD = [sys.executable, "-m", "shmmmu.workers.cli"]
OTHER_USER = "nobody"


# ---------------------------------------------------------------- inside the namespace

def cli(*args: str, timeout: float = 60, user: str | None = None, check_time: bool = True) -> dict[str, Any]:
    """Run the CLI; {'rc', 'out', 'err'}; rc 'timeout' if it hung (its process group is killed)."""
    cmd = [*CMD, *args]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return {"rc": "timeout", "out": out, "err": err, "args": list(args)}
    return {"rc": p.returncode, "out": out, "err": err, "args": list(args)}


def spawn(*args: str, user: str | None = None) -> subprocess.Popen[str]:
    cmd = [*CMD, *args]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            stdin=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                                       signal.SIG_DFL))


def shm() -> list[str]:
    return sorted(os.listdir("/dev/shm"))


def log_dirs(name: str) -> list[str]:
    return sorted(d for d in os.listdir(tempfile.gettempdir()) if d.startswith(f"{PREFIX}{name}-"))


def wait_running(name: str, timeout: float = 300, user: str | None = None) -> dict[str, Any]:
    """Poll `inspect --json` until every vCPU of the VM reports ready; its summary."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = cli("inspect", name, "--json", timeout=30, user=user)
        if r["rc"] == 0:
            s = json.loads(r["out"])
            vcpus = [w for w in s["workers"] if w["role"].startswith("vCPU")]
            if vcpus and all(w["status"] == "ready" and w["pid"] for w in vcpus):
                return s
        time.sleep(0.2)
    raise AssertionError(f"VM {name} did not start: {r}")


def finish(p: subprocess.Popen[str], sig: int | None = signal.SIGINT, timeout: float = 60) -> dict[str, Any]:
    if sig is not None and p.poll() is None:
        p.send_signal(sig)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        return {"rc": "timeout", "out": out, "err": err}
    return {"rc": p.returncode, "out": out, "err": err}


def reach_python_as_other_user() -> None:
    """Inside the namespace: make the interpreter (under /root, mode 0700) reachable by OTHER_USER."""
    real = sys.base_prefix
    if not real.startswith("/root/"):
        return
    top = "/root/" + real[len("/root/"):].split("/")[0]           # e.g. /root/.pyenv
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/mnt"], check=True)
    os.mkdir("/mnt/keep")
    subprocess.run(["mount", "--bind", top, "/mnt/keep"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=755", "tmpfs", "/root"], check=True)
    os.mkdir(top)
    subprocess.run(["mount", "--bind", "/mnt/keep", top], check=True)


def _enter(scenario: str, shm_size: str, arg: str) -> None:
    """The namespace's main: a fresh tmpfs on /dev/shm, then the scenario; its result as JSON on stdout."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={shm_size},mode=1777", "tmpfs", "/dev/shm"], check=True)
    result = globals()[scenario](arg)
    sys.stdout.write("\n@@RESULT@@" + json.dumps(result) + "\n")


# ---------------------------------------------------------------- from the test

_NS_OK: list[str] = []


def namespaces_usable() -> str:
    """'' if a private mount namespace with its own /dev/shm can be made here, else why not."""
    if _NS_OK:
        return _NS_OK[0]
    why = ""
    if os.geteuid() != 0:
        why = "needs root for unshare -m and a private tmpfs on /dev/shm"
    else:
        try:
            r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                               capture_output=True, text=True, timeout=30)
            if r.returncode:
                why = f"unshare -m / mount not permitted here: {r.stderr.strip()}"
        except (OSError, subprocess.TimeoutExpired) as e:
            why = f"unshare not usable: {e}"
    _NS_OK.append(why)
    return why


def in_namespace(scenario: str, shm_size: str = "64m", arg: str = "", timeout: float = 240) -> Any:
    why = namespaces_usable()
    if why:
        pytest.skip(why)
    here = str(Path(__file__).resolve().parent)           # this file's folder: the scenario imports it by name
    code = (f"import sys; sys.path.insert(0, {here!r}); import test_hardening as t; "
            f"t._enter({scenario!r}, {shm_size!r}, {arg!r})")
    r = subprocess.run(["unshare", "-m", sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    if "@@RESULT@@" not in r.stdout:
        raise AssertionError(f"scenario {scenario} failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n"
                             f"{r.stderr[-3000:]}")
    return json.loads(r.stdout.split("@@RESULT@@", 1)[1])


def other_user_usable() -> str:
    import pwd
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        return f"no user {OTHER_USER!r} to act as a second user"
    if subprocess.run(["which", "runuser"], capture_output=True).returncode:
        return "runuser is not installed"
    return ""


def one_line_error(r: dict[str, Any], code: int = 2) -> str:
    """Assert the documented usage error: exit `code`, exactly one line `shmmmu: error: ...`, no traceback."""
    assert r["rc"] == code, r
    lines = [ln for ln in r["err"].splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("shmmmu: error: "), r
    assert "Traceback" not in r["err"] + r["out"], r
    return lines[0]


def no_traceback(r: dict[str, Any]) -> None:
    assert r["rc"] != "timeout", r
    assert "Traceback" not in r["err"] + r["out"] and "Error:" not in r["err"].replace("error:", ""), r


# ---------------------------------------------------------------- hostile /dev/shm entries

def scenario_hostile(kind: str) -> dict[str, Any]:
    path = f"/dev/shm/{PREFIX}{kind}"
    if kind == "dir":
        os.mkdir(path)
    elif kind == "symlink":
        os.symlink("/etc/passwd", path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
    elif kind == "semdir":                     # a directory where a semaphore would be
        os.mkdir(f"/dev/shm/sem.{PREFIX}semdir.mmu_lock.q")
    before = shm()
    out = {"runs": [cli(*a, timeout=30) for a in (
        ("ls",), ("ls", "--json"), ("inspect", kind), ("inspect", kind, "--check"), ("inspect", kind, "--tree"),
        ("rm", kind), ("rm", "--stale"), ("rm", "--all", "--force"))]}
    out["after"], out["before"] = shm(), before
    return out


@pytest.mark.parametrize("kind", ["dir", "symlink", "fifo", "socket", "semdir"])
def test_hostile_entries_are_reported_never_opened(kind: str) -> None:
    """A directory, link, FIFO or socket under our prefix: listed as not ours, never opened (a FIFO would
    block), never removed; every command answers at once without a traceback."""
    res = in_namespace("scenario_hostile", "8m", kind)
    for r in res["runs"]:
        no_traceback(r)
        assert r["rc"] in (0, 2), r
    ls, ls_json, insp, check, tree, rm_name, rm_stale, rm_all = res["runs"]
    assert res["after"] == res["before"]                 # nothing removed
    if kind != "semdir":
        assert re.search(rf"^{kind}\s.*not-ours", ls["out"], re.M), ls
        assert json.loads(ls_json["out"])[0]["state"] == "not-ours"
        for r in (insp, check, tree):
            assert "not a shared-memory object shmmmu made" in one_line_error(r), r
        assert "not made by shmmmu: left alone" in one_line_error(rm_name), rm_name
        assert "skipping" in rm_stale["err"] and "skipping" in rm_all["err"]


# ---------------------------------------------------------------- headers that parse but lie

def scenario_lying_header(how: str) -> dict[str, Any]:
    import mmap

    import numpy as np

    from shmmmu import region as R
    from shmmmu.layout import section_shapes
    from shmmmu.run import RunOptions
    from shmmmu.vm import create_vm

    name = "liar"
    cfg = RunOptions(name=name, vcpus=1, memory=1 << 20, iterations=1).config()
    if how == "sparse-64g":
        # a consistent header whose tables claim 64 GiB, in a sparse file: nothing may try to copy it
        c = cfg.derived()
        c.n_tables = (64 << 30) // (512 * 8)
        c.retire_ring = 256
        sections, size = R.plan_sections(section_shapes(c))
        doc = {"layout_version": R.LAYOUT_VERSION, "config": c.to_json(),
               "sections": [{"name": s.name, "offset": s.offset, "shape": list(s.shape)} for s in sections],
               "semaphores": []}
        fd = os.open(f"/dev/shm/{PREFIX}{name}", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, R.HEADER_BYTES)
        os.close(fd)
        blob = json.dumps(doc).encode()
    else:
        vm = create_vm(cfg)
        vm.close()                             # stays in /dev/shm (the namespace's), its creator gone soon
        fd = os.open(f"/dev/shm/{PREFIX}{name}", os.O_RDWR)
        mm = mmap.mmap(fd, R.HEADER_BYTES)
        os.close(fd)
        h = np.frombuffer(mm, dtype=np.uint64, count=8)
        doc = json.loads(bytes(mm[R.H_JSON_OFFSET:R.H_JSON_OFFSET + int(h[R.H_JSON_LEN])]))
        del h
        if how == "sections-int":
            doc["sections"] = 5
        elif how == "section-noname":
            del doc["sections"][0]["name"]
        elif how == "semaphores-int":
            doc["semaphores"] = 7
        elif how == "shape-negative":
            next(s for s in doc["sections"] if s["name"] == "tables")["shape"] = [-1, 512]
        elif how == "bits-disagree":
            doc["config"]["bits"] = 3          # the tables have 512 entries
        elif how == "config-types":
            doc["config"]["n_vcpus"] = "two"
            doc["config"]["memslots"] = 5
        blob = json.dumps(doc).encode()
    h = np.frombuffer(mm, dtype=np.uint64, count=8)
    mm[R.H_JSON_OFFSET:R.H_JSON_OFFSET + len(blob)] = blob
    h[R.H_JSON_LEN] = len(blob)
    if how == "sparse-64g":
        h[R.H_VERSION], h[R.H_SIZE], h[R.H_MAGIC] = R.LAYOUT_VERSION, size, R.MAGIC
    h[R.H_PID] = 0                             # no creator: stale
    del h
    mm.close()
    runs = [cli(*a, timeout=60) for a in (("ls",), ("ls", "--json"), ("inspect", name), ("inspect", name, "--check"),
                                          ("inspect", name, "--tree"), ("inspect", name, "--gfn", "0x100"),
                                          ("rm", name))]
    return {"runs": runs, "after": shm()}


@pytest.mark.parametrize("how", ["sections-int", "section-noname", "semaphores-int", "shape-negative",
                                 "bits-disagree", "config-types", "sparse-64g"])
def test_lying_headers_are_one_line_and_removable(how: str) -> None:
    res = in_namespace("scenario_lying_header", "64m", how)
    ls, ls_json, *inspects, rm = res["runs"]
    assert ls["rc"] == 0 and ls_json["rc"] == 0, (ls, ls_json)
    no_traceback(ls)
    for r in inspects:
        line = one_line_error(r)
        assert "damaged header" in line or "cannot read" in line or "memory" in line, r
    assert rm["rc"] == 0 and "removed liar" in rm["out"], rm
    assert res["after"] == []


WRONG_VALUES: list[Any] = [7, "nope", [5, "nope"], None, 10 ** 30, -1, 0.5, True, {"a": 1}]


def _config_fields(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    """The path of every field of a header's config: its own, the workload's, the first memslot's."""
    cfg = doc["config"]
    return ([(k,) for k in cfg] + [("workload", k) for k in cfg["workload"]]
            + [("memslots", 0, k) for k in cfg["memslots"][0]])


def _mutated(doc: dict[str, Any], path: tuple, value: Any) -> dict[str, Any]:
    d = json.loads(json.dumps(doc))
    node = d["config"]
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return d


def scenario_config_mutations(_: str) -> dict[str, Any]:
    """Every field of a real header's config set to each of WRONG_VALUES in turn: the library's inspect path
    (attach, copy, summary, tree, checks, ls) either refuses the region with a RegionError (the CLI's one line,
    exit 2) or reads it; anything else raised is a crash (the CLI's traceback).  Then the CLI itself on a few."""
    import mmap

    import numpy as np

    from shmmmu import inspect as insp
    from shmmmu import region as R
    from shmmmu.run import RunOptions
    from shmmmu.vm import create_vm

    name = "liar"
    seg = f"/dev/shm/{PREFIX}{name}"
    vm = create_vm(RunOptions(name=name, vcpus=1, memory=1 << 20, iterations=1).config())
    vm.close()
    with open(seg, "rb") as f:
        image = f.read()
    h = np.frombuffer(image, dtype=np.uint64, count=8)
    doc = json.loads(image[R.H_JSON_OFFSET:R.H_JSON_OFFSET + int(h[R.H_JSON_LEN])])

    def write(d: dict[str, Any]) -> None:
        with open(seg, "r+b") as f:
            mm = mmap.mmap(f.fileno(), R.HEADER_BYTES)
            mm[:] = image[:R.HEADER_BYTES]
            blob = json.dumps(d).encode()
            mm[R.H_JSON_OFFSET:R.H_JSON_OFFSET + len(blob)] = blob
            hh = np.frombuffer(mm, dtype=np.uint64, count=8)
            hh[R.H_JSON_LEN] = len(blob)
            hh[R.H_PID] = 0                    # no creator: stale
            del hh
            mm.close()

    crashes, refused, read = [], 0, 0
    for path in _config_fields(doc):
        for value in WRONG_VALUES:
            write(_mutated(doc, path, value))
            try:
                try:
                    snap = insp.take_snapshot(name)
                    insp.summary_lines(insp.summary(snap))
                    insp.tree_lines(insp.tree(snap))
                    insp.run_checks(snap)
                    read += 1
                except R.RegionError:
                    refused += 1
                entry = insp.describe_vm(name)
                assert entry is not None and entry.state in ("stale", "damaged"), entry
                json.dumps(entry.to_json())
            except Exception as e:               # what the CLI would have printed as a traceback
                crashes.append(f"{'.'.join(map(str, path))}={value!r}: {type(e).__name__}: {e}"[:300])
    runs = []
    for path, value in ((("bugs",), [5, "nope"]), (("n_vcpus",), "two"), (("workload", "pages"), None),
                        (("memslots", 0, "npages"), 10 ** 30), (("lock_mode",), [1]), (("seed",), -1)):
        write(_mutated(doc, path, value))
        runs += [cli(*a, timeout=60) for a in (("inspect", name), ("inspect", name, "--check"), ("ls",),
                                              ("ls", "--json"))]
    runs.append(cli("rm", name, timeout=60))
    return {"crashes": crashes, "refused": refused, "read": read, "runs": runs, "after": shm()}


def test_every_config_field_of_a_header_with_a_wrong_type_is_refused_in_one_line() -> None:
    """`"config": {"bugs": [5, "nope"]}` made plain `inspect COPY` raise TypeError (1 of 60 header mutations,
    issue 21, item 9): the config is checked field by field when a region is attached, so every field of a
    real header set to an int, a string, a list, null, a huge or negative number, a float, a bool or an object
    is refused in one line (inspect, --check) or listed as damaged (ls), never a traceback."""
    res = in_namespace("scenario_config_mutations", "64m", timeout=600)
    assert res["crashes"] == [], "\n".join(res["crashes"])
    assert res["refused"] > 0
    *runs, rm = res["runs"]
    for insp_run, check_run, ls, ls_json in zip(runs[0::4], runs[1::4], runs[2::4], runs[3::4]):
        for r in (insp_run, check_run):
            assert "damaged header" in one_line_error(r), r
        no_traceback(ls)
        assert ls["rc"] == 0 and ls_json["rc"] == 0, (ls, ls_json)
        assert json.loads(ls_json["out"])[0]["state"] == "damaged", ls_json
    assert rm["rc"] == 0 and "removed liar" in rm["out"], rm
    assert res["after"] == []


# ---------------------------------------------------------------- other users

def scenario_other_users_vm(_: str) -> dict[str, Any]:
    """Root's live VM, seen by another user: listed as another user's, skipped by rm with a note."""
    reach_python_as_other_user()
    p = spawn("stress", "-d", "60", "-v", "1")
    name = f"stress-{p.pid}"
    wait_running(name)
    runs = [cli(*a, user=OTHER_USER, timeout=30) for a in (("ls",), ("ls", "--json"), ("inspect", name),
                                                           ("rm", "--stale"), ("rm", "--all", "--force"),
                                                           ("rm", name))]
    still = shm()
    end = finish(p)
    return {"name": name, "runs": runs, "still": still, "end": end, "after": shm(), "logs": log_dirs(name)}


def test_another_users_live_vm_is_listed_as_such_and_skipped() -> None:
    why = other_user_usable()
    if why:
        pytest.skip(why)
    res = in_namespace("scenario_other_users_vm")
    ls, ls_json, insp, rm_stale, rm_all, rm_name = res["runs"]
    name = res["name"]
    for r in res["runs"]:
        no_traceback(r)
    assert re.search(rf"^{name}\s.*other-user.*another user's VM", ls["out"], re.M), ls
    entry = json.loads(ls_json["out"])[0]
    assert entry["state"] == "other-user" and entry["live"], entry
    assert "belongs to user root" in one_line_error(insp), insp
    for r in (rm_stale, rm_all):
        assert r["rc"] == 0 and f"skipping {name} (other-user)" in r["err"], r
    assert f"cannot remove {name} (other-user): another user's VM" in one_line_error(rm_name), rm_name
    assert f"{PREFIX}{name}" in res["still"]             # untouched while it ran
    assert res["end"]["rc"] == 130 and res["after"] == [] and res["logs"] == [], res["end"]


def scenario_foreign_semaphore(_: str) -> dict[str, Any]:
    """Root made a semaphore under the name another user's VM needs: that user's run says so, leaks nothing."""
    import posix_ipc
    reach_python_as_other_user()
    s = posix_ipc.Semaphore(f"/{PREFIX}victim.mmu_lock.w", posix_ipc.O_CREX, mode=0o600)
    s.close()
    r = cli("run", "--name", "victim", "-b", "1M", "-i", "1", user=OTHER_USER)
    return {"run": r, "after": shm(), "logs": log_dirs("victim")}


def test_semaphore_precreated_by_another_user_is_one_line_and_leaks_nothing() -> None:
    why = other_user_usable()
    if why:
        pytest.skip(why)
    res = in_namespace("scenario_foreign_semaphore")
    line = one_line_error(res["run"])
    assert f"sem.{PREFIX}victim.mmu_lock.w already exists" in line and "belongs to user root" in line, line
    assert res["after"] == [f"sem.{PREFIX}victim.mmu_lock.w"], res        # only root's own semaphore is left
    assert res["logs"] == []


# ---------------------------------------------------------------- /dev/shm full, read-only, too small

def scenario_shm_unusable(how: str) -> dict[str, Any]:
    if how == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", "/dev/shm"], check=True)
    elif how == "no-inodes":
        subprocess.run(["mount", "-o", "remount,nr_inodes=4", "/dev/shm"], check=True)
    elif how == "not-writable":
        reach_python_as_other_user()
        os.chmod("/dev/shm", 0o755)
    user = OTHER_USER if how == "not-writable" else None
    runs = [cli(*a, user=user, timeout=60) for a in (
        ("run", "--name", "full", "-b", "1M", "-i", "1"), ("stress", "-d", "1", "-v", "1"),
        ("torture", "lock", "-d", "1"), ("torture", "rcu", "-d", "1"))]
    return {"runs": runs, "after": shm(), "logs": log_dirs("")}


@pytest.mark.parametrize("how", ["read-only", "no-inodes", "not-writable"])
def test_unusable_dev_shm_is_one_line(how: str) -> None:
    if how == "not-writable":
        why = other_user_usable()
        if why:
            pytest.skip(why)
    res = in_namespace("scenario_shm_unusable", "64m", how)
    words = {"read-only": "mounted read-only", "no-inodes": "out of space or inodes",
             "not-writable": "not writable by this user"}[how]
    for r in res["runs"]:
        assert words in one_line_error(r), r
    assert res["after"] == [] and res["logs"] == []


def scenario_small_shm(_: str) -> dict[str, Any]:
    return {"runs": [cli("stress", "-d", "2", "-v", "1", timeout=60),
                     cli("run", "--name", "big", "-b", "64M", "-i", "1", timeout=60)], "after": shm(),
            "logs": log_dirs("")}


def test_dev_shm_smaller_than_the_segment_says_how_big_it_must_be() -> None:
    """Docker's /dev/shm is 64 MiB; here 256 KiB: reserved up front, one line with the size needed, no SIGBUS."""
    res = in_namespace("scenario_small_shm", "256k")
    for r in res["runs"]:
        line = one_line_error(r)
        assert re.search(r"/dev/shm must be at least \d+ MiB", line), line
        assert "Bus error" not in r["err"]
    assert res["after"] == [] and res["logs"] == []


# ---------------------------------------------------------------- signals

def scenario_signal(signame: str) -> dict[str, Any]:
    p = spawn("stress", "-d", "60", "-v", "2")
    name = f"stress-{p.pid}"
    wait_running(name)
    end = finish(p, getattr(signal, signame))
    return {"end": end, "after": shm(), "logs": log_dirs(name)}


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGXCPU", "SIGUSR1", "SIGALRM"])
def test_every_terminating_signal_cleans_up(signame: str) -> None:
    res = in_namespace("scenario_signal", "64m", signame)
    end = res["end"]
    assert end["rc"] == 128 + getattr(signal, signame), end
    assert f"interrupted ({signame}); every worker stopped and the VM removed" in end["err"], end
    assert "Traceback" not in end["err"]
    assert res["after"] == [] and res["logs"] == [], res


# A signal that comes due inside a teardown (a SIGINT deferred by MMU code whose recheck lands in the VM's
# context exit): the CLI in a child whose trace hook raises SIGINT at the first line of VM.__exit__.
TEARDOWN_DRIVER = """
import os, signal, sys
from shmmmu.workers import cli
import shmmmu.vm
target = shmmmu.vm.VM.__exit__.__code__
def hook(frame, event, arg):
    if event == "call" and frame.f_code is target:
        sys.settrace(None)
        os.kill(os.getpid(), signal.SIGINT)
    return None
sys.settrace(hook)
cli.main(sys.argv[1:])
"""


# The same, and the deferred interrupt's recheck (SIGALRM) then comes due at the first line of main()'s
# epilogue (signals.flush_output), after the command returned: under load it once landed there by chance and
# escaped main() (a traceback, status 1) in one run of 30.
TEARDOWN_LATE_DRIVER = TEARDOWN_DRIVER.replace("""target = shmmmu.vm.VM.__exit__.__code__
def hook(frame, event, arg):
    if event == "call" and frame.f_code is target:
        sys.settrace(None)
        os.kill(os.getpid(), signal.SIGINT)
    return None""", """from shmmmu.workers import signals
targets = {shmmmu.vm.VM.__exit__.__code__: signal.SIGINT, signals.flush_output.__code__: signal.SIGALRM}
def hook(frame, event, arg):
    if event == "call" and frame.f_code in targets:
        os.kill(os.getpid(), targets.pop(frame.f_code))
        if not targets:
            sys.settrace(None)
    return None""")
assert TEARDOWN_LATE_DRIVER != TEARDOWN_DRIVER


def scenario_signal_in_teardown(command: str) -> dict[str, Any]:
    command, _, late = command.partition(":")
    args = {"run": ["run", "--name", "teardown", "-b", "1M", "-i", "1"],
            "stress": ["stress", "-d", "1", "-v", "2"]}[command]
    p = subprocess.Popen([sys.executable, "-c", TEARDOWN_LATE_DRIVER if late else TEARDOWN_DRIVER, *args],
                         stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, stdin=subprocess.DEVNULL)
    end = finish(p, None, timeout=120)
    return {"end": end, "after": shm(), "logs": log_dirs("teardown") + log_dirs(f"stress-{p.pid}")}


@pytest.mark.parametrize("command", ["run", "stress", "run:late", "stress:late"])
def test_a_signal_that_comes_due_in_the_teardown_waits_for_it(command: str) -> None:
    """The teardown runs to its end (nothing left in /dev/shm or /tmp); the command still ends as
    interrupted (130, one line), after it, also when the interrupt's recheck comes due once the command has
    returned (`:late`; stress ended with a traceback and status 1 there before signals.closing())."""
    res = in_namespace("scenario_signal_in_teardown", "64m", command)
    end = res["end"]
    assert res["after"] == [] and res["logs"] == [], res
    assert end["rc"] == 130 and "Traceback" not in end["err"], end
    assert end["err"].strip().splitlines()[-1].startswith("shmmmu: interrupted (SIGINT)"), end


def scenario_sigkill(_: str) -> dict[str, Any]:
    p = spawn("stress", "-d", "60", "-v", "2")
    name = f"stress-{p.pid}"
    wait_running(name)
    p.kill()
    p.wait()
    time.sleep(0.5)                            # PR_SET_PDEATHSIG ends the workers
    ls = cli("ls", "--json")
    logs = log_dirs(name)
    watch = cli("inspect", name, "--watch", "--interval", "0.2", timeout=30)
    rm = cli("rm", "--stale")
    return {"name": name, "ls": ls, "logs_before": logs, "watch": watch, "rm": rm, "after": shm(),
            "logs": log_dirs(name)}


def test_sigkill_of_the_supervisor_leaves_what_rm_stale_removes_and_watch_stops() -> None:
    res = in_namespace("scenario_sigkill")
    name = res["name"]
    assert json.loads(res["ls"]["out"])[0]["state"] == "stale", res["ls"]
    assert len(res["logs_before"]) == 1                     # the log directory SIGKILL left behind
    assert "is stale: its supervisor" in one_line_error(res["watch"], code=1)   # not refreshing forever
    assert res["rm"]["rc"] == 0 and f"removed {name} (stale)" in res["rm"]["out"], res["rm"]
    assert "removed log directory" in res["rm"]["out"], res["rm"]
    assert res["after"] == [] and res["logs"] == []


def _catches(pid: int, sig: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(mask >> (sig - 1) & 1)


def test_ctrl_c_while_modules_load_is_one_line() -> None:
    """SIGINT at many moments after the command's first line ran (typer, numpy, the command's own modules
    loading; the output written; interpreter shutdown): never a KeyboardInterrupt traceback.  The moment
    is taken from the process itself: its handler for SIGHUP is the first thing the command installs
    (Python's own start-up, before any of our code, is out of reach)."""
    seen = []
    for k in range(10):
        p = subprocess.Popen([*CMD, "ls", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300              # a hang guard
        while not _catches(p.pid, signal.SIGHUP) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        armed = _catches(p.pid, signal.SIGHUP)
        time.sleep(0.04 * k)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        seen.append(p.returncode)
        assert armed, f"the command never installed its signal handlers (rc {p.returncode}): {err}"
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, (k, err)
        assert p.returncode in (0, 130), (k, p.returncode, err)
        if p.returncode == 130:
            assert err.strip().splitlines()[-1:] == ["shmmmu: interrupted (SIGINT)"] or \
                err.strip() == "shmmmu: interrupted", (k, err)
    assert 130 in seen                         # some landed before the end


# ---------------------------------------------------------------- name reuse, names

def scenario_name_reuse(_: str) -> dict[str, Any]:
    old = spawn("run", "--name", "same", "-b", "1M", "-i", "1", "--keep")
    wait_running("same")
    rm = cli("rm", "--force", "same")
    new = spawn("run", "--name", "same", "-b", "1M", "-i", "1", "--keep")
    wait_running("same")
    new_pid = json.loads(cli("inspect", "same", "--json")["out"])["creator_pid"]
    old_end = finish(old)                      # the old VM's teardown runs now
    ls = cli("ls", "--json")
    new_end = finish(new)
    return {"rm": rm, "old_end": old_end, "ls": ls, "new_pid": new_pid, "new": new.pid, "new_end": new_end,
            "after": shm(), "logs": log_dirs("same")}


def test_teardown_removes_only_what_it_created() -> None:
    res = in_namespace("scenario_name_reuse")
    assert res["rm"]["rc"] == 0, res["rm"]
    assert res["old_end"]["rc"] == 130, res["old_end"]
    vms = json.loads(res["ls"]["out"])
    assert [(v["name"], v["state"], v["creator_pid"]) for v in vms] == [("same", "alive", res["new"])], vms
    assert res["new_end"]["rc"] == 130 and res["after"] == [] and res["logs"] == [], res


def test_names_are_validated_whole_and_a_leading_dash_is_a_name() -> None:
    one_line_error(cli("run", "--name", "bad\n", "-b", "1M", "-i", "1"))
    one_line_error(cli("rm", "bad\n"))
    res = in_namespace("scenario_dash_name")
    assert res["run"]["rc"] == 0, res["run"]
    assert res["after"] == [] and res["logs"] == []


def scenario_dash_name(_: str) -> dict[str, Any]:
    return {"run": cli("run", "--name=-x", "-b", "1M", "-i", "1", "--json"), "after": shm(), "logs": log_dirs("-x")}


# ---------------------------------------------------------------- numbers, workloads, usage

@pytest.mark.parametrize("args, words", [
    (("run", "--memory", "inf"), "bad size 'inf'"),
    (("run", "--memory", "1e400"), "bad size '1e400'"),
    (("run", "--memory", "nan"), "bad size 'nan'"),
    (("bench", "dirty-log", "-b", "inf"), "bad size 'inf'"),
    (("inspect", "x", "--watch", "--interval", "inf"), "--interval must be a finite number"),
    (("inspect", "x", "--watch", "--interval", "nan"), "--interval must be a finite number"),
    (("run", "--seed", "-1"), "--seed must be between 0"),
    (("stress", "--seed", "-1"), "--seed must be between 0"),
    (("stress", "--lock-mode", "bogus"), "unknown lock mode 'bogus'"),
    (("stress", "--kill-every", "-1"), "--kill-every must be at least"),
    (("stress", "--kill-every", "nan"), "--kill-every must be a finite number"),
    (("stress", "--duration", "nan"), "--duration must be a finite number"),
    (("stress", "--duration", "inf"), "--duration must be a finite number"),
    (("torture", "lock", "--duration", "0"), "--duration must be at least 0.1"),
    (("torture", "lock", "--duration", "nan"), "--duration must be a finite number"),
    (("torture", "rcu", "--duration", "1e-9"), "--duration must be at least 0.1"),
    (("torture", "lock", "--readers", "100000"), "--readers must be between 0 and 64"),
    (("torture", "rcu", "--writers", "1000"), "--writers must be between 1 and 64"),
    (("torture", "lock", "--seed", "-1"), "--seed must be between 0"),
    (("run", "--stall-timeout", "nan"), "--stall-timeout must be a finite number"),
    (("run", "--iterations", str(10 ** 21)), "--iterations must be at most"),
    (("run", "-w", "stress"), "unknown workload 'stress'"),
    (("run", "--bogus"), "No such option: --bogus"),
    (("run", "--vcpus", "x"), "Invalid value for '--vcpus'"),
    (("torture",), "shmmmu torture needs a command"),
    (("bench",), "shmmmu bench needs a command"),
])
def test_bad_numbers_and_usage_are_one_line(args: tuple[str, ...], words: str) -> None:
    r = cli(*args, timeout=60)
    assert words in one_line_error(r), r
    assert "Usage:" not in r["err"] and "╭" not in r["err"]


# ---------------------------------------------------------------- stalls and stale state

def scenario_stopped_vcpu(_: str) -> dict[str, Any]:
    p = spawn("stress", "-d", "60", "-v", "2")
    name = f"stress-{p.pid}"
    s = wait_running(name)
    victim = next(w["pid"] for w in s["workers"] if w["role"] == "vCPU 0")
    os.kill(victim, signal.SIGSTOP)
    try:
        insp = cli("inspect", name)
        js = json.loads(cli("inspect", name, "--json")["out"])
    finally:
        os.kill(victim, signal.SIGCONT)
    end = finish(p)
    return {"inspect": insp, "json": js, "victim": victim, "end": end, "after": shm(), "logs": log_dirs(name)}


def test_a_stopped_vcpu_is_not_shown_alive() -> None:
    res = in_namespace("scenario_stopped_vcpu")
    row = next(ln for ln in res["inspect"]["out"].splitlines() if re.match(rf"\s+0\s+vCPU 0\s+{res['victim']}", ln))
    assert "stopped" in row and "alive" not in row, row
    w = next(w for w in res["json"]["workers"] if w["role"] == "vCPU 0")
    assert w["process"] == "stopped" and not w["alive"], w
    assert res["end"]["rc"] == 130 and res["after"] == [] and res["logs"] == [], res


def scenario_run_stall(_: str) -> dict[str, Any]:
    p = spawn("run", "--name", "stall", "-b", "1M", "-i", "100000", "-w", "random", "--stall-timeout", "2")
    s = wait_running("stall")
    victim = next(w["pid"] for w in s["workers"] if w["role"] == "vCPU 0")
    os.kill(victim, signal.SIGSTOP)
    end = finish(p, None, timeout=60)
    return {"end": end, "after": shm(), "logs": log_dirs("stall")}


def test_run_detects_a_stalled_vcpu() -> None:
    res = in_namespace("scenario_run_stall")
    line = one_line_error(res["end"], code=1)
    assert "no-forward-progress: vCPU 0" in line and "stopped" in line, line
    assert res["after"] == [] and res["logs"] == []


def scenario_forged_pid(_: str) -> dict[str, Any]:
    """A stale VM whose header names a pid that runs but is another process (reused, or forged)."""
    import mmap

    import numpy as np

    from shmmmu import region as R
    from shmmmu.run import RunOptions
    from shmmmu.vm import create_vm
    vm = create_vm(RunOptions(name="forged", vcpus=1, memory=1 << 20, iterations=1).config())
    vm.close()
    fd = os.open(f"/dev/shm/{PREFIX}forged", os.O_RDWR)
    mm = mmap.mmap(fd, 64)
    os.close(fd)
    h = np.frombuffer(mm, dtype=np.uint64, count=8)
    h[R.H_PID] = 1                             # init runs, but did not create this region
    del h
    mm.close()
    ls = cli("ls", "--json")
    rm = cli("rm", "--stale")
    return {"ls": ls, "rm": rm, "after": shm()}


def test_a_reused_or_forged_pid_does_not_look_alive() -> None:
    res = in_namespace("scenario_forged_pid")
    vm = json.loads(res["ls"]["out"])[0]
    assert vm["creator_pid"] == 1 and vm["state"] == "stale" and not vm["live"], vm
    assert "removed forged (stale)" in res["rm"]["out"] and res["after"] == []


def scenario_keep_json(_: str) -> dict[str, Any]:
    p = spawn("run", "--name", "kept", "-b", "1M", "-i", "1", "--keep", "--json")
    wait_running("kept")
    end = finish(p)
    return {"end": end, "after": shm(), "logs": log_dirs("kept")}


def test_keep_json_prints_its_json_after_ctrl_c() -> None:
    """Ctrl-C ends the keeping: the VM is torn down and checked, its JSON printed, and the exit status is
    still that of an interrupted command (130)."""
    res = in_namespace("scenario_keep_json")
    end = res["end"]
    assert end["rc"] == 130, end
    assert end["err"].strip().splitlines()[-1] == ("shmmmu: interrupted (SIGINT); every worker stopped and "
                                                   "the VM removed"), end
    doc = json.loads(end["out"])
    assert doc["result"] == "SUCCESS" and doc["options"]["name"] == "kept"
    assert res["after"] == [] and res["logs"] == []
