"""The provider port: what the spend path needs from an LLM provider, in OpenAI's shapes.

Adapters live in ``server/providers/`` (``local``, any OpenAI-compatible upstream, Anthropic).
Every adapter speaks OpenAI's wire shapes to the rest of SmartSpace: a chat call returns a
``chat.completion`` body, a stream yields ``chat.completion.chunk`` dicts, an embedding call returns
a ``list`` of embeddings. ``usage`` is what the upstream reported (``None`` if it reported nothing —
then the caller counts tokens conservatively with :mod:`domain.tokens`, never pricing a call at zero).

Errors: adapters raise :class:`UpstreamError` (a :class:`~domain.errors.ProviderError`, 502) carrying
the upstream's status, or :class:`~domain.errors.ProviderTimeout` (504). Messages never contain keys.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal, Protocol

import msgspec

from domain import tokens
from domain.errors import NotFound, ProviderError


class Usage(msgspec.Struct, frozen=True):
    input_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class ProviderCall(msgspec.Struct, kw_only=True):
    provider: str
    model: str  # the upstream's model name (catalog id without the "provider/" prefix)
    operation: Literal["chat", "embedding"] = "chat"
    messages: list[dict[str, Any]] | None = None
    input: str | list[str] | None = None
    max_tokens: int | None = None
    params: dict[str, Any] = {}  # other OpenAI parameters (temperature, stop, top_p, ...)


class Completion(msgspec.Struct, kw_only=True):
    body: dict[str, Any]  # OpenAI-shaped chat.completion or embeddings response
    usage: Usage | None = None
    raw: bytes | None = None  # the exact JSON bytes of ``body`` when the adapter has them (forwarded as is)


class Provider(Protocol):
    async def complete(self, call: ProviderCall) -> Completion: ...

    def stream(self, call: ProviderCall) -> AsyncIterator[dict[str, Any]]: ...

    async def embed(self, call: ProviderCall) -> Completion: ...


class ProviderRegistry(Protocol):
    def get(self, provider: str) -> Provider: ...

    def names(self) -> list[str]: ...

    def timeout_seconds(self, provider: str) -> float:
        """The provider's time limit: a JSON call's whole duration; a stream's longest wait for a chunk."""
        ...


class UnknownProvider(NotFound):
    code = "not_found"
    status = 404


class UpstreamError(ProviderError):
    """The upstream answered with an error status (``upstream_status``) or an unreadable body."""

    def __init__(self, message: str, upstream_status: int | None = None, retry_after: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details)
        self.upstream_status = upstream_status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Worth trying a fallback model: rate-limited or a server-side failure upstream."""
        return self.upstream_status is None or self.upstream_status == 429 or self.upstream_status >= 500


class UpstreamRejected(UpstreamError):
    """The upstream refused the request itself (400/413/422: e.g. a parameter out of range) — the client's
    to fix, so it is answered as ``invalid_request`` rather than a gateway failure; never retried."""

    code = "invalid_request"
    status = 400

    @property
    def retryable(self) -> bool:
        return False


# --- helpers shared by the adapters and the gateway ---------------------------------------------------

def usage_from_openai(raw: Mapping[str, Any] | None) -> Usage | None:
    """OpenAI's ``usage`` object (prompt/completion tokens) → :class:`Usage`; ``None`` if absent."""
    if not raw:
        return None
    prompt = raw.get("prompt_tokens")
    completion = raw.get("completion_tokens")
    if prompt is None and completion is None:
        return None
    return Usage(input_tokens=int(prompt or 0), output_tokens=int(completion or 0))


def usage_to_openai(usage: Usage) -> dict[str, int]:
    """:class:`Usage` → OpenAI's ``usage`` object (prompt, completion and total tokens)."""
    return {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens}


def input_text(call: ProviderCall) -> list[str]:
    if call.input is None:
        return []
    return [call.input] if isinstance(call.input, str) else list(call.input)


def estimate_input_tokens(call: ProviderCall) -> int:
    """Conservative input count for a call (used when the upstream reports no usage)."""
    if call.operation == "embedding":
        return sum(tokens.count_text(t) for t in input_text(call))
    return tokens.count_messages(call.messages or [])


def message_text(body: Mapping[str, Any]) -> str:
    """The generated text of a ``chat.completion`` — content and tool calls (name + arguments) — what
    output is counted on when the upstream reports no usage."""
    out = ""
    for choice in body.get("choices") or ():
        message = choice.get("message") or {}
        out += str(message.get("content") or "")
        for tc in message.get("tool_calls") or ():
            fn = tc.get("function") or {}
            out += str(fn.get("name") or "") + str(fn.get("arguments") or "")
    return out


def delta_text(chunk: Mapping[str, Any]) -> str:
    """The generated text a ``chat.completion.chunk`` carries (content and tool-call name/arguments)."""
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


def completion_usage(call: ProviderCall, completion: Completion) -> Usage:
    """The usage a non-streaming call is charged: the reported one, else counted conservatively."""
    if call.operation == "embedding":
        return completion.usage or conservative_usage(call, "")
    return conservative_usage(call, message_text(completion.body), completion.usage)


def conservative_usage(call: ProviderCall, output_text: str, reported: Usage | None = None) -> Usage:
    """Usage for a call whose upstream reported none (or zeros): counted conservatively, never zero input."""
    if reported is not None and reported.input_tokens and (reported.output_tokens or not output_text):
        return reported
    counted_in = max(estimate_input_tokens(call), 1)
    input_tokens = reported.input_tokens if reported is not None and reported.input_tokens else counted_in
    output_tokens = (reported.output_tokens if reported is not None and reported.output_tokens
                     else tokens.count_text(output_text))
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens)
