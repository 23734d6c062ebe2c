"""HTTP plumbing shared by the upstream adapters: POST JSON, read SSE, map failures, redact keys.

Failures become :class:`~domain.providers.UpstreamError` (502, carrying the upstream status) or
:class:`~domain.errors.ProviderTimeout` (504). Every message that could carry upstream text goes
through :func:`redact` first, so a provider key echoed back by an upstream never reaches a client,
a log line or an event.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from domain.errors import ProviderTimeout
from domain.inputs import decode_json
from domain.providers import UpstreamError, UpstreamRejected

if TYPE_CHECKING:
    from server.providers import Providers, Upstream

_KEYISH = re.compile(r"(sk-[A-Za-z0-9_\-*.]{6,}|(?:Bearer|bearer)\s+\S+|x-api-key[:=]\s*\S+)")
DONE = "[DONE]"
_decode = decode_json  # depth-limited: what providers (and tool arguments) send is not trusted
_encode = msgspec.json.encode


class RawChunk(dict):
    """A decoded SSE chunk that remembers the exact bytes it came from (forwarded without re-encoding)."""

    __slots__ = ("raw",)

    def __init__(self, data: dict, raw: bytes) -> None:
        super().__init__(data)
        self.raw = raw


def redact(text: str, secret: str = "") -> str:
    if secret:
        text = text.replace(secret, "[redacted]")
    return _KEYISH.sub("[redacted]", text)


def _error_message(status: int, body: bytes, secret: str) -> str:
    message = ""
    try:
        data = _decode(body)
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict):
                message = str(err.get("message") or err.get("type") or "")
            elif isinstance(err, str):
                message = err
            else:
                message = str(data.get("message") or data.get("detail") or "")
    except msgspec.DecodeError:
        message = body[:300].decode("utf-8", errors="replace")
    return redact(message.strip()[:500], secret) or f"HTTP {status}"


def _retry_after(headers: Any) -> int | None:
    raw = headers.get("Retry-After") if headers is not None else None
    try:
        return max(1, int(float(raw))) if raw else None
    except ValueError:
        return None


async def raise_for_status(upstream: Upstream, resp: aiohttp.ClientResponse, secret: str) -> None:
    if resp.status < 400:
        return
    body = await resp.read()
    cls = UpstreamRejected if resp.status in (400, 413, 422) else UpstreamError
    raise cls(
        f"upstream {upstream.provider!r} answered {resp.status}: {_error_message(resp.status, body, secret)}",
        upstream_status=resp.status, retry_after=_retry_after(resp.headers),
        details={"provider": upstream.provider, "upstream_status": resp.status})


def timeout_error(upstream: Upstream) -> ProviderTimeout:
    return ProviderTimeout(f"upstream {upstream.provider!r} did not answer in time",
                           {"provider": upstream.provider})


def connection_error(upstream: Upstream, exc: BaseException, secret: str) -> UpstreamError:
    reason = redact(f"{type(exc).__name__}: {exc}", secret)
    return UpstreamError(f"upstream {upstream.provider!r} failed: {reason}", details={"provider": upstream.provider})


async def post_json(registry: Providers, upstream: Upstream, url: str, headers: dict[str, str], body: dict,
                    secret: str) -> tuple[dict, bytes]:
    """POST ``body``; return (decoded JSON, raw bytes) of a 2xx answer or raise a provider error."""
    try:
        async with registry.session.post(url, data=_encode(body), headers=headers,
                                         timeout=registry.timeout(upstream)) as resp:
            await raise_for_status(upstream, resp, secret)
            raw = await resp.read()
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise timeout_error(upstream) from None
    except aiohttp.ClientError as exc:
        raise connection_error(upstream, exc, secret) from None
    try:
        data = _decode(raw)
    except msgspec.DecodeError:
        raise UpstreamError(f"upstream {upstream.provider!r} answered with a body that is not JSON",
                            upstream_status=resp.status, details={"provider": upstream.provider}) from None
    if not isinstance(data, dict):
        raise UpstreamError(f"upstream {upstream.provider!r} answered with an unexpected body",
                            upstream_status=resp.status, details={"provider": upstream.provider})
    return data, raw


async def sse_events(registry: Providers, upstream: Upstream, url: str, headers: dict[str, str], body: dict,
                     secret: str) -> AsyncIterator[tuple[str | None, bytes]]:
    """POST ``body`` and yield (event name, data bytes) for each server-sent event until the stream ends.

    ``data: [DONE]`` ends the stream and is reported as the event :data:`DONE`; whether a stream that ends
    without it (or without the provider's own final event) was cut is for the adapter to decide.
    """
    try:
        async with registry.session.post(url, data=_encode(body), headers=headers,
                                         timeout=registry.timeout(upstream, stream=True)) as resp:
            await raise_for_status(upstream, resp, secret)
            event: str | None = None
            data: list[bytes] = []
            async for line in resp.content:
                line = line.rstrip(b"\r\n")
                if not line:
                    if data:
                        payload = b"\n".join(data)
                        if payload == b"[DONE]":
                            yield DONE, b""
                            return
                        yield event, payload
                    event, data = None, []
                    continue
                if line.startswith(b"data:"):
                    data.append(line[6:] if line[5:6] == b" " else line[5:])
                elif line.startswith(b"event:"):
                    event = line[6:].strip().decode()
                # comments (":") and other fields are ignored
            if data:
                payload = b"\n".join(data)
                if payload != b"[DONE]":
                    yield event, payload
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise timeout_error(upstream) from None
    except aiohttp.ClientError as exc:
        raise connection_error(upstream, exc, secret) from None
