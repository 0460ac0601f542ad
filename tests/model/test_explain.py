"""Explaining a counterexample (issue 24): the same decisions with the fix, every step whole with the decisive ones
marked, the violation in words, and one self-contained HTML page, checked in a real headless browser.

The browser tests drive Debian's chromium through its chromedriver with Selenium; where any of the three is
missing they skip with one line (.ci/run installs them).
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shmmmu import violations
from shmmmu.variants import BUGS
from shmmmu.exploration import Exploration
from shmmmu.explore import html as page_html
from shmmmu.explore.decisive import MARKS, written
from shmmmu.explore.explain import explain
from shmmmu.explore.explorer import Explorer, Token, replay, scenario_with
from shmmmu.explore.report import ExploreOptions, ReplayReport, run_explore
from shmmmu.explore.scenarios import SCENARIOS, accesses, host_ops
from shmmmu.workloads import READ, WRITE

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "shmmmu.workers.cli"]
K18 = "link-after-publish"


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def k18() -> object:
    """The K18 counterexample as `shmmmu explore --bug link-after-publish` finds it, with the fix beside it."""
    rep = run_explore(ExploreOptions(bugs=[K18], with_fix=True))
    assert rep.found is not None
    return rep


# ---------------------------------------------------------------- the violation in words


def _recording_sites() -> set[tuple[str, str]]:
    """(kind, file:qualname) of every call that records a violation with a literal kind, read from the sources."""
    found = set()
    for path in (ROOT / "shmmmu").rglob("*.py"):
        def walk(node: ast.AST, stack: list[str]) -> None:
            for ch in ast.iter_child_nodes(node):
                if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    walk(ch, stack + [ch.name, "<locals>"])
                elif isinstance(ch, ast.ClassDef):
                    walk(ch, stack + [ch.name])
                else:
                    if isinstance(ch, ast.Call) and isinstance(ch.func, ast.Attribute):
                        f = ch.func
                        is_record = f.attr == "record" and ast.unparse(f.value) == "violations"
                        kind_at = 1 if is_record else 0
                        if (is_record or f.attr == "violation") and len(ch.args) > kind_at \
                                and isinstance(ch.args[kind_at], ast.Constant):
                            where = ".".join(stack)
                            where = where[:-len(".<locals>")] if where.endswith(".<locals>") else where
                            found.add((ch.args[kind_at].value, f"{path.name}:{where}"))
                    walk(ch, stack)
        walk(ast.parse(path.read_text()), [])
    return found


def test_every_site_that_records_a_violation_has_its_sentence() -> None:
    """One table (violations.SITES) says every recorded violation in words: each call in the package that records
    one with a literal kind has its entry, and no entry names a site that is gone."""
    sites = _recording_sites()
    assert len(sites) > 30, sites
    table = {(k, w) for k, w, _ in violations.SITES}
    missing = {s for s in sites if s not in table}
    assert not missing, f"recorded without a sentence in violations.SITES: {sorted(missing)}"
    stale = {(k, w) for k, w in table if k != "*" and (k, w) not in sites}
    assert not stale, f"violations.SITES names sites that no longer record: {sorted(stale)}"


def test_a_record_names_its_site_and_says_what_happened(k18) -> None:
    """K18 through the real MMU: the record's site is the K18 unlink, its sentence names the table, the list, the
    actor; the raw fields stay in str() and in the JSON."""
    t = Token.decode(k18.token)
    with Explorer(scenario_with(t.scenario, t.params), t.bugs) as ex:
        replay(ex, t.switches)
        (v,) = violations.read_all(ex.region)
    assert v.where == "tdp_map.py:TdpMap.unlink_sp_k18_page_list"
    assert str(v) == "!!! table-leak: worker 1 gfn 0x0 (0x5, 0x0)"
    text = v.sentence(violations.worker_names(ex.config), 8)
    assert "table t5" in text and "tdp_mmu_pages" in text and "list_del" in text and "the host" in text, text
    j = k18.to_json()
    (raw,) = j["violations"]
    assert (raw["kind"], raw["worker"], raw["gfn"], raw["a"], raw["b"]) == ("table-leak", 1, 0, 5, 0)
    assert raw["site"] == v.where and raw["sentence"].startswith("host ran list_del")
    assert j["finding"]["message"].startswith("table-leak: worker 1 gfn 0x0 (0x5, 0x0)")


def test_inspect_says_a_recorded_violation_in_words(k18) -> None:
    """A region that recorded K18's violation, as `shmmmu inspect` and `inspect --check` show it: the raw record
    and its sentence."""
    t = Token.decode(k18.token)
    with Explorer(scenario_with(t.scenario, t.params), t.bugs) as ex:
        replay(ex, t.switches)
        summary = cli("inspect", ex.name)
        check = cli("inspect", ex.name, "--check")
    assert "!!! table-leak: worker 1 gfn 0x0 (0x5, 0x0)" in summary.stdout, summary.stdout + summary.stderr
    assert "the host ran list_del (tdp_mmu_unlink_page) on table t5" in summary.stdout, summary.stdout
    assert check.returncode != 0
    assert "recorded: table-leak: worker 1 gfn 0x0 (0x5, 0x0): the host ran list_del" in check.stdout, check.stdout


# ---------------------------------------------------------------- every step, whole, marked


def _column_text(lines: list[str], header: str, actors: list[str]) -> dict[str, str]:
    """Each actor's column of a text table, its wrapped pieces joined (whitespace collapsed)."""
    starts = [header.index(a) for a in actors]
    widths = [b - a for a, b in zip(starts, starts[1:])] + [10_000]
    out = {a: [] for a in actors}
    for ln in lines:
        for a, s, w in zip(actors, starts, widths):
            out[a].append(ln[s:s + w - 3].strip() if len(ln) > s else "")
    return {a: re.sub(r"\s+", " ", " ".join(x for x in v if x)) for a, v in out.items()}


def test_k18_table_has_every_step_to_the_failure_whole_and_marked(k18) -> None:
    """Every step of the failing execution is a row (the setup folded into one line, or every one with --unfold),
    no value is cut, and the decisive steps carry their marks: vCPU0's cmpxchg publishing t5 (T), the host's
    preemption (P), its list_del reads of t5's links before vCPU0's list_add (D), the violation (!)."""
    e = k18.explained
    log = e.bug.rec.log
    # the last step is the record's last store (its kind word): the checkers' steps are steps too
    assert log[-1].section == "violations" and log[-1].function == "violations.py:record" and log[-1].word == 0
    for unfold in (False, True):
        k18.unfold = unfold
        lines = k18.lines()
        assert not any("…" in ln for ln in lines)
        header = next(ln for ln in lines if ln.startswith("step   mark"))
        table = lines[lines.index(header) + 2: lines.index("=> " + e.finding_lines()[0])]
        numbers = [int(ln[:5]) for ln in table if ln[:5].strip().isdigit()]
        fold = e.bug.marks.fold
        want = [s.index for k, s in enumerate(log) if unfold or not (fold[0] <= k <= fold[1])]
        if not unfold:
            folded = next(ln for ln in table if ln[:5].strip().isdigit())
            assert numbers[0] == 1 and f"[setup, folded: steps 1-{log[fold[1]].index}," in folded
            numbers = numbers[1:]
        assert numbers == want
        columns = _column_text(table, header, e.actors)
        for r in e.bug.rows[(0 if unfold else fold[1] + 1):]:
            assert re.sub(r"\s+", " ", r.text) in columns[e.actors[r.actor]], r.text
    k18.unfold = False
    marked = {s.index: e.bug.marks.mark[k] for k, s in enumerate(log) if k in e.bug.marks.mark}
    texts = {s.index: e.bug.describe.step(s) for s in log}
    t_steps = [n for n, m in marked.items() if m == "T"]
    assert any("cmpxchg L2 t6[0]: 0 (not present) -> 0x5907 (L2 non-leaf -> t5" in texts[n] for n in t_steps)
    d_steps = [n for n, m in marked.items() if m == "D"]
    assert {texts[n].split(": ", 1)[1] for n in d_steps} >= {"read t5.prev = none", "read t5.next = none"}
    assert all("unlink_sp_k18_page_list" in texts[n] for n in d_steps)
    assert "P" in marked.values() and "!" in marked.values()
    assert "0x5a0 (REMOVED: frozen)" in "\n".join(k18.lines())
    finding = e.finding_lines()
    assert finding[0] == "violation: table-leak: worker 1 gfn 0x0 (0x5, 0x0)"
    assert any(ln.startswith("why: host preempted vCPU0 at step") and "t5.prev" in ln for ln in finding)
    assert any(ln.startswith("decisive pair: host's unlink_sp_k18_page_list: read t5.prev") for ln in finding)


def test_the_svg_has_every_row_and_the_marks(k18) -> None:
    svg = k18.svg()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "…" not in svg and "setup, folded" in svg
    for letter in ("T", "P", "D", "!"):
        assert 'class="m" fill="' in svg and f">{letter}</text>" in svg.replace("&gt;", ">"), letter
    assert "read t5.prev = none" in svg


# ---------------------------------------------------------------- --with-fix


def test_with_fix_runs_the_same_decisions_clean_and_names_the_first_difference(k18) -> None:
    p = cli("explore", "--replay", k18.token, "--with-fix")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    out = p.stdout
    assert "the same execution" in out
    m = re.search(r"the executions first differ at step (\d+): with the bug vCPU0 in (\S+) .*; with the fix vCPU0 "
                  r"in (\S+) ", out)
    assert m, out[:3000]
    assert m.group(3) == "tdp_mmu_link_sp"         # 6.2's count, where 5.13 took tdp_mmu_pages_lock for list_add
    assert re.search(r"the switch to host after vCPU0's write of L2 t6\[0\] \(step \d+ with the bug\) is made at "
                     r"step \d+", out), out[:3000]
    assert out.rstrip().endswith("no finding with the fix: the same decisions end cleanly") or \
        "=> no finding with the fix" in out
    assert "THE FIXED CODE FAILS" not in out


@pytest.mark.slow
@pytest.mark.parametrize("bug", sorted(BUGS))
def test_with_fix_for_every_switch(bug: str) -> None:
    """For every bug switch: its counterexample's decisions with the switch off end with no finding (exit 0) and
    say where the two executions first differ."""
    rep = run_explore(ExploreOptions(bugs=[bug]))
    assert rep.found is not None
    p = cli("explore", "--replay", rep.token, "--with-fix")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    assert re.search(r"the executions first differ at step \d+: with the bug \S+ in ", p.stdout), p.stdout[:2000]
    assert "no finding with the fix" in p.stdout


def test_a_finding_with_the_fix_is_said_loudly_and_fails() -> None:
    """If the same decisions fail with every switch off, that is a bug of shmmmu: the verdict says so and the exit
    status is 1 (here the scenario's own oracle is made to fail, as a broken checker would)."""
    sc = dataclasses.replace(SCENARIOS["fault-zap"], oracle=lambda ctx: ["invariant: a checker that always fails"])
    with Explorer(sc, [K18]) as ex:
        e = explain(ex, [], with_fix=True)
    assert e.fix.rec.result.finding is not None
    text = "\n".join(e.fix_lines())
    assert "!!! THE FIXED CODE FAILS UNDER THE SAME DECISIONS" in text and "a bug of shmmmu" in text
    r = ReplayReport(Token("fault-zap", [K18], {}, []), e, True, [], show_fix=True)
    assert Exploration(replay=r, with_fix=True).status == 1


# ---------------------------------------------------------------- the page


def _big_scenario():
    """Two vCPUs faulting in most of a 128-page memslot while the host zaps it: over 5,000 steps."""
    def build(ctx) -> None:
        ctx.actor("vCPU0", accesses(ctx, 0, [(g, WRITE) for g in range(64)]))
        ctx.actor("vCPU1", accesses(ctx, 1, [(g, READ) for g in range(32, 96)]))
        ctx.actor("host", host_ops(ctx, [("zap_gfn_range_locked", 0, 128)]))
    return dataclasses.replace(SCENARIOS["fault-fault"], name="big", build=build, memslots=((0, 128, 1),))


def test_the_page_is_one_file_with_nothing_to_fetch(k18, tmp_path: Path) -> None:
    text = page_html.page(k18.explained, k18.title, k18.token, "shmmmu explore --bug link-after-publish")
    assert text.startswith("<!DOCTYPE html>") and page_html.PLACEHOLDER not in text
    low = text.lower()
    for ref in ("http://", "https://", "<link", "@import", "url(", "src=", "@font-face"):
        assert ref not in low, ref
    data = json.loads(re.search(r"const D = (.*?);\n", text, re.S).group(1))
    assert data["meta"]["token"] == k18.token and data["meta"]["version"] and data["meta"]["commit"]
    assert len(data["runs"]) == 2 and data["runs"][1]["diverge"] >= 0
    assert data["meta"]["marks"] == MARKS


def test_a_5000_step_execution_makes_a_page_under_1_mib() -> None:
    """The page of an execution of over 5,000 steps, with the same decisions again beside it (two executions in
    one file), stays under 1 MiB: every text once, the state as changes."""
    with Explorer(_big_scenario(), []) as ex:
        e = explain(ex, [(30, -1, 2), (900, -1, 1)], with_fix=True)
    assert len(e.bug.rec.log) >= 5000 and len(e.fix.rec.log) >= 5000, len(e.bug.rec.log)
    size = len(page_html.page(e, ["big"], "token", "command").encode())
    assert size <= 1 << 20, size


def test_html_option_writes_the_page_or_says_why_not(tmp_path: Path, k18) -> None:
    out = tmp_path / "k18.html"
    p = cli("explore", "--replay", k18.token, "--html", str(out))
    assert p.returncode == 1 and out.read_text().startswith("<!DOCTYPE html>"), p.stderr
    clean = run_explore(ExploreOptions(scenario="fault-zap", strategy="random", executions=2))
    assert clean.found is None
    p = cli("explore", "--scenario", "fault-zap", "--strategy", "random", "-n", "2", "--html", str(tmp_path / "x.html"))
    assert p.returncode == 0 and "no finding: no page written to" in p.stderr and not (tmp_path / "x.html").exists()
    p = cli("explore", "--bug", K18, "--html", str(tmp_path / "no" / "such" / "dir" / "x.html"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr


# ---------------------------------------------------------------- in a real browser

BROWSER, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _driver(profile: Path):
    """Headless Debian chromium through its chromedriver (Selenium), logging the console and the network; its
    profile in `profile` (the test's own tmp_path: nothing is left in /tmp)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("no browser test: the selenium package is not installed (pip install selenium)")
    if not BROWSER or not DRIVER:
        pytest.skip("no browser test: chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver)")
    o = webdriver.ChromeOptions()
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1600,1000", "--user-data-dir=" + str(profile)):
        o.add_argument(a)
    o.binary_location = BROWSER
    o.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=o)


def test_the_page_in_a_headless_browser_steps_through_the_recorded_state(k18, tmp_path: Path) -> None:
    """The K18 page in chromium: no console error, no network request but the file itself; the keys move the
    cursor; at every marked step on a page-table word the state panel shows that word's value as the step left
    it (the value the step itself read or wrote, from the explorer's log), and one step back what it was before."""
    d = _driver(tmp_path / "chromium")           # skips in one line without selenium or chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    path = tmp_path / "k18.html"
    path.write_text(page_html.page(k18.explained, k18.title, k18.token, "shmmmu explore --bug link-after-publish"))
    url = path.as_uri()
    try:
        d.get_log("performance")                 # the browser's own start page, before ours
        d.get(url)
        assert d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
        e = k18.explained
        log, describe, marks = e.bug.rec.log, e.bug.describe, e.bug.marks
        body = d.find_element(By.TAG_NAME, "body")

        def at() -> tuple[int, str]:
            """The cursor's step, and the value the state panel shows for the word that step touched."""
            step = int(d.find_element(By.ID, "where").get_attribute("data-step"))
            cells = d.find_elements(By.CSS_SELECTOR, "#state tr.touched td:nth-child(2)")
            return step, cells[0].text if cells else ""

        body.send_keys(Keys.HOME)
        assert at()[0] == log[0].index
        body.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
        assert at()[0] == log[2].index
        body.send_keys(Keys.ARROW_LEFT)
        assert at()[0] == log[1].index
        body.send_keys(Keys.HOME)
        checked = 0
        for pos in sorted(marks.mark):
            body.send_keys("n")
            s = log[pos]
            step, shown = at()
            assert step == s.index, (step, s.index)
            if s.section not in ("tables", "tmeta") or s.op == "touch":
                continue
            after = written(s) if written(s) is not None else s.result
            assert shown == describe.value(s.section, s.word, after, pos), (s, shown)
            if s.op != "load":
                # one step back: the same entry as it was before this step
                cell = d.execute_script("return runs[0].cell(runs[0].cursor);")
                body.send_keys(Keys.ARROW_LEFT)
                row = d.find_element(By.CSS_SELECTOR, f'#state tr[data-cell="{cell}"] td:nth-child(2)')
                was = s.before if s.op == "store" or s.op.startswith("fetch") else s.result
                assert row.text == describe.value(s.section, s.word, was, pos - 1), (s, row.text)
                body.send_keys(Keys.ARROW_RIGHT)
                assert at()[0] == s.index
            checked += 1
        assert checked >= 4, checked
        body.send_keys("f")
        assert d.find_element(By.ID, "where").get_attribute("data-run") == "1"
        assert d.find_elements(By.CSS_SELECTOR, "#pane1 tr.diverge")
        body.send_keys(Keys.END)
        assert int(d.find_element(By.ID, "where").get_attribute("data-step")) == e.fix.rec.log[-1].index
        errors = [x for x in d.get_log("browser") if x["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        requests = [json.loads(x["message"])["message"] for x in d.get_log("performance")]
        sent = [r["params"] for r in requests if r["method"] == "Network.requestWillBeSent"]
        assert any(p["request"]["url"] == url for p in sent)
        # what our page asked for: itself only (headless chromium loads its own chrome:// start page beside it)
        ours = {p["request"]["url"] for p in sent if p.get("documentURL") == url}
        assert ours == {url}, ours
        others = {p.get("documentURL", "") for p in sent} - {url}
        assert all(doc.startswith("chrome://") for doc in others), others     # only the browser's own pages
    finally:
        d.quit()
