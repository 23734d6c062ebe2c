"""The OpenAI-shaped bodies of the gateway, for the OpenAPI document only: the gateway itself reads the
JSON as OpenAI sends it (unknown fields pass through to the provider), so these describe, never decode."""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """OpenAI's chat completion request. ``model`` is a catalog id (``provider/model``)."""

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # {"include_usage": true}: usage (with cost_micros) in a last chunk
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None  # kept on the spend request


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int  # SmartSpace's receipt: what this call cost, micro-USDC


class Choice(msgspec.Struct, kw_only=True):
    index: int
    message: dict[str, Any]
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    """The answer (JSON); with ``stream: true`` it is SSE chunks instead (``chat.completion.chunk``)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class EmbeddingRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] | None = None


class Embedding(msgspec.Struct, kw_only=True):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: dict[str, int]
