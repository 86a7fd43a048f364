"""The web app below the browser: requests reach every rank and cancel stops them together, results stay in
the output folder, the viewer's tile pyramid is the image, and the image is the command line's."""

from __future__ import annotations

import base64
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from multirank import run_ranks
from PIL import Image

from distlin.app.coordinator import Coordinator
from distlin.app.ranks import RankChannel, serve_worker
from distlin.app.request import PUBLIC_MAX_PIXELS, PUBLIC_MAX_STEPS, GenerationRequest, Limits
from distlin.app.results import RESULT_ID, ResultStore
from distlin.app.session import GenerationSession
from distlin.app.tiles import dzi_descriptor, pyramid_levels, write_pyramid
from distlin.cli import generate as cli
from distlin.errors import Cancelled, UsageError
from distlin.parallel import Runtime

TINY = GenerationRequest.for_preset("tiny-sd15")


def tiny(**changes: object) -> GenerationRequest:
    """The tiny preset's request with two steps (seconds on a CPU) and the given changes."""
    return GenerationRequest.from_message({**TINY.to_message(), "steps": 2, **changes})


# --- the request's trip through every rank, and cancel ---------------------------------------------------------


class RecordingSession(GenerationSession):
    """A worker's session that notes how each run it took part in ended."""

    def __init__(self, runtime: Runtime):
        super().__init__(runtime)
        self.outcomes: list[str] = []

    def run(self, request, on_progress=None, should_stop=None):  # noqa: ANN001, ANN201 - as the base class
        try:
            result = super().run(request, on_progress, should_stop)
        except Cancelled:
            self.outcomes.append("cancelled")
            raise
        self.outcomes.append("done")
        return result


def two_rank_app(runtime: Runtime, output_dir: str) -> dict:
    """Rank 0 runs a coordinator (done, then a cancelled run with one queued behind it, then done again);
    rank 1 runs the worker loop until shutdown."""
    channel = RankChannel(runtime)
    if runtime.rank != 0:
        session = RecordingSession(runtime)
        serve_worker(channel, session)
        return {"outcomes": session.outcomes}
    coordinator = Coordinator(channel, GenerationSession(runtime), ResultStore(output_dir), idle_message_s=0.2)
    serving = threading.Thread(target=coordinator.serve)
    serving.start()
    first = coordinator.submit(tiny())
    first.finished.wait()
    time.sleep(0.5)  # a few idle messages while nothing waits
    long = coordinator.submit(tiny(steps=200))
    queued = coordinator.submit(tiny())
    while long.progress is None and not long.finished.is_set():
        time.sleep(0.01)
    ahead = coordinator.ahead_of(queued)
    coordinator.cancel(long)
    queued.finished.wait()
    coordinator.close()
    serving.join()
    jobs = (first, long, queued)
    return {
        "outcomes": ["cancelled" if job.cancelled else "done" if job.result else job.error for job in jobs],
        "ahead": ahead,
        "cancelled_at": long.progress.step,
        "images": [np.asarray(Image.open(job.result.image)) for job in (first, queued)],
        "files": sorted(path.name for path in Path(output_dir).iterdir()),
    }


def test_requests_reach_every_rank_and_cancel_stops_them_together(tmp_path: Path) -> None:
    main, worker = run_ranks(2, two_rank_app, str(tmp_path))
    assert main["outcomes"] == ["done", "cancelled", "done"]
    assert worker["outcomes"] == ["done", "cancelled", "done"]  # the worker stopped too, and stayed in step
    assert main["ahead"] == 1  # one request at a time: the queued one waited for the running one
    assert 1 <= main["cancelled_at"] < 200
    np.testing.assert_array_equal(main["images"][0], main["images"][1])  # same request after a cancel: same image
    assert len(main["files"]) == 2 and all(RESULT_ID.fullmatch(name) for name in main["files"])  # no partial result


# --- the same image as the command line ------------------------------------------------------------------------


def test_image_equals_the_command_lines_for_the_same_settings(tmp_path: Path) -> None:
    output = str(tmp_path / "cli.png")
    assert cli.main(["--preset", "tiny-sd15", "--steps", "2", "--seed", "5", "--output", output]) == 0
    expected = np.asarray(Image.open(tmp_path / "cli.png"))
    session = GenerationSession(Runtime())
    store = ResultStore(tmp_path / "app")
    first = session.run(tiny(seed=5))
    session.run(tiny(seed=6))  # the kept pipeline serves another request in between
    again = session.run(tiny(seed=5))
    np.testing.assert_array_equal(np.asarray(first.image), expected)
    np.testing.assert_array_equal(np.asarray(again.image), expected)
    saved = store.save(again.image, again.metadata)
    np.testing.assert_array_equal(np.asarray(Image.open(saved.image)), expected)
    assert Image.open(saved.image).text == Image.open(tmp_path / "cli.png").text  # the same metadata chunks
    assert saved.metadata()["seed"] == 5 and saved.metadata()["steps"] == 2


def test_planner_refusal_is_one_line_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    coordinator = Coordinator(RankChannel(Runtime()), GenerationSession(Runtime()), ResultStore(tmp_path))
    assert "predicted peak per rank" in coordinator.plan(tiny())
    monkeypatch.setenv("DISTLIN_DEVICE_MEMORY", "1000")
    with pytest.raises(UsageError, match=r"^predicted peak .* does not fit") as refusal:
        coordinator.submit(tiny())
    assert "\n" not in str(refusal.value)


# --- the tile pyramid ------------------------------------------------------------------------------------------


def test_pyramid_levels_halve_from_the_full_size_down_to_one_pixel() -> None:
    levels = pyramid_levels(300, 170, tile_size=64)
    assert [(lv.width, lv.height) for lv in levels][-3:] == [(75, 43), (150, 85), (300, 170)]
    assert (levels[0].width, levels[0].height) == (1, 1) and len(levels) == 10  # 2**9 >= 300
    assert (levels[-1].columns, levels[-1].rows) == (5, 3)
    assert pyramid_levels(16384, 8192)[-1].columns == 64  # 16K: 64 x 32 tiles of 256 px at full size


def test_pyramid_tiles_reassemble_to_the_image(tmp_path: Path) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (170, 300, 3), dtype=np.uint8))
    dzi = write_pyramid(image, tmp_path, "image", tile_size=64)
    assert dzi.read_text() == dzi_descriptor(300, 170, 64)
    size = ET.parse(dzi).getroot()[0].attrib
    assert (size["Width"], size["Height"]) == ("300", "170")
    expected = image
    for level in reversed(pyramid_levels(300, 170, 64)):
        if expected.size != (level.width, level.height):
            expected = expected.reduce(2)
        canvas = Image.new("RGB", (level.width, level.height))
        tiles = sorted((tmp_path / "image_files" / str(level.index)).iterdir())
        assert len(tiles) == level.columns * level.rows
        for tile in tiles:
            column, row = map(int, tile.stem.split("_"))
            with Image.open(tile) as pixels:
                assert pixels.width <= 64 and pixels.height <= 64
                assert pixels.width == min(64, level.width - 64 * column)  # only edge tiles are smaller
                canvas.paste(pixels, (64 * column, 64 * row))
        np.testing.assert_array_equal(np.asarray(canvas), np.asarray(expected))


# --- results stay in the output folder -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"preset": "../../etc/passwd"},
        {"preset": "/tmp/evil.yaml"},
        {"output": "/tmp/evil.png"},
        {"model": "/home/someone/weights"},
        {"height": "128; rm -rf /"},
        {"steps": 2.5},
        {"scheduler": "turbo-magic"},
    ],
)
def test_a_request_names_no_path_and_no_unknown_field(change: dict) -> None:
    with pytest.raises(UsageError) as refusal:
        GenerationRequest.from_message({**TINY.to_message(), **change})
    assert "\n" not in str(refusal.value)


def test_the_scheduler_control_maps_onto_the_command_lines_scheduler() -> None:
    assert TINY.settings(1).scheduler is None  # the model's own, as without --scheduler
    assert tiny(scheduler="euler-ancestral").settings(1).scheduler == "euler-ancestral"


def test_results_are_written_only_inside_the_output_folder_under_names_the_app_makes(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "out")
    image = Image.new("RGB", (40, 24), "red")
    saved = store.save(image, {"prompt": "../../escape", "seed": 1})
    assert RESULT_ID.fullmatch(saved.id) and saved.folder.parent == store.root
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    written = {p.relative_to(saved.folder).as_posix() for p in saved.folder.rglob("*") if p.is_file()}
    assert {"image.png", "image.dzi", "metadata.json", "thumbnail.jpg"} <= written
    for bad in ("..", "../out", saved.id + "/..", "/etc", ""):
        with pytest.raises(UsageError):
            store.get(bad)


def test_a_result_that_fails_while_written_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("distlin.app.results.write_pyramid", interrupted)
    store = ResultStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        store.save(Image.new("RGB", (8, 8)), {})
    assert list(tmp_path.iterdir()) == []


def test_the_server_serves_only_result_files_and_asks_for_credentials(tmp_path: Path) -> None:
    import gradio as gr
    from fastapi.testclient import TestClient

    from distlin.app.server import build_server

    store = ResultStore(tmp_path / "out")
    saved = store.save(Image.new("RGB", (40, 24), "blue"), {"seed": 1})
    (tmp_path / "secret.txt").write_text("secret")
    with gr.Blocks() as page:
        gr.Markdown("test")
    client = TestClient(build_server(page, store, ("ann", "pa:ss")))
    assert client.get(f"/results/{saved.id}/image.png").status_code == 401
    login = {"Authorization": "Basic " + base64.b64encode(b"ann:pa:ss").decode()}
    wrong = {"Authorization": "Basic " + base64.b64encode(b"ann:nope").decode()}
    assert client.get(f"/results/{saved.id}/image.png", headers=wrong).status_code == 401
    assert client.get(f"/results/{saved.id}/image.png", headers=login).status_code == 200
    assert client.get(f"/results/{saved.id}/image_files/0/0_0.png", headers=login).status_code == 200
    assert client.get("/viewer/", headers=login).status_code == 200
    for escape in ("%2e%2e/secret.txt", f"{saved.id}/%2e%2e/%2e%2e/secret.txt", f"{saved.id}/../../secret.txt"):
        response = client.get(f"/results/{escape}", headers=login)
        assert response.status_code == 404 and b"secret" not in response.content


def test_limits_apply_beyond_localhost_by_default() -> None:
    assert Limits.for_host(local=True, max_pixels=None, max_steps=None) == Limits(None, None)
    assert Limits.for_host(local=False, max_pixels=None, max_steps=None) == Limits(PUBLIC_MAX_PIXELS, PUBLIC_MAX_STEPS)
    settings = tiny().settings(world_size=1)
    Limits(max_pixels=128 * 192, max_steps=2).check(settings)
    with pytest.raises(UsageError, match="at most 100 pixels"):
        Limits(max_pixels=100).check(settings)
    with pytest.raises(UsageError, match="at most 1$"):
        Limits(max_steps=1).check(settings)
