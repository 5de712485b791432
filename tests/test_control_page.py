"""The control page in a real headless Chromium, acting on a real swapper with real llama-servers.

Chromium and its driver come from Debian (`chromium`, `chromium-driver`; `make test` installs
them); Selenium drives them. Assertions are on the DOM and on swapper's own API; a screenshot of
each view lands in tests/artifacts/ (git-ignored) for people to look at.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import link, synth_file

pytestmark = pytest.mark.real

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1360,900")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not binary or not driver_bin:
        pytest.fail("Chromium not found: `make system-deps` installs chromium and chromium-driver")
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
    last = None
    while time.monotonic() < end:
        last = pred()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def screenshot(driver, name: str) -> Path:  # noqa: ANN001
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"control-{name}.png"
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000
    return path


ROWS = """
const out = {};
for (const tr of document.querySelectorAll("#models tbody tr")) {
  out[tr.dataset.model] = {state: tr.dataset.state, pinned: tr.dataset.pinned === "1",
    reason: tr.querySelector(".reason").textContent, force: !tr.querySelector(".force").hidden};
}
return out;
"""


def rows(driver) -> dict:  # noqa: ANN001
    return driver.execute_script(ROWS)


def row_state(driver, model: str) -> str | None:  # noqa: ANN001
    return rows(driver).get(model, {}).get("state")


def click(driver, model: str, button: str) -> None:  # noqa: ANN001
    driver.execute_script(f'document.querySelector(\'#models tr[data-model="{model}"] .{button}\').click()')


def tab(driver, view: str) -> None:  # noqa: ANN001
    driver.execute_script(f'document.querySelector(\'#tabs [data-view="{view}"]\').click()')


def open_page(driver, s, key: str | None = None) -> None:  # noqa: ANN001
    driver.get(f"{s.url}/")
    if key is not None:
        wait_until(lambda: driver.execute_script("return document.getElementById('keybox').classList.contains('on')"),
                   15, "the page to ask for a key")
        driver.find_element("id", "key").send_keys(key)
        driver.execute_script("document.querySelector('#keybox button').click()")
    wait_until(lambda: driver.execute_script("return document.getElementById('conn').textContent") == "live",
               20, "the event stream")
    wait_until(lambda: rows(driver), 15, "the models table")


def test_load_unload_and_pin_from_the_page_with_an_admin_key(swapper_factory, models_dir, browser):
    s = swapper_factory("--models-dir", str(models_dir), "--admin-key", "adm-1", "--api-key", "use-1",
                        "--pin", "tiny-b")
    open_page(browser, s, key="adm-1")
    assert browser.execute_script("return sessionStorage.getItem('swapper.key')") == "adm-1", \
        "the key is kept for the tab"
    wait_until(lambda: row_state(browser, "tiny-b") == "loaded", 60, "the pinned model to load at start")
    assert row_state(browser, "tiny-a") == "unloaded"

    click(browser, "tiny-a", "load")
    wait_until(lambda: row_state(browser, "tiny-a") == "loaded", 60, "tiny-a to show loaded")
    auth = {"Authorization": "Bearer adm-1"}
    listing = {m["id"]: m for m in s.get("/models", headers=auth).json()["data"]}
    assert listing["tiny-a"]["status"]["value"] == "loaded"
    screenshot(browser, "models")

    click(browser, "tiny-a", "unload")
    wait_until(lambda: row_state(browser, "tiny-a") == "unloaded", 60, "tiny-a to show unloaded")

    # a pinned model refuses a plain unload, says why, and offers force
    click(browser, "tiny-b", "unload")
    got = wait_until(lambda: (r := rows(browser)["tiny-b"])["force"] and r, 15, "the refusal")
    assert "pinned" in got["reason"] and got["state"] == "loaded"
    screenshot(browser, "models-pinned-refusal")
    click(browser, "tiny-b", "force")
    wait_until(lambda: row_state(browser, "tiny-b") == "unloaded", 60, "the forced unload")

    # pin and unpin from the page: swapper's own listing agrees
    click(browser, "tiny-a", "pinbtn")
    wait_until(lambda: rows(browser)["tiny-a"]["pinned"], 15, "tiny-a pinned on the page")
    listing = {m["id"]: m for m in s.get("/models", headers=auth).json()["data"]}
    assert listing["tiny-a"]["status"]["pinned"] is True
    click(browser, "tiny-a", "pinbtn")
    wait_until(lambda: not rows(browser)["tiny-a"]["pinned"], 15, "tiny-a unpinned on the page")


def test_a_model_too_big_for_the_budget_shows_insufficient_memory(swapper_factory, tmp_path, browser):
    """The small model (~114 MiB estimated) fits the budget, the big one (~189 MiB) never can."""
    d = tmp_path / "models"
    link(synth_file(8, 1), d / "small.gguf")
    link(synth_file(64, 3), d / "big.gguf")
    s = swapper_factory("--models-dir", str(d), "--budget", "150MiB", "--reserve", "0")
    open_page(browser, s)
    click(browser, "big", "load")
    reason = wait_until(lambda: rows(browser)["big"]["reason"], 15, "the refusal")
    assert "insufficient_memory" in reason


def test_a_failed_load_shows_the_childs_error_in_the_log_view(swapper_factory, tmp_path, browser):
    d = tmp_path / "models"
    link(synth_file(8, 1), d / "fine.gguf")
    bad = {"models": {"broken": {"path": str(synth_file(8, 1)), "args": ["--no-such-flag"]}}}
    s = swapper_factory("--models-dir", str(d), config=bad)
    open_page(browser, s)
    click(browser, "broken", "load")
    wait_until(lambda: row_state(browser, "broken") == "failed", 60, "the failed load on the page")

    def backoff_shown() -> bool:
        """Each failure doubles the back-off (1 s, 2 s, ...): retry until one is long enough to see."""
        r = rows(browser)["broken"]
        if "back-off" in r["reason"] and " s left" in r["reason"]:
            return True
        if "model_load_failed" in r["reason"] and "retry in" in r["reason"]:
            return True  # a load asked for during the back-off is refused with the time left
        if r["state"] == "failed" and "model_load_failed" not in r["reason"]:
            click(browser, "broken", "load")
            time.sleep(0.5)
        return False

    wait_until(backoff_shown, 60, "the back-off and its time left")
    browser.execute_script("document.querySelector('#models tr[data-model=\"broken\"] .reason a').click()")
    text = wait_until(lambda: browser.execute_script(
        "return document.getElementById('model-log').textContent"), 15, "the model's log")
    assert "--no-such-flag" in text, text
    banner = browser.execute_script("return document.getElementById('log-banner').textContent")
    assert "exit" in banner and "failed" in banner.lower()
    swapper_log = browser.execute_script("return document.getElementById('swapper-log').textContent")
    assert "swap fail model=broken" in swapper_log, "swapper's own log lines stream in"
    screenshot(browser, "logs")


def test_activity_gains_a_row_per_request(swapper_factory, models_dir, browser):
    s = swapper_factory("--models-dir", str(models_dir))
    open_page(browser, s)
    tab(browser, "activity")
    for i in range(3):
        assert s.post("/v1/completions", {"model": "tiny-a", "prompt": f"x{i}", "max_tokens": 4}).status == 200
        wait_until(lambda: browser.execute_script("return document.querySelectorAll('#requests tbody tr').length")
                   == i + 1, 15, f"activity row {i + 1}")
    assert s.post("/v1/completions", {"model": "nope", "prompt": "x"}).status == 404
    wait_until(lambda: browser.execute_script("return document.querySelectorAll('#requests tbody tr').length") == 4,
               15, "a row for the refused request too")
    cells = browser.execute_script("""return [...document.querySelectorAll('#requests tbody tr')].map(
        tr => [...tr.cells].map(c => c.textContent));""")
    newest, first = cells[0], cells[-1]
    assert newest[1:4] == ["unknown", "/v1/completions", "404"]
    assert first[1:4] == ["tiny-a", "/v1/completions", "200"]
    assert first[4].endswith("s"), "queue wait (the cold load) is shown"
    assert all(c[7].endswith("s") for c in cells), "every row has a duration"
    wait_until(lambda: browser.execute_script("return document.querySelectorAll('#swaps tbody tr').length") >= 1,
               10, "the swap of tiny-a listed")
    screenshot(browser, "activity")


def test_playground_streams_from_gemma_and_stop_cancels_it(swapper_factory, models_dir, browser):
    s = swapper_factory("--models-dir", str(models_dir))
    open_page(browser, s)
    tab(browser, "playground")
    browser.execute_script("document.getElementById('pg-model').value = 'gemma'")

    # a short answer first (the PyPI Gemma is the pretrained model: its words are not checked)
    browser.execute_script("document.getElementById('pg-max').value = '16'")
    browser.execute_script("document.getElementById('pg-send').click()")
    wait_until(lambda: browser.execute_script("return document.getElementById('pg-out').dataset.state") == "done",
               120, "the answer to finish")
    answer = browser.execute_script("return document.getElementById('pg-answer').textContent")
    assert answer.strip(), "tokens streamed into the page"
    screenshot(browser, "playground")

    # then a long one, stopped mid-stream: the request is cancelled in the child
    browser.execute_script("""
        document.getElementById('pg-max').value = '3000';
        document.getElementById('pg-prompt').value = 'Write a very long story about a lighthouse keeper, in many chapters.';
        document.getElementById('pg-send').click();""")
    wait_until(lambda: int(browser.execute_script("return document.getElementById('pg-out').dataset.chunks || 0")) >= 5,
               120, "tokens to stream")
    assert s.status("gemma")["inflight"] == 1
    browser.execute_script("document.getElementById('pg-stop').click()")
    wait_until(lambda: browser.execute_script("return document.getElementById('pg-out').dataset.state") == "stopped",
               10, "the page to stop")
    wait_until(lambda: s.status("gemma")["inflight"] == 0, 15, "swapper to release the request")
    wait_until(lambda: not any(slot.get("is_processing") for slot in s.get("/slots?model=gemma").json()),
               15, "llama-server to stop generating")
    screenshot(browser, "playground-stopped")


def test_a_thousand_models_stay_responsive(swapper_factory, tmp_path, browser):
    d = tmp_path / "models"
    src = synth_file(8, 1)
    for i in range(1000):
        os.makedirs(d, exist_ok=True)
        os.symlink(src, d / f"m{i:04d}.gguf")
    s = swapper_factory("--models-dir", str(d))
    t0 = time.monotonic()
    open_page(browser, s)
    wait_until(lambda: len(rows(browser)) == 1000, 30, "1,000 rows")
    shown = time.monotonic() - t0
    assert shown < 10, f"1,000 models took {shown:.1f} s to show"
    assert s.post("/v1/completions", {"model": "m0500", "prompt": "x", "max_tokens": 2}).status == 200
    t1 = time.monotonic()
    wait_until(lambda: row_state(browser, "m0500") == "loaded", 10, "one row's change among 1,000")
    assert time.monotonic() - t1 < 5
    took = browser.execute_script("""const t = performance.now();
        const f = document.getElementById('filter'); f.value = 'm05'; f.dispatchEvent(new Event('input'));
        return performance.now() - t;""")
    assert took < 500, f"filtering 1,000 rows took {took:.0f} ms"
    assert browser.execute_script("return document.getElementById('count').textContent") == "100 of 1000 models"
