"""Token counting without a tokenizer download: a deliberately conservative estimate.

Real BPE tokenizers average ~4 characters per token on English and fewer on code or other scripts;
we count ``ceil(bytes / 3)`` of UTF-8 — more than the tokenizer would — so an estimate made here
never under-prices a call. Message framing adds a few tokens per message, as OpenAI's chat format does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

PER_MESSAGE_OVERHEAD = 4
PER_REQUEST_OVERHEAD = 3


def count_text(text: str) -> int:
    if not text:
        return 0
    return -(-len(text.encode("utf-8")) // 3)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts / Anthropic blocks
        return " ".join(_content_text(p.get("text") if isinstance(p, Mapping) else p) for p in content)
    return str(content)


def count_messages(messages: Iterable[Mapping[str, Any]]) -> int:
    total = PER_REQUEST_OVERHEAD
    for message in messages:
        total += PER_MESSAGE_OVERHEAD + count_text(_content_text(message.get("content")))
        if message.get("name"):
            total += count_text(str(message["name"]))
    return total
