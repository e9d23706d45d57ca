"""report.html renders in headless Chromium: a real screenshot with the channel bars drawn, no console errors,
nothing loaded from outside the file."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess

import pytest

from prune_compile.cli import main

from .test_cli import DEFAULT_MODEL
from .third_party import cache_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEPT, REMOVED = (0x3B, 0x7D, 0xDD), (0xE8, 0x69, 0x4A)  # the bar colors in report_html._CSS


@pytest.fixture(scope="module")
def chromium(request, model_cache_dir: str) -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not (request.config.getoption("--run-big") or os.environ.get("PRUNE_COMPILE_RUN_BIG") == "1"):
        pytest.skip("Chromium is not installed: tools/setup_chromium.sh installs it (CI's --run-big does)")
    with cache_lock(os.path.join(model_cache_dir, "chromium-setup")):  # apt runs one install at a time
        if not (shutil.which("chromium") or shutil.which("chromium-browser")):  # another worker's install
            subprocess.run([os.path.join(ROOT, "tools", "setup_chromium.sh")], check=True, timeout=900)
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(chromium: str, html_path: str, png_path: str) -> list[str]:
    """Screenshot `html_path` headless; returns the page's console messages (an error in a page shows up here)."""
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={png_path}", "--window-size=1200,2600", "--enable-logging=stderr",
                           "--v=0", f"file://{os.path.abspath(html_path)}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def _color_pixels(png_path: str, rgb: tuple[int, int, int]) -> int:
    from PIL import Image

    image = Image.open(io.BytesIO(open(png_path, "rb").read())).convert("RGB")
    return sum(count for count, color in image.getcolors(maxcolors=1 << 20)
               if all(abs(a - b) <= 6 for a, b in zip(color, rgb, strict=True)))


def test_console_check_catches_a_broken_page(chromium, tmp_path) -> None:
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>throw new Error('kaboom')</script></body></html>")
    messages = render(chromium, str(page), str(tmp_path / "broken.png"))
    assert any("kaboom" in m for m in messages), messages


def test_report_renders_with_bars_curves_and_latency(chromium, tmp_path) -> None:
    out = tmp_path / "o"
    assert main([DEFAULT_MODEL, "-o", str(out), "-q", "--policy", "sensitivity", "--target-macs", "2",
                 "--target", "cpu", "--measure-latency"]) == 0
    html = (out / "report.html").read_text()
    assert not re.search(r"(src|href)\s*=|url\(|@import", html), "report.html must not load anything"
    assert "<script" not in html
    for section in ("Channels per layer", "Sensitivity", "Latency", "Compiled targets", "onnxruntime", "tvm-cpu"):
        assert section in html, section
    assert html.count("<polyline") == 7  # one curve per prunable group of the demo model
    png = str(tmp_path / "report.png")
    assert render(chromium, str(out / "report.html"), png) == []
    assert os.path.getsize(png) > 20_000
    assert _color_pixels(png, KEPT) > 2_000, "kept-channel bars did not render"
    assert _color_pixels(png, REMOVED) > 200, "removed-channel bars did not render"
