"""HTTP helpers shared by every route module: the route table (which also feeds OpenAPI),
JSON encode/decode with msgspec (strings with a NUL refused, see ``domain.inputs``), pagination and
query parsing."""

from __future__ import annotations

import re
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
    """Decode and validate a body read by ``read_body``; a string with a NUL is a 422 naming its field. A body
    that breaks a rule is an InvalidRequest naming the field and the rule in words (:func:`invalid_body`);
    malformed JSON is left to the error middleware (400)."""
    refuse_nul_in(body)
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise exc from None  # truncated JSON met a field first: the middleware answers "not valid JSON"
        raise invalid_body(exc, type_) from None


# ---------------------------------------------------------------- validation errors in words
_NOUNS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "array": "a list",
          "object": "an object", "null": "null", "bytes": "base64 text", "datetime": "an RFC 3339 date-time",
          "uuid": "a UUID", "decimal": "a decimal number", "date": "a date (YYYY-MM-DD)"}
_UNITS = {"str": ("character", "characters"), "array": ("item", "items"), "object": ("entry", "entries"),
          "bytes": ("byte", "bytes")}
_BOUNDS = {">=": "at least", "<=": "at most", ">": "greater than", "<": "less than"}
_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_EXPECTED = re.compile(r"^Expected `(?P<kind>\w+)`(?:, got `(?P<got>\w+)`)?"
                       r"(?: (?P<op>>=|<=|>|<) (?P<bound>\S+))?"
                       r"(?: of length (?P<lop>>=|<=|>|<) (?P<length>\d+))?"
                       r"(?: matching regex '(?P<regex>.*)')?$")
_FIELD_NAMED = re.compile(r"^Object (?P<what>missing required|contains unknown) field `(?P<name>[^`]+)`$")
_ENUM = re.compile(r"^Invalid enum value (?P<value>.+)$")


def _noun(kind: str) -> str:
    return _NOUNS.get(kind, f"a {kind}")


def _leaf(type_: Any, path: str) -> Any:
    """The msgspec type info of the field at ``path`` (``.a.b[0].c``) inside ``type_``, or None."""
    try:
        return _walk(msgspec.inspect.type_info(type_), path)
    except Exception:  # words without the type's help, rather than no answer
        return None


def _walk(info: Any, path: str) -> Any:
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        info = _unwrap(info)
        if name:
            fields = getattr(info, "fields", None)
            found = next((f for f in fields or () if f.encode_name == name or f.name == name), None)
            if found is None:
                return None
            info = found.type
        elif index:
            info = getattr(info, "item_type", None)
            if info is None:
                return None
    return info


def _unwrap(info: Any) -> Any:
    while True:
        if isinstance(info, msgspec.inspect.Metadata):
            inner = info.type
            if isinstance(inner, msgspec.inspect.Metadata | msgspec.inspect.UnionType):
                info = inner
                continue
            return info if _description(info) else inner
        if isinstance(info, msgspec.inspect.UnionType):
            useful = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
            if len(useful) == 1:
                info = useful[0]
                continue
        return info


def _description(info: Any) -> str | None:
    return ((getattr(info, "extra_json_schema", None) or {}).get("description")
            if isinstance(info, msgspec.inspect.Metadata) else None)


def _allowed(info: Any) -> list[str] | None:
    info = _unwrap(info)
    if isinstance(info, msgspec.inspect.Metadata):
        info = info.type
    if isinstance(info, msgspec.inspect.LiteralType):
        return [str(v) for v in info.values]
    if isinstance(info, msgspec.inspect.EnumType):
        return [str(m.value) for m in info.cls]
    return None


def describe_validation(exc: msgspec.ValidationError, type_: Any = None) -> tuple[str, str | None]:
    """A msgspec ValidationError → (a message naming the field and the rule in words, the field's path).

    ``type_`` (the type decoded) lets a pattern be told by its ``Meta(description=…)`` and an enum by its values;
    without it the words are generic. Never a regex."""
    text = str(exc)
    at = _AT.search(text)
    path = at.group("path").lstrip(".") if at else ""
    rule = text[:at.start()] if at else text
    field_name = path or None
    subject = f"`{path}`" if path else "the body"
    named = _FIELD_NAMED.match(rule)
    if named:
        name = f"{path}.{named.group('name')}" if path else named.group("name")
        if named.group("what") == "missing required":
            return f"`{name}` is required", name
        return f"`{name}` is not a field of this request", name
    enum = _ENUM.match(rule)
    if enum:
        allowed = _allowed(_leaf(type_, "." + path)) if type_ is not None and path else None
        if allowed:
            return f"{subject} must be one of {', '.join(allowed)} (got {enum.group('value')})", field_name
        return f"{subject} has a value that is not allowed ({enum.group('value')})", field_name
    m = _EXPECTED.match(rule)
    if not m:
        return f"{subject} is invalid: {rule}", field_name
    kind = m.group("kind")
    if m.group("got"):
        return f"{subject} must be {_noun(kind)}, not {_noun(m.group('got'))}", field_name
    if m.group("op"):
        return f"{subject} must be {_noun(kind)} {_BOUNDS[m.group('op')]} {m.group('bound')}", field_name
    if m.group("lop"):
        count = int(m.group("length"))
        unit = _UNITS.get(kind, ("item", "items"))[0 if count == 1 else 1]
        return f"{subject} must be {_noun(kind)} of {_BOUNDS[m.group('lop')]} {count} {unit}", field_name
    if m.group("regex") is not None:
        described = _description(_unwrap(_leaf(type_, "." + path))) if type_ is not None and path else None
        return f"{subject} must be {described or 'in the documented format'}", field_name
    return f"{subject} must be {_noun(kind)}", field_name


def invalid_body(exc: msgspec.ValidationError, type_: Any = None) -> InvalidRequest:
    message, field_name = describe_validation(exc, type_)
    return InvalidRequest(message, {"field": field_name, "reason": message} if field_name else {"reason": message})


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
        words = describe_validation(exc, type_)[0].replace("the body", f"query parameter {name!r}")
        raise InvalidRequest(words, {name: raw, "param": name}) from None


PAGE_QUERY = {"limit": "page size, 1–200 (default 50)", "cursor": "next_cursor of the previous page"}
