"""The web page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stream.server import ServerConfig, ServerThread

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed (apt-get install -y chromium)")

CANVAS_STD = """() => {
  const canvas = document.getElementById("view");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let sum = 0, squares = 0, n = 0;
  for (let i = 0; i < data.length; i += 4) { const v = data[i] + data[i + 1] + data[i + 2]; sum += v; squares += v * v; n++; }
  return Math.sqrt(squares / n - (sum / n) ** 2);
}"""


def _text(page, element: str) -> str:
    return page.text_content(f"#{element}")


def test_page_streams_switches_prompt_and_draws(tiny_pipeline, tmp_path):
    from playwright.sync_api import sync_playwright

    with ServerThread(tiny_pipeline, ServerConfig(port=0)) as running, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(running.server.url + "/")
            page.wait_for_function("document.getElementById('state').textContent === 'connected'", timeout=20_000)
            assert page.evaluate("document.getElementById('view').width") == 32  # sized from the hello event

            page.fill("#prompt", "a red circle moving right")
            page.click("#start")
            page.wait_for_function("Number(document.getElementById('frames').textContent) >= 10", timeout=60_000)
            assert _text(page, "state").startswith("streaming (t2v, realtime)")
            assert page.evaluate(CANVAS_STD) > 1.0  # frames were drawn: the canvas is not uniform

            page.fill("#prompt", "a blue square bouncing on gray")
            page.click("#switch")
            page.wait_for_function(
                "document.getElementById('current-prompt').textContent === 'a blue square bouncing on gray'", timeout=30_000
            )
            seen = int(_text(page, "frames"))
            page.wait_for_function(f"Number(document.getElementById('frames').textContent) >= {seen + 8}", timeout=30_000)
            assert float(_text(page, "fps")) > 0 and _text(page, "latency").endswith(" ms")
            assert "prompt switched at block" in _text(page, "log") and "(cut)" not in _text(page, "log")
            # A cut chosen on the page reaches the server: its prompt event says so.
            page.select_option("#switch-mode", "cut")
            page.fill("#prompt", "a green circle staying still on black")
            page.click("#switch")
            page.wait_for_function("document.getElementById('log').textContent.includes('(cut)')", timeout=30_000)

            shot = tmp_path / "page.png"
            page.locator("#view").screenshot(path=str(shot))
            pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
            assert pixels.shape[0] > 100 and pixels.std() > 1.0  # the drawn canvas, scaled up: not blank

            page.click("#stop")
            page.wait_for_function("document.getElementById('state').textContent === 'stopped'", timeout=20_000)
            assert running.server.active_sessions == 0
            assert errors == []
        finally:
            browser.close()
