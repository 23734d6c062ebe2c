"""The live dashboard (API.md "Dashboard"): ``GET /`` and its built assets under ``/assets/``.

The page is built from ``ui/`` (``make ui``) into ``server/static/``, which is committed so the server
needs no Node. It talks to the API over REST and Socket.IO only. Every answer carries a strict
Content-Security-Policy: scripts and styles from this origin only (no inline script, no eval), network
to this origin and its websocket only, no framing.
"""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from server.http import routes

STATIC = Path(__file__).resolve().parent.parent / "static"
_HOST_OK = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
_ASSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
R = TypeVar("R", bound=web.StreamResponse)
_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png",
          ".json": "application/json", ".map": "application/json", ".woff2": "font/woff2"}


def content_security_policy(host: str | None) -> str:
    # connect-src names the websocket origin explicitly: older browsers do not let 'self' cover ws:.
    sockets = f" ws://{host} wss://{host}" if host and _HOST_OK.match(host) else ""
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
            f"connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _secured(response: R, request: web.Request) -> R:
    response.headers["Content-Security-Policy"] = content_security_policy(request.host)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    return response


def _missing(request: web.Request) -> web.Response:
    return _secured(web.Response(status=503, content_type="text/plain",
                                 text="The page bundle (server/static) is missing: run `make ui` (Node) to build it."),
                    request)


def static_page(request: web.Request, name: str) -> web.StreamResponse:
    """A page of the bundle (the dashboard, the API reference) with the strict policy above."""
    page = STATIC / name
    if not page.is_file():
        return _missing(request)
    return _secured(web.Response(body=page.read_bytes(), content_type="text/html", charset="utf-8",
                                 headers={"Cache-Control": "no-cache"}), request)


@routes.get("/", summary="The live dashboard (HTML; sign in, then REST + Socket.IO)", tag="dashboard", auth=False)
async def dashboard(request: web.Request) -> web.StreamResponse:
    return static_page(request, "index.html")


@routes.get("/assets/{name}", summary="The dashboard's built assets (content-hashed names)", tag="dashboard",
            auth=False, errors=(404,))
async def asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = STATIC / "assets" / name
    if not _ASSET_NAME.match(name) or ".." in name or not path.is_file():
        raise web.HTTPNotFound(reason="no such asset")
    kind = _TYPES.get(path.suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    # The names carry a hash of their content (vite), so a browser may keep them for good.
    return _secured(web.Response(body=path.read_bytes(), content_type=kind,
                                 headers={"Cache-Control": "public, max-age=31536000, immutable"}), request)
