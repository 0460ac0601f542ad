#!/usr/bin/env python3
"""Captured documentation: runs the commands of every owned block in README.md and docs/ and rewrites their output.

    .venv/bin/python tools/capture_docs.py [--check] [--list] [FILE ...]

Without FILE: README.md and every docs/*.md that holds a capture marker.
Without an option it runs each document's blocks and rewrites their output in
place; --check runs them and compares shapes instead (below), printing a diff
for each block that differs and exiting 1 if any does; --list prints the blocks
without running anything.  Bad input (a missing file, a broken marker or
option) is one line on stderr and exit 2; a command that cannot finish (a
timeout, a wait that never matched) is one line and exit 1, and nothing of
that document is rewritten.

The blocks it owns
------------------
A fenced code block whose opening fence is on the line right after an HTML
comment of the form

    <!-- capture -->
    <!-- capture keep="1-12,-3" wait="kept alive" -->

Inside the fence a line starting with `$ ` is a command (a trailing ` \\`
continues it on the next line); commands are kept as written.  Every other
line is output and is regenerated.  Options, `name="value"` (shell quoting):

  keep="ITEMS"      elide output lines: keep only these, one `...` line where
                    lines were cut.  ITEMS, comma-separated: N (line N, from
                    1), A-B, A- (to the end), -N (the last N), /REGEX/ (the
                    first line that matches; no comma in it).
  wait="TEXT"       a background command (`cmd &`) is shown with its output up
                    to the first line that contains TEXT; the tool waits for
                    it.  Without wait= nothing is shown under a background
                    command when it starts.
  interrupt="TEXT"  send SIGINT to a foreground command (a user's Ctrl-C) once
                    its output contains TEXT, then let it finish.
  timeout="S"       seconds each command of the block may take (default 300).
  env="N=V ..."     variables exported for the block's commands only.
  cwd="DIR"         the directory the block's commands run in (shell-expanded;
                    relative to the scratch directory), for this block only.
  setup="SHELL"     run before the block, in the same session, output not
                    shown; a status other than 0 stops the document.

keep, wait, interrupt and timeout apply to every command of the block;
`keep.N=`, `wait.N=`, `interrupt.N=`, `timeout.N=` to its Nth command only.

A fenced block whose commands are shown but cannot be produced here (it needs
root or a private mount namespace) carries `<!-- not captured: REASON -->`
instead; tests/system/test_docs.py checks that every block of commands in the
converted documents carries one marker or the other.

The session
-----------
The commands of one document run in order in one bash (job control on, as in
a terminal, so a background job takes SIGINT), so `$?`, `$!`, `wait`, `cd` and
`export` work as in a terminal; `$ echo $?` prints the previous command's exit
status, and a comment after a command (`$ cmd    # while X`) is the shell's
comment: kept in the document, not executed.  The session has a scratch
directory as its current directory and a SHMMMU_PREFIX of its own (printed as
the default `shmmmu-` in the output, the scratch directory as /tmp/doc),
COLUMNS=100 so rich tables have one width, no colour, stdin from /dev/null,
this Python's bin directory first on PATH (so `shmmmu` is the one installed
next to it), and CAPTURE_REPO naming the checkout (for setup=).  Output is
stdout and stderr together, in order, as a terminal shows it (of a line
rewritten with \\r, its last text), without trailing spaces or leading and
trailing blank lines; bash's own messages name `bash`, not the tool's files.

A background command's output after its wait= text is shown before the output
of the command during which the job ends (`$ kill -INT $!; wait $!` shows what
it printed on the way out).  At the end of the document every background job
still running gets SIGINT, then SIGKILL after 30 s, as does any other process
the session started; the session's VMs and everything under its prefix in
/dev/shm and the temporary directory are removed.

Shapes
------
--check compares what the code prints now with what the document holds, after
normalising both: replay tokens, hex numbers, numbers (pids, times, sizes,
counts), long names with digits in them and log directories' suffixes (random
names) become placeholders;
runs of spaces and of box-drawing characters become one; `...` lines (whether
keep= cut something at a place depends on the run's counts) go; consecutive
lines that are then equal become one.  So a changed number passes, and a changed
word, a missing or an added line fails.
"""
from __future__ import annotations

import argparse
import difflib
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = "capture_docs.py"
COLUMNS = "100"
DEFAULT_TIMEOUT_S = 300.0
STOP_GRACE_S = 30.0                  # SIGINT to SIGKILL for the jobs left at the end of a document
SHOWN_PREFIX = "shmmmu-"             # what the session's own prefix is printed as
SHOWN_SCRATCH = "/tmp/doc"           # ... and its scratch directory

MARKER_RE = re.compile(r"^<!--\s*capture(?P<opts>(?:\s.*?)?)\s*-->\s*$")
FENCE_RE = re.compile(r"^(?P<fence>```+|~~~+)")
OPTIONS = {"keep", "wait", "interrupt", "timeout", "env", "cwd", "setup"}
PER_COMMAND = {"keep", "wait", "interrupt", "timeout"}
KEEP_ITEM_RE = re.compile(r"^(?:(?P<a>\d+)(?:(?P<dash>-)(?P<b>\d+)?)?|-(?P<last>\d+)|/(?P<re>.+)/)$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class BadInput(Exception):
    """A document or an argument the tool cannot use: one line, exit 2."""


class RunFailed(Exception):
    """A command that could not finish (a timeout, a wait that never matched): one line, exit 1."""


# ----------------------------------------------------------------------------- parsing

@dataclass
class Command:
    text: list[str]                  # the lines as written, each starting with "$ " or a continuation
    output: list[str]                # the output the document holds

    @property
    def shell(self) -> str:
        """What bash runs: the lines without the "$ " prompt."""
        return "\n".join([self.text[0][2:], *self.text[1:]])

    @property
    def background(self) -> bool:
        """`cmd &`: the last shell token is a lone `&` (not `&&`), comments aside."""
        try:
            lex = shlex.shlex(self.shell, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            tokens = list(lex)
        except ValueError:
            return False                      # unbalanced quotes: bash will say so
        return bool(tokens) and tokens[-1] == "&"


@dataclass
class Block:
    path: Path
    line: int                        # 1-based line of the marker
    options: dict[str, str]
    start: int                       # index of the first line inside the fence
    end: int                         # index of the closing fence
    commands: list[Command] = field(default_factory=list)

    def where(self) -> str:
        return f"{display(self.path)}:{self.line}"

    def option(self, name: str, i: int) -> str | None:
        """Option `name` for command i (0-based): `name.N` if given, else the block's `name`."""
        return self.options.get(f"{name}.{i + 1}", self.options.get(name))


def display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def parse_options(text: str, where: str) -> dict[str, str]:
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise BadInput(f"{where}: cannot read the marker's options: {e}") from None
    opts: dict[str, str] = {}
    for w in words:
        name, eq, value = w.partition("=")
        base, dot, index = name.partition(".")
        if not eq or base not in OPTIONS or (dot and (base not in PER_COMMAND or not index.isdigit()
                                                      or int(index) < 1)):
            raise BadInput(f"{where}: unknown marker option {w!r} (options: {', '.join(sorted(OPTIONS))}; "
                           f"{', '.join(sorted(PER_COMMAND))} also as NAME.N for command N)")
        if base == "keep":
            parse_keep(value, where)
        elif base == "timeout":
            try:
                t = float(value)
            except ValueError:
                t = -1.0
            if not 0 < t < 1e6:
                raise BadInput(f"{where}: {name}={value!r} must be a number of seconds")
        elif base == "env":
            for pair in shlex.split(value):
                n, eq2, _ = pair.partition("=")
                if not eq2 or not ENV_NAME_RE.match(n):
                    raise BadInput(f"{where}: env={value!r}: {pair!r} is not NAME=VALUE")
        elif base in ("wait", "interrupt") and not value:
            raise BadInput(f"{where}: {name}= needs the text to wait for")
        opts[name] = value
    return opts


def parse_keep(spec: str, where: str) -> list[tuple]:
    """keep="1-12,-3,/^Reader/" as ("range", a, b) (1-based, b None for the end), ("last", n), ("re", pattern)."""
    items: list[tuple] = []
    for raw in spec.split(","):
        item = raw.strip()
        m = KEEP_ITEM_RE.match(item)
        if not m:
            raise BadInput(f"{where}: keep item {item!r} is not N, A-B, A-, -N or /REGEX/")
        if m["re"] is not None:
            try:
                items.append(("re", re.compile(m["re"])))
            except re.error as e:
                raise BadInput(f"{where}: keep item {item!r}: {e}") from None
        elif m["last"] is not None:
            items.append(("last", int(m["last"])))
        else:
            a = int(m["a"])
            b = a if not m["dash"] else (int(m["b"]) if m["b"] else None)
            if a < 1 or (b is not None and b < a):
                raise BadInput(f"{where}: keep item {item!r} is an empty range")
            items.append(("range", a, b))
    return items


def parse_document(path: Path) -> tuple[list[str], list[Block]]:
    """The document's lines and its owned blocks, each with its commands and the output it holds now."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read {display(path)}: {e.strerror if isinstance(e, OSError) else e}") from None
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = MARKER_RE.match(lines[i])
        if not m:
            i += 1
            continue
        where = f"{display(path)}:{i + 1}"
        opts = parse_options(m["opts"], where)
        f = FENCE_RE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if not f:
            raise BadInput(f"{where}: a capture marker must be followed at once by a fenced code block")
        fence = f["fence"]
        j = i + 2
        while j < len(lines) and lines[j].rstrip() != fence:
            j += 1
        if j == len(lines):
            raise BadInput(f"{where}: the block's fence {fence} is never closed")
        block = Block(path, i + 1, opts, i + 2, j)
        body = lines[i + 2:j]
        k = 0
        while k < len(body):
            line = body[k]
            if line.startswith("$ "):
                text = [line]
                while text[-1].endswith("\\") and k + 1 < len(body):
                    k += 1
                    text.append(body[k])
                block.commands.append(Command(text, []))
            elif block.commands:
                block.commands[-1].output.append(line)
            elif line.strip():
                raise BadInput(f"{where}: output before the block's first command (a command starts with '$ ')")
            k += 1
        if not block.commands:
            raise BadInput(f"{where}: the block has no command (a line starting with '$ ')")
        for name in opts:
            base, dot, index = name.partition(".")
            if dot and int(index) > len(block.commands):
                raise BadInput(f"{where}: {name}= names command {index}, the block has {len(block.commands)}")
        blocks.append(block)
        i = j + 1
    return lines, blocks


# ----------------------------------------------------------------------------- output shapes

def elide(lines: list[str], spec: str | None, where: str) -> list[str]:
    """The lines keep= selects, with one "..." where a run of lines was cut."""
    if not spec:
        return lines
    n = len(lines)
    kept: set[int] = set()
    for item in parse_keep(spec, where):
        if item[0] == "range":
            _, a, b = item
            kept.update(range(a - 1, min(n, b if b is not None else n)))
        elif item[0] == "last":
            kept.update(range(max(0, n - item[1]), n))
        else:
            hit = next((k for k, s in enumerate(lines) if item[1].search(s)), None)
            if hit is not None:
                kept.add(hit)
    out: list[str] = []
    cut = False
    for k, s in enumerate(lines):
        if k in kept:
            if cut:
                out.append("...")
            out.append(s)
            cut = False
        else:
            cut = True
    if cut:
        out.append("...")
    return out


_TOKEN = re.compile(r"\bshx\d+-[A-Za-z0-9_-]+")
_LOGDIR = re.compile(r"(shmmmu-\S*-)[a-z0-9_]{8}(?=$|[\s:,;)])")  # a log directory's random suffix
_HEX = re.compile(r"0x[0-9a-fA-F]+")
_DECIMAL = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)+(?:[eE][-+]?\d+)?")
_HEXWORD = re.compile(r"\b[0-9a-fA-F]*\d[0-9a-fA-F]*\b")
_NAME = re.compile(r"\b(?=\w*\d)\w{8,}\b")
_NUMBER = re.compile(r"\d+")
_BOX = re.compile(r"([\u2500-\u257f])\1+")
_CPU_MODEL = re.compile(r"^(\s*Model name:\s*).*$")     # lscpu's: the machine, not the code
_UNFAIR = re.compile(r"\s+\?\?\?$")    # locktorture's max > 2x min flag: how this run was scheduled
_SPACES = re.compile(r"\s+")


def shape_line(line: str) -> str:
    """A line with its figures as placeholders: what the code prints, not what this run counted."""
    s = _UNFAIR.sub("", _CPU_MODEL.sub(r"\1<cpu>", line))
    s = _TOKEN.sub("<token>", s)
    s = _LOGDIR.sub(r"\1<id>", s)
    s = _HEX.sub("<hex>", s)
    s = _DECIMAL.sub("<n>", s)
    s = _HEXWORD.sub("<n>", s)        # decimal, and hex printed without 0x (trace-cmd's fields)
    s = _NAME.sub("<id>", s)          # a random name: mkdtemp's suffix, a uuid
    s = _NUMBER.sub("<n>", s)         # digits inside a word: 4K, L4, x17
    s = _BOX.sub(r"\1", s)
    return _SPACES.sub(" ", s).strip()


def shape(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        s = shape_line(line)
        if s == "...":
            continue                  # whether keep= cut anything at a place depends on the run's counts
        if not out or out[-1] != s:
            out.append(s)
    return out


def block_lines(block: Block, outputs: list[list[str]]) -> list[str]:
    body: list[str] = []
    for cmd, out in zip(block.commands, outputs):
        body.extend(cmd.text)
        body.extend(out)
    return body


# ----------------------------------------------------------------------------- the session

@dataclass
class Job:
    pid: int
    out: Path
    shown: int = 0                   # bytes of its output already shown
    ended: bool = False


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rpartition(")")[2].split()
        return rest[0], int(rest[1]), int(rest[3])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


class Session:
    """One document's bash: job control on, a scratch directory, a SHMMMU_PREFIX of its own."""

    def __init__(self) -> None:
        # SHMMMU_DOC_PREFIX: a caller's own root for the sessions' names (a test counts only its own)
        self.prefix = f"{os.environ.get('SHMMMU_DOC_PREFIX', 'shmmmu_doc')}{uuid.uuid4().hex[:12]}-"
        tmp = tempfile.gettempdir()
        self.ctl = Path(tempfile.mkdtemp(prefix=f"{self.prefix}ctl-", dir=tmp))
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{self.prefix}cwd-", dir=tmp))
        bindir = os.path.dirname(os.path.abspath(sys.executable))
        if not os.access(os.path.join(bindir, "shmmmu"), os.X_OK):
            self._remove_files()
            raise BadInput(f"no shmmmu next to {sys.executable}: run `{sys.executable} -m pip install -e .` first")
        env = {k: v for k, v in os.environ.items()
               if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "SHMMMU_PROGRESS", "LINES", "CLICOLOR_FORCE")}
        env.update(SHMMMU_PREFIX=self.prefix, COLUMNS=COLUMNS, NO_COLOR="1", PYTHONIOENCODING="utf-8",
                   PATH=bindir + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"), CAPTURE_REPO=str(ROOT))
        self.marker = f"SHMMMU_PREFIX={self.prefix}".encode()
        self.bash = subprocess.Popen(["bash", "--noprofile", "--norc"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(self.ctl / "bash.err", "wb"),
                                     cwd=self.scratch, env=env, start_new_session=True, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.jobs: list[Job] = []
        self.n = 0
        self._send("set -m; __cap_rc=0; __cap_setrc() { return \"$1\"; }")

    def _read(self) -> None:
        assert self.bash.stdout is not None
        for line in self.bash.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _send(self, text: str) -> None:
        assert self.bash.stdin is not None
        try:
            self.bash.stdin.write(text + "\n")
            self.bash.stdin.flush()
        except BrokenPipeError:
            raise RunFailed("the session's bash is gone") from None

    def _shown(self, raw: bytes) -> list[str]:
        """Output as a terminal shows it: a \\r-rewritten line as its last text, bash's own messages as bash's,
        the session's prefix and scratch directory as the defaults."""
        text = raw.decode("utf-8", errors="replace")
        text = re.sub(re.escape(str(self.ctl)) + r"/cmd\.\d+: ", "bash: ", text)
        text = text.replace(str(self.scratch), SHOWN_SCRATCH).replace(self.prefix, SHOWN_PREFIX)
        lines = []
        for line in text.split("\n"):
            parts = [p for p in line.split("\r") if p]
            lines.append((parts[-1] if parts else "").rstrip())
        while lines and not lines[-1]:
            lines.pop()
        while lines and not lines[0]:
            lines.pop(0)
        return lines

    def _children(self) -> list[int]:
        """bash's children: the foreground job's processes while one runs."""
        out = []
        known = {j.pid for j in self.jobs}
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) not in known:
                st = _stat(int(d))
                if st and st[1] == self.bash.pid and st[0] != "Z":
                    out.append(int(d))
        return out

    def _interrupt_foreground(self) -> None:
        for pid in self._children():
            try:
                os.killpg(os.getpgid(pid), signal.SIGINT)
            except OSError:
                pass

    def run(self, shell: str, background: bool, timeout_s: float, where: str,
            wait: str | None = None, interrupt: str | None = None, control: bool = False) -> tuple[int, list[str]]:
        """Run one command in the session: its exit status and the output to show under it.

        A control step (setup=, env=, cwd=) leaves $? as the document's last command left it."""
        self.n += 1
        cmd, out = self.ctl / f"cmd.{self.n}", self.ctl / f"out.{self.n}"
        cmd.write_text(shell + "\n")
        rc_var = "__cap_ctl" if control else "__cap_rc"
        self._send(f"source {shlex.quote(str(cmd))} > {shlex.quote(str(out))} 2>&1 < /dev/null; {rc_var}=$?; "
                   f"echo \"__CAP_DONE__ ${rc_var} $!\"; __cap_setrc $__cap_rc")
        deadline = time.monotonic() + timeout_s
        interrupted = False
        while True:
            try:
                line = self.lines.get(timeout=0.05)
            except queue.Empty:
                line = ""
            if line is None:
                raise RunFailed(f"{where}: the session's bash exited")
            if line.startswith("__CAP_DONE__"):
                break
            if interrupt and not interrupted and out.exists() and interrupt.encode() in out.read_bytes():
                self._interrupt_foreground()
                interrupted = True
            if time.monotonic() > deadline:
                self._interrupt_foreground()
                raise RunFailed(f"{where}: `{shell.splitlines()[0]}` ran past its {timeout_s:g} s limit")
        if interrupt and not interrupted:
            raise RunFailed(f"{where}: `{shell.splitlines()[0]}` ended before its output showed {interrupt!r}")
        fields = line.split()
        rc = int(fields[1])
        shown: list[str] = []
        if background:
            job = Job(int(fields[2]), out)
            self.jobs.append(job)
            if wait:
                job.shown = self._wait_for(job, wait, deadline, where)
                shown = self._shown(out.read_bytes()[:job.shown])
        else:
            shown = self._shown(out.read_bytes())
        ended: list[str] = []
        for job in ([] if control else self.jobs):
            if not job.ended and not _alive(job.pid):
                job.ended = True
                ended += self._shown(job.out.read_bytes()[job.shown:])
        return rc, ended + shown

    def _wait_for(self, job: Job, text: str, deadline: float, where: str) -> int:
        """The byte offset just past the line of the job's output that first contains `text`."""
        needle = text.encode()
        while True:
            data = job.out.read_bytes()
            k = data.find(needle)
            if k >= 0:
                nl = data.find(b"\n", k)
                if nl >= 0:
                    return nl + 1
            if not _alive(job.pid) and data == job.out.read_bytes():
                raise RunFailed(f"{where}: the background command ended before its output showed {text!r}")
            if time.monotonic() > deadline:
                raise RunFailed(f"{where}: the background command's output never showed {text!r}")
            time.sleep(0.05)

    def control(self, shell: str, where: str, what: str) -> None:
        """A step of the tool's own (setup=, env=, cwd=), in the session, keeping $? as the last command left it."""
        rc, out = self.run(shell, False, DEFAULT_TIMEOUT_S, where, control=True)
        if rc != 0:
            tail = "; ".join(out[-3:])
            raise RunFailed(f"{where}: {what} exited with status {rc}" + (f": {tail}" if tail else ""))

    def _processes(self) -> list[int]:
        """Every process of the session but bash: its session id, or our prefix in its environment."""
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) in (os.getpid(), self.bash.pid):
                continue
            pid = int(d)
            st = _stat(pid)
            if st is None or st[0] == "Z":
                continue
            if st[2] == self.bash.pid:
                out.append(pid)
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if self.marker + b"\0" in f.read() + b"\0":
                        out.append(pid)
            except OSError:
                pass
        return out

    def close(self) -> None:
        """Stop what is left (SIGINT, then SIGKILL), end bash, remove every object of the session's prefix."""
        for job in self.jobs:
            if _alive(job.pid):
                try:
                    os.killpg(job.pid, signal.SIGINT)
                except OSError:
                    pass
        deadline = time.monotonic() + STOP_GRACE_S
        while self._processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self._processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            assert self.bash.stdin is not None
            self.bash.stdin.close()
        except OSError:
            pass
        try:
            self.bash.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.bash.pid, signal.SIGKILL)
            self.bash.wait()
        env = dict(os.environ, SHMMMU_PREFIX=self.prefix)
        shmmmu = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "shmmmu")
        subprocess.run([shmmmu, "rm", "--all", "--force"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)
        for entry in os.listdir("/dev/shm"):                   # what rm leaves: the doc's own non-VM entries
            if entry.startswith(self.prefix) or entry.startswith("sem." + self.prefix):
                p = Path("/dev/shm") / entry
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    try:
                        p.unlink()
                    except OSError:
                        pass
        self._remove_files()

    def _remove_files(self) -> None:
        tmp = tempfile.gettempdir()
        for d in os.listdir(tmp):
            if d.startswith(self.prefix):
                p = os.path.join(tmp, d)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    try:
                        os.unlink(p)
                    except OSError:
                        pass


# ----------------------------------------------------------------------------- documents

def run_block(session: Session, block: Block) -> list[list[str]]:
    """The fresh output of each of the block's commands, elided as its keep= says."""
    where = block.where()
    after: list[str] = []
    if "setup" in block.options:
        session.control(block.options["setup"], where, "setup=")
    if "env" in block.options:
        before = []
        for pair in shlex.split(block.options["env"]):
            name, _, value = pair.partition("=")
            before.append(f'if [ "${{{name}+set}}" = set ]; then __cap_had_{name}=1; __cap_old_{name}="${name}"; '
                          f'else __cap_had_{name}=0; fi; export {name}={shlex.quote(value)}')
            after.append(f'if [ "$__cap_had_{name}" = 1 ]; then export {name}="$__cap_old_{name}"; '
                         f'else unset {name}; fi')
        session.control("\n".join(before), where, "env=")
    if "cwd" in block.options:
        session.control(f"pushd {block.options['cwd']} > /dev/null", where, "cwd=")
        after.append("popd > /dev/null")
    outputs = []
    try:
        for i, cmd in enumerate(block.commands):
            timeout_s = float(block.option("timeout", i) or DEFAULT_TIMEOUT_S)
            _, out = session.run(cmd.shell, cmd.background, timeout_s, f"{where} (command {i + 1})",
                                 wait=block.option("wait", i) if cmd.background else None,
                                 interrupt=None if cmd.background else block.option("interrupt", i))
            outputs.append(elide(out, block.option("keep", i), where))
    finally:
        if after:
            session.control("\n".join(after), where, "restoring env= / cwd=")
    return outputs


def diff(block: Block, fresh: list[list[str]]) -> list[str]:
    """A unified diff of the shapes (document against code), empty when they agree."""
    old = shape(block_lines(block, [c.output for c in block.commands]))
    new = shape(block_lines(block, fresh))
    return list(difflib.unified_diff(old, new, f"{block.where()} (the document, normalised)",
                                     f"{block.where()} (the code now, normalised)", lineterm="", n=2))


def process(path: Path, check: bool) -> bool:
    """Run one document's blocks; rewrite it, or compare it (--check).  True when it is current."""
    lines, blocks = parse_document(path)
    if not blocks:
        print(f"{display(path)}: no capture blocks")
        return True
    t0 = time.monotonic()
    session = Session()
    try:
        fresh = [run_block(session, b) for b in blocks]
    finally:
        session.close()
    elapsed = time.monotonic() - t0
    if check:
        differing = 0
        for b, f in zip(blocks, fresh):
            d = diff(b, f)
            if d:
                differing += 1
                print(f"{b.where()}: the output's shape differs from what the code prints now")
                print("\n".join(d))
        print(f"{display(path)}: {len(blocks)} blocks, {differing} differ ({elapsed:.0f} s)")
        return differing == 0
    changed = 0
    for b, f in reversed(list(zip(blocks, fresh))):              # from the end: indices stay valid
        body = block_lines(b, f)
        if lines[b.start:b.end] != body:
            lines[b.start:b.end] = body
            changed += 1
    if changed:
        path.write_text("\n".join(lines), encoding="utf-8")
    print(f"{display(path)}: {len(blocks)} blocks, {changed} rewritten ({elapsed:.0f} s)")
    return True


def default_documents() -> list[Path]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [p for p in docs if p.is_file() and any(MARKER_RE.match(s) for s in p.read_text().split("\n"))]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:                        # one line, not argparse's usage block
        print(f"{TOOL}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog=TOOL, description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path, help="documents (default: README.md and docs/*.md with markers)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="compare shapes instead of rewriting; exit 1 on a difference")
    g.add_argument("--list", action="store_true", help="list the owned blocks without running them")
    a = p.parse_args(argv)
    try:
        paths = a.files or default_documents()
        parsed = [(path, parse_document(path)[1]) for path in paths]  # every document's markers before any run
        if a.list:
            for path, blocks in parsed:
                for b in blocks:
                    opts = " ".join(f"{k}={shlex.quote(v)}" for k, v in b.options.items())
                    print(f"{b.where()}\t{len(b.commands)} commands\t{b.commands[0].text[0]}"
                          + (f"\t[{opts}]" if opts else ""))
                print(f"{display(path)}: {len(blocks)} blocks")
            return 0
        ok = True
        for path, _ in parsed:
            ok = process(path, a.check) and ok
        return 0 if ok else 1
    except BadInput as e:
        print(f"{TOOL}: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"{TOOL}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{TOOL}: interrupted; the session was stopped and removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
