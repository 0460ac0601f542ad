"""The code's shape holds: small classes and modules, no import cycle, no bug switch tested inside the MMU,
every variant put in place, and every instrument site matched by its wrapper (issue 22)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from shmmmu.variants import BUGS, PROFILE_NAMES
from shmmmu.mmu import PARTS, Mmu
from shmmmu.variants import replaced_functions
from shmmmu.mmu.debug import WRAPPERS as DEBUG
from shmmmu.mmu.instruments import KINDS, OBJECT_SITES, kinds_of
from shmmmu.mmu.tracepoints import TRACE
from shmmmu.trace.timeline import TIMELINE
from shmmmu.layout import MemslotSpec, VMConfig
from shmmmu.vm import create_vm

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "shmmmu"
MAX_CLASS, MAX_MODULE = 400, 600


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = p
    return out


def test_no_class_over_400_lines_and_no_module_over_600() -> None:
    too_big = []
    for name, p in modules().items():
        text = p.read_text()
        if text.count("\n") > MAX_MODULE:
            too_big.append(f"module {name}: {text.count(chr(10))} lines")
        for n in ast.walk(ast.parse(text)):
            if isinstance(n, ast.ClassDef) and n.end_lineno - n.lineno + 1 > MAX_CLASS:
                too_big.append(f"class {name}.{n.name}: {n.end_lineno - n.lineno + 1} lines")
    assert too_big == []


def import_graph() -> dict[str, set[str]]:
    """Module -> the shmmmu modules it imports, anywhere in it (module level, functions, TYPE_CHECKING)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, p in mods.items():
        deps = set()
        package = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Import):
                deps |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - n.level + 1] + ([base] if base else []))
                deps.add(base)
                deps |= {f"{base}.{a.name}" for a in n.names}       # `from pkg import module`
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == []


def test_the_cycle_check_sees_a_cycle(tmp_path: Path) -> None:
    """The check itself can fail: two modules importing each other, inside functions, are a cycle."""
    graph = {"a": {"b"}, "b": {"a"}}
    seen = []
    for m in graph:
        for d in graph[m]:
            if m in graph[d]:
                seen.append((m, d))
    assert seen


def test_no_bug_switch_is_tested_inside_the_mmu() -> None:
    """A switch is a variant put in place when the Mmu is built, never an `if` in an MMU function: no function of
    shmmmu/mmu/ reads a `bugs` record or names a switch."""
    from shmmmu.violations import KINDS
    offences = []
    names = set(BUGS) - set(KINDS)          # no-forward-progress is a violation's kind too
    for p in (PACKAGE / "mmu").glob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Attribute) and n.attr == "bugs" and p.name != "__init__.py":
                offences.append(f"{p.name}:{n.lineno} reads .bugs")
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names:
                offences.append(f"{p.name}:{n.lineno} names {n.value!r}")
    assert offences == []


HAND_ROWS = {"TMeta", "WState"}         # the row types read through accessors (layout.Columns), never by offset


def hand_row_offsets(source: str) -> list[int]:
    """The lines of `source` that multiply by TMeta.WORDS or WState.WORDS: a row offset computed by hand."""
    lines = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mult):
            for side in (n.left, n.right):
                if isinstance(side, ast.Attribute) and side.attr == "WORDS" and \
                        isinstance(side.value, ast.Name) and side.value.id in HAND_ROWS:
                    lines.append(n.lineno)
    return sorted(lines)


def test_no_row_offset_is_computed_by_hand() -> None:
    """TMeta and WState rows are read through named accessors (`region.columns("tmeta", TMeta).level.load(t)`,
    Column.word for a word's index); only shmmmu/layout.py, which declares the rows, multiplies by WORDS."""
    offences = []
    for folder in ("shmmmu", "workers", "tools"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            if p == PACKAGE / "layout.py":
                continue
            offences += [f"{p.relative_to(ROOT)}:{line}" for line in hand_row_offsets(p.read_text())]
    assert offences == []


def test_the_row_offset_check_sees_one() -> None:
    """The check itself can fail: each way of writing a hand-computed row offset is found, a named access is not."""
    assert hand_row_offsets("w = t * TMeta.WORDS + TMeta.LEVEL\nx = WState.WORDS*k\ny = (k + 1) * WState.WORDS") \
        == [1, 2, 3]
    assert hand_row_offsets("v = tmeta.level.load(t)\nn = len(tm) // TMeta.WORDS\nr = k * RootRow.WORDS") == []


@pytest.mark.parametrize("kernel,bug", [(k, b) for b in sorted(BUGS) for k in BUGS[b].profiles] +
                         [(k, None) for k in PROFILE_NAMES])
def test_each_switch_puts_its_functions_in_place_and_nothing_else(kernel: str, bug: str | None,
                                                                   vm_name: str) -> None:
    """Each profile's own variants and each switch in each profile it exists in: exactly the functions the
    table names are replaced, each by the function it names."""
    bugs = [bug] if bug else []
    cfg = VMConfig(name=vm_name, n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 1)], bugs=bugs, kernel=kernel)
    with create_vm(cfg) as vm:
        m = Mmu(vm, 0)
        replaced = replaced_functions(kernel, bugs)
        assert replaced or (not bug and kernel == "5.13")
        for part_name, cls in PARTS.items():
            part = getattr(m, part_name)
            for fn in dir(cls):
                target = f"{part_name}.{fn}"
                if not callable(getattr(cls, fn, None)) or fn.startswith("__") or target == "fault.page_fault":
                    continue                        # a slot (a handle), or the entry chosen for the lock mode
                bound = getattr(part, fn)
                want = replaced.get(target, fn)
                assert getattr(bound, "__func__", None) is getattr(cls, want), (target, want)


def test_switches_that_replace_the_same_function_are_refused_together() -> None:
    with pytest.raises(ValueError, match="both replace tdp.tdp_mmu_set_spte_atomic"):
        replaced_functions("5.13", ["fault-plain-store", "cas-over-removed"])


def test_every_instrument_site_has_its_wrapper_and_every_wrapper_its_site() -> None:
    wrappers = {"debug": set(DEBUG), "trace": set(TRACE), "timeline": set(TIMELINE)}
    sites = {k: set() for k in KINDS}
    from shmmmu.mmu.kvm import Kvm
    for part_name, cls in [("kvm", Kvm)] + list(PARTS.items()):
        for fn in vars(cls):
            for kind in kinds_of(getattr(cls, fn)):
                sites[kind].add(f"{part_name}.{fn}")
    for key, kinds in OBJECT_SITES.items():
        for kind in kinds:
            sites[kind].add(key)
    for kind in KINDS:
        assert sites[kind] == wrappers[kind], (kind, sites[kind] ^ wrappers[kind])


def test_debug_and_tracepoints_wrap_their_sites_and_nothing_is_wrapped_without_them(vm_name: str, tmp_path) -> None:
    for debug, trace in ((False, ""), (True, str(tmp_path))):
        cfg = VMConfig(name=f"{vm_name}-{int(debug)}", n_vcpus=1, bits=3, memslots=[MemslotSpec(0, 64, 1)],
                       debug=debug, tracepoints=trace)
        with create_vm(cfg) as vm:
            m = Mmu(vm, 0)
            for key in set(DEBUG) | set(TRACE):
                owner, fn = key.split(".")
                obj = m.kvm.lock if key in OBJECT_SITES else (m.kvm if owner == "kvm" else getattr(m, owner))
                wrapped = fn in vars(obj) if hasattr(obj, "__dict__") else False
                if key == "fault.page_fault":
                    wrapped = getattr(obj, fn).__qualname__.startswith("_page_fault")
                expect = (debug and key in DEBUG) or (bool(trace) and key in TRACE)
                if key in OBJECT_SITES:
                    wrapped = not getattr(getattr(obj, fn), "__self__", None) is obj
                assert wrapped == expect, (key, debug, trace)
