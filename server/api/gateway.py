"""The OpenAI-compatible gateway: ``/v1/chat/completions`` (JSON and SSE), ``/v1/embeddings``, ``/v1/models``.

This module is OpenAI translation, SSE framing and routes only. Every call runs the one execute path of
``domain.spend`` (DESIGN.md §3): ``spending.call`` (JSON) or ``spending.open_stream`` (SSE) prepare the
request (the brain decides, the worst case is reserved against the wallet and every budget), call the
provider, count the usage and settle — or fail, charging what was consumed — with the policy's
fallback models and one timeout policy; see ``domain/spend/execute.py``.

Auth is a project API key (``Authorization: Bearer sk-…`` or ``X-API-Key``). Keys are resolved through a
small per-process cache (``KeyCache``); a revoked key, a deleted project or any change to a project
drops that project's entries at once through the event bus, and entries expire after ``KEY_TTL`` anyway —
or at the key's own ``expires_at``, whichever comes first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import struct
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import msgspec
from aiohttp import web

from domain.base import Actor, utcnow
from domain.catalog import Catalog, ModelFilter
from domain.errors import ApprovalRequired, Conflict, DomainError, InvalidRequest, NotFound, ProviderError, Unauthorized
from domain.events import Event
from domain.identity import KEY_PREFIX, parse_key
from domain.inputs import may_hold_nul, nul_message, nul_path, refuse_nul
from domain.providers import usage_to_openai
from domain.spend import Laps, Receipt, SpendCommand, SpendStream
from server.api.openai_schema import ChatCompletion, ChatCompletionRequest, EmbeddingList, EmbeddingRequest
from server.container import Container
from server.http import REQUEST_ID, read_body, routes
from server.http import container as _c
from server.idempotency import HEADER as IDEMPOTENCY_KEY
from server.idempotency import idempotent
from server.middleware import bearer, openai_error

log = logging.getLogger("smartspace.gateway")

BUDGET_REMAINING = "x-smartspace-budget-remaining-micros"  # the tightest applying budget, after settling
KEY_TTL = 30.0  # seconds an authenticated key is trusted without asking the database again
MAX_WAIT_SECONDS = 600.0
_encode = msgspec.json.encode
_decode = msgspec.json.decode
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
_INVALIDATING = frozenset({"key.revoked", "key.updated", "project.deleted", "project.updated", "member.removed"})
_CHAT_OWN = frozenset({"model", "messages", "stream", "max_tokens", "metadata"})
_EMBED_OWN = frozenset({"model", "input", "metadata", "encoding_format"})
_ERRORS = (400, 401, 402, 403, 404, 422, 429, 502, 504)


# ---------------------------------------------------------------- key auth cache
class KeyCache:
    """sk- key hash → Actor, trusted for ``ttl`` seconds; invalidated per project by bus events."""

    def __init__(self, container: Container, ttl: float = KEY_TTL, max_entries: int = 50_000) -> None:
        self.container = container
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[Actor, float]] = {}
        container.bus.listen(self._on_event)
        container.bus.on_resync(self._on_resync)

    async def actor(self, token: str) -> Actor:
        digest = parse_key(token)
        hit = self._entries.get(digest)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        actor = await self.container.authenticate(token)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        trusted = self.ttl
        if actor.expires_at is not None:  # never past the key's expiry
            trusted = min(trusted, (actor.expires_at - utcnow()).total_seconds())
        self._entries[digest] = (actor, now + trusted)
        return actor

    def drop_project(self, project_id: str) -> None:
        for digest in [d for d, (a, _) in self._entries.items() if a.project_id == project_id]:
            self._entries.pop(digest, None)

    async def _on_event(self, event: Event) -> None:
        if event.type in _INVALIDATING:
            self.drop_project(event.project_id)

    async def _on_resync(self) -> None:  # events may have been missed: trust nothing cached
        self._entries.clear()


_caches: weakref.WeakKeyDictionary[Container, KeyCache] = weakref.WeakKeyDictionary()


def key_cache(container: Container) -> KeyCache:
    cache = _caches.get(container)
    if cache is None:
        cache = _caches[container] = KeyCache(container)
    return cache


async def key_actor(request: web.Request) -> Actor:
    token = bearer(request)
    if token is None:
        raise Unauthorized("authentication required: send Authorization: Bearer <sk- project API key>")
    if not token.startswith(KEY_PREFIX):
        raise Unauthorized("the gateway takes a project API key (sk-…), not a user token")
    return await key_cache(_c(request)).actor(token)


# ---------------------------------------------------------------- request parsing
async def _body(request: web.Request) -> dict[str, Any]:
    raw = await read_body(request)
    body = _decode(raw)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if may_hold_nul(raw):
        _refuse_nul(body)
    return body


def _refuse_nul(body: dict[str, Any]) -> None:
    """A NUL is refused everywhere but in what goes to the model as is: message content and embedding input
    (passed on unchanged; the stored copy is made safe by storage)."""
    refuse_nul(body, key="param", skip=frozenset({"messages", "input"}))
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        path = nul_path(message, skip=frozenset({"content"}))
        if path is not None:
            param = f"messages[{i}]" + ("" if path == "$" else f".{path}")
            raise InvalidRequest(nul_message(param), {"param": param})


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required: a catalog id such as 'openai/gpt-4o-mini'", {"param": "model"})
    return model


def _metadata(body: dict[str, Any]) -> dict:
    metadata = body.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata must be an object", {"param": "metadata"})
    return metadata


def chat_command(body: dict[str, Any], actor: Actor) -> SpendCommand:
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", {"param": "messages"})
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest("each message needs a role", {"param": f"messages[{i}]"})
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise InvalidRequest("max_tokens must be a positive integer", {"param": "max_tokens"})
    n = body.get("n")
    if n not in (None, 1):
        raise InvalidRequest("n must be 1 on this gateway (one completion per request)", {"param": "n"})
    stream = body.get("stream") is True
    params = {k: v for k, v in body.items() if k not in _CHAT_OWN}
    if not stream:
        params.pop("stream_options", None)
    return SpendCommand(model=model, operation="chat", messages=messages, max_tokens=max_tokens,
                        agent_id=actor.agent_id, metadata=_metadata(body), params=params, stream=stream)


def embedding_command(body: dict[str, Any], actor: Actor) -> SpendCommand:
    model = _model(body)
    raw = body.get("input")
    if isinstance(raw, str):
        if not raw:
            raise InvalidRequest("input must not be empty", {"param": "input"})
    elif not (isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw)):
        raise InvalidRequest("input must be a string or a non-empty list of strings", {"param": "input"})
    fmt = body.get("encoding_format")
    if fmt not in (None, "float", "base64"):
        raise InvalidRequest("encoding_format must be 'float' or 'base64'", {"param": "encoding_format"})
    params = {k: v for k, v in body.items() if k not in _EMBED_OWN}
    return SpendCommand(model=model, operation="embedding", input=raw, agent_id=actor.agent_id,
                        metadata=_metadata(body), params=params)


def wait_seconds(request: web.Request) -> float:
    raw = request.headers.get("X-SmartSpace-Wait")
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest("X-SmartSpace-Wait must be a number of seconds", {"header": "X-SmartSpace-Wait"}) from None
    if not 0 <= value <= MAX_WAIT_SECONDS:
        raise InvalidRequest(f"X-SmartSpace-Wait must be between 0 and {MAX_WAIT_SECONDS:g}",
                             {"header": "X-SmartSpace-Wait"})
    return value


def _receipt_headers(receipt: Receipt, remaining: int | None) -> dict[str, str]:
    """The receipt on an answer: the provider's cost and the platform fee (the wallet paid both), and what the
    tightest budget that applied has left."""
    headers = {"x-smartspace-request-id": receipt.request_id, "x-smartspace-cost-micros": str(receipt.cost_micros),
               "x-smartspace-fee-micros": str(receipt.fee_micros)}
    if remaining is not None:
        headers[BUDGET_REMAINING] = str(remaining)
    return headers


async def _budget_remaining(request: web.Request, actor: Actor, prepared) -> int | None:
    """After settling: what the tightest budget that applied to the request has left (None: no budget)."""
    if not prepared.budget_ids:
        return None
    async with _c(request).reader(actor) as scope:
        return await scope.budgets.remaining(prepared.budget_ids)


def _server_timing(laps: Laps) -> str:
    return ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in laps.stages.items())


def _base64_embeddings(body: dict) -> None:
    for item in body.get("data") or ():
        vector = item.get("embedding")
        if isinstance(vector, list):
            item["embedding"] = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# ---------------------------------------------------------------- OpenAI answers of the one execute path
async def _json_answer(request: web.Request, actor: Actor, cmd: SpendCommand, laps: Laps,
                       as_base64: bool = False) -> web.Response:
    outcome = await _c(request).spending.call(actor, cmd, source="gateway", wait_seconds=wait_seconds(request),
                                              idempotency_key=request.headers.get(IDEMPOTENCY_KEY), laps=laps)
    completion = outcome.completion
    headers = _receipt_headers(outcome.receipt, await _budget_remaining(request, actor, outcome.prepared))
    headers["Server-Timing"] = _server_timing(laps)
    body, raw = completion.body, completion.raw
    if as_base64:
        _base64_embeddings(body)
        raw = None
    if raw is None or completion.usage is None:
        if completion.usage is None:
            body["usage"] = usage_to_openai(outcome.usage)
        raw = _encode(body)
    return web.Response(body=raw, content_type="application/json", headers=headers)


async def _sse_answer(request: web.Request, actor: Actor, cmd: SpendCommand, laps: Laps) -> web.StreamResponse:
    stream = await _c(request).spending.open_stream(actor, cmd, source="gateway", wait_seconds=wait_seconds(request),
                                                    idempotency_key=request.headers.get(IDEMPOTENCY_KEY), laps=laps)
    prepared = stream.prepared
    resp, complete = await pump(request, stream, _sse_frame)
    if not complete:
        return resp
    if stream.error is not None or stream.receipt is None or stream.usage is None:
        await _sse_error(resp, stream.error or ProviderError("the stream ended without a settlement"))
        return resp
    cost, fee = stream.receipt.cost_micros, stream.receipt.fee_micros
    remaining = await _budget_remaining(request, actor, prepared)
    left = {} if remaining is None else {"budget_remaining_micros": remaining}
    tail = b""
    if stream.want_usage:
        template = stream.template or {}
        final = dict(stream.usage_chunk) if stream.usage_chunk is not None else {
            "id": template.get("id", prepared.request_id), "object": "chat.completion.chunk",
            "created": template.get("created", int(time.time())),
            "model": template.get("model", prepared.upstream_model), "choices": []}
        final["usage"] = {**usage_to_openai(stream.usage), "cost_micros": cost, "fee_micros": fee,
                          "request_id": prepared.request_id, **left}
        tail = b"data: " + _encode(final) + b"\n\n"
    comment = "".join(f"{k}={v} " for k, v in left.items())
    tail += (f": smartspace cost_micros={cost} request_id={prepared.request_id} fee_micros={fee} {comment}"
             f"timing={_server_timing(laps).replace(' ', '')}\n\n".encode() + b"data: [DONE]\n\n")
    with contextlib.suppress(ConnectionError):
        await resp.write(tail)
        await resp.write_eof()
    return resp


def _sse_frame(chunk: dict) -> bytes:
    raw = getattr(chunk, "raw", None)
    return b"data: " + (raw if raw is not None else _encode(chunk)) + b"\n\n"


async def pump(request: web.Request, stream: SpendStream, frames: Callable[[dict], bytes],
               first: bytes = b"") -> tuple[web.StreamResponse, bool]:
    """Open the SSE answer and forward the stream's chunks as ``frames`` makes them (``first`` before them).
    Returns the response and whether the stream was read to its end; a client that hung up is charged what
    was streamed (the stream aborted). The caller writes the tail (receipt or error)."""
    resp = web.StreamResponse(headers={**_SSE_HEADERS, "x-smartspace-request-id": stream.prepared.request_id,
                                       "X-Request-ID": request.get(REQUEST_ID, "")})
    try:
        await resp.prepare(request)
        if first:
            await resp.write(first)
        async with contextlib.aclosing(stream.chunks()) as chunks:
            async for chunk in chunks:
                frame = frames(chunk)
                if frame:
                    await resp.write(frame)
    except (ConnectionError, asyncio.CancelledError) as exc:  # the client hung up: pay what was streamed
        await stream.abort()
        if isinstance(exc, asyncio.CancelledError):
            raise
        return resp, False
    return resp, True


async def _sse_error(resp: web.StreamResponse, exc: DomainError) -> None:
    with contextlib.suppress(ConnectionError):
        await resp.write(b"data: " + _encode(openai_error(exc.code, exc.message, exc.details, exc.status))
                        + b"\n\n")
        await resp.write_eof()


def _recover(request: web.Request, actor: Actor):
    """What a dead first request with this Idempotency-Key left decides the retry (server/idempotency.py)."""
    async def recover(since: datetime) -> web.StreamResponse | None:
        left = await _c(request).spending.recover(actor.project_id or "", request.headers[IDEMPOTENCY_KEY], since)
        if left is None:  # nothing charged: run anew
            return None
        if left.status == "pending_approval":
            raise ApprovalRequired("this request needs an owner's or admin's approval before it runs",
                                   {"request_id": left.id})
        raise Conflict("the first request with this Idempotency-Key was charged, but its answer was lost with "
                       "its server process; see the request", {"request_id": left.id, "status": left.status})
    return recover


Answer = Callable[[web.Request, Actor, SpendCommand, Laps], Awaitable[web.StreamResponse]]


async def serve_chat(request: web.Request, command: Callable[[dict[str, Any], Actor], SpendCommand],
                     json_answer: Answer, sse_answer: Answer) -> web.StreamResponse:
    """A chat route of either ecosystem: the key, the body as ``command`` reads it, Idempotency-Key, then
    the JSON or the SSE answer."""
    laps = Laps()
    actor = await key_actor(request)
    body = await _body(request)
    cmd = command(body, actor)
    laps.lap("auth")
    answer = sse_answer if cmd.stream else json_answer
    return await idempotent(request, actor, actor.project_id, body, lambda: answer(request, actor, cmd, laps),
                            recover=_recover(request, actor))


# ---------------------------------------------------------------- routes
# Errors are raised, not rendered here: the error middleware answers every /v1/ error in OpenAI's shape.
@routes.post("/v1/chat/completions", summary="OpenAI-compatible chat completion (JSON or SSE with stream: true; "
             "Idempotency-Key honoured)", tag="gateway", auth=False, key_auth=True, body=ChatCompletionRequest,
             response=ChatCompletion, errors=(*_ERRORS, 409))
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await serve_chat(request, chat_command, _json_answer, _sse_answer)


@routes.post("/v1/embeddings", summary="OpenAI-compatible embeddings (Idempotency-Key honoured)", tag="gateway",
             auth=False, key_auth=True, body=EmbeddingRequest, response=EmbeddingList, errors=(*_ERRORS, 409))
async def embeddings(request: web.Request) -> web.StreamResponse:
    laps = Laps()
    actor = await key_actor(request)
    body = await _body(request)
    cmd = embedding_command(body, actor)
    laps.lap("auth")
    # The upstream is asked for floats; base64 is this gateway's translation.
    as_base64 = body.get("encoding_format") == "base64"
    return await idempotent(request, actor, actor.project_id, body,
                            lambda: _json_answer(request, actor, cmd, laps, as_base64=as_base64),
                            recover=_recover(request, actor))


def _model_json(m) -> dict[str, Any]:
    created = int(m.updated_at.timestamp()) if m.updated_at is not None else 0
    return {"id": m.id, "object": "model", "created": created, "owned_by": m.provider}


async def _available(request: web.Request, actor: Actor) -> list:
    container = _c(request)
    configured = set(container.providers.names())
    async with container.reader(actor) as scope:
        found = await Catalog(scope).list(ModelFilter())
    return [m for m in found.items if m.provider in configured]


@routes.get("/v1/models", summary="OpenAI-compatible model list (the catalog's models this server can reach)",
            tag="gateway", auth=False, key_auth=True, errors=(401,))
async def models(request: web.Request) -> web.Response:
    items = await _available(request, await key_actor(request))
    return web.Response(body=_encode({"object": "list", "data": [_model_json(m) for m in items]}),
                        content_type="application/json")


@routes.get("/v1/models/{model:.+}", summary="One model (OpenAI-compatible)", tag="gateway", auth=False,
            key_auth=True, errors=(401, 404))
async def model(request: web.Request) -> web.Response:
    actor = await key_actor(request)
    wanted = request.match_info["model"]
    for m in await _available(request, actor):
        if m.id == wanted:
            return web.Response(body=_encode(_model_json(m)), content_type="application/json")
    raise NotFound(f"the model {wanted!r} is not available", {"model": wanted})
