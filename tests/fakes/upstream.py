"""A fake LLM provider: a real aiohttp server on loopback speaking OpenAI's and Anthropic's wire formats.

- ``POST /v1/chat/completions`` (JSON and SSE), ``POST /v1/embeddings`` — OpenAI's shapes.
- ``POST /v1/messages`` (JSON and SSE events) — Anthropic's Messages API.

It answers deterministically, reports usage with its *own* token counts (different from SmartSpace's
conservative estimate, so tests can tell which one was billed), and can be told to misbehave for the
next requests: answer an error status, stall (before answering or mid-stream), cut a stream half-way,
omit usage, or (JSON answers) call tools or answer a given text. It records every request it received
(path, headers, body) so tests can prove the provider key was sent upstream — and never came back.

Run standalone (used by ``bench/gateway.py``): ``python -m tests.fakes.upstream --port 9100``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

_encode = msgspec.json.encode
_decode = msgspec.json.decode


@dataclass
class Behavior:
    status: int = 200  # an error status answers {"error": ...} in the wire format of the path
    retry_after: int | None = None
    delay: float = 0.0  # stall this long before answering (timeouts)
    cut_after: int | None = None  # streams: drop the connection after this many content chunks
    stall_after: int | None = None  # streams: after this many content chunks, stall for `delay`
    omit_usage: bool = False
    echo_key: bool = False  # put the received key in the error message (tests redaction)
    extra_output_tokens: int = 0  # OpenAI chat: report this many more output tokens than it sent (an overrun)
    # JSON answers: call these tools ({"name", "arguments"}) instead of answering; or answer this text
    tool_calls: list[dict[str, Any]] | None = None
    content: str | None = None


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Reported:
    path: str
    model: str
    input_tokens: int
    output_tokens: int
    stream: bool


@dataclass
class FakeUpstream:
    reply_words: int = 12
    record: bool = True
    plans: deque[Behavior] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    reported: list[Reported] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set on every request received
    unstalled: asyncio.Event = field(default_factory=asyncio.Event)  # set by stop(): stalls end

    # --- control --------------------------------------------------------------------------------------

    def plan(self, *behaviors: Behavior) -> None:
        """The next requests (one behavior each, in order) misbehave as told; then back to normal."""
        self.plans.extend(behaviors)

    def reset(self) -> None:
        self.plans.clear()
        self.received.clear()
        self.reported.clear()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def until_received(self, count: int, within: float = 30.0) -> None:
        """Wait until ``count`` requests have arrived (recording on)."""
        async with asyncio.timeout(within):
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()

    def _next(self) -> Behavior:
        return self.plans.popleft() if self.plans else Behavior()

    # --- deterministic "model" ------------------------------------------------------------------------

    @staticmethod
    def count(text: str) -> int:
        """The fake's own tokenizer: ~4 characters a token, at least 1."""
        return max(1, (len(text) + 3) // 4)

    def reply(self, prompt: str, max_tokens: int | None) -> tuple[list[str], bool]:
        words = (prompt.split() or ["nothing"])
        out = ["Reply"] + [words[i % len(words)] for i in range(self.reply_words - 1)]
        if max_tokens is not None and len(out) > max_tokens:
            return out[:max_tokens], True
        return out, False

    @staticmethod
    def _prompt_text(messages: list[dict], system: Any = None) -> str:
        parts: list[str] = []
        if isinstance(system, str):
            parts.append(system)
        for m in messages:
            c = m.get("content")
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(str(b.get("text", "")) for b in c if isinstance(b, dict))
        return " ".join(parts)

    # --- server ---------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/messages", self.messages)
        return app

    async def start(self, port: int = 0) -> FakeUpstream:
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self.unstalled.set()  # stalled handlers end now rather than hold up the shutdown
        if self.runner is not None:
            await self.runner.cleanup()

    async def _stall(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.unstalled.wait(), seconds)

    async def _receive(self, request: web.Request) -> dict[str, Any]:
        body = _decode(await request.read())
        if self.record:
            self.received.append(Received(request.path, dict(request.headers), body))
            self.arrived.set()
        return body

    def _error(self, request: web.Request, b: Behavior, anthropic: bool) -> web.Response:
        key = request.headers.get("Authorization", "") or request.headers.get("x-api-key", "")
        message = f"fake failure {b.status}" + (f" for key {key}" if b.echo_key else "")
        if anthropic:
            payload = {"type": "error", "error": {"type": "api_error", "message": message}}
        else:
            payload = {"error": {"message": message, "type": "server_error", "code": None}}
        headers = {"Retry-After": str(b.retry_after)} if b.retry_after else None
        return web.Response(status=b.status, body=_encode(payload), content_type="application/json",
                            headers=headers)

    async def _begin(self, request: web.Request, anthropic: bool) -> tuple[dict, Behavior, web.Response | None]:
        body = await self._receive(request)
        b = self._next()
        if b.delay and b.stall_after is None:
            await self._stall(b.delay)
        if b.status >= 400:
            return body, b, self._error(request, b, anthropic)
        return body, b, None

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    async def _content_chunks(self, request: web.Request, resp: web.StreamResponse, b: Behavior, frames: list[bytes]
                              ) -> bool:
        """Write content frames honouring cut/stall; False if the stream was cut."""
        for i, frame in enumerate(frames):
            if b.cut_after is not None and i >= b.cut_after:
                if request.transport is not None:
                    request.transport.abort()
                return False
            if b.stall_after is not None and i == b.stall_after:
                await self._stall(b.delay)
            await resp.write(frame)
        return True

    # OpenAI ------------------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, b, error = await self._begin(request, anthropic=False)
        if error is not None:
            return error
        messages = body.get("messages") or []
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        prompt = self._prompt_text(messages)
        words, cut = self.reply(prompt, max_tokens)
        usage = {"prompt_tokens": self.count(prompt) + 3 * len(messages),
                 "completion_tokens": len(words) + b.extra_output_tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        model = body.get("model", "")
        cid, created = f"chatcmpl-fake{time.time_ns()}", int(time.time())
        finish = "length" if cut else "stop"
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": b.content or " ".join(words), "refusal": None}
            if b.tool_calls:
                message["content"] = b.content
                message["tool_calls"] = [{"id": f"call_{i}_{time.time_ns()}", "type": "function", "function": {
                    "name": t["name"], "arguments": _encode(t.get("arguments") or {}).decode()}}
                    for i, t in enumerate(b.tool_calls)]
                finish = "tool_calls"
            answer: dict[str, Any] = {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}]}
            if not b.omit_usage:
                answer["usage"] = usage
                self.reported.append(Reported(request.path, model, usage["prompt_tokens"],
                                              usage["completion_tokens"], False))
            return web.Response(body=_encode(answer), content_type="application/json")
        resp = await self._sse(request)

        def frame(delta: dict, fin: str | None = None) -> bytes:
            return b"data: " + _encode({"id": cid, "object": "chat.completion.chunk", "created": created,
                                        "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                                     "finish_reason": fin}]}) + b"\n\n"

        await resp.write(frame({"role": "assistant", "content": ""}))
        frames = [frame({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
        if not await self._content_chunks(request, resp, b, frames):
            return resp
        await resp.write(frame({}, finish))
        include = (body.get("stream_options") or {}).get("include_usage")
        if include and not b.omit_usage:
            await resp.write(b"data: " + _encode({"id": cid, "object": "chat.completion.chunk", "created": created,
                                                  "model": model, "choices": [], "usage": usage}) + b"\n\n")
            self.reported.append(Reported(request.path, model, usage["prompt_tokens"], usage["completion_tokens"],
                                          True))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        body, b, error = await self._begin(request, anthropic=False)
        if error is not None:
            return error
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        dims = int(body.get("dimensions") or 8)
        data = [{"object": "embedding", "index": i,
                 "embedding": [round(((len(t) * (j + 1)) % 17) / 17.0, 6) for j in range(dims)]}
                for i, t in enumerate(texts)]
        prompt_tokens = sum(self.count(t) for t in texts)
        answer: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model", "")}
        if not b.omit_usage:
            answer["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
            self.reported.append(Reported(request.path, body.get("model", ""), prompt_tokens, 0, False))
        return web.Response(body=_encode(answer), content_type="application/json")

    # Anthropic ---------------------------------------------------------------------------------------

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body, b, error = await self._begin(request, anthropic=True)
        if error is not None:
            return error
        messages = body.get("messages") or []
        prompt = self._prompt_text(messages, body.get("system"))
        words, cut = self.reply(prompt, body.get("max_tokens"))
        input_tokens = self.count(prompt) + 2 * len(messages)
        model = body.get("model", "")
        mid = f"msg_fake{time.time_ns()}"
        stop_reason = "max_tokens" if cut else "end_turn"
        if not body.get("stream"):
            content: list[dict[str, Any]] = [{"type": "text", "text": b.content or " ".join(words)}]
            if b.tool_calls:
                content = [{"type": "text", "text": b.content}] if b.content else []
                content += [{"type": "tool_use", "id": f"toolu_{i}_{time.time_ns()}", "name": t["name"],
                             "input": t.get("arguments") or {}} for i, t in enumerate(b.tool_calls)]
                stop_reason = "tool_use"
            answer: dict[str, Any] = {
                "id": mid, "type": "message", "role": "assistant", "model": model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": None,
            }
            if not b.omit_usage:
                answer["usage"] = {"input_tokens": input_tokens, "output_tokens": len(words)}
                self.reported.append(Reported(request.path, model, input_tokens, len(words), False))
            return web.Response(body=_encode(answer), content_type="application/json")
        resp = await self._sse(request)

        def event(name: str, data: dict) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + _encode({"type": name, **data}) + b"\n\n"

        start_usage = {} if b.omit_usage else {"usage": {"input_tokens": input_tokens, "output_tokens": 1}}
        await resp.write(event("message_start", {"message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, **start_usage}}))
        await resp.write(event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))
        await resp.write(event("ping", {}))
        frames = [event("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                                      "text": w if i == 0 else " " + w}})
                  for i, w in enumerate(words)]
        if not await self._content_chunks(request, resp, b, frames):
            return resp
        await resp.write(event("content_block_stop", {"index": 0}))
        delta_usage = {} if b.omit_usage else {"usage": {"output_tokens": len(words)}}
        await resp.write(event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                                 **delta_usage}))
        await resp.write(event("message_stop", {}))
        if not b.omit_usage:
            self.reported.append(Reported(request.path, model, input_tokens, len(words), True))
        await resp.write_eof()
        return resp


async def _serve(port: int) -> None:
    fake = FakeUpstream(record=False)
    await fake.start(port)
    print(f"fake upstream on {fake.base_url}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="SmartSpace's fake OpenAI/Anthropic upstream")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port))


if __name__ == "__main__":
    main()
