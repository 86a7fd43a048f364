"""HTTP basic authentication in front of the whole app (page, Gradio API, viewer and result files alike)."""

from __future__ import annotations

import base64
import binascii
import secrets

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from distlin.errors import UsageError


def parse_credentials(text: str) -> tuple[str, str]:
    """``user:password`` (the password may contain colons) as a pair; UsageError when either part is empty."""
    user, _, password = text.partition(":")
    if not user or not password:
        raise UsageError("--auth takes user:password, both non-empty")
    return user, password


class BasicAuth:
    """ASGI middleware: requests without the right ``Authorization: Basic`` header get 401, which makes a
    browser ask for the user and password once and send them with every later request."""

    def __init__(self, app: ASGIApp, user: str, password: str):
        self.app = app
        self.expected = base64.b64encode(f"{user}:{password}".encode()).decode()

    def authorized(self, scope: Scope) -> bool:
        header = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        try:
            token = base64.b64encode(base64.b64decode(token, validate=True)).decode()
        except (binascii.Error, ValueError):
            return False
        return scheme.lower() == "basic" and secrets.compare_digest(token, self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.authorized(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            challenge = {"WWW-Authenticate": 'Basic realm="distlin", charset="UTF-8"'}
            await PlainTextResponse("authentication required", 401, headers=challenge)(scope, receive, send)
