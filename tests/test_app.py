"""The web app below the browser: requests reach every rank and cancel stops them together, results stay in
the output folder, the viewer's tile pyramid is the image, and the image is the command line's; components are
the operator's, by name, and uploaded pictures live in a private folder only while their run does."""

from __future__ import annotations

import base64
import io
import os
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from multirank import run_ranks
from PIL import Image
from safetensors.torch import save_file

from distlin import run as run_module
from distlin.app import cli as app_cli
from distlin.app.coordinator import Coordinator
from distlin.app.library import ComponentLibrary
from distlin.app.ranks import RankChannel, serve_worker
from distlin.app.request import (
    PUBLIC_MAX_PIXELS,
    PUBLIC_MAX_STEPS,
    PUBLIC_MAX_UPLOAD_MB,
    UPLOADS,
    GenerationRequest,
    Limits,
)
from distlin.app.results import RESULT_ID, ResultStore
from distlin.app.session import GenerationSession
from distlin.app.tiles import dzi_descriptor, pyramid_levels, write_pyramid
from distlin.app.wording import in_field_terms
from distlin.cli import generate as cli
from distlin.errors import Cancelled, UsageError
from distlin.models.tiny import build_ip_adapter, build_kohya_lora
from distlin.parallel import Runtime
from distlin.run import Prepared, generate
from distlin.settings import RunSettings, build_settings

TINY = GenerationRequest.for_preset("tiny-sd15")


def tiny(**changes: object) -> GenerationRequest:
    """The tiny preset's request with two steps (seconds on a CPU) and the given changes."""
    return GenerationRequest.from_message({**TINY.to_message(), "steps": 2, **changes})


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A noise picture as the bytes of a PNG file, as a browser uploads it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def components(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An operator's ``--components`` folder: the LoRA ``style``, the ControlNet ``edges`` (its config only: no
    test here loads it), the IP-Adapter ``likeness`` (h94's layout), and beside the folder a LoRA file no request
    may reach."""
    root = tmp_path_factory.mktemp("components")
    lora = build_kohya_lora("tiny-sd15", rank=2)
    (root / "loras").mkdir()
    save_file(lora, root / "loras" / "style.safetensors")
    save_file(lora, root.parent / "outside.safetensors")
    (root / "loras" / "notes.txt").write_text("not a LoRA")
    (root / "controlnets" / "edges").mkdir(parents=True)
    (root / "controlnets" / "edges" / "config.json").write_text("{}")
    (root / "controlnets" / "unfinished").mkdir()  # no config.json: not offered
    build_ip_adapter("tiny-sd15", root / "ip-adapters" / "likeness")
    (root / "ip-adapters" / "empty" / "models").mkdir(parents=True)  # no weights: not offered
    return root


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder this process's temporary folders go to, so a test can see that uploads were removed."""
    folder = tmp_path / "private-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# --- the request's trip through every rank, and cancel ---------------------------------------------------------


class RecordingSession(GenerationSession):
    """A worker's session that notes how each run it took part in ended."""

    def __init__(self, runtime: Runtime, library: ComponentLibrary):
        super().__init__(runtime, library=library)
        self.outcomes: list[str] = []

    def run(self, request, on_progress=None, should_stop=None):  # noqa: ANN001, ANN201 - as the base class
        try:
            result = super().run(request, on_progress, should_stop)
        except Cancelled:
            self.outcomes.append("cancelled")
            raise
        self.outcomes.append("done")
        return result


def two_rank_app(runtime: Runtime, output_dir: str, components: str, private_tmp: str) -> dict:
    """Rank 0 runs a coordinator (done, then a cancelled run with one queued behind it, then done again, then
    an uploaded picture with a LoRA by name); rank 1 runs the worker loop until shutdown. Each rank's temporary
    folders go to its own folder under ``private_tmp``."""
    tempfile.tempdir = os.path.join(private_tmp, str(runtime.rank))
    os.mkdir(tempfile.tempdir)
    library = ComponentLibrary.scan(components)
    channel = RankChannel(runtime)
    if runtime.rank != 0:
        session = RecordingSession(runtime, library)
        serve_worker(channel, session)
        return {"outcomes": session.outcomes, "left": os.listdir(tempfile.tempdir)}
    session = GenerationSession(runtime, library=library)
    coordinator = Coordinator(channel, session, ResultStore(output_dir), idle_message_s=0.2)
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
    uploaded = coordinator.submit(tiny(loras=[["style", 0.8]], init_image=png_bytes(60, 100), strength=0.6))
    uploaded.finished.wait()
    coordinator.close()
    serving.join()
    jobs = (first, long, queued, uploaded)
    return {
        "outcomes": ["cancelled" if job.cancelled else "done" if job.result else job.error for job in jobs],
        "ahead": ahead,
        "cancelled_at": long.progress.step,
        "images": [np.asarray(Image.open(job.result.image)) for job in (first, queued)],
        "files": sorted(path.name for path in Path(output_dir).iterdir()),
        "uploaded": uploaded.result.metadata() if uploaded.result else uploaded.error,
        "left": os.listdir(tempfile.tempdir),
    }


def test_requests_reach_every_rank_and_cancel_stops_them_together(tmp_path: Path, components: Path) -> None:
    (tmp_path / "tmp").mkdir()
    main, worker = run_ranks(2, two_rank_app, str(tmp_path / "out"), str(components), str(tmp_path / "tmp"))
    assert main["outcomes"] == ["done", "cancelled", "done", "done"]
    assert worker["outcomes"] == ["done", "cancelled", "done", "done"]  # the worker stopped too, and stayed in step
    assert main["ahead"] == 1  # one request at a time: the queued one waited for the running one
    assert 1 <= main["cancelled_at"] < 200
    np.testing.assert_array_equal(main["images"][0], main["images"][1])  # same request after a cancel: same image
    assert len(main["files"]) == 3 and all(RESULT_ID.fullmatch(name) for name in main["files"])  # no partial result
    # The upload reached the worker as bytes in the broadcast; every rank removed its copy after the run.
    assert main["uploaded"]["loras"] == [["style", 0.8]] and main["uploaded"]["init_image"].startswith("upload ")
    assert main["left"] == worker["left"] == []


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


def test_a_request_the_fit_runs_with_a_saver_loads_the_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the device is too small and the fit switches on ``--micro-batch`` (which the engine is built with),
    the kept pipeline is the fitted one: one load for two requests, never two models held at once."""
    from distlin.memory.fit import plan_run

    request = tiny(height=256, width=256)
    settings = build_settings("tiny-sd15", {"steps": 2, "height": 256, "width": 256}, world_size=1)
    monkeypatch.setenv("DISTLIN_DEVICE_MEMORY", str(plan_run(settings, 1)["peak_bytes_per_rank"] - 1))
    loads: list[int | None] = []
    prepare = run_module.prepare_pipeline

    def counted(settings: RunSettings, runtime: Runtime) -> Prepared:
        loads.append(settings.engine.micro_batch)
        return prepare(settings, runtime)

    monkeypatch.setattr(run_module, "prepare_pipeline", counted)
    session = GenerationSession(Runtime())
    first, second = session.run(request), session.run(tiny(height=256, width=256, seed=3))
    assert loads == [1]
    assert first.settings.engine.micro_batch == second.settings.engine.micro_batch == 1
    assert first.image.size == second.image.size == (256, 256)


def test_planner_refusal_is_one_line_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    coordinator = Coordinator(RankChannel(Runtime()), GenerationSession(Runtime()), ResultStore(tmp_path))
    assert "predicted peak per rank" in coordinator.plan(tiny())
    monkeypatch.setenv("DISTLIN_DEVICE_MEMORY", "1000")
    with pytest.raises(UsageError, match=r"^predicted peak .* does not fit") as refusal:
        coordinator.submit(tiny())
    assert "\n" not in str(refusal.value)


# --- the operator's components, by name, and uploaded pictures -------------------------------------------------


def test_a_request_naming_an_allowed_lora_gives_the_command_lines_image(
    tmp_path: Path, components: Path, private_tmp: Path
) -> None:
    lora = components / "loras" / "style.safetensors"
    output = str(tmp_path / "cli.png")
    flags = ["--preset", "tiny-sd15", "--steps", "2", "--seed", "5", "--lora", f"{lora}:0.8", "--output", output]
    assert cli.main(flags) == 0
    session = GenerationSession(Runtime(), library=ComponentLibrary.scan(components))
    result = session.run(tiny(seed=5, loras=[["style", 0.8]]))
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(Image.open(output)))
    assert result.metadata["loras"] == [("style", 0.8)]  # the name, not the server's path
    assert str(components) not in str(result.metadata)


def test_a_request_naming_an_allowed_ip_adapter_with_an_uploaded_reference_gives_the_command_lines_image(
    tmp_path: Path, components: Path, private_tmp: Path
) -> None:
    reference = tmp_path / "reference.png"
    reference.write_bytes(png_bytes(50, 40, seed=3))
    folder = components / "ip-adapters" / "likeness"
    output = str(tmp_path / "cli.png")
    flags = ["--preset", "tiny-sd15", "--steps", "2", "--seed", "5", "--ip-adapter", str(folder), "--ip-image",
             str(reference), "--ip-scale", "0.7", "--output", output]  # fmt: skip
    assert cli.main(flags) == 0
    session = GenerationSession(Runtime(), library=ComponentLibrary.scan(components))
    result = session.run(tiny(seed=5, ip_adapter="likeness", ip_image=reference.read_bytes(), ip_scale=0.7))
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(Image.open(output)))
    assert result.settings.ip_adapter == (str(folder.resolve()),) and result.settings.ip_scale == (0.7,)
    (picture,) = result.settings.ip_image
    assert picture.startswith(str(private_tmp))
    assert list(private_tmp.iterdir()) == []  # the reference's folder went with the run
    assert result.metadata["ip_adapter"] == ["likeness"] and result.metadata["ip_image"][0].startswith("upload sha256:")
    assert str(components) not in str(result.metadata) and str(private_tmp) not in str(result.metadata)


def test_an_uploaded_init_image_runs_image_to_image_like_generate_with_the_file_and_is_removed_after(
    tmp_path: Path, private_tmp: Path
) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes(60, 100))
    settings = build_settings("tiny-sd15", {"steps": 2, "seed": 5, "init_image": str(photo), "strength": 0.6}, 1)
    expected = generate(settings, Runtime()).image
    result = GenerationSession(Runtime()).run(tiny(seed=5, init_image=photo.read_bytes(), strength=0.6))
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(expected))
    assert result.settings.init_image is not None and result.settings.init_image.startswith(str(private_tmp))
    assert list(private_tmp.iterdir()) == []  # the upload's folder went with the run
    assert result.metadata["init_image"].startswith("upload sha256:") and result.metadata["mask"] is None


def test_a_controlnet_by_name_and_its_uploaded_control_image_are_the_command_lines_flags(
    components: Path, private_tmp: Path
) -> None:
    session = GenerationSession(Runtime(), library=ComponentLibrary.scan(components))
    control = png_bytes(192, 128)
    with session.settings(tiny(controlnet="edges", control_image=control, control_scale=0.5)) as settings:
        assert settings.controlnet == (str(components.resolve() / "controlnets" / "edges"),)
        (image,) = settings.control_image
        assert Path(image).read_bytes() == control and settings.control_scale == (0.5,)
        assert Path(image).parent.parent == private_tmp
    assert list(private_tmp.iterdir()) == []


def test_an_uploaded_photo_with_a_cascade_preset_starts_the_cascade_at_its_size(tmp_path: Path) -> None:
    coordinator = Coordinator(RankChannel(Runtime()), GenerationSession(Runtime()), ResultStore(tmp_path))
    cascade = GenerationRequest.for_preset("tiny-sd15-cascade").to_message()
    plan = coordinator.plan(GenerationRequest.from_message({**cascade, "init_image": png_bytes(192, 128)}))
    assert plan.startswith("cascade: on (192×128 -> 384×256)")  # from the photo's size up, its 96x64 stage skipped


def test_the_page_sends_uploads_as_bytes_and_components_by_name() -> None:
    from distlin.app.page import CONTROLS, NO_COMPONENT, request_from_controls

    photo, reference = png_bytes(8, 8), png_bytes(8, 8, seed=1)  # what the picture fields read
    components = {"init_image": photo, "strength": 0, "mask": None, "loras": ["style", "ink"], "lora_scale": 0.5,
                  "controlnet": NO_COMPONENT, "control_image": None, "control_scale": 1, "ip_adapter": "likeness",
                  "ip_image": reference, "ip_scale": 0.6}  # fmt: skip
    values = {**TINY.to_message(), **components}
    request = request_from_controls(tuple(values[name] for name in CONTROLS))
    assert request.init_image == photo and request.mask is None
    assert request.strength is None  # the slider's 0: the preset's strength, as without --strength
    assert request.loras == (("style", 0.5), ("ink", 0.5)) and request.controlnet is None
    assert request.ip_adapter == "likeness" and request.ip_image == reference and request.ip_scale == 0.6
    values.update(ip_adapter=NO_COMPONENT, ip_image=None)
    assert request_from_controls(tuple(values[name] for name in CONTROLS)).ip_adapter is None


@pytest.mark.parametrize(
    "change",
    [
        {"loras": [["missing", 1.0]]},
        {"loras": [["style", 1.0], ["../outside", 1.0]]},
        {"loras": [["../loras/style", 1.0]]},
        {"loras": [["style.safetensors", 1.0]]},
        {"loras": [["/etc/passwd", 1.0]]},
        {"controlnet": "../controlnets/edges"},
        {"controlnet": "unfinished"},
        {"controlnet": "/etc"},
        {"ip_adapter": "../ip-adapters/likeness"},
        {"ip_adapter": "empty"},  # a folder without an IP-Adapter's weights is not offered
        {"ip_adapter": "/etc", "ip_image": png_bytes(8, 8)},
    ],
)
def test_a_component_not_in_the_servers_list_is_refused(change: dict, components: Path, tmp_path: Path) -> None:
    coordinator = Coordinator(
        RankChannel(Runtime()), GenerationSession(Runtime(), library=ComponentLibrary.scan(components)),
        ResultStore(tmp_path),
    )  # fmt: skip
    offers = r"; this server offers (style|edges|likeness)$"
    with pytest.raises(UsageError, match=r"^unknown (LoRA|ControlNet|IP-Adapter) .*" + offers):
        coordinator.submit(tiny(**change))


def test_the_components_folder_offers_what_its_layout_holds(components: Path) -> None:
    library = ComponentLibrary.scan(components)
    assert list(library.loras) == ["style"] and list(library.controlnets) == ["edges"]
    assert list(library.ip_adapters) == ["likeness"]
    assert library.ip_adapter("likeness") == str(components.resolve() / "ip-adapters" / "likeness")
    assert library.lora("style") == str(components.resolve() / "loras" / "style.safetensors")
    with pytest.raises(UsageError, match="unknown LoRA 'style'; this server offers none$"):
        ComponentLibrary().lora("style")  # without --components a request may name nothing


@pytest.mark.parametrize(
    "change, flags",
    [
        ({"mask": "mask.png"}, ["--mask", "mask.png"]),
        ({"strength": 0.5}, ["--strength", "0.5"]),
        ({"control_image": "mask.png"}, ["--control-image", "mask.png"]),
        ({"ip_image": "mask.png"}, ["--ip-image", "mask.png"]),
        ({"init_image": "mask.png", "mask": "mask.png", "preset": "tiny-sd15-cascade", "steps": 3},
         ["--init-image", "mask.png", "--mask", "mask.png", "--preset", "tiny-sd15-cascade"]),
    ],
)  # fmt: skip
def test_a_bad_combination_is_refused_with_the_command_lines_line_before_any_work(
    change: dict, flags: list[str], tmp_path: Path, private_tmp: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "mask.png").write_bytes(png_bytes(192, 128))
    assert cli.main(["--preset", "tiny-sd15", *(str(tmp_path / f) if f.endswith(".png") else f for f in flags)]) == 2
    line = capsys.readouterr().err.strip().removeprefix("error: ")
    uploads = {key: (tmp_path / value).read_bytes() if key in UPLOADS else value for key, value in change.items()}
    coordinator = Coordinator(RankChannel(Runtime()), GenerationSession(Runtime()), ResultStore(tmp_path / "out"))
    with pytest.raises(UsageError) as refusal:
        coordinator.submit(tiny(**uploads))
    assert str(refusal.value) == in_field_terms(line)
    assert list(private_tmp.iterdir()) == [] and list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "change, said",
    [
        ({"height": 100}, "height 100 is not a positive multiple of 8; set height to e.g. 96"),
        ({"strength": 0.5}, "strength needs init image (the picture to start from)"),
    ],
)
def test_the_pages_refusals_name_its_fields_not_flags(change: dict, said: str, tmp_path: Path) -> None:
    coordinator = Coordinator(RankChannel(Runtime()), GenerationSession(Runtime()), ResultStore(tmp_path / "out"))
    with pytest.raises(UsageError) as refusal:
        coordinator.plan(tiny(**change))
    assert str(refusal.value) == said


def test_a_components_folder_that_holds_none_is_refused_at_start(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "model.bin").write_bytes(b"")  # only .safetensors: nothing that unpickles
    assert app_cli.main(["--components", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --components {str(tmp_path)!r} holds no component;")
    assert app_cli.main(["--components", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


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
        {"init_image": "/etc/passwd"},  # a picture is an upload's bytes, never a path
        {"mask": "../mask.png"},
        {"loras": "style"},
        {"loras": [["style"]]},
        {"controlnet": 3},
        {"ip_adapter": ["likeness"]},
        {"ip_image": "/etc/passwd"},
    ],
)
def test_a_request_names_no_path_and_no_unknown_field(change: dict) -> None:
    with pytest.raises(UsageError) as refusal:
        GenerationRequest.from_message({**TINY.to_message(), **change})
    assert "\n" not in str(refusal.value)


def test_the_scheduler_control_maps_onto_the_command_lines_scheduler() -> None:
    with TINY.settings(1) as own, tiny(scheduler="euler-ancestral").settings(1) as chosen:
        assert own.scheduler is None  # the model's own, as without --scheduler
        assert chosen.scheduler == "euler-ancestral"


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
    client = TestClient(build_server(page, store, ("ann", "pa:ss"), max_upload_mb=1))
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
    for size, status in ((2**20 - 1024, 200), (2**20 + 1, 413)):  # --max-upload-mb 1
        upload = {"files": ("photo.png", b"\0" * size, "image/png")}
        assert client.post("/gradio_api/upload", files=upload, headers=login).status_code == status


def test_limits_apply_beyond_localhost_by_default() -> None:
    assert Limits.for_host(local=True, max_pixels=None, max_steps=None) == Limits(None, None, None)
    public = Limits(PUBLIC_MAX_PIXELS, PUBLIC_MAX_STEPS, PUBLIC_MAX_UPLOAD_MB)
    assert Limits.for_host(local=False, max_pixels=None, max_steps=None) == public
    with tiny().settings(world_size=1) as settings:
        Limits(max_pixels=128 * 192, max_steps=2).check(settings)
    with pytest.raises(UsageError, match="at most 100 pixels"):
        Limits(max_pixels=100).check(settings)
    with pytest.raises(UsageError, match="at most 1$"):
        Limits(max_steps=1).check(settings)
