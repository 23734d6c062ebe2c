"""Execute: the one path from a command to a closed request — prepare (or wait for an approval) → the
provider call → usage → settle or fail — with the policy's fallback models, for every caller.

Callers: ``POST /api/v1/requests`` and any in-process caller (:meth:`Executing.run`), the gateway
(:meth:`Executing.call` for JSON, :meth:`Executing.open_stream` for SSE), an approved REST request
(:meth:`Executing.complete`). They all get the same behaviour:

- **timeouts**: one limit per provider (``ProviderRegistry.timeout_seconds``): a JSON call must answer
  within it; a stream may run longer but never waits longer than it for its next chunk (the first
  included). Past it: ``provider_timeout`` (504), the reservation released.
- **usage**: what the upstream reported; when it reported none (or zeros), a conservative count of the
  input and of the output — the text *and* any tool calls (:func:`domain.providers.message_text`).
- **fallbacks**: when the call fails with a retryable upstream error (429, 5xx, no status) or a
  timeout before any output, each of the project policy's ``fallback_models`` is tried in order, each
  one re-priced and re-checked by the brain as a request of its own (``metadata.fallback_of``).
- **failures**: the request fails, charging what the upstream reported as consumed (streams: what was
  streamed) and releasing the rest; a cancelled caller releases too (shielded), then the cancellation
  goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from domain.base import Actor
from domain.errors import ApprovalRequired, Conflict, DomainError, ProviderError, ProviderTimeout
from domain.providers import Completion, UpstreamError, Usage, completion_usage
from domain.spend.approvals import Approving
from domain.spend.entities import Prepared, Receipt, SpendCommand, SpendRequest, SpendResult
from domain.spend.prepare import Preparing
from domain.spend.stream import SpendStream

log = logging.getLogger("smartspace.spend")
T = TypeVar("T")


class Laps:
    """Where one call's time went, by stage (the gateway sends it as ``Server-Timing``)."""

    __slots__ = ("_t", "stages")

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self._t
        self._t = now


class Outcome(msgspec.Struct, kw_only=True):
    """A settled non-streaming call: the request, the provider's answer, the usage charged, the receipt."""

    prepared: Prepared
    completion: Completion
    usage: Usage
    receipt: Receipt


def fallback_worthy(exc: DomainError) -> bool:
    """Worth another model: a timeout, or an upstream that is rate-limited or failing on its side."""
    return isinstance(exc, ProviderTimeout) or (isinstance(exc, UpstreamError) and exc.retryable)


class Executing(Preparing, Approving):
    """The provider call between prepare and close."""

    async def approve(self, actor: Actor, request_id: str, reason: str | None = None) -> SpendRequest:
        """An owner/admin approves a held request. REST requests (source api) run at once and the
        executed request is returned; gateway requests are released to their waiting caller."""
        row = await self._approve(actor, request_id, reason)
        if row.status == "executing":
            with contextlib.suppress(DomainError):  # a failed run is recorded on the request, shown below
                await self.complete(self._prepared(row), keep_response=True)
        return await self.get(actor, request_id)

    # ------------------------------------------------------------ entry points
    async def run(self, actor: Actor, cmd: SpendCommand, idempotency_key: str | None = None, *,
                  source: str = "api") -> SpendResult:
        """The in-process entry point (``POST /api/v1/requests``; the chat assistant's own model calls):
        one non-streaming call through the whole path. 200 with the settled request — its ``response`` is
        the provider's OpenAI-shaped ``chat.completion`` (``choices[0].message`` with ``content`` and any
        ``tool_calls``; ``cmd.params`` carries ``tools``, ``tool_choice`` …) — or 202 with the request held
        for review. Refusals and failures raise their DomainError (``details.request_id``)."""
        try:
            outcome = await self.call(actor, cmd, source=source, idempotency_key=idempotency_key,
                                      keep_response=True)
        except ApprovalRequired as held:
            return SpendResult(status_code=202, request=await self.get(actor, held.details["request_id"]))
        return SpendResult(status_code=200, request=await self.get(actor, outcome.prepared.request_id))

    async def call(self, actor: Actor, cmd: SpendCommand, *, source: str = "api", wait_seconds: float = 0.0,
                   idempotency_key: str | None = None, keep_response: bool = False,
                   laps: Laps | None = None) -> Outcome:
        """A non-streaming chat or embedding call, settled. ``wait_seconds`` > 0: a held request waits that
        long for an admin (else ApprovalRequired). ``keep_response`` stores the answer on the request."""
        laps = laps or Laps()

        async def attempt(prepared: Prepared) -> Outcome:
            return await self.complete(prepared, keep_response=keep_response, laps=laps)

        return await self._with_fallbacks(actor, cmd, source, wait_seconds, idempotency_key, laps, attempt)

    async def open_stream(self, actor: Actor, cmd: SpendCommand, *, source: str = "gateway",
                          wait_seconds: float = 0.0, idempotency_key: str | None = None,
                          laps: Laps | None = None) -> SpendStream:
        """A streaming chat call, opened: its first chunk is already read, so a call that fails at once is
        a plain error (and falls back) rather than an error inside a stream. Iterate the result for the
        chunks to forward; it settles when the upstream ends (see :class:`SpendStream`)."""
        laps = laps or Laps()

        async def attempt(prepared: Prepared) -> SpendStream:
            return await self._open(prepared, laps)

        return await self._with_fallbacks(actor, cmd, source, wait_seconds, idempotency_key, laps, attempt)

    # ------------------------------------------------------------ one prepared request
    async def complete(self, prepared: Prepared, *, keep_response: bool = False,
                       laps: Laps | None = None) -> Outcome:
        """Call the provider for a prepared request (non-streaming), count the usage, settle; on any failure
        fail the request (what was consumed charged, the rest released) and raise."""
        call = prepared.call()
        limit = self.providers.timeout_seconds(prepared.provider)
        try:
            provider = self.providers.get(prepared.provider)  # inside: an unknown provider releases too
            async with asyncio.timeout(limit):
                completion = await (provider.embed(call) if call.operation == "embedding" else provider.complete(call))
        except asyncio.CancelledError:  # the caller went away: give the money back, then stop
            await self._fail_shielded(prepared, ProviderError("the call was cancelled",
                                                              {"request_id": prepared.request_id}))
            raise
        except Exception as exc:
            raise await self.call_failed(prepared, exc, limit) from None
        if laps is not None:
            laps.lap("upstream")
        usage = completion_usage(call, completion)
        receipt = await self.settle_or_fail(prepared, usage, completion.body if keep_response else None)
        if laps is not None:
            laps.lap("settle")
        return Outcome(prepared=prepared, completion=completion, usage=usage, receipt=receipt)

    async def settle_or_fail(self, prepared: Prepared, usage: Usage, response: dict[str, Any] | None = None) -> Receipt:
        """Settle (shielded: a cancelled caller still pays what it used). A request that is no longer
        executing is a Conflict; any other failure fails the request with ``usage`` and raises."""
        try:
            return await asyncio.shield(self.settle(prepared, usage, response))
        except Conflict:
            raise
        except Exception as exc:
            log.exception("settlement failed", extra={"request_id": prepared.request_id})
            error = exc if isinstance(exc, DomainError) else ProviderError(
                f"settlement failed: {type(exc).__name__}", {"request_id": prepared.request_id})
            await self._fail_shielded(prepared, error, usage)
            raise error from None

    async def call_failed(self, prepared: Prepared, exc: BaseException, limit: float) -> DomainError:
        """The provider call raised before answering: fail the request (its reservation released) and return
        the error to raise — a DomainError with the request id added; a timeout as ``provider_timeout``;
        anything else (logged) as ``provider_error``."""
        if isinstance(exc, DomainError):
            exc.details = {**exc.details, "request_id": prepared.request_id}
            error: DomainError = exc
        elif isinstance(exc, TimeoutError):
            error = ProviderTimeout(f"the provider did not answer within {limit:g}s",
                                    {"request_id": prepared.request_id})
        else:
            log.error("provider call failed", extra={"request_id": prepared.request_id}, exc_info=exc)
            error = ProviderError(f"the provider call failed: {type(exc).__name__}",
                                  {"request_id": prepared.request_id})
        await self._fail_shielded(prepared, error)
        return error

    async def _fail_shielded(self, prepared: Prepared, error: DomainError, usage: Usage | None = None) -> None:
        await asyncio.shield(self.fail(prepared, error, usage))  # the money goes back even if we are cancelled

    async def _open(self, prepared: Prepared, laps: Laps) -> SpendStream:
        call = prepared.call()
        limit = self.providers.timeout_seconds(prepared.provider)
        try:
            iterator = self.providers.get(prepared.provider).stream(call).__aiter__()
            async with asyncio.timeout(limit):
                first: dict[str, Any] | None = await anext(iterator, None)
        except asyncio.CancelledError:
            await self._fail_shielded(prepared, ProviderError("the call was cancelled",
                                                              {"request_id": prepared.request_id}))
            raise
        except Exception as exc:
            raise await self.call_failed(prepared, exc, limit) from None
        return SpendStream(self, prepared, call, iterator, first, limit, laps)

    # ------------------------------------------------------------ admission and fallbacks
    async def _admit(self, actor: Actor, cmd: SpendCommand, source: str, wait_seconds: float,
                     idempotency_key: str | None, laps: Laps) -> Prepared:
        try:
            prepared = await self.prepare(actor, cmd, source=source, idempotency_key=idempotency_key)
        except ApprovalRequired as held:
            if wait_seconds <= 0:
                raise
            prepared = await self.wait_for_approval(held.details["request_id"], wait_seconds)
        laps.lap("prepare")
        return prepared

    async def _with_fallbacks(self, actor: Actor, cmd: SpendCommand, source: str, wait_seconds: float,
                              idempotency_key: str | None, laps: Laps,
                              attempt: Callable[[Prepared], Awaitable[T]]) -> T:
        """prepare → attempt; on a fallback-worthy failure, each fallback model prepared and attempted in turn."""
        prepared = await self._admit(actor, cmd, source, wait_seconds, idempotency_key, laps)
        try:
            return await attempt(prepared)
        except DomainError as first:
            if not fallback_worthy(first):
                raise
            error: DomainError = first
        for model in await self._fallback_models(actor, prepared, cmd):
            retry_cmd = msgspec.structs.replace(cmd, model=model, metadata={
                **cmd.metadata, "fallback_of": prepared.request_id, "fallback_reason": error.code})
            try:
                retry = await self._admit(actor, retry_cmd, source, wait_seconds, None, laps)
            except DomainError as rejected:  # re-checked: the fallback may itself be refused
                log.info("fallback refused", extra={"model": model, "code": rejected.code})
                continue
            try:
                return await attempt(retry)
            except DomainError as again:
                if not fallback_worthy(again):
                    raise
                error = again
        raise error

    async def _fallback_models(self, actor: Actor, prepared: Prepared, cmd: SpendCommand) -> list[str]:
        try:
            async with self.reader(actor) as scope:
                policy = await scope.policies.current(prepared.project_id)
        except Exception:  # no policy, no fallback: the original error stands
            log.exception("could not read the fallback models", extra={"request_id": prepared.request_id})
            return []
        return [m for m in policy.fallback_models if m not in (prepared.model, cmd.model)]
