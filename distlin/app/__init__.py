"""The local web app (``distlin-app``, ``launch/app.py``): a Gradio page that drives one device or a whole
torchrun group through :func:`distlin.run.generate`, with a queue, cancel, a gallery and a deep-zoom viewer.

Nothing heavy is imported here: :mod:`distlin.app.cli` checks its flags before torch or Gradio load, and the
console script refuses in one line when the ``app`` extra is not installed.
"""

from __future__ import annotations

from typing import NoReturn

from distlin.commands import require_extra

# What the page and its server import; all come with ``pip install 'distlin[app]'`` (Gradio brings the rest).
WEB_MODULES = ("gradio", "starlette", "fastapi", "uvicorn")


def entry_point() -> NoReturn:
    """Console script ``distlin-app``."""
    require_extra("app", WEB_MODULES)
    from distlin.app.cli import entry_point as serve

    serve()
