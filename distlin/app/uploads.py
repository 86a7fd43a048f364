"""What a request may hand the server as a file: the bytes it carries, never a name of a file on the server.

Gradio's API takes a picture as a ``FileData`` dict whose ``path`` the server copies and opens, and, mounted with
``gr.mount_gradio_app``, Gradio opens whatever path it is given (its own check runs only after ``launch()``): a
request could read any file the server can, or hang it on ``/dev/zero``. So the app reads every request body
itself before Gradio does (:class:`RequestGuard`): a body is at most the upload limit as base64 (so the limit
holds for pictures sent inline, as ``data:`` URLs or base64 in JSON, as it does on the upload route), and every
``path`` anywhere in it must name a regular file inside this server's own upload folder
(:func:`private_upload_folder`), where only Gradio's upload route and cache write. The picture fields
(:func:`picture_field`) read their file with the same check and give the page its bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import ImageData
from gradio.utils import get_upload_folder
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distlin.errors import UsageError
from distlin.io import _alive, _host  # the same rule as an output's temporary file: this host, a dead pid

UPLOAD_FOLDER_PREFIX = "distlin-app-uploads-"
UPLOAD_ROUTE = "/gradio_api/upload"  # Gradio's multipart upload route, which enforces the size as a file arrives
JSON_MARGIN = 2**20  # room in a request body for everything but its pictures: prompt, numbers, names
NOT_UPLOADED = "a request may hand over only pictures it uploads or sends inline; it names no file on the server"
# Gradio's file route fetches a URL given in place of a file; no request makes this server fetch anything.
FETCH_ROUTE = re.compile(r"/(file[=/]|proxy=)\s*[a-z][a-z0-9+.-]*:", re.IGNORECASE)


@contextmanager
def private_upload_folder() -> Iterator[Path]:
    """A fresh folder (mode 0700) for Gradio's uploads and cache while the server runs, removed after, so the only
    files a request's ``path`` may name are the ones this server's upload route wrote. Set as ``GRADIO_TEMP_DIR``
    before any Gradio block is made (the operator's ``GRADIO_TEMP_DIR``, if set, is where it is made). Its name
    holds this host and pid, so the folders of an app that was killed (users' pictures) are removed at the next
    start (:func:`remove_stale_upload_folders`)."""
    previous = os.environ.get("GRADIO_TEMP_DIR")
    parent = Path(previous or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_upload_folders(parent)
    prefix = f"{UPLOAD_FOLDER_PREFIX}{_host()}-{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as folder:
        os.environ["GRADIO_TEMP_DIR"] = folder
        try:
            yield Path(folder)
        finally:
            if previous is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = previous


def remove_stale_upload_folders(parent: Path) -> list[Path]:
    """Remove this user's upload folders in ``parent`` whose app, a process on this host, is gone."""
    pattern = re.compile(rf"{UPLOAD_FOLDER_PREFIX}{re.escape(_host())}-(\d+)-\w+")
    removed = []
    for folder in parent.iterdir():
        match = pattern.fullmatch(folder.name)
        if match and not _alive(int(match[1])) and folder.is_dir() and folder.lstat().st_uid == os.getuid():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def uploaded_file(path: str, max_bytes: int | None) -> Path:
    """The file ``path`` names if this server's upload route wrote it: a regular file inside the upload folder,
    within ``max_bytes``. UsageError otherwise, naming no path (nothing is opened to find out)."""
    try:
        real = Path(path).resolve(strict=True)
        info = real.stat()
    except (OSError, RuntimeError, ValueError):
        raise UsageError(NOT_UPLOADED) from None
    if not real.is_relative_to(Path(get_upload_folder()).resolve()) or not stat.S_ISREG(info.st_mode):
        raise UsageError(NOT_UPLOADED)
    _check_size(info.st_size, max_bytes)
    return real


def inline_bytes(url: str, max_bytes: int | None) -> bytes:
    """The bytes of a ``data:...;base64,...`` URL, refused (UsageError) above ``max_bytes`` before decoding."""
    header, comma, encoded = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise UsageError("an inline picture must be a data: URL in base64 (data:image/png;base64,...)")
    _check_size(len(encoded) * 3 // 4, max_bytes)
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("an inline picture's data: URL is not valid base64") from None


def picture_bytes(payload: ImageData, max_bytes: int | None) -> bytes:
    """The bytes of a picture field's value: sent inline, or uploaded to this server (and nothing else)."""
    if payload.url and payload.url.startswith("data:"):
        return inline_bytes(payload.url, max_bytes)
    if payload.path is None:
        raise UsageError(NOT_UPLOADED)
    with uploaded_file(payload.path, max_bytes).open("rb") as file:
        data = file.read(-1 if max_bytes is None else max_bytes + 1)
    _check_size(len(data), max_bytes)
    return data


def check_files_named(value: Any, max_bytes: int | None) -> None:
    """Every ``path`` anywhere in a request's JSON must name one of this server's uploads (UsageError)."""
    if isinstance(value, dict):
        if isinstance(value.get("path"), str):
            uploaded_file(value["path"], max_bytes)
        for item in value.values():
            check_files_named(item, max_bytes)
    elif isinstance(value, list):
        for item in value:
            check_files_named(item, max_bytes)


def body_limit(max_bytes: int | None) -> int | None:
    """The largest request body (other than an upload) for pictures of ``max_bytes`` sent as base64."""
    return None if max_bytes is None else -(-max_bytes // 3) * 4 + JSON_MARGIN


def picture_field(label: str, max_upload_mb: int | None, **options: Any) -> gr.Image:
    """An upload field whose value is the file's bytes, read only from this server's uploads or an inline
    ``data:`` URL within the upload limit (Gradio's own reading opens any path it is sent, and decodes an inline
    picture before any check). Its reading is replaced on the instance: a subclass of a Gradio component makes
    Gradio write a ``.pyi`` file beside this module at import."""
    field = gr.Image(label=label, type="filepath", image_mode=None, sources=["upload"], **options)
    max_bytes = None if max_upload_mb is None else max_upload_mb * 2**20

    def read(payload: ImageData | None) -> bytes | None:
        if payload is None:
            return None
        try:
            return picture_bytes(payload, max_bytes)
        except UsageError as err:
            raise gr.Error(f"{label}: {err}") from None

    field.preprocess = read  # type: ignore[method-assign]
    return field


class RequestGuard:
    """ASGI middleware in front of Gradio: reads each request body (other than an upload) before the app does,
    refusing one over :func:`body_limit` (413), one that is not JSON (400: the upload route is the only one that
    takes a file) or one naming a file that is not one of this server's uploads (400), and refusing the routes by
    which Gradio fetches a URL on a request's behalf (404). An upload that would take the upload folder past
    ``max_folder_bytes`` (with the uploads still arriving) is refused (413) before Gradio writes anything, and
    so is one that does not say its size (411)."""

    def __init__(self, app: ASGIApp, max_bytes: int | None, max_folder_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.limit = body_limit(max_bytes)
        self.max_folder_bytes = max_folder_bytes
        self._arriving = 0  # bytes of uploads let through and still being written (one event loop: no lock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if FETCH_ROUTE.search(scope["path"]):
            await PlainTextResponse("not found", 404)(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and scope["path"].rstrip("/").endswith(UPLOAD_ROUTE):
            await self._upload(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        body = await self._body(receive)
        if body is None:
            text = f"request body over {self.limit / 2**20:.1f} MiB: this server takes pictures up to its upload limit"
            await PlainTextResponse(text, 413)(scope, receive, send)
            return
        try:
            check_files_named(json.loads(body), self.max_bytes)
        except UsageError as err:
            await PlainTextResponse(str(err), 400)(scope, receive, send)
            return
        except RecursionError:
            await PlainTextResponse("request body nested too deep", 400)(scope, receive, send)
            return
        except ValueError:
            if body.strip():  # a file sent elsewhere than the upload route (Gradio's recording and component routes)
                await PlainTextResponse("a request body must be JSON; pictures go to the upload route", 400)(
                    scope, receive, send
                )
                return

        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Gradio's upload route, if the upload folder has room for the whole body (told by Content-Length)."""
        if self.max_folder_bytes is None:
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if not length.isdigit():
            await PlainTextResponse("an upload must say its size (Content-Length)", 411)(scope, receive, send)
            return
        held = folder_bytes(Path(get_upload_folder())) + self._arriving
        if held + int(length) > self.max_folder_bytes:
            text = (
                f"the server's upload folder holds {held / 2**20:.1f} MiB of its {self.max_folder_bytes / 2**20:g} "
                "MiB; try again later"
            )
            await PlainTextResponse(text, 413)(scope, receive, send)
            return
        self._arriving += int(length)
        try:
            await self.app(scope, receive, send)
        finally:
            self._arriving -= int(length)

    async def _body(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it passes the limit."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if self.limit is not None and size > self.limit:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def folder_bytes(folder: Path) -> int:
    """The bytes of the files below ``folder`` (0 if it is gone)."""
    total = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except OSError:  # removed meanwhile (Gradio's cache cleanup)
                continue
    return total


def _check_size(size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        limit = f"{max_bytes / 2**20:g} MiB"
        raise UsageError(f"picture of {size / 2**20:.1f} MiB; this server takes pictures up to {limit}")
