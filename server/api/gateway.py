"""The OpenAI-compatible gateway: ``/v1/chat/completions`` (JSON and SSE), ``/v1/embeddings``, ``/v1/models``.

Every call runs the spend path (DESIGN.md §3): ``spending.prepare`` (brain decides, worst case reserved
against the wallet and every budget) → the provider adapter → ``spending.settle`` with the reported
usage (or a conservative count when the upstream reports none) — or ``spending.fail`` with what was
consumed when the upstream fails, times out, or the client hangs up mid-stream.

Auth is a project API key (``Authorization: Bearer sk-…`` or ``X-API-Key``). Keys are resolved through a
small per-process cache (``KeyCache``); a revoked key, a deleted project or any change to a project
drops that project's entries at once through the event bus, and entries expire after ``KEY_TTL`` anyway.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import struct
import time
import weakref
from typing import Any

import msgspec
from aiohttp import web

from domain.base import Actor
from domain.catalog import Catalog, ModelFilter
from domain.errors import (
    ApprovalRequired,
    DomainError,
    InvalidRequest,
    NotFound,
    ProviderError,
    ProviderTimeout,
    Unauthorized,
)
from domain.events import Event
from domain.identity import KEY_PREFIX, parse_key
from domain.inputs import may_hold_nul, nul_message, nul_path, refuse_nul
from domain.policies import Policies
from domain.providers import (
    ProviderCall,
    UpstreamError,
    Usage,
    conservative_usage,
    usage_from_openai,
    usage_to_openai,
)
from domain.spend import Prepared, SpendCommand
from server.container import Container
from server.http import REQUEST_ID, read_body, routes
from server.http import container as _c
from server.middleware import bearer, render_domain_error

log = logging.getLogger("smartspace.gateway")

KEY_TTL = 30.0  # seconds an authenticated key is trusted without asking the database again
MAX_WAIT_SECONDS = 600.0
_encode = msgspec.json.encode
_decode = msgspec.json.decode
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
_INVALIDATING = frozenset({"key.revoked", "project.deleted", "project.updated", "member.removed"})
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
        on_resync = getattr(container.bus, "on_resync", None)
        if on_resync is not None:
            on_resync(self._on_resync)

    async def actor(self, token: str) -> Actor:
        digest = parse_key(token)
        hit = self._entries.get(digest)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        actor = await self.container.authenticate(token)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[digest] = (actor, now + self.ttl)
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


def _receipt_headers(request_id: str, cost: int) -> dict[str, str]:
    return {"x-smartspace-request-id": request_id, "x-smartspace-cost-micros": str(cost)}


def _fallback_worthy(exc: DomainError) -> bool:
    if isinstance(exc, ProviderTimeout):
        return True
    return isinstance(exc, UpstreamError) and exc.retryable


def _delta_text(chunk: dict) -> str:
    """The generated text (content and tool-call arguments) a chunk carries — what output is counted on."""
    out = ""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if content:
            out += content
        for tc in delta.get("tool_calls") or ():
            fn = tc.get("function") or {}
            out += (fn.get("name") or "") + (fn.get("arguments") or "")
    return out


def _message_text(body: dict) -> str:
    out = ""
    for choice in body.get("choices") or ():
        message = choice.get("message") or {}
        out += str(message.get("content") or "")
        for tc in message.get("tool_calls") or ():
            fn = tc.get("function") or {}
            out += str(fn.get("name") or "") + str(fn.get("arguments") or "")
    return out


def _base64_embeddings(body: dict) -> None:
    for item in body.get("data") or ():
        vector = item.get("embedding")
        if isinstance(vector, list):
            item["embedding"] = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# ---------------------------------------------------------------- one gateway call
class GatewayCall:
    def __init__(self, request: web.Request, actor: Actor, cmd: SpendCommand) -> None:
        self.request = request
        self.container = _c(request)
        self.spending = self.container.spending
        self.actor = actor
        self.cmd = cmd
        self.wait = wait_seconds(request)
        self.base64 = False
        self.timing: dict[str, float] = {}  # stage → seconds, sent as Server-Timing
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timing[stage] = self.timing.get(stage, 0.0) + now - self._t
        self._t = now

    def server_timing(self) -> str:
        return ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in self.timing.items())

    async def prepare(self, cmd: SpendCommand) -> Prepared:
        try:
            prepared = await self.spending.prepare(self.actor, cmd, source="gateway")
        except ApprovalRequired as held:
            if self.wait <= 0:
                raise
            prepared = await self.spending.wait_for_approval(held.details["request_id"], self.wait)
        self.lap("prepare")
        return prepared

    async def fallbacks(self, prepared: Prepared) -> list[str]:
        try:
            async with self.container.reader(self.actor) as scope:
                policy = await Policies(scope).current(prepared.project_id)
        except Exception:  # no policy, no fallback: the original error stands
            log.exception("could not read the fallback models", extra={"request_id": prepared.request_id})
            return []
        return [m for m in policy.fallback_models if m not in (prepared.model, self.cmd.model)]

    async def fail(self, prepared: Prepared, error: DomainError, usage: Usage | None) -> None:
        # Shielded: the money must be released even if this task is being cancelled.
        await asyncio.shield(self.spending.fail(prepared, error, usage))

    async def call_failed(self, prepared: Prepared, exc: Exception, log_message: str) -> DomainError:
        """The provider call raised before answering: fail the request (its reservation released) and return the
        error to raise — ``exc`` itself, with the request id added, if it is a DomainError; otherwise a
        ProviderError, and ``exc`` is logged."""
        if isinstance(exc, DomainError):
            exc.details = {**exc.details, "request_id": prepared.request_id}
            error = exc
        else:
            log.exception(log_message, extra={"request_id": prepared.request_id}, exc_info=exc)
            error = ProviderError(f"the provider call failed: {type(exc).__name__}",
                                  {"request_id": prepared.request_id})
        await self.fail(prepared, error, None)
        return error

    async def run(self, attempt) -> web.StreamResponse:
        """prepare → attempt; on a 429/5xx/timeout upstream, retry on the policy's fallback models."""
        prepared = await self.prepare(self.cmd)
        try:
            return await attempt(prepared)
        except DomainError as first:
            if not _fallback_worthy(first):
                raise
            error: DomainError = first
            for model in await self.fallbacks(prepared):
                cmd = msgspec.structs.replace(self.cmd, model=model, metadata={
                    **self.cmd.metadata, "fallback_of": prepared.request_id, "fallback_reason": error.code})
                try:
                    retry = await self.prepare(cmd)
                except DomainError as rejected:  # re-checked: the fallback may itself be refused
                    log.info("fallback refused", extra={"model": model, "code": rejected.code})
                    continue
                try:
                    return await attempt(retry)
                except DomainError as again:
                    if not _fallback_worthy(again):
                        raise
                    error = again
            raise error from None

    def call(self, prepared: Prepared) -> ProviderCall:
        return prepared.call()

    # ------------------------------------------------------------ non-streaming chat / embeddings
    async def complete(self, prepared: Prepared) -> web.Response:
        call = self.call(prepared)
        try:
            provider = self.container.providers.get(prepared.provider)  # inside: an unknown one releases too
            if call.operation == "embedding":
                completion = await provider.embed(call)
            else:
                completion = await provider.complete(call)
        except Exception as exc:
            if (error := await self.call_failed(prepared, exc, "provider call failed")) is exc:
                raise
            raise error from None
        self.lap("upstream")
        body = completion.body
        if call.operation == "embedding":
            usage = completion.usage or conservative_usage(call, "")
        else:
            usage = conservative_usage(call, _message_text(body), completion.usage)
        try:
            receipt = await asyncio.shield(self.spending.settle(prepared, usage, None))
        except Exception as exc:
            await self.fail(prepared, ProviderError(f"settlement failed: {type(exc).__name__}",
                                                    {"request_id": prepared.request_id}), usage)
            raise
        self.lap("settle")
        headers = _receipt_headers(prepared.request_id, receipt.cost_micros)
        headers["Server-Timing"] = self.server_timing()
        raw = completion.raw
        if self.base64:
            _base64_embeddings(body)
            raw = None
        if raw is None or completion.usage is None:
            if completion.usage is None:
                body["usage"] = usage_to_openai(usage)
            raw = _encode(body)
        return web.Response(body=raw, content_type="application/json", headers=headers)

    # ------------------------------------------------------------ streaming chat
    async def open_stream(self, prepared: Prepared):
        """Start the upstream stream and pull its first chunk, so an immediate failure is still a
        plain 502/504 answer (and can fall back) rather than an error inside a 200 stream."""
        call = self.call(prepared)
        try:
            iterator = self.container.providers.get(prepared.provider).stream(call).__aiter__()
            first = await iterator.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as exc:
            if (error := await self.call_failed(prepared, exc, "provider stream failed")) is exc:
                raise
            raise error from None
        return await self.forward(prepared, call, iterator, first)

    async def forward(self, prepared: Prepared, call: ProviderCall, iterator, first) -> web.StreamResponse:
        request = self.request
        want_usage = bool((self.cmd.params.get("stream_options") or {}).get("include_usage"))
        resp = web.StreamResponse(headers={**_SSE_HEADERS, "x-smartspace-request-id": prepared.request_id,
                                           "X-Request-ID": request.get(REQUEST_ID, "")})
        await resp.prepare(request)
        text: list[str] = []
        reported: Usage | None = None
        usage_chunk: dict | None = None
        template: dict | None = None
        chunk = first
        try:
            while chunk is not None:
                if template is None and chunk.get("id"):
                    template = chunk
                if chunk.get("usage"):
                    reported = usage_from_openai(chunk["usage"]) or reported
                    if not chunk.get("choices"):
                        usage_chunk = chunk  # held back: it goes out with the cost once settled
                        chunk = await anext(iterator, None)
                        continue
                piece = _delta_text(chunk)
                if piece:
                    text.append(piece)
                raw = getattr(chunk, "raw", None)
                await resp.write(b"data: " + (raw if raw is not None else _encode(chunk)) + b"\n\n")
                chunk = await anext(iterator, None)
        except DomainError as exc:  # the upstream failed mid-stream: charge what was consumed
            usage = conservative_usage(call, "".join(text), reported)
            exc.details = {**exc.details, "request_id": prepared.request_id}
            await self.fail(prepared, exc, usage)
            await self._stream_error(resp, exc)
            return resp
        except (ConnectionError, asyncio.CancelledError) as exc:  # the client hung up
            with contextlib.suppress(Exception):
                await iterator.aclose()
            usage = conservative_usage(call, "".join(text), reported)
            await self.fail(prepared, ProviderError("the client disconnected mid-stream",
                                                    {"request_id": prepared.request_id}), usage)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return resp
        except Exception as exc:
            log.exception("stream forwarding failed", extra={"request_id": prepared.request_id})
            usage = conservative_usage(call, "".join(text), reported)
            error = ProviderError(f"the stream failed: {type(exc).__name__}", {"request_id": prepared.request_id})
            await self.fail(prepared, error, usage)
            await self._stream_error(resp, error)
            return resp
        usage = conservative_usage(call, "".join(text), reported)
        self.lap("upstream")
        try:
            receipt = await asyncio.shield(self.spending.settle(prepared, usage, None))
        except Exception as exc:
            log.exception("settlement failed", extra={"request_id": prepared.request_id})
            error = exc if isinstance(exc, DomainError) else ProviderError(f"settlement failed: {type(exc).__name__}")
            with contextlib.suppress(Exception):
                await self.fail(prepared, error, usage)
            await self._stream_error(resp, error)
            return resp
        self.lap("settle")
        tail = b""
        if want_usage:
            final = dict(usage_chunk) if usage_chunk is not None else {
                "id": (template or {}).get("id", prepared.request_id), "object": "chat.completion.chunk",
                "created": (template or {}).get("created", int(time.time())),
                "model": (template or {}).get("model", prepared.upstream_model), "choices": []}
            final["usage"] = {**usage_to_openai(usage), "cost_micros": receipt.cost_micros,
                              "request_id": prepared.request_id}
            tail = b"data: " + _encode(final) + b"\n\n"
        tail += (f": smartspace cost_micros={receipt.cost_micros} request_id={prepared.request_id} "
                 f"timing={self.server_timing().replace(' ', '')}\n\n".encode() + b"data: [DONE]\n\n")
        with contextlib.suppress(ConnectionError):
            await resp.write(tail)
            await resp.write_eof()
        return resp

    @staticmethod
    async def _stream_error(resp: web.StreamResponse, exc: DomainError) -> None:
        payload = {"error": {"message": exc.message, "type": exc.code, "code": exc.code, "param": None,
                             "details": exc.details}}
        with contextlib.suppress(ConnectionError):
            await resp.write(b"data: " + _encode(payload) + b"\n\n")
            await resp.write_eof()


def _render(request: web.Request, exc: DomainError) -> web.Response:
    response = render_domain_error(request, exc)
    rid = exc.details.get("request_id") if isinstance(exc.details, dict) else None
    if rid:
        response.headers["x-smartspace-request-id"] = str(rid)
    return response


# ---------------------------------------------------------------- routes
@routes.post("/v1/chat/completions", summary="OpenAI-compatible chat completion (JSON or SSE with stream: true)",
             tag="gateway", auth=False, errors=_ERRORS)
async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        start = time.perf_counter()
        actor = await key_actor(request)
        cmd = chat_command(await _body(request), actor)
        call = GatewayCall(request, actor, cmd)
        call.timing["auth"] = call._t - start
        return await call.run(call.open_stream if cmd.stream else call.complete)
    except DomainError as exc:
        return _render(request, exc)


@routes.post("/v1/embeddings", summary="OpenAI-compatible embeddings", tag="gateway", auth=False, errors=_ERRORS)
async def embeddings(request: web.Request) -> web.Response:
    try:
        actor = await key_actor(request)
        body = await _body(request)
        call = GatewayCall(request, actor, embedding_command(body, actor))
        call.base64 = body.get("encoding_format") == "base64"  # the upstream is asked for floats
        return await call.run(call.complete)
    except DomainError as exc:
        return _render(request, exc)


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
            tag="gateway", auth=False, errors=(401,))
async def models(request: web.Request) -> web.Response:
    try:
        actor = await key_actor(request)
        items = await _available(request, actor)
    except DomainError as exc:
        return _render(request, exc)
    return web.Response(body=_encode({"object": "list", "data": [_model_json(m) for m in items]}),
                        content_type="application/json")


@routes.get("/v1/models/{model:.+}", summary="One model (OpenAI-compatible)", tag="gateway", auth=False,
            errors=(401, 404))
async def model(request: web.Request) -> web.Response:
    try:
        actor = await key_actor(request)
        wanted = request.match_info["model"]
        for m in await _available(request, actor):
            if m.id == wanted:
                return web.Response(body=_encode(_model_json(m)), content_type="application/json")
        raise NotFound(f"the model {wanted!r} is not available", {"model": wanted})
    except DomainError as exc:
        return _render(request, exc)
