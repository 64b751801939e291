"""The live shop page (``GET /demo``) in a real headless browser: Debian's ``chromium`` driven by
Playwright (PyPI ``playwright``, using the system browser: nothing is downloaded).

The page is served by the serving app's own code in one process (``bench/inprocess_app.py``: the
same FastAPI routes, Ingress, ranker and session shards, every Ray hop a direct call) under
uvicorn on 127.0.0.1, so this test needs no Ray; it checks the page, not Serve. A screenshot of
the page after the clicks is saved as ``test-output/demo.png``.

Skips, saying why, when Playwright or a chromium binary is missing (``apt-get install chromium``;
``pip install -e .[dev]`` installs Playwright).
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_for_condition

pytestmark = pytest.mark.integration

KEY = "client-key-for-browser-tests-01"
OUTPUT = Path(__file__).resolve().parents[2] / "test-output"


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def demo_url(svd_artifact_root: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import uvicorn
    from ray import serve

    from bench.inprocess_app import build

    tmp = tmp_path_factory.mktemp("demo-browser")
    mp = pytest.MonkeyPatch()
    mp.setattr(serve, "get_replica_context", serve.get_replica_context)
    mp.setenv("INTENTREC_API_KEY", KEY)
    root = tmp / "models"
    shutil.copytree(svd_artifact_root, root)
    api = build({"artifacts_root": str(root), "state_dir": str(tmp / "state"),
                 "reload_poll_s": 0, "inline_context": True,
                 "session": {"num_shards": 1, "wal_uri": str(tmp / "wal")}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_condition(lambda: server.started, timeout=60, what="uvicorn serves the demo app")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        mp.undo()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install -e .[dev])")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium on PATH: install Debian's `chromium` (apt-get install chromium)")
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def recs_categories(page: Any) -> list[str]:
    cats: list[str] = page.eval_on_selector_all("#recs li", "els => els.map(e => e.dataset.category)")
    return cats


def wait_generation(page: Any, after: int) -> int:
    page.wait_for_function(f"Number(document.getElementById('recs').dataset.generation) > {after}",
                           timeout=30_000)
    n: int = page.evaluate("Number(document.getElementById('recs').dataset.generation)")
    return n


def test_clicking_three_items_of_a_category_raises_it(browser: Any, demo_url: str) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(demo_url + "/demo")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    generation = wait_generation(page, 0)
    page.wait_for_function("document.querySelectorAll('#shopper option').length > 1")
    # A fixed request time (the picker's field): without it the page asks at the wall clock's
    # weekday and hour, and the context features would make the answer depend on the time of day.
    page.fill("#when", "2017-06-10T09:30")
    page.dispatch_event("#when", "change")
    generation = wait_generation(page, generation)
    before = recs_categories(page)
    assert before, "the page shows recommendations for a new anonymous session"

    # A category with at least three items that the first list does not show.
    cats: list[dict[str, Any]] = page.eval_on_selector_all(
        ".cat", "els => els.map(e => ({category: e.dataset.category, "
        "items: Number(e.querySelector('small').textContent.replace(/[()]/g, ''))}))")
    target = next(c["category"] for c in cats if c["items"] >= 3 and c["category"] not in before)
    button = page.locator(f".cat[data-category='{target}']")
    button.evaluate("b => b.closest('details').open = true")
    button.click()
    page.wait_for_function(
        f"document.getElementById('shelf').dataset.category === {target!r} && "
        "document.querySelectorAll('#shelf .card').length >= 3")
    cards = page.locator("#shelf .card")
    for n in range(3):
        assert cards.nth(n).get_attribute("data-category") == target
        cards.nth(n).locator(".title").click()
        generation = wait_generation(page, generation)

    after = recs_categories(page)
    assert after.count(target) > before.count(target) == 0, (target, before, after)
    # The intent panel names the category; moved items are highlighted.
    assert page.locator(f"#intent .bar[data-category='{target}']").count() == 1
    assert page.locator("#recs li.new, #recs li.up").count() > 0
    # Every click was attributed to the response that showed the item.
    log = page.locator("#log li").all_text_contents()
    # ("position –" would mean a click credited to a response that did not show the item.)
    assert len(log) == 3 and all(re.search(r"position \d+$", line) for line in log), log
    assert not errors, errors

    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()


def test_the_time_picker_changes_the_context(browser: Any, demo_url: str) -> None:
    page = browser.new_page()
    page.goto(demo_url + "/demo")
    generation = wait_generation(page, 0)
    page.click("[data-preset='christmas']")
    wait_generation(page, generation)
    page.wait_for_function("document.getElementById('context').textContent.includes('Christmas')")
    assert "winter" in page.text_content("#context")
    page.close()


