"""Stream accounting: an open provider stream of a prepared request, counted as it is forwarded.

The caller iterates :meth:`SpendStream.chunks` for the chunks to pass on (OpenAI ``chat.completion.chunk``
dicts) and writes them wherever it likes. The stream counts what went by: the text and tool-call
arguments of every delta, and the usage the upstream reported (a usage-only chunk is held back: it goes
out with the cost once settled — :attr:`SpendStream.usage_chunk`). Then, exactly once:

- the upstream ended → settled to its usage (reported, or counted conservatively): :attr:`receipt`;
- the upstream failed or stalled (no chunk within the provider's timeout) → failed, charging what was
  streamed, the rest released: :attr:`error` (the caller shows it inside the stream);
- the caller's client went away → :meth:`abort`: failed the same way, shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

from domain.errors import DomainError, ProviderError, ProviderTimeout
from domain.providers import ProviderCall, Usage, conservative_usage, delta_text, usage_from_openai
from domain.spend.entities import Prepared, Receipt

if TYPE_CHECKING:
    from domain.spend.execute import Executing, Laps

log = logging.getLogger("smartspace.spend")


class SpendStream:
    def __init__(self, spending: Executing, prepared: Prepared, call: ProviderCall,
                 upstream: AsyncIterator[dict[str, Any]], first: dict[str, Any] | None, timeout_seconds: float,
                 laps: Laps) -> None:
        self.prepared = prepared
        self.laps = laps
        self.receipt: Receipt | None = None  # set when settled
        self.error: DomainError | None = None  # set when failed mid-stream
        self.usage: Usage | None = None  # what was charged (settled or failed)
        self.usage_chunk: dict[str, Any] | None = None  # the upstream's usage-only chunk, held back
        self.template: dict[str, Any] | None = None  # the first chunk with an id (for a final usage chunk of our own)
        self._spending = spending
        self._call = call
        self._upstream = upstream
        self._first = first
        self._timeout = timeout_seconds
        self._text: list[str] = []
        self._reported: Usage | None = None
        self._closed = False

    @property
    def want_usage(self) -> bool:
        """The client asked for a final usage chunk (``stream_options.include_usage``)."""
        return bool((self.prepared.params.get("stream_options") or {}).get("include_usage"))

    async def chunks(self) -> AsyncGenerator[dict[str, Any], None]:
        """The chunks to forward, once. Close it (``contextlib.aclosing``) if you stop early."""
        chunk = self._first
        self._first = None
        try:
            while chunk is not None:
                if self.template is None and chunk.get("id"):
                    self.template = chunk
                if chunk.get("usage"):
                    self._reported = usage_from_openai(chunk["usage"]) or self._reported
                    if not chunk.get("choices"):
                        self.usage_chunk = chunk
                        chunk = await self._next()
                        continue
                piece = delta_text(chunk)
                if piece:
                    self._text.append(piece)
                yield chunk
                chunk = await self._next()
        except DomainError as exc:  # the upstream failed mid-stream: charge what was consumed
            exc.details = {**exc.details, "request_id": self.prepared.request_id}
            await self._fail(exc)
            return
        except Exception as exc:
            log.exception("the stream failed", extra={"request_id": self.prepared.request_id})
            await self._fail(ProviderError(f"the stream failed: {type(exc).__name__}",
                                           {"request_id": self.prepared.request_id}))
            return
        self.laps.lap("upstream")
        await self._settle()

    async def abort(self, reason: str = "the client disconnected mid-stream") -> None:
        """The caller stops reading (its client hung up): close the upstream and fail the request,
        charging what was streamed. Does nothing once the stream has settled or failed."""
        if self._closed:
            return
        with contextlib.suppress(Exception):
            await self._upstream.aclose()  # type: ignore[attr-defined]
        await self._fail(ProviderError(reason, {"request_id": self.prepared.request_id}), show=False)

    async def _next(self) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(self._timeout):
                return await anext(self._upstream, None)
        except TimeoutError:
            raise ProviderTimeout(f"the provider sent nothing for {self._timeout:g}s",
                                  {"request_id": self.prepared.request_id}) from None

    def _counted(self) -> Usage:
        return conservative_usage(self._call, "".join(self._text), self._reported)

    async def _fail(self, error: DomainError, *, show: bool = True) -> None:
        self._closed = True
        self.usage = self._counted()
        if show:
            self.error = error
        await asyncio.shield(self._spending.fail(self.prepared, error, self.usage))

    async def _settle(self) -> None:
        self._closed = True
        self.usage = self._counted()
        try:
            self.receipt = await self._spending.settle_or_fail(self.prepared, self.usage)
        except Exception as exc:  # shown inside the stream; the request is failed unless it was closed already
            self.error = exc if isinstance(exc, DomainError) else ProviderError(
                f"settlement failed: {type(exc).__name__}", {"request_id": self.prepared.request_id})
            return
        self.laps.lap("settle")
