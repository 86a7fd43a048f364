"""The web app under hostile requests, each test written as the attack it stops: a request reads no file on the
server and cannot hang it, the upload limit holds however a picture is sent, and only finished results are
served."""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from distlin.app.coordinator import Coordinator
from distlin.app.ranks import RankChannel
from distlin.app.request import Limits
from distlin.app.results import ResultStore
from distlin.app.session import GenerationSession
from distlin.app.uploads import NOT_UPLOADED, private_upload_folder
from distlin.errors import UsageError
from distlin.parallel import Runtime

pytest.importorskip("gradio")
from fastapi.testclient import TestClient  # noqa: E402 - with the web stack only

FILE = {"_type": "gradio.FileData"}
FORM = {"preset": "tiny-sd15", "prompt": "a cat", "negative_prompt": "", "height": 128, "width": 192, "steps": 2,
        "guidance_scale": 7.5, "seed": 0, "mode": "exact", "scheduler": "model's own", "init_image": None,
        "strength": 0, "mask": None, "loras": [], "lora_scale": 1, "controlnet": "none", "control_image": None,
        "control_scale": 1, "ip_adapter": "none", "ip_image": None, "ip_scale": 1}  # fmt: skip


def png_bytes(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class App:
    """The app's HTTP side as a browser or a script reaches it (``--max-upload-mb 1 --max-upload-folder-mb 1``),
    its ranks not started."""

    def __init__(self, client: TestClient, uploads: Path, store: ResultStore):
        self.client, self.uploads, self.store = client, uploads, store

    def upload(self, data: bytes, name: str = "photo.png") -> str:
        """Through the upload route, as the page does: the path the server gives back."""
        response = self.client.post("/gradio_api/upload", files={"files": (name, data, "image/png")})
        assert response.status_code == 200, response.text
        return response.json()[0]

    def plan(self, **fields: Any) -> tuple[int, str]:
        """The page's plan call with these fields: the status and the plan text (or the refusal)."""
        from distlin.app.page import CONTROLS

        values = {**FORM, **fields}
        response = self.client.post("/gradio_api/call/_plan", json={"data": [values[name] for name in CONTROLS]})
        if response.status_code != 200:
            return response.status_code, response.text
        return 200, self.client.get(f"/gradio_api/call/_plan/{response.json()['event_id']}").text

    def cached(self) -> list[str]:
        """Every file in the server's upload folder, where Gradio copies what it is handed."""
        return sorted(path.name for path in self.uploads.rglob("*") if path.is_file())


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    from distlin.app.page import CSS, AppPage
    from distlin.app.server import build_server

    runtime = Runtime()
    store = ResultStore(tmp_path / "out")
    coordinator = Coordinator(RankChannel(runtime), GenerationSession(runtime), store, Limits(max_upload_mb=1))
    with private_upload_folder() as uploads:
        page = AppPage(coordinator, "tiny-sd15").build()
        server = build_server(page, store, None, CSS, max_upload_mb=1, max_upload_folder_mb=1)
        with TestClient(server) as client:
            yield App(client, uploads, store)


def file_data(path: str, **more: Any) -> dict[str, Any]:
    return {"path": path, "meta": FILE, **more}


# --- no server path is opened on a request's behalf ------------------------------------------------------------


def test_an_uploaded_picture_is_used(app: App) -> None:
    status, plan = app.plan(init_image=file_data(app.upload(png_bytes(192, 128))), strength=0.5)
    assert status == 200 and "predicted peak per rank" in plan


@pytest.mark.parametrize("field", ["init_image", "mask", "control_image", "ip_image"])
def test_a_request_naming_a_file_on_the_server_is_refused_and_nothing_is_read(
    app: App, tmp_path: Path, field: str
) -> None:
    never_uploaded = tmp_path / "private.png"
    never_uploaded.write_bytes(png_bytes(8, 8))
    uploaded = app.upload(png_bytes(8, 8))
    before = app.cached()
    for path in ("/etc/passwd", str(never_uploaded), "../../../../etc/passwd", f"{uploaded}/../../../etc/passwd",
                 "https://example.com/x.png", str(tmp_path)):  # fmt: skip
        status, text = app.plan(**{field: file_data(path, orig_name="x.png")})
        assert (status, text) == (400, NOT_UPLOADED)
    assert app.cached() == before  # nothing was copied into Gradio's cache to be served back


def test_a_file_named_anywhere_in_a_request_is_refused(app: App) -> None:
    """Gradio copies any FileData-shaped value into its cache, whatever field carries it."""
    for fields in ({"prompt": file_data("/etc/passwd")}, {"loras": [file_data("/etc/passwd")]},
                   {"init_image": {"path": "/etc/passwd"}}):  # fmt: skip
        assert app.plan(**fields) == (400, NOT_UPLOADED)
    response = app.client.post("/gradio_api/queue/join", json={"data": [file_data("/etc/passwd")], "fn_index": 1,
                               "session_hash": "s", "event_data": {"value": file_data("/etc/hostname")}})  # fmt: skip
    assert (response.status_code, response.text) == (400, NOT_UPLOADED)
    assert "root:" not in app.client.get("/gradio_api/file=/etc/passwd").text


def test_a_picture_field_reads_only_uploads_and_inline_bytes_even_past_the_guard(app: App) -> None:
    import gradio as gr
    from gradio.data_classes import ImageData

    from distlin.app.uploads import picture_field

    field, photo = picture_field("init image", max_upload_mb=1), png_bytes(8, 8)
    assert field.preprocess(ImageData(path=app.upload(photo))) == photo  # the uploaded file's bytes, as sent
    inline = f"data:image/png;base64,{base64.b64encode(photo).decode()}"
    assert field.preprocess(ImageData(url=inline)) == photo
    for payload in (ImageData(path="/etc/passwd"), ImageData(path="/dev/zero"), ImageData(url="https://x/y.png")):
        with pytest.raises(gr.Error, match="init image: a request may hand over only"):
            field.preprocess(payload)


def test_a_file_sent_to_any_route_but_the_upload_route_is_refused(app: App) -> None:
    video = {"video": ("x.mp4", b"\0" * 1024, "video/mp4")}
    for route in ("/gradio_api/process_recording", "/gradio_api/component_server", "/gradio_api/queue/join"):
        response = app.client.post(route, files=video)
        assert (response.status_code, response.text) == (
            400,
            "a request body must be JSON; pictures go to the upload route",
        )
    assert app.cached() == []


def test_dev_zero_named_as_a_picture_does_not_hang_the_server(app: App) -> None:
    answers: list[tuple[int, str]] = []
    zero = file_data("/dev/zero", orig_name="x.svg")
    attack = threading.Thread(target=lambda: answers.append(app.plan(init_image=zero)))
    attack.start()
    attack.join(timeout=30)
    assert answers == [(400, NOT_UPLOADED)]
    assert app.plan()[0] == 200  # the next request is served


def test_no_request_makes_the_server_fetch_a_url(app: App) -> None:
    for route in ("/gradio_api/file=http://127.0.0.1:1/x", "/gradio_api/file=https://example.com/x.png",
                  "/gradio_api/proxy=http://127.0.0.1:1/x", "/file=http://127.0.0.1:1/x"):  # fmt: skip
        assert app.client.get(route).status_code == 404


# --- the upload limit holds for every encoding -----------------------------------------------------------------


def test_the_upload_limit_holds_for_a_picture_sent_inline(app: App) -> None:
    small, large = png_bytes(192, 128), b"\x89PNG" + b"\0" * (2 * 2**20)  # --max-upload-mb 1
    inline = f"data:image/png;base64,{base64.b64encode(small).decode()}"
    status, plan = app.plan(init_image={"url": inline, "meta": FILE}, strength=0.5)
    assert status == 200 and "predicted peak" in plan  # a picture within the limit may come inline
    status, text = app.plan(init_image={"url": f"data:image/png;base64,{base64.b64encode(large).decode()}"})
    assert status == 413 and "upload limit" in text
    assert app.plan(prompt=base64.b64encode(large).decode())[0] == 413  # base64 anywhere in the JSON
    exactly_over = b"\0" * (2**20 + 1)  # fits the body's margin, not the picture's limit
    status, text = app.plan(init_image={"url": f"data:image/png;base64,{base64.b64encode(exactly_over).decode()}"})
    assert status == 200 and "up to 1 MiB" in text
    assert app.client.post("/gradio_api/upload", files={"files": ("x.png", large, "image/png")}).status_code == 413


# --- what waits on the server is bounded ----------------------------------------------------------------------


def test_an_upload_that_would_fill_the_upload_folder_is_refused_and_nothing_is_written(app: App) -> None:
    pictures = [png_bytes(400 + n, 300) for n in range(3)]  # 0.34 MiB each, within --max-upload-mb 1
    app.upload(pictures[0])
    app.upload(pictures[1])  # the folder holds 1 MiB in all
    before = app.cached()
    response = app.client.post("/gradio_api/upload", files={"files": ("x.png", pictures[2], "image/png")})
    assert (response.status_code, response.text) == (
        413,
        "the server's upload folder holds 0.7 MiB of its 1 MiB; try again later",
    )
    assert app.cached() == before
    unsized = app.client.post("/gradio_api/upload", content=iter([b"--x--\r\n"]),
                              headers={"content-type": "multipart/form-data; boundary=x"})  # fmt: skip
    assert unsized.status_code == 411 and app.cached() == before


def test_a_request_beyond_the_queues_limits_is_refused_in_one_line_and_not_queued(tmp_path: Path) -> None:
    from distlin.app.page import CONTROLS, AppPage

    runtime = Runtime()
    limits = Limits(max_queued=2, max_queued_mb=1)
    coordinator = Coordinator(RankChannel(runtime), GenerationSession(runtime), ResultStore(tmp_path), limits)
    page = AppPage(coordinator, "tiny-sd15")  # its ranks not started: requests wait in the queue
    values = tuple(FORM[name] for name in CONTROLS)
    waiting = [coordinator.submit(tiny()), coordinator.submit(tiny())]
    assert next(page._run(*values))[0] == (
        "refused: 2 requests are waiting, the most this server queues; try again once one has run"
    )
    coordinator.cancel(waiting[0])
    photo = png_bytes(512, 400)  # 0.59 MiB
    coordinator.submit(tiny(init_image=photo, strength=0.5))
    coordinator.cancel(waiting[1])
    with pytest.raises(UsageError) as refused:
        coordinator.submit(tiny(init_image=photo, strength=0.5))
    assert str(refused.value) == (
        "the queue's pictures would take 1.2 MiB, over this server's 1 MiB; try again once a request has run"
    )
    assert coordinator.ahead_of(coordinator.submit(tiny())) == 1  # a request without pictures still fits


# --- only finished results, under /results/<id>/<known file> ---------------------------------------------------


def test_only_finished_results_are_served_and_nothing_else_under_the_output_folder(app: App) -> None:
    saved = app.store.save(Image.new("RGB", (40, 24), "blue"), {"seed": 1})
    root = app.store.root
    (root / ".env").write_text("SECRET=1")
    unfinished = root / f".{saved.id[:-1]}x.tmp"
    unfinished.mkdir()
    (unfinished / "image.png").write_bytes(png_bytes(8, 8))
    assert app.client.get(f"/results/{saved.id}/image.png").status_code == 200
    for path in (saved.image, root / ".env", unfinished / "image.png", saved.folder / "metadata.json"):
        for route in (f"/gradio_api/file={path}", f"/file={path}"):
            response = app.client.get(route)
            assert response.status_code in (403, 404) and b"SECRET" not in response.content
    for name in (f"{unfinished.name}/image.png", ".env", f"{saved.id}/../.env"):
        assert app.client.get(f"/results/{name}").status_code == 404


# --- no request stops the rank group ---------------------------------------------------------------------------

RANK_1_FAILS = "a request rank 1 fails alone"
RANK_1_FAULTS_MID_STEP = "a request rank 1 fails alone inside a denoising step"


def tiny(**changes: Any) -> Any:
    from distlin.app.request import GenerationRequest

    return GenerationRequest.from_message({**GenerationRequest.for_preset("tiny-sd15").to_message(), "steps": 2,
                                           **changes})  # fmt: skip


def bomb_png(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


class FailsAloneOnRank1(GenerationSession):
    """Rank 1's session: fails alone on one request before the others could notice (its disk is full), and on
    another in the middle of its second UNet call, while rank 0 waits for it in a band exchange."""

    def settings(self, request):  # noqa: ANN001, ANN201 - as the base class
        if request.prompt == RANK_1_FAILS:
            raise OSError(28, "No space left on device")
        return super().settings(request)

    def _pipeline(self, settings):  # noqa: ANN001, ANN202 - as the base class
        prepared = super()._pipeline(settings)
        if settings.prompt == RANK_1_FAULTS_MID_STEP:
            calls = []

            def fault(module: Any, args: Any) -> None:
                calls.append(module)
                if len(calls) == 2:
                    handle.remove()
                    raise RuntimeError("injected fault in rank 1's UNet")

            handle = prepared.pipe.unet.up_blocks[-1].register_forward_pre_hook(fault)
        return prepared


def hostile_requests(runtime: Runtime, output_dir: str) -> dict[str, Any]:
    """Rank 0 is sent a truncated PNG, a decompression bomb, steps=1001, NaN guidance, a request one rank
    fails alone and one it fails alone mid-step (each followed by a normal request); rank 1 serves until
    shutdown."""
    from distlin.app.ranks import serve_worker
    from distlin.app.regroup import GroupRecovery

    channel = RankChannel(runtime)
    recovery = GroupRecovery(runtime, timeout_s=6)  # the app's --timeout-s
    if runtime.rank != 0:
        serve_worker(channel, FailsAloneOnRank1(runtime, recovery=recovery))
        return {"worker": "stopped by shutdown", "rebuilds": recovery.rounds}
    session = GenerationSession(runtime, recovery=recovery)
    coordinator = Coordinator(channel, session, ResultStore(output_dir), idle_message_s=0.2)
    serving = threading.Thread(target=coordinator.serve)
    serving.start()
    refusals = []
    for changes in ({"init_image": png_bytes(192, 128)[:-200], "strength": 0.5}, {"mask": bomb_png(40000, 40000)},
                    {"steps": 1001}, {"guidance_scale": float("nan")}):  # fmt: skip
        try:
            coordinator.submit(tiny(**changes))
            refusals.append("accepted")
        except UsageError as err:
            refusals.append(str(err))
    outcomes = []
    for failing in (tiny(prompt=RANK_1_FAILS), tiny(prompt=RANK_1_FAULTS_MID_STEP, guidance_scale=1.0)):
        started = time.monotonic()  # guidance 1: one batch, both ranks on its row bands, exchanging mid-step
        failed = coordinator.submit(failing)
        failed.finished.wait(timeout=120)
        seconds = time.monotonic() - started
        after = coordinator.submit(tiny())
        after.finished.wait(timeout=120)
        outcomes.append((failed.error, seconds, after.result is not None))
    coordinator.close()
    serving.join()
    return {"refusals": refusals, "outcomes": outcomes, "lost": coordinator.failure, "rebuilds": recovery.rounds}


def test_no_request_stops_a_two_rank_group(tmp_path: Path) -> None:
    from multirank import run_ranks

    main, worker = run_ranks(2, hostile_requests, str(tmp_path / "out"))
    truncated, bomb, steps, nan = main["refusals"]
    assert truncated.startswith("init image is not a complete image")
    assert bomb.startswith("mask has more than") and "pixels" in bomb
    assert "1001" in steps and "1000" in steps
    assert nan.startswith("guidance scale nan must be a finite number")
    assert not any("/" in refusal for refusal in main["refusals"])  # no server path in what the page shows
    (disk_full, _, served), (fault, seconds, served_after_fault) = main["outcomes"]
    assert disk_full == "rank 1: OSError: [Errno 28] No space left on device"  # refused on every rank
    assert fault == "rank 1: RuntimeError: injected fault in rank 1's UNet"  # rank 0 was waiting for it mid-step
    assert seconds < 6  # rank 0's exchange fails at once, not at the app's --timeout-s (6 s here)
    assert served and served_after_fault and main["lost"] is None  # the same processes serve the next request
    assert worker == {"worker": "stopped by shutdown", "rebuilds": 2} and main["rebuilds"] == 2


# --- Cancel stops the request it names -------------------------------------------------------------------------


def test_cancel_stops_the_request_it_names_when_one_session_queued_several(tmp_path: Path) -> None:
    from distlin.app.page import CONTROLS, AppPage

    runtime = Runtime()
    coordinator = Coordinator(RankChannel(runtime), GenerationSession(runtime), ResultStore(tmp_path))
    page = AppPage(coordinator, "tiny-sd15")  # its ranks not started: requests wait in the queue
    values = tuple(FORM[name] for name in CONTROLS)
    first, second, third = (page._run(*values) for _ in range(3))
    ids = [next(run)[1] for run in (first, second, third)]  # the request id each page holds
    jobs = [page._jobs[request_id] for request_id in ids]
    assert len(set(ids)) == 3 and coordinator.ahead_of(jobs[2]) == 2
    page._cancel(ids[1])
    assert [job.cancelled for job in jobs] == [False, True, False] and coordinator.ahead_of(jobs[2]) == 1
    assert next(second)[0] == "cancelled; nothing was written"
    page._cancel("a guessed id")
    page._cancel(None)
    assert not jobs[0].cancelled and not jobs[2].cancelled


# --- refusals name no server path ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("--mask '/tmp/distlin-uploads-x1/mask' is 64×64; pass a mask the size of --init-image",
         "the uploaded mask is 64×64; pass a mask the size of init image"),
        ("--controlnet '/srv/cn' is not a folder with a config.json; fix --controlnet",
         "ControlNet (a file on the server) is not a folder with a config.json; fix ControlNet"),
        ("OSError: [Errno 2] No such file or directory: '/srv/models/unet/config.json'",
         "OSError: [Errno 2] No such file or directory: a file on the server"),
        ("rank 1: PermissionError: /home/op/distlin-results/.x.tmp denied; stage 1/2",
         "rank 1: PermissionError: a file on the server denied; stage 1/2"),
    ],
)  # fmt: skip
def test_refusals_shown_on_the_page_name_no_server_path(message: str, shown: str) -> None:
    from distlin.app.wording import in_field_terms

    assert in_field_terms(message) == shown


# --- the operator's components stay inside their folder -------------------------------------------------------


def test_a_link_in_the_components_folder_that_leaves_it_is_refused_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from distlin.app import cli as app_cli
    from distlin.app.library import ComponentLibrary

    root, outside = tmp_path / "components", tmp_path / "outside"
    (root / "loras").mkdir(parents=True)
    (root / "controlnets" / "edges").mkdir(parents=True)
    (root / "controlnets" / "edges" / "config.json").write_text("{}")
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"")
    (outside / "config.json").write_text("{}")
    (root / "loras" / "style.safetensors").write_bytes(b"")
    (root / "loras" / "alias.safetensors").symlink_to(root / "loras" / "style.safetensors")  # inside: offered
    assert sorted(ComponentLibrary.scan(root).loras) == ["alias", "style"]
    for link, target in (
        (root / "loras" / "stolen.safetensors", outside / "secret.safetensors"),
        (root / "controlnets" / "edges" / "weights.safetensors", outside / "secret.safetensors"),
        (root / "controlnets" / "other", outside),
    ):  # a whole ControlNet folder elsewhere
        link.symlink_to(target)
        assert app_cli.main(["--components", str(root)]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: --components {str(root)!r}: ") and "is a link that leaves the folder" in error
        assert error.count("\n") == 1
        link.unlink()


def test_many_requests_at_once_decode_one_picture_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of requests each carrying a large picture holds one decoded picture in memory, not one each."""
    import time

    from distlin.app import request as request_module

    decoding, most = [0], [0]

    def counting_decode(data: bytes, what: str) -> Any:
        decoding[0] += 1
        most[0] = max(most[0], decoding[0])
        time.sleep(0.05)
        decoding[0] -= 1
        return Image.new("RGB", (192, 128))

    monkeypatch.setattr(request_module, "decode_image", counting_decode)
    runtime = Runtime()
    coordinator = Coordinator(RankChannel(runtime), GenerationSession(runtime), ResultStore(tmp_path))
    flood = [threading.Thread(target=coordinator.plan, args=(tiny(init_image=png_bytes(192, 128), strength=0.5),))
             for _ in range(6)]  # fmt: skip
    for thread in flood:
        thread.start()
    for thread in flood:
        thread.join()
    assert most[0] == 1


def test_the_upload_folders_of_a_killed_app_are_removed_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    from distlin.app.uploads import UPLOAD_FOLDER_PREFIX
    from distlin.io import _host

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = _host()
    killed = tmp_path / f"{UPLOAD_FOLDER_PREFIX}{host}-{int(gone.stdout)}-abc123"
    running = tmp_path / f"{UPLOAD_FOLDER_PREFIX}{host}-{os.getpid()}-def456"  # this process: alive
    for folder in (killed, running):
        (folder / "f00d").mkdir(parents=True)
        (folder / "f00d" / "photo.png").write_bytes(png_bytes(8, 8))  # a user's picture
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    with private_upload_folder() as uploads:
        assert uploads.parent == tmp_path and uploads.stat().st_mode & 0o777 == 0o700
        assert not killed.exists() and running.exists()
    assert not uploads.exists()
