"""The built-in ``local`` provider: a small deterministic "model" that needs no network.

It answers with a short echo/summary of the last user message, respects ``max_tokens`` (finish
reason ``length`` when it had to cut), streams its answer word by word, and embeds text as
deterministic unit vectors derived from SHA-256. Usage is counted with :mod:`domain.tokens`, so it
is real and reproducible: the same prompt always costs the same.
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

from domain import tokens
from domain.base import new_id
from domain.providers import Completion, ProviderCall, Usage, input_text, usage_to_openai

DEFAULT_MAX_TOKENS = 256
DEFAULT_DIMENSIONS = 16


def _last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return tokens._content_text(message.get("content")).strip()
    return ""


def reply_for(messages: list[dict]) -> str:
    """The deterministic answer to a conversation (before any max_tokens cut)."""
    text = " ".join(_last_user_text(messages).split())
    words = text.split(" ") if text else []
    if not words:
        return "Hello from the local model. Ask me anything."
    head = " ".join(words[:24])
    more = "" if len(words) <= 24 else f" … (+{len(words) - 24} words)"
    return f"You said: {head}{more}. That is {len(words)} words."


def truncate_to_tokens(text: str, max_tokens: int) -> tuple[str, bool]:
    """Cut ``text`` so that ``tokens.count_text`` of it is at most ``max_tokens``."""
    if tokens.count_text(text) <= max_tokens:
        return text, False
    raw = text.encode("utf-8")[: max(0, max_tokens) * 3]
    return raw.decode("utf-8", errors="ignore"), True


def answer(call: ProviderCall) -> tuple[str, str, Usage]:
    """(text, finish_reason, usage) for a chat call."""
    limit = call.max_tokens if call.max_tokens is not None else DEFAULT_MAX_TOKENS
    text, cut = truncate_to_tokens(reply_for(call.messages or []), limit)
    usage = Usage(input_tokens=tokens.count_messages(call.messages or []), output_tokens=tokens.count_text(text))
    return text, ("length" if cut else "stop"), usage


def embedding_for(text: str, dimensions: int = DEFAULT_DIMENSIONS) -> list[float]:
    """A deterministic unit vector for ``text``."""
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        values.extend((v / 2**31) - 1.0 for v in struct.unpack("<8I", digest))
        counter += 1
    values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 8) for v in values]


class LocalProvider:
    name = "local"

    async def complete(self, call: ProviderCall) -> Completion:
        text, finish, usage = answer(call)
        body: dict[str, Any] = {
            "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": call.model, "system_fingerprint": "smartspace-local",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage_to_openai(usage),
        }
        return Completion(body=body, usage=usage)

    async def stream(self, call: ProviderCall) -> AsyncIterator[dict]:
        text, finish, usage = answer(call)
        cid, created = new_id("chatcmpl"), int(time.time())

        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": call.model,
                    "system_fingerprint": "smartspace-local",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        yield chunk({"role": "assistant", "content": ""})
        pieces = text.split(" ")
        for i, piece in enumerate(pieces):
            yield chunk({"content": piece if i == 0 else " " + piece})
        yield chunk({}, finish)
        if (call.params.get("stream_options") or {}).get("include_usage", True):
            yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": call.model,
                   "system_fingerprint": "smartspace-local", "choices": [], "usage": usage_to_openai(usage)}

    async def embed(self, call: ProviderCall) -> Completion:
        texts = input_text(call)
        dimensions = int(call.params.get("dimensions") or DEFAULT_DIMENSIONS)
        data = [{"object": "embedding", "index": i, "embedding": embedding_for(t, dimensions)}
                for i, t in enumerate(texts)]
        usage = Usage(input_tokens=sum(tokens.count_text(t) for t in texts), output_tokens=0)
        body = {"object": "list", "data": data, "model": call.model,
                "usage": {"prompt_tokens": usage.input_tokens, "total_tokens": usage.input_tokens}}
        return Completion(body=body, usage=usage)
