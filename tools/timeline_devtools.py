"""Timeline in DevTools: a `--timeline` JSON opened offline in the trace viewer Chromium ships, its DevTools Performance panel.

chrome://tracing is gone from Chromium (156 here) and Perfetto's UI is a web
site, but every Chromium serves its own DevTools front end on its remote
debugging port (/devtools/devtools_app.html), and the Performance panel
there opens Chrome trace-event JSON with the same trace engine
(models/trace/trace.js) that parses a recorded profile.  Headless Chromium
driven by chromedriver (selenium) does, offline:

  parse FILE.json           the trace engine's reading of the file, as JSON on stdout: each process's
                            threads (tracks) with their event names and counts, the flows, the warnings
  screenshot FILE.json PNG  the Performance panel with the file loaded, the VM's tracks expanded

The test (tests/system/test_timeline.py) uses `parse`; docs/trace.md's picture comes
from `screenshot`.  Without selenium, chromium or chromedriver: one line on
stderr, exit 2 (the test skips with that line).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from typing import Any

CHROMIUM = os.environ.get("SHMMMU_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SHMMMU_CHROMEDRIVER", "/usr/bin/chromedriver")

PARSE_JS = """
const done = arguments[arguments.length - 1];
(async () => { try {
  const Trace = await import('./models/trace/trace.js');
  const model = Trace.TraceModel.Model.createWithAllHandlers();
  const file = JSON.parse(arguments[0]);
  await model.parse(file.traceEvents || file);
  const data = model.parsedTrace(0).data;
  const out = {processes: [], flows: (data.Flows.flows || []).length,
               warnings: [...(data.Warnings.perWarning || new Map()).keys()]};
  for (const [pid, p] of data.Renderer.processes) {
    const threads = [];
    for (const [tid, t] of p.threads) {
      const counts = {};
      for (const e of t.entries) counts[e.name] = (counts[e.name] || 0) + 1;
      threads.push({tid, name: t.name, events: counts});
    }
    out.processes.push({pid, threads});
  }
  done(JSON.stringify(out));
} catch (e) { done('error: ' + e); } })();
"""

LOAD_JS = """
const done = arguments[arguments.length - 1];
(async () => { try {
  const UI = await import('./ui/legacy/legacy.js');
  await UI.ViewManager.ViewManager.instance().showView('timeline');
  const T = await import('./panels/timeline/timeline.js');
  await T.TimelinePanel.TimelinePanel.instance().loadFromFile(new File([arguments[1]], arguments[0]));
  done('ok');
} catch (e) { done('error: ' + e); } })();
"""

CLOSE_DIALOGS_JS = """
function walk(root, f) { for (const e of root.querySelectorAll('*')) { f(e); if (e.shadowRoot) walk(e.shadowRoot, f); } }
walk(document, e => { const l = (e.getAttribute && e.getAttribute('aria-label')) || '';
  if (l === 'Close' && !(e.closest && e.closest('.tabbed-pane-header'))) { try { e.click(); } catch (x) {} } });
"""


def missing() -> str | None:
    """Why the viewer cannot be driven here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not (os.path.exists(path) or shutil.which(path)):
            return f"{what} is not installed (Debian: apt-get install chromium chromium-driver)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser(width: int = 1800, height: int = 1000) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    o = webdriver.ChromeOptions()
    o.binary_location = CHROMIUM
    port = _free_port()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}",
              f"--remote-debugging-port={port}"):
        o.add_argument(a)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=o)
    d.set_script_timeout(300)
    d.get(f"http://127.0.0.1:{port}/devtools/devtools_app.html")     # DevTools' front end, served by Chromium
    time.sleep(2)
    return d


def parse(path: str) -> dict[str, Any]:
    """The DevTools trace engine's reading of a trace-event JSON file."""
    with open(path) as f:
        text = f.read()
    d = _browser()
    try:
        r = d.execute_async_script(PARSE_JS, text)
    finally:
        d.quit()
    if r.startswith("error: "):
        raise RuntimeError(f"DevTools' trace engine refused {path}: {r[7:]}")
    return json.loads(r)


def _click(d: Any, x: int, y: int) -> None:
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        ev = {"type": kind, "x": x, "y": y}
        if kind != "mouseMoved":
            ev.update(button="left", clickCount=1)
        d.execute_cdp_cmd("Input.dispatchMouseEvent", ev)
    time.sleep(1)


def screenshot(path: str, png: str, rows: int, settle_s: float = 8.0) -> None:
    """The Performance panel with `path` loaded, the sidebar hidden, the first process and its first `rows`
    tracks expanded (clicked from the bottom up, each track's header 21 px below the previous)."""
    with open(path) as f:
        text = f.read()
    d = _browser()
    try:
        r = d.execute_async_script(LOAD_JS, os.path.basename(path), text)
        if r != "ok":
            raise RuntimeError(f"the Performance panel did not load {path}: {r}")
        time.sleep(settle_s)
        d.execute_script(CLOSE_DIALOGS_JS)              # the flame chart's keyboard-shortcuts card
        _click(d, 15, 39)                               # the toolbar's sidebar toggle
        _click(d, 10, 130)                              # the process group
        for k in reversed(range(rows)):
            _click(d, 20, 145 + 21 * k)
        d.save_screenshot(png)
    finally:
        d.quit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("parse").add_argument("file")
    s = sub.add_parser("screenshot")
    s.add_argument("file")
    s.add_argument("png")
    s.add_argument("--rows", type=int, default=6, help="tracks of the first process to expand")
    a = p.parse_args()
    why = missing()
    if why:
        print(f"timeline_devtools: {why}", file=sys.stderr)
        sys.exit(2)
    if a.cmd == "parse":
        print(json.dumps(parse(a.file), indent=1))
    else:
        screenshot(a.file, a.png, a.rows)


if __name__ == "__main__":
    main()
