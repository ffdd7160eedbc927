"""The served page in a real headless Chromium (Debian's ``chromium``, driven by Playwright for Python).

Starts the server under uvicorn on a free loopback port with a tiny random pipeline, loads the page, starts a
stream, watches the canvas change as frames arrive, switches the prompt, stops, downloads the MP4 and checks it
holds exactly the frames the page received. Saves a screenshot artifact to ``outputs/serve_screenshot.png``
(``docs/img/serve_screenshot.png`` is a committed copy).
Skipped when Playwright or Chromium is missing (``playwright install`` is never used: the system Chromium is).
"""
from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")
av = pytest.importorskip("av")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip("no chromium executable (apt-get install -y chromium)", allow_module_level=True)

from causal_forcing.pipelines.loading import load_pipeline  # noqa: E402
from causal_forcing.serving.app import ServerConfig, create_app  # noqa: E402
from test_serving import OTHER_PROMPT, PROMPT, build_tiny_folder, running_server  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "outputs" / "serve_screenshot.png"
CANVAS_SUM = """() => {
    const canvas = document.getElementById("screen");
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let sum = 0;
    for (let i = 0; i < data.length; i += 1) sum += data[i];
    return sum;
}"""


def wait_js(page, condition: str, timeout: float = 30.0) -> None:
    """Poll a JavaScript condition from Python: ``page.wait_for_function`` evaluates strings with ``eval``, which
    the page's Content-Security-Policy forbids (and the test keeps that policy on)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(f"() => Boolean({condition})"):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}; stats: {page.evaluate('window.cfStats')}")
        time.sleep(0.05)


def test_page_streams_switches_stops_and_downloads(tmp_path):
    pipeline = load_pipeline(build_tiny_folder(tmp_path / "tiny"))
    pipeline.description = "tiny random test model"  # shown in the page header (instead of a temporary path)
    app = create_app(pipeline, ServerConfig(max_sessions=2, allowed_hosts=("127.0.0.1",)))
    with running_server(app) as address, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 440})
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.goto(f"http://{address}/")
            wait_js(page, "document.getElementById('start').disabled === false")
            assert "48×32 @ 8 fps" in page.inner_text("#model")

            page.fill("#prompt", PROMPT)
            page.fill("#seed", "3")
            page.click("#start")
            wait_js(page, "window.cfStats.shown >= 2")
            first = page.evaluate(CANVAS_SUM)
            wait_js(page, "window.cfStats.shown >= 6")
            later = page.evaluate(CANVAS_SUM)
            assert first > 0 and later > 0 and first != later  # the canvas shows new frames

            page.fill("#prompt", OTHER_PROMPT)
            page.click("#switch")
            wait_js(page, "window.cfStats.switches === 1")
            shown = page.evaluate("window.cfStats.shown")
            wait_js(page, f"window.cfStats.shown >= {shown + 4}")
            assert page.inner_text("#switch-latency") != "–"

            page.click("#stop")
            wait_js(page, "window.cfStats.stopped === 1")
            wait_js(page, "window.cfStats.shown === window.cfStats.received")
            stats = page.evaluate("window.cfStats")
            assert stats["errors"] == [] and stats["runs"] == 1 and stats["received"] > 10
            link = page.locator("#download")
            assert link.is_visible() and link.get_attribute("href").startswith("/download/")
            video = page.request.get(f"http://{address}{link.get_attribute('href')}")
            assert video.status == 200 and video.headers["content-type"] == "video/mp4"
            with av.open(io.BytesIO(video.body())) as container:
                assert sum(1 for _ in container.decode(video=0)) == stats["received"]
            assert page.inner_text("#fps") != "–" and int(page.inner_text("#frames")) == stats["shown"]
            assert problems == []
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.evaluate("() => window.scrollTo(0, 0)")
            page.screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()
