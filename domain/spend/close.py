"""Close an executing request: settle to its usage, or fail it (charge what was consumed); release."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec

from domain.errors import (
    Conflict,
    DomainError,
)
from domain.providers import Usage
from domain.spend.core import SpendCore
from domain.spend.entities import (
    CloseValues,
    Prepared,
    Receipt,
    SpendRequest,
    actor_from_label,
    failed_event,
    settled_event,
)

if TYPE_CHECKING:
    from domain.scope import Scope

log = logging.getLogger("smartspace.spend")


class Closing(SpendCore):
    """The last step of an executing request: ``settle`` or ``fail``; releasing a reservation."""

    async def settle(self, prepared: Prepared, usage: Usage, response: dict[str, Any] | None = None) -> Receipt:
        """Charge the actual cost of ``usage`` and the platform fee on it (together never more than reserved),
        release the rest, receipt. The fee is booked to the platform's ledger in the same transaction."""
        cost, fee = prepared.charge(usage)
        actual = prepared.cost(usage)
        if actual > cost:
            log.warning("actual cost above the reservation; charging the reservation",
                        extra={"request_id": prepared.request_id, "cost_micros": prepared.cost(usage),
                               "reserved_micros": prepared.reserved_micros})
        now = self.clock()
        values = CloseValues(status="settled", cost_micros=cost, fee_micros=fee, input_tokens=usage.input_tokens,
                             output_tokens=usage.output_tokens, response=response, settled_at=now)
        receipt = Receipt(request_id=prepared.request_id, model=prepared.model, input_tokens=usage.input_tokens,
                          output_tokens=usage.output_tokens, estimated_cost_micros=prepared.estimated_cost_micros,
                          cost_micros=cost, fee_micros=fee, settled_at=now)
        overrun = actual > cost  # issue 11: settled on the generic path, with record_overrun below
        # The hot path moves cost only: a request with a fee takes the generic path (it books the fee).
        if (fee == 0 and not overrun and prepared.reserved_micros > 0 and self.hot is not None
                and await self.hot.close(prepared, ("executing",), values, prepared.actor,
                                         [settled_event(prepared, receipt)], now)):
            return receipt
        async with self.uow(actor_from_label(prepared.actor)) as scope:
            row = await self._close(scope, prepared.request_id, ("executing",), values)
            if row is None:
                current = await scope.store.spend_requests.get(prepared.request_id)
                raise Conflict("the request is no longer executing (its reservation expired or it was settled)",
                               {"request_id": prepared.request_id, "status": current.status if current else None})
            stored = row.receipt
            assert stored is not None
            scope.pending.append(settled_event(row, stored))
            if overrun:  # issue 11: the uncharged rest on the platform's ledger + a cost_overrun insight
                await scope.insights.record_overrun(
                    project_id=row.project_id, request_id=row.id, model=row.model, agent_id=row.agent_id,
                    reserved_micros=cost, actual_micros=actual)  # the part of the cost charged (fee aside)
        return stored

    async def fail(self, prepared: Prepared, error: DomainError, usage: Usage | None = None) -> None:
        """The call failed after reserving: charge what was consumed (if the upstream reported usage),
        release the rest."""
        cost, fee = prepared.charge(usage) if usage is not None else (0, 0)
        now = self.clock()
        values = CloseValues(status="failed", cost_micros=cost, fee_micros=fee, error=error.to_dict(),
                             input_tokens=usage.input_tokens if usage else None,
                             output_tokens=usage.output_tokens if usage else None, settled_at=now if cost else None)
        failed = failed_event(prepared.project_id, prepared.request_id, values.error or {}, cost, fee)
        if fee == 0 and prepared.reserved_micros > 0 and self.hot is not None and await self.hot.close(
                prepared, ("executing", "approved"), values, prepared.actor, [failed], now):
            return
        async with self.uow(actor_from_label(prepared.actor)) as scope:
            row = await self._close(scope, prepared.request_id, ("executing", "approved"), values)
            if row is None:
                return  # already released (expired by the sweeper, or failed before)
            scope.pending.append(failed)

    async def _close(self, scope: Scope, request_id: str, from_statuses: tuple[str, ...],
                     values: CloseValues) -> SpendRequest | None:
        row = await scope.store.spend_requests.transition(request_id, from_statuses, reservation_expires_at=None,
                                                          **msgspec.structs.asdict(values))
        if row is not None:
            await self._move_money(scope, row, values.cost_micros, values.fee_micros)
        return row

    async def _move_money(self, scope: Scope, row: SpendRequest, cost: int, fee: int = 0) -> None:
        """Charge ``cost`` and ``fee`` of the request's reservation and release the rest (wallet + its budgets);
        the fee is credited to the platform's ledger (so wallet debit = cost + fee = what the platform booked
        as resold cost plus its fee)."""
        reserved = row.reserved_micros
        if reserved <= 0:
            return
        charged = cost + fee
        await scope.wallets.capture(row.project_id, charged, kind="spend", ref=row.id, memo=row.model,
                                    release_micros=reserved - charged)
        await scope.budgets.settle_all(row.budget_ids, reserved, charged, ref=row.id)
        if fee > 0:
            await scope.wallets.platform_fee(fee, ref=row.id, payer=row.project_id)

    async def _release(self, scope: Scope, row: SpendRequest) -> None:
        if row.reserved_micros > 0:
            await scope.wallets.release(row.project_id, row.reserved_micros, ref=row.id)
            await scope.budgets.release_all(row.budget_ids, row.reserved_micros, ref=row.id)
