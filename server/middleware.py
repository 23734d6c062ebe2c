"""Request id, access log + metrics, error rendering, hostile input, authentication — in that order."""

from __future__ import annotations

import logging
import re
import time
import uuid

import msgspec
from aiohttp import web

from domain.errors import DomainError, InvalidRequest, RateLimited, Unauthorized
from domain.identity import require_key_scope
from domain.inputs import BodyTooDeep, depth_exceeds, nul_message
from server.http import ACTOR, REQUEST_ID, encode, invalid_body, route_spec

access_log = logging.getLogger("smartspace.access")
log = logging.getLogger("smartspace.http")
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


# ---------------------------------------------------------------- the HTTP error renderers
# One per transport, three shapes by path: REST's {"error": {code, message, details}}; under /v1/, OpenAI's
# shape (the gateway, so the official SDKs parse it; also the error event inside an SSE stream); and on
# /v1/messages, Anthropic's. SmartSpace's own code is kept in each (`code`).
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 429: "rate_limit_error"}
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                   403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                   429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error"}
ANTHROPIC_PATHS = ("/v1/messages",)  # and below it (e.g. an unknown /v1/messages/… is a 404 in its shape)


def _type(table: dict[int, str], status: int) -> str:
    return table.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def _param(details: dict | None) -> str | None:
    """The one request field at fault, when there is one."""
    if not details:
        return None
    value = details.get("param") or details.get("field")
    return str(value) if value else None


def openai_error(code: str, message: str, details: dict | None = None, status: int = 400) -> dict:
    return {"error": {"message": message, "type": _type(OPENAI_TYPES, status), "param": _param(details),
                      "code": code, **({"details": details} if details else {})}}


def anthropic_error(code: str, message: str, details: dict | None = None, status: int = 400) -> dict:
    return {"type": "error", "error": {"type": _type(ANTHROPIC_TYPES, status), "message": message, "code": code,
                                       **({"details": details} if details else {})}}


def error_response(request: web.Request, status: int, code: str, message: str,
                   details: dict | None = None, headers: dict[str, str] | None = None) -> web.Response:
    """Every HTTP error answer (domain errors, bad JSON, unknown routes, 500s) is built here."""
    if request.path.startswith("/v1/"):
        if status == 422:  # OpenAI and Anthropic answer an invalid request 400
            status = 400
        shape = anthropic_error if request.path.startswith(ANTHROPIC_PATHS) else openai_error
        body = encode(shape(code, message, details, status))
        rid = details.get("request_id") if details else None
        if rid:  # the gateway's spend request, as on its successful answers
            headers = {**(headers or {}), "x-smartspace-request-id": str(rid)}
    else:
        body = encode({"error": {"code": code, "message": message, "details": details or {}}})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def render_domain_error(request: web.Request, exc: DomainError) -> web.Response:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
    return error_response(request, exc.status, exc.code, exc.message, exc.details, headers)


@web.middleware
async def request_id_middleware(request: web.Request, handler):
    incoming = request.headers.get("X-Request-ID", "")
    rid = incoming if _REQUEST_ID_OK.match(incoming) else uuid.uuid4().hex
    request[REQUEST_ID] = rid
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers["X-Request-ID"] = rid
        raise
    response.headers["X-Request-ID"] = rid
    return response


def access_middleware(metrics, enabled: bool = True):
    @web.middleware
    async def middleware(request: web.Request, handler):
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            elapsed = time.perf_counter() - start
            route = _route_label(request)
            metrics.http_requests.labels(request.method, route, str(status)).inc()
            metrics.http_latency.labels(request.method, route).observe(elapsed)
            if enabled:
                who = request.get(ACTOR)
                access_log.info("request", extra={
                    "request_id": request.get(REQUEST_ID), "method": request.method, "path": request.path,
                    "route": route, "status": status, "duration_ms": round(elapsed * 1000, 3),
                    "actor": who.label if who else None, "remote": request.remote,
                })

    return middleware


async def _is_json(request: web.Request) -> bool:
    try:
        msgspec.json.decode(await request.read())  # already read by the handler: cached
    except msgspec.DecodeError:
        return False
    except Exception:  # the body could not be read at all: let the 422 stand
        return True
    return True


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except DomainError as exc:
        return render_domain_error(request, exc)
    except msgspec.ValidationError as exc:
        # msgspec validates while it parses: a truncated body can fail on a field before the
        # syntax error is reached. Malformed JSON is a 400 whatever the decoder met first.
        if not await _is_json(request):
            return error_response(request, 400, "invalid_request", "the body is not valid JSON")
        invalid = invalid_body(exc)
        return error_response(request, 422, invalid.code, invalid.message, invalid.details)
    except msgspec.DecodeError as exc:
        return error_response(request, 400, "invalid_request", f"the body is not valid JSON: {exc}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "invalid_request"}.get(
            exc.status, "invalid_request" if exc.status < 500 else "internal_error")
        return error_response(request, exc.status, code, exc.reason or "error")
    except Exception:
        log.exception("unhandled error", extra={"request_id": request.get(REQUEST_ID)})
        return error_response(request, 500, "internal_error",
                              f"an internal error occurred (request id {request.get(REQUEST_ID)})")


def _nul_in_url(request: web.Request) -> None:
    """A percent-encoded NUL in a path or query parameter is refused, naming it (PostgreSQL cannot take
    it; aiohttp itself refuses a raw NUL byte anywhere in the request line or headers)."""
    for name, value in request.match_info.items():
        if "\x00" in value:
            raise InvalidRequest(nul_message(name), {"field": name, "in": "path"})
    for name, value in request.query.items():
        if "\x00" in name or "\x00" in value:
            field = name.replace("\x00", "\\x00")
            raise InvalidRequest(nul_message(f"query parameter {field!r}"), {"field": field, "in": "query"})
    if "\x00" in request.path:
        raise InvalidRequest(nul_message("the path"), {"field": "path", "in": "path"})


@web.middleware
async def input_middleware(request: web.Request, handler):
    """Hostile input at the edge, before authentication and any handler (issue 9): a NUL in the URL, and a
    body nested too deeply for any parser to be trusted with (domain/inputs.py). A body's NUL strings are
    judged where it is decoded (server/http.py), which knows its fields."""
    if "%00" in request.raw_path:  # cheap: an encoded NUL must show up like this in the raw path
        _nul_in_url(request)
    # Only the route table's handlers read bodies through aiohttp's cache. Socket.IO's engine.io reads the raw
    # stream itself (a read here would leave it an empty body: long-polling would hang); its packets are
    # depth-checked where they are decoded (domain.inputs.SocketJson). A 404/405 reads no body.
    if request.body_exists and request.match_info.http_exception is None and route_spec(request) is not None:
        body = await request.read()  # cached: the handler's read costs nothing more
        if depth_exceeds(body):
            raise BodyTooDeep()
    return await handler(request)


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return request.headers.get("X-API-Key") or None


def auth_middleware(container):
    @web.middleware
    async def middleware(request: web.Request, handler):
        token = bearer(request)
        spec = route_spec(request)
        # Only routes of the table that need auth: the gateway and Socket.IO authenticate their own
        # callers, and an unknown path is a 404 whatever credentials came with it.
        if spec is None or not spec.auth:
            return await handler(request)
        if token is not None:
            request[ACTOR] = who = await container.authenticate(token)
            require_key_scope(who, spec.key_scope)  # before the body is read, like the 401
        else:
            # Before the handler reads the body: an anonymous caller learns nothing about validation.
            raise Unauthorized("authentication required: send Authorization: Bearer <token or sk- key>")
        return await handler(request)

    return middleware
