"""report.html renders in a real browser: a headless-Chromium screenshot of a tiny run's report
(skipped where no chromium / chrome binary is installed; Debian: ``apt-get install chromium``).

The screenshot must be a PNG of the requested size that is not blank: it holds both the page's
white and the dark pixels of text and of the embedded (``data:`` URI) figures, so a page whose
images failed to load or that did not render at all would fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from metafluence import cli
from tests.test_run import TINY, glyph_cache  # noqa: F401  (fixture)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
WIDTH, HEIGHT = 1000, 4000


def _browser() -> str | None:
    for name in (os.environ.get("METAFLUENCE_CHROMIUM"), *BROWSERS):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_browser() is None, reason="no chromium / chrome binary installed")
def test_report_html_screenshot(tmp_path, glyph_cache):  # noqa: F811
    from PIL import Image

    assert cli.main([*TINY, "--out", str(tmp_path), "--name", "shot"]) == 0
    page = tmp_path / "shot" / "report.html"
    shot = tmp_path / "report.png"
    cmd = [
        _browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--screenshot={shot}",
        page.as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (HEIGHT, WIDTH)
    assert (img > 240).mean() > 0.3  # the white page
    dark = img < 100
    assert dark.mean() > 0.01  # text and the figures drawn
    # the gallery's black glyph tiles: rows with long dark runs, far below the first headings
    assert dark[HEIGHT // 4 :].mean() > 0.005
