"""Anthropic's Messages API, translated to and from OpenAI's chat shapes.

Request: ``system`` messages become the top-level ``system`` prompt; user/assistant turns become
content blocks (text, images, tool_use, tool_result; consecutive turns of one role are merged);
``max_tokens`` is required by Anthropic and always sent; ``stop`` → ``stop_sequences``; tools and
tool_choice are mapped. Response: text blocks → ``message.content``, tool_use → ``tool_calls``,
``stop_reason`` → ``finish_reason``, usage (incl. cache tokens) → prompt/completion tokens.
Stream: ``message_start`` / ``content_block_start`` / ``content_block_delta`` / ``message_delta`` /
``message_stop`` → ``chat.completion.chunk`` dicts, with a final usage chunk.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from domain.errors import InvalidRequest
from domain.inputs import decode_json
from domain.providers import Completion, ProviderCall, UpstreamError, Usage, usage_to_openai
from server.providers.wire import post_json, redact, sse_events

if TYPE_CHECKING:
    from server.providers import Providers, Upstream

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_decode = decode_json  # depth-limited: what providers (and tool arguments) send is not trusted
_encode = msgspec.json.encode


# --- OpenAI request → Anthropic request ----------------------------------------------------------------

def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return str(content)


def _image_block(part: Mapping[str, Any]) -> dict[str, Any]:
    url = str((part.get("image_url") or {}).get("url", ""))
    if url.startswith("data:") and ";base64," in url:
        media, _, data = url[5:].partition(";base64,")
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else [content]:
        if isinstance(part, str):
            blocks.append({"type": "text", "text": part})
        elif isinstance(part, Mapping):
            kind = part.get("type")
            if kind == "text":
                blocks.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image_url":
                blocks.append(_image_block(part))
            else:
                raise InvalidRequest(f"content part type {kind!r} is not supported by this provider")
    return blocks


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return _decode(raw) if raw.strip() else {}
        except msgspec.DecodeError:
            raise InvalidRequest("tool call arguments must be a JSON object") from None
    return raw or {}


def to_anthropic(call: ProviderCall, *, stream: bool = False, default_max_tokens: int = DEFAULT_MAX_TOKENS
                 ) -> dict[str, Any]:
    """An OpenAI chat request (as a :class:`ProviderCall`) → an Anthropic Messages request body."""
    system_parts: list[str] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": list(blocks)})

    for message in call.messages or []:
        role = message.get("role")
        if role in ("system", "developer"):
            text = _text_of(message.get("content"))
            if text:
                system_parts.append(text)
        elif role == "user":
            add("user", _blocks(message.get("content")))
        elif role == "assistant":
            blocks = _blocks(message.get("content"))
            for tc in message.get("tool_calls") or []:
                fn = tc.get("function") or {}
                blocks.append({"type": "tool_use", "id": tc.get("id"), "name": fn.get("name"),
                               "input": _arguments(fn.get("arguments"))})
            add("assistant", blocks)
        elif role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": message.get("tool_call_id"),
                          "content": _text_of(message.get("content"))}])
        else:
            raise InvalidRequest(f"message role {role!r} is not supported")
    if not turns:
        raise InvalidRequest("at least one user message is required")

    params = call.params
    body: dict[str, Any] = {"model": call.model, "messages": turns,
                            "max_tokens": call.max_tokens if call.max_tokens is not None else default_max_tokens}
    if system_parts:
        body["system"] = "\n\n".join(system_parts)
    for name in ("temperature", "top_p", "top_k"):
        if params.get(name) is not None:
            body[name] = params[name]
    stop = params.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    user = params.get("user") or (params.get("metadata") or {}).get("user_id")
    if user:
        body["metadata"] = {"user_id": str(user)}
    tools = params.get("tools")
    if tools:
        body["tools"] = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                          "input_schema": t["function"].get("parameters") or {"type": "object", "properties": {}}}
                         for t in tools if t.get("type") == "function"]
    choice = params.get("tool_choice")
    if choice == "auto":
        body["tool_choice"] = {"type": "auto"}
    elif choice == "required":
        body["tool_choice"] = {"type": "any"}
    elif choice == "none":
        body["tool_choice"] = {"type": "none"}
    elif isinstance(choice, Mapping) and choice.get("type") == "function":
        body["tool_choice"] = {"type": "tool", "name": choice["function"]["name"]}
    if stream:
        body["stream"] = True
    return body


# --- Anthropic response → OpenAI response -------------------------------------------------------------

def usage_from_anthropic(raw: Mapping[str, Any] | None) -> Usage | None:
    if not raw:
        return None
    prompt = (int(raw.get("input_tokens") or 0) + int(raw.get("cache_creation_input_tokens") or 0)
              + int(raw.get("cache_read_input_tokens") or 0))
    return Usage(input_tokens=prompt, output_tokens=int(raw.get("output_tokens") or 0))


def finish_reason(stop_reason: str | None) -> str | None:
    if stop_reason is None:
        return None
    return STOP_REASONS.get(stop_reason, "stop")


def from_anthropic(message: Mapping[str, Any]) -> tuple[dict[str, Any], Usage | None]:
    """An Anthropic Messages response → (OpenAI chat.completion body, usage)."""
    text: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in message.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            text.append(str(block.get("text", "")))
        elif kind == "tool_use":
            tool_calls.append({"id": block.get("id"), "type": "function",
                               "function": {"name": block.get("name"),
                                            "arguments": _encode(block.get("input") or {}).decode()}})
    out: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not tool_calls else None}
    if tool_calls:
        out["tool_calls"] = tool_calls
    usage = usage_from_anthropic(message.get("usage"))
    body: dict[str, Any] = {
        "id": message.get("id") or "", "object": "chat.completion", "created": int(time.time()),
        "model": message.get("model") or "",
        "choices": [{"index": 0, "message": out, "logprobs": None,
                     "finish_reason": finish_reason(message.get("stop_reason")) or "stop"}],
    }
    if usage is not None:
        body["usage"] = usage_to_openai(usage)
    return body, usage


class StreamTranslator:
    """Feeds Anthropic stream events, returns the ``chat.completion.chunk`` dicts each one becomes."""

    def __init__(self, model: str) -> None:
        self.id = ""
        self.model = model
        self.created = int(time.time())
        self.input_tokens = 0
        self.cache_tokens = 0
        self.output_tokens = 0
        self.finish: str | None = None
        self.stopped = False
        self.has_usage = False
        self._tool_index: dict[int, int] = {}  # anthropic block index → OpenAI tool_calls index

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    @property
    def usage(self) -> Usage | None:
        if not self.has_usage:
            return None
        return Usage(input_tokens=self.input_tokens + self.cache_tokens, output_tokens=self.output_tokens)

    def feed(self, event: str | None, data: Mapping[str, Any]) -> list[dict[str, Any]]:
        kind = data.get("type") or event
        if kind == "message_start":
            message = data.get("message") or {}
            self.id = message.get("id") or self.id
            self.model = message.get("model") or self.model
            usage = message.get("usage") or {}
            if usage:
                self.has_usage = True
                self.input_tokens = int(usage.get("input_tokens") or 0)
                self.cache_tokens = (int(usage.get("cache_creation_input_tokens") or 0)
                                     + int(usage.get("cache_read_input_tokens") or 0))
                self.output_tokens = int(usage.get("output_tokens") or 0)
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self._tool_index.setdefault(int(data.get("index", 0)), len(self._tool_index))
                return [self._chunk({"tool_calls": [{"index": index, "id": block.get("id"), "type": "function",
                                                     "function": {"name": block.get("name"), "arguments": ""}}]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if delta.get("type") == "input_json_delta":
                index = self._tool_index.get(int(data.get("index", 0)), 0)
                return [self._chunk({"tool_calls": [{"index": index,
                                                     "function": {"arguments": delta.get("partial_json", "")}}]})]
            return []
        if kind == "message_delta":
            usage = data.get("usage") or {}
            if usage:
                self.has_usage = True
                if usage.get("output_tokens") is not None:
                    self.output_tokens = int(usage["output_tokens"])
                if usage.get("input_tokens"):
                    self.input_tokens = int(usage["input_tokens"])
            reason = (data.get("delta") or {}).get("stop_reason")
            if reason:
                self.finish = finish_reason(reason)
                return [self._chunk({}, self.finish)]
            return []
        if kind == "message_stop":
            self.stopped = True
            usage = self.usage
            if usage is None:
                return []
            return [{"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                     "choices": [], "usage": usage_to_openai(usage)}]
        return []  # ping, content_block_stop, unknown future events


class AnthropicProvider:
    def __init__(self, upstream: Upstream, registry: Providers) -> None:
        self.upstream = upstream
        self.registry = registry
        self.name = upstream.provider
        base = upstream.base_url.rstrip("/")
        self.url = f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"
        self._secret = upstream.resolved_key()
        self.headers = {"Content-Type": "application/json", "Accept": "application/json",
                        "anthropic-version": API_VERSION, **upstream.headers}
        if self._secret:
            self.headers["x-api-key"] = self._secret
        self.stream_headers = {**self.headers, "Accept": "text/event-stream"}
        self.default_max_tokens = registry.settings.default_output_tokens or DEFAULT_MAX_TOKENS

    def __repr__(self) -> str:
        return f"AnthropicProvider({self.upstream!r})"

    async def complete(self, call: ProviderCall) -> Completion:
        body = to_anthropic(call, default_max_tokens=self.default_max_tokens)
        data, _ = await post_json(self.registry, self.upstream, self.url, self.headers, body, self._secret)
        if data.get("type") == "error":
            raise UpstreamError(f"upstream {self.name!r} failed: {self._error_text(data)}", upstream_status=200,
                                details={"provider": self.name})
        out, usage = from_anthropic(data)
        return Completion(body=out, usage=usage)

    def _error_text(self, data: Mapping[str, Any]) -> str:
        err = data.get("error") or {}
        return redact(str(err.get("message") or err.get("type") or "error"), self._secret)

    async def stream(self, call: ProviderCall) -> AsyncIterator[dict]:
        body = to_anthropic(call, stream=True, default_max_tokens=self.default_max_tokens)
        translator = StreamTranslator(call.model)
        async for event, payload in sse_events(self.registry, self.upstream, self.url, self.stream_headers, body,
                                               self._secret):
            try:
                data = _decode(payload)
            except msgspec.DecodeError:
                raise UpstreamError(f"upstream {self.name!r} sent a stream event that is not JSON",
                                    upstream_status=200, details={"provider": self.name}) from None
            if not isinstance(data, dict):
                continue
            if (data.get("type") or event) == "error":
                raise UpstreamError(f"upstream {self.name!r} failed mid-stream: {self._error_text(data)}",
                                    upstream_status=200, details={"provider": self.name})
            for chunk in translator.feed(event, data):
                yield chunk
            if translator.stopped:
                return
        raise UpstreamError(f"upstream {self.name!r} cut the stream before message_stop",
                            details={"provider": self.name, "cut": True})

    async def embed(self, call: ProviderCall) -> Completion:
        raise InvalidRequest(f"provider {self.name!r} (Anthropic) has no embeddings API",
                             {"provider": self.name})
