#!/usr/bin/env python3
"""Screenshot of an explore counterexample page: `shmmmu explore --bug NAME --html`, opened in headless chromium.

    .venv/bin/python tools/explore_screenshot.py [--bug link-after-publish] [--keys n,n,n,n] OUT.png

Finds the switch's counterexample (as `shmmmu explore --bug NAME` does), writes its page, opens it in Debian's
chromium through chromium-driver (Selenium), presses the keys (comma-separated: a letter, or a Selenium key
name such as ARROW_RIGHT), and saves the window (1600x1000) as OUT.png.  docs/explore/k18-html.png is
`--keys n,n,n` (from the first mark, the cursor on the first of the host's reads of t5's list links, step 218).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the PNG to write")
    ap.add_argument("--bug", default="link-after-publish")
    ap.add_argument("--keys", default="n,n,n")
    ap.add_argument("--size", default="1600,1000")
    a = ap.parse_args()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
    except ImportError:
        print("explore_screenshot: selenium is not installed (pip install selenium)", file=sys.stderr)
        return 2
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        print("explore_screenshot: chromium and chromium-driver are not installed", file=sys.stderr)
        return 2
    from shmmmu.explore import html
    from shmmmu.explore.report import ExploreOptions, run_explore
    rep = run_explore(ExploreOptions(bugs=[a.bug], with_fix=True))
    if rep.found is None:
        print(f"explore_screenshot: no counterexample for {a.bug}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="shmmmu-shot-") as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(html.page(rep.explained, rep.title, rep.token, f"shmmmu explore --bug {a.bug} --html"))
        o = webdriver.ChromeOptions()
        for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--window-size={a.size}", f"--user-data-dir={tmp}/profile"):
            o.add_argument(arg)
        o.binary_location = browser
        d = webdriver.Chrome(service=Service(driver), options=o)
        try:
            d.get(page.as_uri())
            body = d.find_element(By.TAG_NAME, "body")
            for k in filter(None, a.keys.split(",")):
                body.send_keys(getattr(Keys, k) if len(k) > 1 else k)
            d.save_screenshot(a.out)
            print(f"{a.out}: {d.find_element(By.ID, 'where').text}")
        finally:
            d.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
