"""Anthropic-native clients: ``POST /v1/messages``, the Messages API, JSON and streaming.

The official ``anthropic`` SDK (and tools built on it) work unchanged with ``base_url`` pointed at the
server: ``x-api-key: sk-…`` (what the SDK sends) or ``Authorization: Bearer sk-…``. The request is
translated to the OpenAI shapes the rest of SmartSpace speaks and runs the one execute path
(``spending.call`` / ``spending.open_stream``): priced, decided, reserved and settled exactly like a chat
completion, any catalog model behind it (an Anthropic upstream gets it translated back, see
``server/providers/anthropic.py``). Answers carry ``x-smartspace-request-id`` and
``x-smartspace-cost-micros`` / ``x-smartspace-fee-micros``; a stream's last ``message_delta`` carries
``usage.cost_micros``, ``usage.fee_micros`` and ``usage.request_id``. Errors are rendered in Anthropic's
shape ``{"type": "error", "error": {"type", "message"}}`` by the one HTTP renderer
(``server.middleware.error_response``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import msgspec
from aiohttp import web

from domain.base import Actor
from domain.errors import DomainError, InvalidRequest, ProviderError
from domain.providers import Usage
from domain.spend import Laps, SpendCommand
from server.api.gateway import _budget_remaining, _receipt_headers, _server_timing, pump, serve_chat, wait_seconds
from server.http import container as _c
from server.http import routes
from server.idempotency import HEADER as IDEMPOTENCY_KEY
from server.middleware import anthropic_error

_encode = msgspec.json.encode
_OWN = frozenset({"model", "messages", "system", "max_tokens", "stream", "metadata", "stop_sequences",
                  "tools", "tool_choice"})
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}


# ---------------------------------------------------------------- Anthropic request → OpenAI shapes
def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, block in enumerate(content):
            if not isinstance(block, Mapping) or block.get("type") != "text":
                raise InvalidRequest(f"{param}[{i}] must be a text block", {"param": f"{param}[{i}]"})
            out.append(str(block.get("text", "")))
        return "\n".join(out)
    raise InvalidRequest(f"{param} must be a string or a list of text blocks", {"param": param})


def _image(block: Mapping[str, Any], param: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, Mapping):
        raise InvalidRequest(f"{param}.source must be an object", {"param": f"{param}.source"})
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', '')};base64,{source.get('data', '')}"
    elif source.get("type") == "url":
        url = str(source.get("url", ""))
    else:
        raise InvalidRequest(f"{param}.source.type must be 'base64' or 'url'", {"param": f"{param}.source"})
    return {"type": "image_url", "image_url": {"url": url}}


def _turn(role: str, content: Any, param: str) -> list[dict[str, Any]]:
    """One Anthropic message → the OpenAI messages it becomes (tool results are messages of their own)."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list) or not content:
        raise InvalidRequest(f"{param}.content must be a string or a non-empty list of content blocks",
                             {"param": f"{param}.content"})
    parts: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        where = f"{param}.content[{i}]"
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image" and role == "user":
            parts.append(_image(block, where))
        elif kind == "tool_use" and role == "assistant":
            tool_calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": _encode(block.get("input") or {}).decode()}})
        elif kind == "tool_result" and role == "user":
            inner = block.get("content")
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": _text(inner, f"{where}.content") if inner is not None else ""})
        else:
            raise InvalidRequest(f"{where}: a {role} message cannot carry a {kind!r} block", {"param": where})
    out: list[dict[str, Any]] = list(results)
    if parts or tool_calls:
        message: dict[str, Any] = {"role": role, "content": (
            parts[0]["text"] if len(parts) == 1 and parts[0]["type"] == "text" else (parts or None))}
        if tool_calls:
            message["tool_calls"] = tool_calls
        out.append(message)
    return out


def _tools(body: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidRequest("tools must be a list", {"param": "tools"})
        params["tools"] = [{"type": "function", "function": {
            "name": t.get("name"), "description": t.get("description", ""),
            "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}}
            for t in tools if isinstance(t, Mapping)]
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping):
        kind = choice.get("type")
        if kind in ("auto", "none"):
            params["tool_choice"] = kind
        elif kind == "any":
            params["tool_choice"] = "required"
        elif kind == "tool":
            params["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        else:
            raise InvalidRequest("tool_choice.type must be auto, any, tool or none", {"param": "tool_choice"})
    return params


def messages_command(body: dict[str, Any], actor: Actor) -> SpendCommand:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required: a catalog id such as 'anthropic/claude-sonnet-4-5'",
                             {"param": "model"})
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidRequest("max_tokens is required: a positive integer", {"param": "max_tokens"})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("messages must be a non-empty list", {"param": "messages"})
    messages: list[dict[str, Any]] = []
    if body.get("system") is not None:
        messages.append({"role": "system", "content": _text(body["system"], "system")})
    for i, message in enumerate(raw):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ("user", "assistant"):
            raise InvalidRequest(f"messages[{i}].role must be 'user' or 'assistant'", {"param": f"messages[{i}].role"})
        messages.extend(_turn(role, message.get("content"), f"messages[{i}]"))
    params = {k: v for k, v in body.items() if k not in _OWN}
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("stop_sequences must be a list of strings", {"param": "stop_sequences"})
        params["stop"] = stop
    params.update(_tools(body))
    user = (body.get("metadata") or {}).get("user_id") if isinstance(body.get("metadata"), Mapping) else None
    if user:
        params["user"] = str(user)
    stream = body.get("stream") is True
    if stream:
        params["stream_options"] = {"include_usage": True}
    return SpendCommand(model=model, operation="chat", messages=messages, max_tokens=max_tokens,
                        agent_id=actor.agent_id, params=params, stream=stream)


# ---------------------------------------------------------------- OpenAI answer → Anthropic answer
def _usage(usage: Usage, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "cache_creation_input_tokens": None, "cache_read_input_tokens": None, **(extra or {})}


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return msgspec.json.decode(raw) if raw.strip() else {}
        except msgspec.DecodeError:
            return {"_raw": raw}
    return raw or {}


def to_message(completion: Mapping[str, Any], usage: Usage, model: str, request_id: str) -> dict[str, Any]:
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": str(message["content"])})
    for tc in message.get("tool_calls") or ():
        fn = tc.get("function") or {}
        content.append({"type": "tool_use", "id": tc.get("id") or f"toolu_{len(content)}", "name": fn.get("name"),
                        "input": _arguments(fn.get("arguments"))})
    return {"id": f"msg_{request_id}", "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn"),
            "stop_sequence": None, "usage": _usage(usage)}


class StreamWriter:
    """``chat.completion.chunk`` dicts in → Anthropic stream events (SSE frames) out."""

    def __init__(self, model: str, request_id: str, input_tokens: int) -> None:
        self.model = model
        self.request_id = request_id
        self.input_tokens = input_tokens
        self.index = -1
        self.open: str | None = None  # the kind of the open content block: "text" | "tool_use"
        self.tools: dict[int, int] = {}  # OpenAI tool call index → content block index
        self.finish: str | None = None

    @staticmethod
    def frame(name: str, data: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + _encode({"type": name, **data}) + b"\n\n"

    def start(self) -> bytes:
        return self.frame("message_start", {"message": {
            "id": f"msg_{self.request_id}", "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}})

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return self.frame("content_block_stop", {"index": self.index})

    def _begin(self, block: dict[str, Any], kind: str) -> bytes:
        out = self._close()
        self.index += 1
        self.open = kind
        return out + self.frame("content_block_start", {"index": self.index, "content_block": block})

    def feed(self, chunk: Mapping[str, Any]) -> bytes:
        out = b""
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self.open != "text":
                    out += self._begin({"type": "text", "text": ""}, "text")
                out += self.frame("content_block_delta", {"index": self.index,
                                                          "delta": {"type": "text_delta", "text": text}})
            for tc in delta.get("tool_calls") or ():
                fn = tc.get("function") or {}
                position = int(tc.get("index", 0))
                if position not in self.tools:
                    out += self._begin({"type": "tool_use", "id": tc.get("id") or f"toolu_{position}",
                                        "name": fn.get("name"), "input": {}}, "tool_use")
                    self.tools[position] = self.index
                if fn.get("arguments"):
                    out += self.frame("content_block_delta", {"index": self.tools[position], "delta": {
                        "type": "input_json_delta", "partial_json": fn["arguments"]}})
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return out

    def end(self, usage: Usage, cost: int, fee: int) -> bytes:
        return (self._close() + self.frame("message_delta", {
            "delta": {"stop_reason": STOP_REASONS.get(self.finish or "stop", "end_turn"), "stop_sequence": None},
            "usage": _usage(usage, {"cost_micros": cost, "fee_micros": fee, "request_id": self.request_id})})
            + self.frame("message_stop", {}))


# ---------------------------------------------------------------- answers of the one execute path
async def _json_answer(request: web.Request, actor: Actor, cmd: SpendCommand, laps: Laps) -> web.Response:
    outcome = await _c(request).spending.call(actor, cmd, source="gateway", wait_seconds=wait_seconds(request),
                                              idempotency_key=request.headers.get(IDEMPOTENCY_KEY), laps=laps)
    headers = _receipt_headers(outcome.receipt, await _budget_remaining(request, actor, outcome.prepared))
    headers["Server-Timing"] = _server_timing(laps)
    body = to_message(outcome.completion.body, outcome.usage, cmd.model, outcome.prepared.request_id)
    return web.Response(body=_encode(body), content_type="application/json", headers=headers)


async def _sse_answer(request: web.Request, actor: Actor, cmd: SpendCommand, laps: Laps) -> web.StreamResponse:
    stream = await _c(request).spending.open_stream(actor, cmd, source="gateway", wait_seconds=wait_seconds(request),
                                                    idempotency_key=request.headers.get(IDEMPOTENCY_KEY), laps=laps)
    prepared = stream.prepared
    writer = StreamWriter(cmd.model, prepared.request_id, prepared.input_tokens)
    resp, complete = await pump(request, stream, writer.feed, first=writer.start())
    if not complete:
        return resp
    with contextlib.suppress(ConnectionError):
        if stream.error is not None or stream.receipt is None or stream.usage is None:
            error: DomainError = stream.error or ProviderError("the stream ended without a settlement")
            await resp.write(StreamWriter.frame("error", anthropic_error(error.code, error.message, error.details,
                                                                         error.status)))
        else:
            await resp.write(writer.end(stream.usage, stream.receipt.cost_micros, stream.receipt.fee_micros))
        await resp.write_eof()
    return resp


@routes.post("/v1/messages", summary="Anthropic-compatible Messages API (JSON or SSE with stream: true; "
             "Idempotency-Key honoured)", tag="gateway", auth=False, key_auth=True,
             errors=(400, 401, 402, 403, 404, 409, 429, 502, 504))
async def messages(request: web.Request) -> web.StreamResponse:
    return await serve_chat(request, messages_command, _json_answer, _sse_answer)
