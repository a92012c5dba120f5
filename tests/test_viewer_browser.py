"""The bundled OpenSeadragon viewer in headless Chromium (Debian's package)."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("TILED_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield instance
        instance.close()


def test_viewer_zooms_and_pans(browser, make_daemon, synthetic_root):
    daemon = make_daemon([synthetic_root])
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    failed: list[str] = []
    tiles: list[int] = []
    page.on("requestfailed", lambda request: failed.append(request.url))

    def on_response(response):
        if response.status >= 400:
            failed.append(f"{response.status} {response.url}")
        elif "_files/" in response.url:
            tiles.append(response.status)

    page.on("response", on_response)
    slide_id = daemon.slide_id("odd.svs")
    page.goto(f"{daemon.url}/#{slide_id}")
    page.wait_for_function(
        "window.tiledViewer && window.tiledViewer.world.getItemCount() > 0",
        timeout=30_000,
    )
    page.wait_for_function(
        "window.tiledViewer.world.getItemAt(0).getFullyLoaded()", timeout=60_000
    )
    first_count = len(tiles)
    assert first_count > 0

    # Zoom in 8x around the centre, then pan right and down.
    page.evaluate(
        "window.tiledViewer.viewport.zoomBy(8); "
        "window.tiledViewer.viewport.applyConstraints()"
    )
    page.wait_for_timeout(500)
    page.wait_for_function(
        "window.tiledViewer.world.getItemAt(0).getFullyLoaded()", timeout=60_000
    )
    page.evaluate(
        "window.tiledViewer.viewport.panBy(new OpenSeadragon.Point(0.1, 0.08))"
    )
    page.wait_for_timeout(500)
    page.wait_for_function(
        "window.tiledViewer.world.getItemAt(0).getFullyLoaded()", timeout=60_000
    )
    assert len(tiles) > first_count

    assert failed == []
    assert page.evaluate("window.tiledFailedTiles") == 0
    shot = page.locator("#viewer").screenshot()
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(float)
    # A blank canvas is one colour; tissue texture has a wide spread.
    assert pixels.std() > 10
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    page.close()
