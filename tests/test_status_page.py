"""The status page in a real headless Chromium, watching a real swapper swap real children.

Chromium and its driver come from Debian (`chromium`, `chromium-driver`); Selenium drives them.
Assertions are on the DOM; a screenshot lands in the test's temp dir for people to look at.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = pytest.mark.real

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--window-size=1280,900")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not binary or not driver_bin:
        pytest.fail("Chromium not found: install the Debian packages chromium and chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(driver_bin, log_output=str(tmp_path / "chromedriver.log")),
                              options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(pred, timeout: float, what: str):  # noqa: ANN001, ANN201
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


SNAPSHOT = """
const text = (root, sel) => { const e = root.querySelector(sel); return e ? e.textContent : null; };
const models = {};
for (const tr of document.querySelectorAll("#models tbody tr")) {
  const fill = tr.querySelector(".footprint .bar .fill");
  models[tr.dataset.model] = {state: tr.dataset.state, shown: text(tr, ".state"), queue: text(tr, ".queue"),
    inflight: text(tr, ".inflight"), lastUsed: text(tr, ".last-used"), footprint: text(tr, ".footprint .label"),
    fillWidth: fill ? fill.getBoundingClientRect().width : 0};
}
const events = [...document.querySelectorAll("#events tbody tr")].map(tr => ({model: tr.dataset.model,
  action: tr.dataset.action, reason: text(tr, ".reason"), seconds: text(tr, ".seconds")}));
return {models, events, conn: text(document, "#conn"), ready: text(document, "#ready"),
        chips: text(document, "#memchips"), noEvents: getComputedStyle(document.getElementById("no-events")).display};
"""


def snapshot(driver) -> dict:  # noqa: ANN001
    """What the page shows, read in one go (the page redraws while it lives)."""
    return driver.execute_script(SNAPSHOT)


def state(driver, model: str) -> str | None:  # noqa: ANN001
    return snapshot(driver)["models"].get(model, {}).get("state")


def test_page_shows_a_model_loading_live(swapper_factory, models_dir, browser, tmp_path):
    key = "page-key-8080"
    s = swapper_factory("--models-dir", str(models_dir), "--api-key", key, "--max-models", "1")
    browser.get(f"{s.url}/ui?api_key={key}")
    wait_until(lambda: state(browser, "tiny-a"), 15, "the models table")
    page = snapshot(browser)
    assert set(page["models"]) == {"gemma", "tiny-a", "tiny-b"}
    assert page["models"]["tiny-a"]["state"] == "unloaded"
    assert page["conn"] == "live", "server-sent events, with the key passed on"
    assert page["ready"] == "not ready"
    assert page["events"] == [] and page["noEvents"] != "none"

    auth = {"Authorization": f"Bearer {key}"}
    r = s.post("/v1/completions", {"model": "tiny-a", "prompt": "x", "max_tokens": 2}, headers=auth)
    assert r.status == 200
    wait_until(lambda: state(browser, "tiny-a") == "loaded", 10, "the page to show tiny-a loaded without a reload")
    # the request is answered a moment before its slot is released: the page catches up live
    wait_until(lambda: snapshot(browser)["models"]["tiny-a"]["inflight"] == "0", 10, "in flight back to 0")
    page = snapshot(browser)
    tiny = page["models"]["tiny-a"]
    assert (tiny["shown"], tiny["queue"], tiny["inflight"]) == ("loaded", "0", "0")
    assert tiny["lastUsed"].endswith("s ago")
    assert tiny["fillWidth"] > 0 and "MiB" in tiny["footprint"]
    assert page["ready"] == "ready" and "tiny-a" in page["chips"]

    # one slot: tiny-b swaps tiny-a out, and the events table lists both swaps, newest first
    assert s.post("/v1/completions", {"model": "tiny-b", "prompt": "x", "max_tokens": 2}, headers=auth).status == 200
    wait_until(lambda: state(browser, "tiny-a") == "unloaded", 10, "tiny-a evicted")
    wait_until(lambda: len(snapshot(browser)["events"]) == 3, 10, "three swap events")
    page = snapshot(browser)
    assert page["models"]["tiny-b"]["state"] == "loaded"
    got = [(e["model"], e["action"], e["reason"]) for e in page["events"]]
    assert got == [("tiny-b", "load", "demand"), ("tiny-a", "evict", "budget"), ("tiny-a", "load", "demand")]
    assert all(e["seconds"].endswith(" s") for e in page["events"])
    assert page["noEvents"] == "none"
    shot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_page_polls_when_events_are_unavailable(swapper_factory, models_dir, browser):
    """Without EventSource the page falls back to polling /api/status (and still sees changes)."""
    s = swapper_factory("--models-dir", str(models_dir))
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": "delete window.EventSource; window.EventSource = undefined;"})
    browser.get(f"{s.url}/")
    wait_until(lambda: state(browser, "tiny-b"), 15, "the models table")
    assert snapshot(browser)["conn"] == "polling"
    assert s.post("/v1/completions", {"model": "tiny-b", "prompt": "x", "max_tokens": 2}).status == 200
    wait_until(lambda: state(browser, "tiny-b") == "loaded", 10, "a poll to see tiny-b")
