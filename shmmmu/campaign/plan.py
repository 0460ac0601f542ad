"""Plan: what a campaign runs, from its command line or a TOML file, expanded into tasks with stable ids.

A plan has a `stress` part, an `explore` part, or both:

- stress: seeds A..B x switches (or none) x lock modes x kernel profiles, every
  run with the same `shmmmu stress` arguments (duration, vCPUs, ...);
- explore: scenarios x switches x kernel profiles; a DFS search is one task
  whose subtrees the cluster runs (shmmmu.explore.split: the answer
  `explore --jobs N` and one process give), a random or PCT search one task
  per seed.

Every task carries the `shmmmu` command line it is equivalent to (`argv`),
which is what runs for a stress or seeded task and what a user reruns to
replay it; its id is made of its axes, so a resumed campaign finds it again.
Every value is checked here, before anything runs: a bad one is a UsageError
(one line, exit 2).
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from typing import Any

from shmmmu import validate as V
from shmmmu.explore import DEFAULT_EXECUTIONS
from shmmmu.validate import UsageError
from shmmmu.variants import DEFAULT_PROFILE, PROFILE_NAMES, bugs_of

NONE = "none"                      # the fixed code: no switch
TARGETS = "targets"                # explore: each scenario's own switches (the fixed code where it names none)
ALL = "all"                        # every switch the profile carries; every scenario
MAX_TASKS = 1_000_000

STRESS_RUN_KEYS = {"duration": 10.0, "vcpus": 4, "bits": 3, "kill_every": 0.0, "nx_huge_pages": False,
                   "torture_delay_us": 200, "root_roles": 2}           # shmmmu stress's defaults
EXPLORE_RUN_KEYS = {"strategy": "", "preemptions": 3, "executions": DEFAULT_EXECUTIONS, "depth": 0, "mix_seed": 0}
AXES = {"stress": ("seeds", "switches", "lock_modes", "kernels"),
        "explore": ("scenarios", "switches", "kernels", "seeds")}


@dataclass(frozen=True)
class Task:
    """One line of the campaign's results: a stress run, a seeded search, or a DFS search split into subtrees."""

    id: str
    kind: str                       # stress or explore
    switch: str | None              # None: the fixed code
    profile: str
    argv: tuple[str, ...]           # the `shmmmu` command line it is equivalent to (its replay without a finding)
    split: str = "run"              # run: argv runs as one subprocess; dfs: subtrees (shmmmu.explore.split)
    explore: dict[str, Any] = field(default_factory=dict)    # dfs: ExploreOptions' fields

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["argv"] = list(self.argv)
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> Task:
        return Task(id=d["id"], kind=d["kind"], switch=d["switch"], profile=d["profile"], argv=tuple(d["argv"]),
                    split=d.get("split", "run"), explore=dict(d.get("explore", {})))


def parse_seeds(value: Any, option: str = "seeds") -> list[int]:
    """'A..B' (both included), one seed, or a list of seeds."""
    if isinstance(value, list):
        return [V.seed(v, option) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return [V.seed(value, option)]
    text = str(value).strip()
    a, sep, b = text.partition("..")
    try:
        lo, hi = int(a), int(b if sep else a)
    except ValueError:
        raise UsageError(f"{option} must be A..B (both included) or one seed, not {text!r}") from None
    V.seed(lo, option)
    V.seed(hi, option)
    if hi < lo:
        raise UsageError(f"{option} {text!r}: B is less than A")
    if hi - lo >= MAX_TASKS:
        raise UsageError(f"{option} {text!r}: more than {MAX_TASKS} seeds")
    return list(range(lo, hi + 1))


def _names(value: Any, key: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise UsageError(f"{key} must be a name or a list of names, not {value!r}")
    return list(dict.fromkeys(items))


def _profiles(value: Any) -> list[str]:
    out = _names(value, "kernels")
    for p in out:
        if p not in PROFILE_NAMES:
            raise UsageError(f"unknown kernel profile {p!r} (known: {', '.join(PROFILE_NAMES)})")
    return out


def _switches(names: list[str], profile: str, targets: tuple[str, ...] | None = None) -> list[str | None]:
    """The switches a task list runs under `profile`: names, `none`, `all`, and (explore) `targets`."""
    known = bugs_of(profile)
    out: list[str | None] = []
    for n in names:
        if n == NONE:
            out.append(None)
        elif n == ALL:
            out.extend(known)
        elif n == TARGETS and targets is not None:
            out.extend([t for t in targets if t in known] or [None])
        elif n in known:
            out.append(n)
        else:
            extra = f", {TARGETS}" if targets is not None else ""
            raise UsageError(f"unknown switch {n!r} for kernel {profile} (use {NONE}, {ALL}{extra} or one of "
                             f"`shmmmu stress --list-bugs`)")
    return list(dict.fromkeys(out))


def _run_values(part: str, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The run's arguments: the defaults, then what the plan gives, each of the default's type."""
    out = dict(defaults)
    for k, v in given.items():
        d = defaults[k]
        if isinstance(d, bool):
            ok = isinstance(v, bool)
        elif isinstance(d, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            v = float(v) if ok else v
        elif isinstance(d, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        else:
            ok = isinstance(v, str)
        if not ok:
            raise UsageError(f"[{part}] {k} must be a {type(d).__name__}, not {v!r}")
        out[k] = v
    return out


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def stress_tasks(part: dict[str, Any]) -> list[Task]:
    """The stress part: seeds x switches x lock modes x profiles, each `shmmmu stress` with the run's arguments."""
    from shmmmu.stress import StressOptions
    run = _run_values("stress", {k: v for k, v in part.items() if k in STRESS_RUN_KEYS}, STRESS_RUN_KEYS)
    seeds = parse_seeds(part.get("seeds", "1..10"))
    modes = _names(part.get("lock_modes", ["shared"]), "lock_modes")
    for m in modes:
        V.choice(m, "--lock-mode", ("shared", "exclusive"))
    tasks = []
    for profile in _profiles(part.get("kernels", [DEFAULT_PROFILE])):
        for switch in _switches(_names(part.get("switches", [NONE]), "switches"), profile):
            for mode in modes:
                try:               # stress's own check of its arguments, once per combination
                    StressOptions(duration=run["duration"], vcpus=run["vcpus"], bits=run["bits"], lock_mode=mode,
                                  bugs=[switch] if switch else [], kill_every=run["kill_every"],
                                  nx_huge_pages=run["nx_huge_pages"], torture_delay_us=run["torture_delay_us"],
                                  root_roles=run["root_roles"]).config()
                except ValueError as e:
                    raise UsageError(f"[stress] {e}") from None
                for seed in seeds:
                    argv = ["stress", "--seed", str(seed), "--lock-mode", mode, "--duration",
                            f"{run['duration']:g}", "--vcpus", str(run["vcpus"])]
                    for k, v in run.items():
                        if k not in ("duration", "vcpus") and v != STRESS_RUN_KEYS[k]:
                            argv += [_option(k)] if isinstance(v, bool) else [_option(k), f"{v:g}"]
                    argv += ["--bug", switch] if switch else []
                    argv += ["--kernel", profile] if profile != DEFAULT_PROFILE else []
                    tasks.append(Task(f"stress/{profile}/{switch or NONE}/{mode}/seed{seed}", "stress", switch,
                                      profile, tuple(argv)))
    return tasks


def explore_tasks(part: dict[str, Any]) -> list[Task]:
    """The explore part: scenarios x switches x profiles; a DFS search per combination, or one search per seed."""
    from shmmmu.explore.report import STRATEGIES, ExploreOptions
    from shmmmu.explore.scenarios import SCENARIOS
    run = _run_values("explore", {k: v for k, v in part.items() if k in EXPLORE_RUN_KEYS}, EXPLORE_RUN_KEYS)
    names = _names(part.get("scenarios", [ALL]), "scenarios")
    scenarios = list(SCENARIOS) if ALL in names else names
    for s in scenarios:
        if s not in SCENARIOS:
            raise UsageError(f"unknown scenario {s!r} (`shmmmu explore --list` shows them)")
    if run["strategy"] and run["strategy"] not in STRATEGIES:
        raise UsageError(f"unknown strategy {run['strategy']!r}: use random, pct or dfs")
    seeds = parse_seeds(part.get("seeds", "1..10"))
    tasks = []
    for profile in _profiles(part.get("kernels", [DEFAULT_PROFILE])):
        for name in scenarios:
            sc = SCENARIOS[name]
            strategy = run["strategy"] or sc.strategy
            for switch in _switches(_names(part.get("switches", [TARGETS]), "switches"), profile, sc.targets):
                bugs = [switch] if switch else []
                opts = ExploreOptions(scenario=name, bugs=bugs, strategy=strategy, preemptions=run["preemptions"],
                                      executions=run["executions"], depth=run["depth"], mix_seed=run["mix_seed"])
                try:
                    opts.resolve()
                except ValueError as e:
                    raise UsageError(f"[explore] {e}") from None
                base = ["explore", "--scenario", name] + (["--bug", switch] if switch else []) + \
                    ["--strategy", strategy, "--executions", str(run["executions"])] + \
                    (["--mix-seed", str(run["mix_seed"])] if run["mix_seed"] else []) + \
                    (["--kernel", profile] if profile != DEFAULT_PROFILE else [])
                where = f"explore/{profile}/{name}/{switch or NONE}/{strategy}"
                if strategy == "dfs":
                    fields = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
                    if profile != DEFAULT_PROFILE:
                        # the coordinator builds its Explorer in-process: the profile must be an explore option
                        if "kernel" not in fields:
                            raise UsageError(f"explore's DFS split cannot run kernel {profile}: this explorer "
                                             f"takes no kernel profile")
                        fields["kernel"] = profile
                    tasks.append(Task(f"{where}/bound{run['preemptions']}", "explore", switch, profile,
                                      tuple(base + ["--preemptions", str(run["preemptions"])]), "dfs", fields))
                    continue
                depth = ["--depth", str(run["depth"])] if strategy == "pct" and run["depth"] else []
                for seed in seeds:
                    tasks.append(Task(f"{where}/seed{seed}", "explore", switch, profile,
                                      tuple(base + depth + ["--seed", str(seed)])))
    return tasks


def plan_tasks(plan: dict[str, Any]) -> list[Task]:
    """Every task of a plan ({"stress": {...}, "explore": {...}}), checked; ids unique, in the plan's order."""
    unknown = set(plan) - {"stress", "explore", "campaign"}
    if unknown:
        raise UsageError(f"unknown plan table [{sorted(unknown)[0]}]: use [stress], [explore] and [campaign]")
    tasks: list[Task] = []
    for part, make, keys in (("stress", stress_tasks, STRESS_RUN_KEYS), ("explore", explore_tasks, EXPLORE_RUN_KEYS)):
        if part not in plan:
            continue
        if not isinstance(plan[part], dict):
            raise UsageError(f"[{part}] must be a table")
        bad = set(plan[part]) - set(keys) - set(AXES[part])
        if bad:
            raise UsageError(f"[{part}] has no key {sorted(bad)[0]!r} (known: {', '.join([*AXES[part], *keys])})")
        tasks += make(plan[part])
    if not tasks:
        raise UsageError("the plan has no task: give a [stress] or [explore] table")
    if len(tasks) > MAX_TASKS:
        raise UsageError(f"the plan has {len(tasks)} tasks, more than {MAX_TASKS}")
    return list({t.id: t for t in tasks}.values())


def campaign_settings(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan's [campaign] table: task_timeout (seconds, 0: automatic) and workers (0: the machine's)."""
    part = plan.get("campaign", {})
    if not isinstance(part, dict):
        raise UsageError("[campaign] must be a table")
    bad = set(part) - {"task_timeout", "workers"}
    if bad:
        raise UsageError(f"[campaign] has no key {sorted(bad)[0]!r} (known: task_timeout, workers)")
    return _run_values("campaign", part, {"task_timeout": 0.0, "workers": 0})


def read_plan(path: str) -> dict[str, Any]:
    """A TOML plan file (tomllib); a missing or malformed file is one line."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UsageError(f"cannot read the plan {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"the plan {path} is not TOML: {e}") from None


OPTION_OF = {"seeds": "--seeds", "switches": "--switch", "lock_modes": "--lock-mode", "kernels": "--kernel",
             "scenarios": "--scenario"}
CLI_KEYS = {"stress": {"seeds", "switches", "lock_modes", "kernels", "duration", "vcpus", "bits"},
            "explore": {"seeds", "switches", "kernels", "scenarios", "strategy", "preemptions", "executions"}}


def plan_from_options(what: str, given: dict[str, Any], resume: str = "") -> dict[str, Any]:
    """The plan `shmmmu campaign WHAT [options]` names: stress or explore with the options given (plan keys:
    seeds, switches, ...), or a TOML file; none with --resume (the directory holds its plan)."""
    if resume:
        if what or given:
            raise UsageError("--resume takes the plan from its directory: give no plan or plan option with it")
        return {}
    if what in CLI_KEYS:
        for k in given:
            if k not in CLI_KEYS[what]:
                raise UsageError(f"{OPTION_OF.get(k, _option(k))} is not an option of a {what} campaign")
        return {what: {k: (parse_seeds(v, "--seeds") if k == "seeds" else v) for k, v in given.items()}}
    if not what:
        raise UsageError("name what the campaign runs: stress, explore, or a TOML plan file")
    if given:
        first = next(iter(given))
        raise UsageError(f"the plan file {what} holds the campaign's axes: set {first} there, not "
                         f"{OPTION_OF.get(first, _option(first))}")
    return read_plan(what)
