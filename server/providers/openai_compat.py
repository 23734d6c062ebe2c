"""Any OpenAI-compatible upstream by base URL: OpenAI itself, Ollama, vLLM, Together, Groq, …

Requests go out in OpenAI's shape (model renamed to the upstream's name, ``stream_options.include_usage``
asked for on streams); answers come back unchanged, decoded once, and the raw bytes are kept so the
gateway can forward them without re-encoding.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec

from domain.inputs import decode_json
from domain.providers import Completion, ProviderCall, UpstreamError, usage_from_openai
from server.providers.wire import DONE, RawChunk, post_json, redact, sse_events

if TYPE_CHECKING:
    from server.providers import Providers, Upstream

_decode = decode_json  # depth-limited: what providers (and tool arguments) send is not trusted


class OpenAICompatProvider:
    def __init__(self, upstream: Upstream, registry: Providers) -> None:
        self.upstream = upstream
        self.registry = registry
        self.name = upstream.provider
        base = upstream.base_url.rstrip("/")
        self.chat_url = f"{base}/chat/completions"
        self.embeddings_url = f"{base}/embeddings"
        self._secret = upstream.resolved_key()
        self.headers = {"Content-Type": "application/json", "Accept": "application/json", **upstream.headers}
        if self._secret:
            self.headers["Authorization"] = f"Bearer {self._secret}"
        self.stream_headers = {**self.headers, "Accept": "text/event-stream"}

    def __repr__(self) -> str:
        return f"OpenAICompatProvider({self.upstream!r})"

    def chat_body(self, call: ProviderCall, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {**call.params, "model": call.model, "messages": call.messages or []}
        if call.max_tokens is not None:
            # o-series models accept only max_completion_tokens; keep whichever name the client used.
            body["max_completion_tokens" if "max_completion_tokens" in call.params else "max_tokens"] = call.max_tokens
        if stream:
            body["stream"] = True
            body["stream_options"] = {**(call.params.get("stream_options") or {}), "include_usage": True}
        else:
            body.pop("stream", None)
            body.pop("stream_options", None)
        return body

    async def complete(self, call: ProviderCall) -> Completion:
        data, raw = await post_json(self.registry, self.upstream, self.chat_url, self.headers,
                                    self.chat_body(call, False), self._secret)
        if not isinstance(data.get("choices"), list):
            raise UpstreamError(f"upstream {self.name!r} answered without choices", upstream_status=200,
                                details={"provider": self.name})
        return Completion(body=data, usage=usage_from_openai(data.get("usage")), raw=raw)

    async def stream(self, call: ProviderCall) -> AsyncIterator[dict]:
        finished = False
        async for event, payload in sse_events(self.registry, self.upstream, self.chat_url, self.stream_headers,
                                               self.chat_body(call, True), self._secret):
            if event == DONE:
                return
            try:
                data = _decode(payload)
            except msgspec.DecodeError:
                raise UpstreamError(f"upstream {self.name!r} sent a stream chunk that is not JSON",
                                    upstream_status=200, details={"provider": self.name}) from None
            if not isinstance(data, dict):
                continue
            if "error" in data and "choices" not in data:
                err = data["error"] if isinstance(data["error"], dict) else {"message": str(data["error"])}
                raise UpstreamError(f"upstream {self.name!r} failed mid-stream: "
                                    f"{redact(str(err.get('message', '')), self._secret)}",
                                    upstream_status=200, details={"provider": self.name})
            for choice in data.get("choices") or ():
                if choice.get("finish_reason"):
                    finished = True
            yield RawChunk(data, payload)
        if not finished:
            raise UpstreamError(f"upstream {self.name!r} cut the stream before it finished",
                                details={"provider": self.name, "cut": True})

    async def embed(self, call: ProviderCall) -> Completion:
        body: dict[str, Any] = {**call.params, "model": call.model, "input": call.input}
        data, raw = await post_json(self.registry, self.upstream, self.embeddings_url, self.headers, body,
                                    self._secret)
        if not isinstance(data.get("data"), list):
            raise UpstreamError(f"upstream {self.name!r} answered without data", upstream_status=200,
                                details={"provider": self.name})
        return Completion(body=data, usage=usage_from_openai(data.get("usage")), raw=raw)
