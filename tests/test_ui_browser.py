"""The web page in a real headless Chromium (Playwright, the system's Chromium) over a real `mvz serve`.

A person's path through the page: type a prompt, seed 7, 4 views, Generate; the grid they download equals
`mvz generate --seed 7 --views 4`'s pixel for pixel; a bad value shows the API's one-line error; two pages
generating at once run as one batch (read from /metrics). The screenshot is saved as a test artifact
(``MVZ_TEST_ARTIFACTS``, default the test's tmp dir; ``MVZ_TEST_ARTIFACTS=docs/img`` refreshes the README's)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import free_port, wait_ready

playwright_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra)")
pytest.importorskip("gradio", reason="needs gradio (the ui extra)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVE = ["--model", "tiny", "--device", "cpu", "--dtype", "fp32"]
WAIT_MS = 180_000  # a loaded 2-core CI machine; nothing here asserts a duration
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="needs the system Chromium (apt-get install chromium)")]


@pytest.fixture(scope="module")
def server():
    """`mvz serve` with the page; a 2 s batch window so that two pages clicked together share a batch."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "mvz", "serve", *SERVE, "--port", str(port), "--ui",
                             "--max-batch", "2", "--batch-window-ms", "2000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(proc, url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=120)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.goto(url + "/")
    # the page fills the controls from the server's limits once loaded (resolution is empty until then)
    page.wait_for_function("document.querySelector('#resolution input')?.value > 0", timeout=WAIT_MS)
    return page


def fill_form(page, prompt: str, *, seed: int = 7, views: int = 4, steps: str = "8") -> None:
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#seed input").fill(str(seed))
    page.locator("#steps input").fill(steps)
    page.get_by_role("radio", name="N evenly spaced").check()
    views_box = page.locator("#views input[type=number]")
    views_box.fill(str(views))
    views_box.press("Enter")


def status_after(page, marker: str) -> str:
    page.wait_for_function(f"document.querySelector('#status')?.innerText.includes({marker!r})", timeout=WAIT_MS)
    return page.locator("#status").inner_text().strip()


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _batches(url: str) -> tuple[float, float]:
    """(count, sum) of the mvz_batch_size histogram."""
    found = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("mvz_batch_size_count", "mvz_batch_size_sum"):
            found[name] = float(value)
    return found["mvz_batch_size_count"], found["mvz_batch_size_sum"]


def test_page_generates_four_views_equal_to_mvz_generate(server, browser, tmp_path):
    page = open_page(browser, server)
    fill_form(page, "a red wooden chair")
    page.locator("#generate").click()
    assert status_after(page, "seed 7").startswith("seed 7 · 4 views")

    loaded = "[...document.querySelectorAll('#views-out img')].every(i => i.complete && i.naturalWidth > 0)"
    page.wait_for_function(loaded, timeout=WAIT_MS)
    sizes = page.evaluate("[...document.querySelectorAll('#views-out img')].map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[64, 64]] * 4  # four views at the tiny model's default resolution

    with page.expect_download() as dl:
        page.locator("#grid a[download]").click()
    grid = tmp_path / "page_grid.png"
    dl.value.save_as(grid)
    with page.expect_download() as dl:
        page.locator("#zip a").first.click()
    archive = tmp_path / "page.zip"
    dl.value.save_as(archive)

    expected = tmp_path / "generate.png"
    subprocess.run([sys.executable, "-m", "mvz", "generate", "a red wooden chair", *SERVE, "--seed", "7",
                    "--views", "4", "--out", str(expected)], check=True, capture_output=True)
    assert np.array_equal(_pixels(grid), _pixels(expected))
    names = set(zipfile.ZipFile(archive).namelist())
    assert {"mvz_seed7.png", "mvz_seed7.json"} <= names and sum(n.endswith(".png") for n in names) == 5

    assert "model tiny" in page.locator("#mvz-footer").inner_text()
    shot_dir = Path(os.environ.get("MVZ_TEST_ARTIFACTS", tmp_path))
    shot_dir.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot_dir / "ui.png"), full_page=True)
    page.close()


def test_bad_steps_show_the_one_line_api_error(server, browser):
    page = open_page(browser, server)
    fill_form(page, "a toy robot", steps="0")
    page.locator("#generate").click()
    status = status_after(page, "error:")
    assert status == "error: steps: Input should be greater than or equal to 1"
    assert page.locator("#views-out img").count() == 0
    page.close()


def test_two_pages_generating_at_once_share_one_batch(server, browser):
    pages = [open_page(browser, server) for _ in range(2)]
    for page, prompt in zip(pages, ["a ceramic teapot", "a yellow rubber duck"], strict=True):
        fill_form(page, prompt, views=2, steps="2")
    count0, sum0 = _batches(server)
    for page in pages:  # within the server's 2 s batch window
        page.locator("#generate").click()
    statuses = [status_after(page, "seed") for page in pages]
    count1, sum1 = _batches(server)
    assert (count1 - count0, sum1 - sum0) == (1, 2), statuses
    assert all("batch of 2" in s for s in statuses)
    for page in pages:
        page.close()
