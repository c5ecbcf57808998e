"""The neighbour debugger page in a real headless Chromium (Debian's package, driven by Playwright).

`make browser` installs both; without them these tests are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.edit_helpers import build_db
from tests.test_serve import Running

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("RETRODB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a closed network and a root user: no background connections, no sandbox, a fresh profile.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: run `make browser` (pip install 'retrodb[browser]')")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium), "
                    "or set RETRODB_CHROMIUM to its path")
    return sync_playwright


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    root = build_db(tmp_path_factory.mktemp("browser") / "db", n_docs=16, segment_bytes=3000, index=True)
    running = Running(root)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def test_query_shows_neighbour_cards_and_opens_their_neighbours(page_server, browser):
    page = browser.new_page()
    page.goto(page_server.url + "/")
    page.wait_for_selector("#meta:has-text('chunks')")
    page.fill("#q", "retrieval database chunk neighbour encoder")
    page.fill("#k", "3")
    page.click("#search")
    page.wait_for_selector(".card")
    cards = page.query_selector_all(".card")
    assert len(cards) == 3
    first = cards[0]
    assert first.query_selector(".rank").inner_text() == "#1"
    assert first.query_selector(".doc").inner_text().startswith("d")
    assert first.query_selector(".text").inner_text().strip()
    marks = page.query_selector_all(".card mark")
    assert marks, "the longest common token run is highlighted"
    assert all(m.inner_text().strip() and m.inner_text().lower() in
               "retrieval database chunk neighbour encoder" for m in marks if len(m.inner_text().split()) > 1)
    # a neighbour's own neighbours: its document is left out
    chunk_id = first.get_attribute("data-chunk-id")
    doc = first.query_selector(".doc").inner_text()
    first.query_selector(".actions button").click()
    page.wait_for_selector(f".asked:has-text('chunk {chunk_id}')")
    docs = [c.query_selector(".doc").inner_text() for c in page.query_selector_all(".card")]
    assert docs and doc not in docs
    # the document view: chunks as clickable spans
    page.query_selector(".card .doc").click()
    page.wait_for_selector(".doc-view .chunk")
    assert len(page.query_selector_all(".doc-view .chunk")) >= 1
    page.close()


def test_errors_show_on_the_page(page_server, browser):
    page = browser.new_page()
    page.goto(page_server.url + "/#chunk=123456789")
    page.wait_for_selector(".error")
    assert "123456789" in page.inner_text(".error")
    page.close()


def test_generation_view_shows_what_each_chunk_retrieved(page_server, browser):
    from tests.conftest import make_text

    page = browser.new_page()
    page.goto(page_server.url + "/")
    page.wait_for_selector("#nav-generate:not([hidden])")
    page.click("#nav-generate")
    page.fill("#prompt", make_text(5, 120))
    page.fill("#max-new", "4")
    page.click("#gen-form button[type=submit]")
    page.wait_for_selector(".gen .chunk ul li")
    items = page.query_selector_all(".gen .chunk ul li")
    assert items and all(li.query_selector(".neighbour-text").inner_text().strip() for li in items)
    assert "retrieved for it" in page.inner_text("#gen-results")
    page.close()
