"""The README's screenshot of `retrodb serve`: a query on the demo database, in headless Chromium.

    python bench/screenshot_serve.py [DB] [--query TEXT] [--out docs/img/serve.png]

DB defaults to bench/out/serve-demo (built by bench/bench_serve.py). Needs `make browser`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("db", nargs="?", default=None)
    ap.add_argument("--query", default="a generator function yields values one at a time")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "serve.png"))
    args = ap.parse_args(argv)
    from bench_serve import Server, demo_db
    from playwright.sync_api import sync_playwright

    db = Path(args.db) if args.db else demo_db()
    server = Server(db)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                        args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                              "--disable-background-networking", "--disable-component-update"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(server.url + "/")
            page.wait_for_selector("#meta:has-text('chunks')")
            page.fill("#q", args.query)
            page.fill("#k", "3")
            page.click("#search")
            page.wait_for_selector(".card")
            page.screenshot(path=args.out, full_page=False)
            browser.close()
    finally:
        server.stop()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
