"""The `shmmmu` command, run as a user runs it: in a subprocess."""
from __future__ import annotations

import ast
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


# ---------------------------------------------------------------- the command line's shape

CLI_DIR = Path(__file__).resolve().parents[2] / "workers" / "cli"
MAX_MODULE_LINES = 200          # a module per command group, each a thin layer over the library
MAX_COMMAND_BODY = 40           # a command's body: parsing, one call into the library, printing, exit status


def _commands(tree: ast.Module) -> list[ast.FunctionDef]:
    """The functions of a module registered as commands (`@x.command(...)` or `@x.command`)."""
    def is_command(d: ast.expr) -> bool:
        f = d.func if isinstance(d, ast.Call) else d
        return isinstance(f, ast.Attribute) and f.attr == "command"
    return [n for n in tree.body if isinstance(n, ast.FunctionDef) and any(map(is_command, n.decorator_list))]


def _body_lines(fn: ast.FunctionDef) -> int:
    """Lines of a function's body after its docstring (blank lines and comments inside count)."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def _registered(app) -> int:
    """The commands a typer app and its groups have."""
    return len(app.registered_commands) + sum(_registered(g.typer_instance) for g in app.registered_groups)


def test_the_cli_is_thin_modules_of_short_commands_with_annotated_options() -> None:
    """workers/cli/: no module over MAX_MODULE_LINES, no command body over MAX_COMMAND_BODY lines, every
    option and argument declared as `Annotated[type, typer.Option(...)]` (typer's advice), never as a
    `typer.Option(...)` default; and these are all the commands the app has."""
    from shmmmu.workers.cli import app

    files = sorted(CLI_DIR.glob("*.py"))
    assert len(files) >= 8, files
    long_modules = {f.name: n for f in files if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    found, long_bodies, old_style = [], {}, []
    for f in files:
        for fn in _commands(ast.parse(f.read_text(), str(f))):
            where = f"{f.name}:{fn.name}"
            found.append(where)
            if _body_lines(fn) > MAX_COMMAND_BODY:
                long_bodies[where] = _body_lines(fn)
            for arg in fn.args.args + fn.args.kwonlyargs:
                ann = arg.annotation
                if not (isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name)
                        and ann.value.id == "Annotated" or isinstance(ann, ast.Name)):
                    old_style.append(f"{where}({arg.arg}): {ast.unparse(ann) if ann else 'no annotation'}")
            for default in fn.args.defaults + [d for d in fn.args.kw_defaults if d is not None]:
                if isinstance(default, ast.Call):
                    old_style.append(f"{where}: default {ast.unparse(default)}")
    assert not long_bodies, f"command bodies over {MAX_COMMAND_BODY} lines: {long_bodies}"
    assert not old_style, f"options not declared with Annotated: {old_style}"
    assert len(found) == _registered(app) == 20, found
