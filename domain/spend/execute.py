"""Execute: the one call to the provider → usage → settle or fail."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from domain.base import Actor
from domain.errors import (
    ApprovalRequired,
    Conflict,
    DomainError,
    ProviderError,
    ProviderTimeout,
)
from domain.providers import Completion, conservative_usage
from domain.spend.close import Closing
from domain.spend.entities import Prepared, SpendCommand, SpendResult, output_text
from domain.spend.prepare import Preparing

if TYPE_CHECKING:
    pass

log = logging.getLogger("smartspace.spend")


class Executing(Preparing, Closing):
    """The provider call between prepare and close."""

    async def execute(self, prepared: Prepared) -> Completion:
        """Call the provider for a prepared request (non-streaming); release on failure."""
        try:
            provider = self.providers.get(prepared.provider)
            async with asyncio.timeout(self.provider_timeout):
                if prepared.operation == "embedding":
                    return await provider.embed(prepared.call())
                return await provider.complete(prepared.call())
        except DomainError as exc:
            exc.details = {**exc.details, "request_id": prepared.request_id}
            await self.fail(prepared, exc)
            raise
        except asyncio.CancelledError:  # the caller went away: give the money back, then stop
            await asyncio.shield(self.fail(prepared, ProviderError("the call was cancelled",
                                                                   {"request_id": prepared.request_id})))
            raise
        except TimeoutError:
            error = ProviderTimeout(f"the provider did not answer within {self.provider_timeout:g}s",
                                    {"request_id": prepared.request_id})
            await self.fail(prepared, error)
            raise error from None
        except Exception as exc:
            log.exception("provider call failed", extra={"request_id": prepared.request_id})
            error = ProviderError(f"the provider call failed: {type(exc).__name__}",
                                  {"request_id": prepared.request_id})
            await self.fail(prepared, error)
            raise error from None

    async def _execute_and_settle(self, prepared: Prepared) -> None:
        completion = await self.execute(prepared)
        call = prepared.call()
        usage = conservative_usage(call, output_text(completion.body), completion.usage) \
            if prepared.operation == "chat" else (completion.usage or conservative_usage(call, ""))
        try:
            await asyncio.shield(self.settle(prepared, usage, completion.body))  # settle even if cancelled
        except Conflict:
            raise
        except Exception as exc:  # never leave the reservation behind
            await self.fail(prepared, ProviderError(f"settlement failed: {type(exc).__name__}"), usage)
            raise

    async def run(self, actor: Actor, cmd: SpendCommand, idempotency_key: str | None = None) -> SpendResult:
        """POST /api/v1/requests: prepare → call the provider → settle. 200 executed, 202 held."""
        try:
            prepared = await self.prepare(actor, cmd, source="api", idempotency_key=idempotency_key)
        except ApprovalRequired as held:
            return SpendResult(status_code=202, request=await self.get(actor, held.details["request_id"]))
        await self._execute_and_settle(prepared)
        return SpendResult(status_code=200, request=await self.get(actor, prepared.request_id))
