#!/usr/bin/env python3
"""Mutation score: apply each mutant of the catalogue to a scratch copy of shmmmu, hunt it, print the table.

    .venv/bin/python tools/mutants/run.py [NAME ...] [--executions N] [--stress-seeds K] [--json FILE] [--list]
    .venv/bin/python tools/mutants/run.py --table FILE ...     # one table and score from saved verdicts

For each mutant (tools/mutants/catalogue.py), in its own scratch copy of the
installed shmmmu (the package, its C helpers and its programs) with the
mutant's edits applied, the hunt stops at the first channel that catches it:

1. `shmmmu explore --strategy dfs --preemptions 2` on every scenario (iterative
   bounding: 0, 1, then 2 preemptions), at most N executions each;
2. `shmmmu explore --strategy pct` on every scenario, N executions, seed 1;
3. `shmmmu stress` (3 vCPUs, 6 s, every checker on) for seeds 1..K.

A channel catches a mutant when it reports a finding (exit 1).  A run that
crashes (a traceback, exit 2 or worse) also kills it and says so.  Budgets are
executions and seeds, so the verdict of the explore channels does not depend
on the machine; stress is real concurrency and its verdict can (docs/stress.md).
Every run has its own SHMMMU_PREFIX; what a run leaves in /dev/shm or as a log
directory is removed, with nothing else.  Exit 0 when every mutant is killed
or explained in SURVIVORS, 1 otherwise, 2 on bad input.

The whole catalogue takes hours on two cores, so it can be run in batches, each
writing its verdicts with --json; --table then prints the table and score of
the files together (in catalogue order; a mutant missing from them is named).
`crosscheck_mutant` runs the explorer's crosscheck (shmmmu.explore.crosscheck)
in a mutant's scratch copy, for tests/model/test_mutants.py.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _installed  # noqa: E402,F401  (the installed shmmmu, or one line saying how to get it)

import argparse  # noqa: E402
import json  # noqa: E402
import py_compile  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import shmmmu  # noqa: E402
from shmmmu.explore.scenarios import SCENARIOS  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from catalogue import AREAS, MUTANTS, SURVIVORS, Mutant  # noqa: E402

PACKAGE = Path(shmmmu.__file__).resolve().parent
WORKERS = PACKAGE / "workers"
if not WORKERS.is_dir():                      # an editable install maps shmmmu.workers onto the checkout's workers/
    import shmmmu.workers
    WORKERS = Path(shmmmu.workers.__file__).resolve().parent
RUN_TIMEOUT_S = 3600                          # a hang guard only: a run past it is reported "hung"


@dataclass
class Verdict:
    name: str
    area: str
    killed: bool
    channel: str = ""          # "explore dfs", "explore pct", "stress"
    where: str = ""            # scenario or seed
    executions: int = 0
    first: str = ""            # the first finding, or the crash
    runs: int = 0              # channel runs made
    seconds: float = 0.0
    explained: str = ""        # SURVIVORS' reason, for a survivor


class MutantError(Exception):
    pass


def scratch_copy(m: Mutant, into: Path) -> Path:
    """A copy of the installed package with the mutant applied; returns the directory to put on PYTHONPATH."""
    pkg = into / "shmmmu"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__", "workers"))
    shutil.copytree(WORKERS, pkg / "workers", ignore=shutil.ignore_patterns("__pycache__"))
    rel = m.path.split("/", 1)
    target = pkg / rel[1] if rel[0] == "shmmmu" else pkg / "workers" / rel[1]
    if not target.is_file():
        raise MutantError(f"{m.name}: no file {m.path}")
    text = target.read_text()
    for old, new in m.edits:
        n = text.count(old)
        if n != 1:
            raise MutantError(f"{m.name}: its edit occurs {n} times in {m.path} (must be once): {old[:60]!r}")
        text = text.replace(old, new)
    target.write_text(text)
    try:
        py_compile.compile(str(target), doraise=True)
    except py_compile.PyCompileError as e:
        raise MutantError(f"{m.name}: the mutated {m.path} does not compile: {e.msg}") from None
    return into


def _cleanup(prefix: str) -> None:
    """Remove what runs with `prefix` left: /dev/shm objects and supervisor log directories (only those)."""
    for d, pat in (("/dev/shm", prefix), ("/dev/shm", "sem." + prefix)):
        for f in os.listdir(d):
            if f.startswith(pat):
                try:
                    os.unlink(os.path.join(d, f))
                except OSError:
                    pass
    tmp = tempfile.gettempdir()
    for f in os.listdir(tmp):
        if f.startswith(prefix):
            shutil.rmtree(os.path.join(tmp, f), ignore_errors=True)


def _run(root: Path, args: list[str], prefix: str) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=str(root), SHMMMU_PREFIX=prefix, OPENBLAS_NUM_THREADS="1")
    try:
        p = subprocess.run([sys.executable, "-P", "-m", "shmmmu.workers.cli", *args], env=env, capture_output=True,
                           text=True, timeout=RUN_TIMEOUT_S, start_new_session=True)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        return -1, "", f"hung: no answer in {RUN_TIMEOUT_S} s"
    finally:
        _cleanup(prefix)


def _finding(code: int, out: str, err: str) -> str:
    if code == 1:
        try:
            d = json.loads(out)
            f = d.get("finding") or {}                # explore's report
            problems = d.get("problems") or []         # stress's
            return f.get("message") or f.get("kind") or (str(problems[0]) if problems else "finding")
        except ValueError:
            lines = [ln for ln in (out + err).splitlines() if ln.startswith("!!!") or "FAILURE" in ln]
            return lines[0] if lines else (err.strip().splitlines() or ["finding"])[-1]
    tail = (err.strip().splitlines() or ["(no output)"])[-1]
    return f"crash (exit {code}): {tail}"


def hunt(m: Mutant, executions: int, stress_seeds: int, stress_duration: float, log=print) -> Verdict:
    v = Verdict(m.name, m.area, False)
    t0 = time.monotonic()
    prefix = f"shmmmu_m{uuid.uuid4().hex[:10]}-"
    with tempfile.TemporaryDirectory(prefix="shmmmu-mutant-") as tmp:
        root = scratch_copy(m, Path(tmp))
        channels = [("explore dfs", s, ["explore", "--scenario", s, "--strategy", "dfs", "--preemptions", "2",
                                        "-n", str(executions), "--no-shrink", "--json"]) for s in SCENARIOS]
        channels += [("explore pct", s, ["explore", "--scenario", s, "--strategy", "pct", "--seed", "1",
                                         "-n", str(executions), "--no-shrink", "--json"]) for s in SCENARIOS]
        channels += [("stress", f"seed {seed}", ["stress", "--json", "--duration", str(stress_duration),
                                                 "--vcpus", "3", "--seed", str(seed)])
                     for seed in range(1, stress_seeds + 1)]
        for channel, where, args in channels:
            code, out, err = _run(root, args, prefix)
            v.runs += 1
            if code == 0:
                continue
            v.killed, v.channel, v.where = True, channel, where
            v.first = _finding(code, out, err)
            try:
                v.executions = int(json.loads(out).get("executions", 0))
            except (ValueError, AttributeError):
                pass
            break
    v.seconds = time.monotonic() - t0
    if not v.killed:
        v.explained = SURVIVORS.get(m.name, "")
    log(f"  {m.name}: {'killed by ' + v.channel + ' ' + v.where if v.killed else 'SURVIVED'}"
        f"{' -- ' + v.first if v.first else ''} ({v.runs} runs, {v.seconds:.0f} s)")
    return v


_CROSSCHECK = """
import json, sys
from shmmmu.explore.crosscheck import crosscheck
from shmmmu.explore.scenarios import SCENARIOS
c = crosscheck(SCENARIOS[sys.argv[1]], [], int(sys.argv[2]), budget=int(sys.argv[3]))
print(json.dumps({"complete": c.complete, "agree": c.agree, "plain": sorted(c.plain.findings),
                  "reduced": sorted(c.reduced.findings), "lines": c.lines()}))
"""


def crosscheck_mutant(m: Mutant, scenario: str, bound: int, budget: int, prefix: str) -> dict:
    """Plain enumeration against the reduced search (crosscheck.py) of `scenario` within `bound`, run in a
    scratch copy with `m` applied, under `prefix`: complete, agree, the findings of each, the summary lines."""
    with tempfile.TemporaryDirectory(prefix="shmmmu-mutant-") as tmp:
        root = scratch_copy(m, Path(tmp))
        env = dict(os.environ, PYTHONPATH=str(root), SHMMMU_PREFIX=prefix, OPENBLAS_NUM_THREADS="1")
        try:
            p = subprocess.run([sys.executable, "-P", "-c", _CROSSCHECK, scenario, str(bound), str(budget)],
                               env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        finally:
            _cleanup(prefix)
    if p.returncode != 0:
        raise MutantError(f"{m.name}: the crosscheck of {scenario} failed (exit {p.returncode}): "
                          f"{(p.stderr.strip().splitlines() or ['(no output)'])[-1]}")
    return json.loads(p.stdout)


def load_verdicts(files: list[str]) -> list[Verdict]:
    """The verdicts saved by --json runs, in catalogue order (a later file's verdict of a mutant wins)."""
    got: dict[str, Verdict] = {}
    for f in files:
        try:
            for d in json.loads(Path(f).read_text()):
                got[d["name"]] = Verdict(**d)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise MutantError(f"{f}: not a verdict file of run.py --json ({e})") from None
    order = {m.name: i for i, m in enumerate(MUTANTS)}
    for v in got.values():                       # a survivor's reason as the catalogue now says it
        if not v.killed:
            v.explained = SURVIVORS.get(v.name, "")
    return sorted(got.values(), key=lambda v: order.get(v.name, len(order)))


# a run's own object names (/PREFIXexplore-PID-HEX.mmu_lock.w) say nothing about the mutant; the lock's name does
_RUN_NAMES = re.compile(r"/?shmmmu_[0-9A-Za-z]+-[\w-]*?-[0-9a-f]{6,}\.")


def table(verdicts: list[Verdict]) -> str:
    rows = ["| mutant | area | verdict | caught by | executions | first finding |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        verdict = "killed" if v.killed else ("explained" if v.explained else "**survived**")
        caught = f"{v.channel} ({v.where})" if v.killed else (v.explained or "-")
        first = _RUN_NAMES.sub("", v.first).replace("|", "\\|")
        rows.append(f"| `{v.name}` | {v.area} | {verdict} | {caught} | {v.executions or '-'} | {first} |")
    killed = sum(v.killed for v in verdicts)
    rows.append("")
    rows.append(f"score: {killed}/{len(verdicts)} killed ({100.0 * killed / max(1, len(verdicts)):.1f}%)"
                f"; {sum(bool(v.explained) for v in verdicts)} survivors explained")
    rows.append(f"hunt: {sum(v.runs for v in verdicts)} channel runs, "
                f"{sum(v.seconds for v in verdicts) / 60:.0f} min in all (the machine's time, not a budget)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--executions", "-n", type=int, default=2000, help="explore budget per scenario and strategy")
    ap.add_argument("--stress-seeds", type=int, default=3)
    ap.add_argument("--stress-duration", type=float, default=6.0)
    ap.add_argument("--json", help="write the verdicts here as JSON")
    ap.add_argument("--list", action="store_true", help="list the catalogue and exit")
    ap.add_argument("--table", nargs="+", metavar="FILE", help="print the table and score of saved verdicts")
    a = ap.parse_args(argv)
    if a.table:
        try:
            verdicts = load_verdicts(a.table)
        except MutantError as e:
            print(f"run.py: error: {e}", file=sys.stderr)
            return 2
        missing = [m.name for m in MUTANTS if m.name not in {v.name for v in verdicts}]
        print(table(verdicts))
        if missing:
            print(f"not in these files: {', '.join(missing)}")
        return 0 if all(v.killed or v.explained for v in verdicts) and not missing else 1
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in a.names if n not in by_name]
    if unknown:
        print(f"run.py: error: unknown mutant {unknown[0]!r} (--list shows them)", file=sys.stderr)
        return 2
    if a.executions < 1 or a.stress_seeds < 0 or a.stress_duration <= 0:
        print("run.py: error: --executions must be >= 1, --stress-seeds >= 0, --stress-duration > 0",
              file=sys.stderr)
        return 2
    if a.list:
        for m in MUTANTS:
            print(f"{m.name:36} {m.area:10} {m.path}\n    {m.why}")
        return 0
    chosen = [by_name[n] for n in a.names] if a.names else MUTANTS
    verdicts = []
    try:
        for m in chosen:
            verdicts.append(hunt(m, a.executions, a.stress_seeds, a.stress_duration,
                                 log=lambda s: print(s, file=sys.stderr, flush=True)))
    except MutantError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    print(table(verdicts))
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(v) for v in verdicts], indent=1) + "\n")
    assert set(v.area for v in verdicts) <= set(AREAS)
    return 0 if all(v.killed or v.explained for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
