"""The web app end to end: two CPU ranks under torchrun, driven by headless Chromium through Playwright.

Needs Debian's ``chromium`` and the ``playwright`` package (no downloaded browsers), which CI installs. Takes a
screenshot of the page; ``DISTLIN_APP_SCREENSHOT=docs/app.png`` keeps it (how the README's picture is made).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import playwright.sync_api as playwright  # the test extra installs it; .ci/run installs Debian's chromium
import pytest
from multirank import free_port
from PIL import Image
from safetensors.torch import save_file

from distlin.app.results import RESULT_ID
from distlin.models.tiny import build_ip_adapter, build_kohya_lora

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
USER, PASSWORD = "tester", "s3cret:pass"
TILE_SIZE = 64  # the tiny 192x128 image spans 3 x 2 tiles at full size, so zooming in loads only some


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``torchrun --nproc-per-node 2 launch/app.py`` on CPU with basic auth and one LoRA (``style``) and one
    IP-Adapter (``likeness``) in its ``--components``; yields its URL and output folder."""
    output = tmp_path_factory.mktemp("results")
    components = tmp_path_factory.mktemp("components")
    (components / "loras").mkdir()
    save_file(build_kohya_lora("tiny-sd15", rank=2), components / "loras" / "style.safetensors")
    build_ip_adapter("tiny-sd15", components / "ip-adapters" / "likeness")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        str(REPO / "launch" / "app.py"), "--port", str(port), "--output-dir", str(output), "--device", "cpu",
        "--tile-size", str(TILE_SIZE), "--auth", f"{USER}:{PASSWORD}", "--components", str(components),
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_served(url, process)
        yield url, output
    finally:
        process.send_signal(signal.SIGINT)
        try:
            log = process.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            log = process.communicate()[0]
        print(log)


def _wait_until_served(url: str, process: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{process.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=5)
        except urllib.error.HTTPError as err:
            if err.code == 401:  # up, and asking for the password
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the app did not answer on {url} within {timeout_s} s")


def test_generate_view_zoom_and_cancel_in_a_browser(app: tuple[str, Path], tmp_path: Path) -> None:
    url, output = app
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(
            http_credentials={"username": USER, "password": PASSWORD}, viewport={"width": 1400, "height": 1000}
        )
        page = context.new_page()
        tiles: list[str] = []
        page.on("request", lambda request: tiles.append(request.url) if "image_files/" in request.url else None)
        page.goto(url)
        expect = playwright.expect
        expect(page.locator("#plan textarea")).to_have_value(re.compile("predicted peak per rank"), timeout=60_000)

        # A generation with the operator's LoRA chosen by name: progress, then the result in the viewer, its
        # metadata and a download link.
        page.locator("#steps input").fill("2")
        page.locator("#seed input").fill("7")
        page.locator("#components").get_by_text("pictures and components").click()
        page.locator("#loras input").click()
        page.get_by_role("option", name="style").click()
        page.locator("#generate").click()
        expect(page.locator("#status")).to_contain_text("done:", timeout=120_000)
        results = [path.name for path in output.iterdir()]
        assert len(results) == 1 and RESULT_ID.fullmatch(results[0])
        expect(page.locator("#metadata")).to_contain_text("tiny-sd15")
        expect(page.locator("#gallery img")).to_have_count(1)
        page.locator("#gallery img").click()  # a past result opens in the viewer
        expect(page.locator("#viewer iframe")).to_have_attribute("data-result", results[0])
        link = page.locator("#download-link")
        download = context.request.get(url + link.get_attribute("href"))
        image = Image.open(io.BytesIO(download.body()))
        assert image.size == (192, 128)
        assert image.text["seed"] == "7" and image.text["steps"] == "2" and image.text["world_size"] == "2"
        assert image.text["loras"] == "[('style', 1.0)]"

        # The viewer in the page: the whole image, then zoomed in at the deepest level.
        viewer = page.frame_locator("#viewer iframe")
        canvas = viewer.locator("#view")
        expect(viewer.locator("#status")).to_contain_text("192\u00d7128 px")
        scale = float(canvas.get_attribute("data-scale"))
        viewer.locator("#zoom-in").click()
        expect(canvas).to_have_attribute("data-scale", str(2 * scale))
        shot = Path(os.environ.get("DISTLIN_APP_SCREENSHOT", output.parent / "app.png"))
        assert page.screenshot(path=str(shot), full_page=True).startswith(b"\x89PNG")

        # The viewer alone in a window smaller than the image: the whole picture comes from a coarser level, and
        # zooming in on the centre loads only the full-size tiles in view.
        small = context.new_page()
        small.set_viewport_size({"width": 64, "height": 48})
        small.on("request", lambda request: tiles.append(request.url) if "image_files/" in request.url else None)
        tiles.clear()
        small.goto(url + page.locator("#viewer iframe").get_attribute("src"))
        top = 8  # ceil(log2(192))
        expect(small.locator("#view")).to_have_attribute("data-level", str(top - 1))
        small.wait_for_timeout(500)
        assert not [u for u in tiles if f"/image_files/{top}/" in u]
        small.add_style_tag(content="#bar { display: none; }")  # in so small a window it would cover the canvas
        small.mouse.move(32, 24)
        small.mouse.wheel(0, -1040)  # x8
        expect(small.locator("#view")).to_have_attribute("data-level", str(top))
        small.wait_for_timeout(500)
        deepest = {u for u in tiles if f"/image_files/{top}/" in u}
        assert 0 < len(deepest) < 6  # of the 3 x 2 full-size tiles
        small.close()

        # A long run, cancelled: every rank stops, nothing is written, and the page says so.
        page.locator("#steps input").fill("400")
        page.locator("#generate").click()
        expect(page.locator("#status")).to_contain_text("step", timeout=60_000)
        page.locator("#cancel").click()
        expect(page.locator("#status")).to_contain_text("cancelled", timeout=60_000)
        assert [path.name for path in output.iterdir()] == results

        # Uploads reach the server, which refuses what the command line refuses: an IP-Adapter's reference
        # picture without an IP-Adapter (until one is chosen by name), a mask without an init image.
        Image.new("L", (192, 128), 255).save(tmp_path / "mask.png")
        page.locator("#ip_image input[type=file]").set_input_files(tmp_path / "mask.png")
        refusal = re.compile("^refused: IP-Adapter and IP-Adapter reference picture go together")
        expect(page.locator("#plan textarea")).to_have_value(refusal)
        page.locator("#ip_adapter input").click()
        page.get_by_role("option", name="likeness").click()
        expect(page.locator("#plan textarea")).to_have_value(re.compile("predicted peak per rank"))
        page.locator("#mask input[type=file]").set_input_files(tmp_path / "mask.png")
        expect(page.locator("#plan textarea")).to_have_value(re.compile("^refused: mask needs init image"))
        browser.close()
