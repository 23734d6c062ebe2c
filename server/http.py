"""HTTP helpers shared by every route module: the route table (which also feeds OpenAPI),
JSON encode/decode with msgspec (strings with a NUL refused, see ``domain.inputs``), pagination and
query parsing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from domain.base import Actor, PageRequest
from domain.errors import InvalidRequest, Unauthorized
from domain.inputs import may_hold_nul, refuse_nul
from server.container import Container

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ACTOR = web.RequestKey("actor", Actor)
REQUEST_ID = web.RequestKey("request_id", str)
CONTAINER = web.AppKey("container", Container)

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder] = {}


@dataclass
class RouteSpec:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    body: type | None = None
    response: Any = None
    status: int = 200
    auth: bool = True
    key_auth: bool = False  # the route checks a project API key itself (the gateway): documented as secured
    query: dict[str, str] = field(default_factory=dict)  # name -> description
    errors: tuple[int, ...] = ()
    # What an API key needs for this route (domain.identity.KEY_SCOPES); OWN: every key, limited to its own
    # doings; None: keys are refused (a user token is needed).
    key_scope: str | None = None


class Routes:
    """The one route table. ``@routes.post(...)`` registers a handler and documents it."""

    def __init__(self) -> None:
        self.specs: list[RouteSpec] = []

    def add(self, method: str, path: str, *, summary: str, tag: str, **kw: Any) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            spec = RouteSpec(method, path, handler, summary, tag, **kw)
            handler.__smartspace_route__ = spec  # type: ignore[attr-defined]
            self.specs.append(spec)
            return handler

        return register

    def get(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.add("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.add("POST", path, **kw)

    def put(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.add("PUT", path, **kw)

    def patch(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.add("PATCH", path, **kw)

    def delete(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.add("DELETE", path, **kw)

    def install(self, app: web.Application) -> None:
        for spec in self.specs:
            app.router.add_route(spec.method, spec.path, spec.handler)


routes = Routes()


def container(request: web.Request) -> Container:
    return request.app[CONTAINER]


def route_spec(request: web.Request) -> RouteSpec | None:
    handler = getattr(request.match_info, "handler", None)
    return getattr(handler, "__smartspace_route__", None)


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encoder.encode(value), status=status, headers=headers,
                        content_type="application/json")


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


async def read_body(request: web.Request) -> bytes:
    """The request body; an empty (or all-whitespace) one is refused. (One nested too deeply never gets
    here: the input middleware refused it.)"""
    body = await request.read()
    if not body.strip():
        raise InvalidRequest("a JSON request body is required")
    return body


def refuse_nul_in(body: bytes) -> None:
    """A string (or key) with a NUL anywhere in a JSON body is a 422 naming it, as the client named it; checked
    before anything else about the body."""
    if may_hold_nul(body):
        refuse_nul(msgspec.json.decode(body))


def decode_body(body: bytes, type_: type[T]) -> T:
    """Decode and validate a body read by ``read_body``; a string with a NUL is a 422 naming its field.
    msgspec errors are rendered by the error middleware."""
    refuse_nul_in(body)
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    return decoder.decode(body)


async def decode(request: web.Request, type_: type[T]) -> T:
    """Read, decode and validate the JSON body."""
    return decode_body(await read_body(request), type_)


async def read_json(request: web.Request) -> Any:
    """The body as plain JSON values (depth-limited; NUL is the caller's to judge)."""
    return msgspec.json.decode(await read_body(request))


def actor(request: web.Request) -> Actor:
    found = request.get(ACTOR)
    if found is None:
        raise Unauthorized("authentication required: send Authorization: Bearer <token or sk- key>")
    return found


def page_request(request: web.Request, max_limit: int = 200) -> PageRequest:
    raw = request.query.get("limit", "50")
    try:
        limit = int(raw)
    except ValueError:
        raise InvalidRequest("limit must be an integer", {"limit": raw}) from None
    if not 1 <= limit <= max_limit:
        raise InvalidRequest(f"limit must be between 1 and {max_limit}", {"limit": limit})
    return PageRequest(limit=limit, cursor=request.query.get("cursor") or None)


def query_value(request: web.Request, name: str, type_: type[T], default: T | None = None) -> T | None:
    raw = request.query.get(name)  # a NUL was refused by the input middleware
    if raw is None or raw == "":
        return default
    try:
        return msgspec.convert(raw, type_, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"query parameter {name!r} is invalid: {exc}", {name: raw}) from None


PAGE_QUERY = {"limit": "page size, 1–200 (default 50)", "cursor": "next_cursor of the previous page"}
