"""The HTTP side: the Gradio page at ``/``, the deep-zoom viewer at ``/viewer/`` and finished results at
``/results/<id>/<file>``, behind optional basic authentication.

Result files are served by an explicit route that accepts only the names the app writes (image, metadata,
thumbnail, pyramid tiles) inside a finished result folder, so no URL reaches anything else on the disk: Gradio's
own file route serves only this server's upload folder (the output folder is blocked there), and every request
body passes :class:`~distlin.app.uploads.RequestGuard` before Gradio reads it.
"""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from distlin.app.auth import BasicAuth
from distlin.app.results import ResultStore
from distlin.app.uploads import RequestGuard
from distlin.errors import UsageError

VIEWER_DIR = Path(__file__).resolve().parent / "viewer"
RESULT_FILE = re.compile(r"image\.png|image\.dzi|metadata\.json|thumbnail\.jpg|image_files/\d+/\d+_\d+\.png")


def build_server(
    page: gr.Blocks,
    store: ResultStore,
    credentials: tuple[str, str] | None = None,
    css: str | None = None,
    max_upload_mb: int | None = None,
    max_upload_folder_mb: int | None = None,
) -> FastAPI:
    """The ASGI app: viewer, results and the Gradio page (uploads up to ``max_upload_mb`` MiB each, and
    ``max_upload_folder_mb`` MiB in all), wrapped in basic auth when credentials are given."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/results/{result_id}/{name:path}")
    def result_file(result_id: str, name: str) -> FileResponse:
        if not RESULT_FILE.fullmatch(name):
            raise HTTPException(404)
        try:
            path = store.get(result_id).folder / name
        except UsageError:
            raise HTTPException(404) from None
        if not path.is_file():
            raise HTTPException(404)
        return FileResponse(path, headers={"Cache-Control": "private, max-age=86400, immutable"})

    app.mount("/viewer", StaticFiles(directory=VIEWER_DIR, html=True), name="viewer")
    max_bytes = None if max_upload_mb is None else max_upload_mb * 2**20
    app = gr.mount_gradio_app(
        app, page, path="/", blocked_paths=[str(store.root)], footer_links=[], run_history=False, css=css,
        max_file_size=max_bytes,
    )  # fmt: skip
    folder_bytes = None if max_upload_folder_mb is None else max_upload_folder_mb * 2**20
    app.add_middleware(RequestGuard, max_bytes=max_bytes, max_folder_bytes=folder_bytes)
    if credentials is not None:  # added last: asked before the guard reads a body
        app.add_middleware(BasicAuth, user=credentials[0], password=credentials[1])
    return app


def http_server(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server for ``app``; ``run()`` blocks until Ctrl-C or ``should_exit``."""
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
