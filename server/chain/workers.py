"""The background side of payments, one loop per process (an ``app.cleanup_ctx`` task):

- payouts: broadcast pending payments' stored bytes in nonce order, then follow submitted ones to their
  receipts; re-sending is always safe (same bytes, same hash), so a restart simply resumes;
- the deposit watcher: re-check pending deposits until confirmed or failed;
- the settlement batcher: pay on-chain projects' settled costs to the revenue address in batches.

Chain I/O happens between units of work; each state change is its own short transaction, made
idempotent by conditional status updates, so several processes may run this loop at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from domain.base import utcnow
from domain.chain import units_to_micros
from domain.errors import Conflict, DomainError, InsufficientFunds, Unavailable
from domain.payments import Payment
from server.chain import open_chain
from server.chain.devnet import Devnet
from server.chain.web3chain import Web3Chain, _Treasury, deposit_address_of
from server.settings import SettingsError

if TYPE_CHECKING:
    from domain.scope import Scope
    from server.container import Container

log = logging.getLogger("smartspace.payments")


class PaymentWorker:
    def __init__(self, container: Container, chain: Web3Chain, *, poll_seconds: float = 1.0) -> None:
        self.container = container
        self.chain = chain
        self.settings = container.settings
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------ payouts and settlement transactions
    async def tick_payments(self, limit: int = 200) -> int:
        """One pass over this sender's unfinished payments; returns how many changed."""
        async with self.container.reader() as scope:
            work = await scope.store.payments.unfinished(self.chain.chain_id, self.chain.treasury_address, limit)
        changed = 0
        blocked = False  # after a failed send, later nonces cannot be mined yet
        for payment, raw_tx in work:
            if payment.status == "pending":
                if blocked:
                    continue
                outcome, detail = await self.chain.broadcast(raw_tx)
                if outcome == "retry":
                    blocked = True
                    async with self.container.uow() as scope:
                        await scope.payments.note_attempt(payment, detail)
                    continue
                if outcome == "nonce_used" and not (await self.chain.lookup(payment.tx_hash)).known:
                    changed += await self._nonce_taken(payment)
                    continue
                async with self.container.uow() as scope:
                    moved = await scope.payments.mark_submitted(payment)
                if moved is None:
                    continue
                payment = moved
                changed += 1
            changed += await self._follow(payment, raw_tx)
        return changed

    async def _follow(self, payment: Payment, raw_tx: bytes) -> int:
        lookup = await self.chain.lookup(payment.tx_hash)
        if lookup.receipt is None:
            if not lookup.known:  # dropped from the pool (or the node restarted): the same bytes again
                outcome, _ = await self.chain.broadcast(raw_tx)
                if outcome == "nonce_used" and not (await self.chain.lookup(payment.tx_hash)).known:
                    return await self._nonce_taken(payment)
            return 0
        if lookup.confirmations < self.settings.confirmations:
            return 0
        async with self.container.uow() as scope:
            done = await scope.payments.finalize(payment, lookup.receipt, confirmations=lookup.confirmations)
        return int(done is not None)

    async def _nonce_taken(self, payment: Payment) -> int:
        """Another transaction used this nonce (someone else spent from the treasury key): this payment can
        never be mined. Fail it (the hold goes back) and move the allocator past the chain's nonce."""
        log.error("nonce %s of %s was used by another transaction; payment %s fails", payment.nonce,
                  payment.from_address, payment.id)
        chain_nonce = await self.chain.next_nonce(payment.from_address)
        async with self.container.uow() as scope:
            done = await scope.payments.finalize(payment, None, error="the nonce was used by another transaction")
            await scope.store.payments.raise_nonce(payment.chain_id, payment.from_address, chain_nonce, utcnow())
        return int(done is not None)

    # ------------------------------------------------------------ deposits
    async def tick_deposits(self, limit: int = 200) -> int:
        async with self.container.reader() as scope:
            pending = await scope.store.payments.pending_deposits(self.chain.chain_id, limit)
        changed = 0
        for deposit in pending:
            lookup = await self.chain.lookup(deposit.tx_hash)
            try:
                async with self.container.uow() as scope:
                    changed += int(await scope.payments.recheck_deposit(deposit, lookup) is not None)
            except Conflict:  # another project's claim of the same transfer was credited first
                async with self.container.uow() as scope:
                    await scope.store.payments.move_deposit(deposit.id, ("pending",), status="failed",
                                                            error="already claimed", updated_at=utcnow())
        return changed

    # ------------------------------------------------------------ settlement
    async def tick_settlement(self) -> str | None:
        """Make at most one batch; returns its id."""
        if self.chain.revenue_address is None:
            return None
        fees = await self.chain.fees()
        treasury = units_to_micros(await self.chain.token_balance(self.chain.treasury_address), self.chain.decimals)
        try:
            async with self.container.uow() as scope:
                batch = await scope.payments.settle_batch(
                    fees, min_micros=self.settings.settlement_batch_micros,
                    max_age_seconds=self.settings.settlement_batch_seconds, now=utcnow(), treasury_micros=treasury)
        except Conflict:
            return None  # another process batched first
        except InsufficientFunds as exc:
            log.warning("settlement waits: %s %s", exc.message, exc.details)
            return None
        if batch is not None:
            log.info("settlement batch %s: %s micro-USDC over %s requests, tx %s", batch.id, batch.total_micros,
                     batch.request_count, batch.tx_hash)
            self.wake()
        return batch.id if batch else None

    # ------------------------------------------------------------ the loop
    async def tick(self) -> None:
        await self.tick_settlement()
        await self.tick_payments()
        await self.tick_deposits()

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except DomainError as exc:  # e.g. the node is unreachable: said once per tick, no traceback
                log.warning("payments worker tick: %s", exc.message)
            except Exception:  # the loop must outlive a bad tick (database blip, a node's odd answer)
                log.exception("payments worker tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            self._wake.clear()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="smartspace-payments")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class ChainRuntime:
    """Opens the chain once and runs the worker. An RPC chain opens at start-up; the devnet opens on first
    use (any payments route), so processes and tests that never touch payments pay nothing for it.

    Built by the container (``container.chain_runtime``), which hands it to the domain as its
    ``domain.scope.ChainLink``: ``chain`` and ``worker`` are None until the chain is open.

    Deposit addresses need no node: they derive from the treasury key, which is known from start-up (rpc:
    the environment's; devnet: this run's, made here and handed to the devnet when it starts). So every
    wallet shows its address from the first read: a new project's wallet gets it as it is created, and
    start-up brings stored ones up to date (none yet, or a previous devnet run's)."""

    def __init__(self, container: Container, *, start_worker: bool = True) -> None:
        self.container = container
        self.start_worker = start_worker
        self._new_run()
        self.chain: Web3Chain | None = None
        self.devnet: Devnet | None = None
        self.worker: PaymentWorker | None = None
        self._lock = asyncio.Lock()
        self._opener: asyncio.Task[None] | None = None

    async def get(self) -> Web3Chain:
        if self.chain is not None:
            return self.chain
        async with self._lock:
            if self.chain is None:
                try:
                    chain, devnet = await open_chain(self.container.settings,
                                                     devnet_treasury_key=self._treasury_key)
                except SettingsError:
                    raise
                except Exception as exc:  # the node is down or answers nonsense: a 503 now, a retry later
                    log.warning("cannot open the chain: %s", str(exc)[:300])
                    raise Unavailable("the chain node is unreachable; try again shortly") from None
                if devnet is not None:
                    async with self.container.uow() as scope:
                        if failed := await scope.payments.forget_devnet_run(chain.chain_id):
                            log.warning("devnet restarted: %s unfinished payments of the previous run failed", failed)
                worker = PaymentWorker(self.container, chain, poll_seconds=self.container.settings.chain_poll_seconds)
                self.devnet, self.worker = devnet, worker
                self.chain = chain
                if self.start_worker:
                    worker.start()
        return self.chain

    def _new_run(self) -> None:
        settings = self.container.settings
        self._treasury_key = settings.treasury_private_key if settings.chain == "rpc" else \
            "0x" + secrets.token_hex(32)
        self._treasury = _Treasury(self._treasury_key) if self._treasury_key else None

    def deposit_address(self, project_id: str) -> str | None:
        return deposit_address_of(self._treasury, project_id) if self._treasury is not None else None

    async def on_project_created(self, scope: Scope, project: Any) -> None:
        """The project-created hook (after ``open_wallet``): the new wallet gets its deposit address in the same
        unit of work — part of its initial state, like its zero balance, so no event of its own."""
        if (address := self.deposit_address(project.id)) is not None:
            await scope.store.wallets.set_deposit_address(project.id, address, utcnow())

    async def refresh_deposit_addresses(self) -> int:
        """Start-up: wallets without this treasury's address for them (created before it was known, or shown a
        previous devnet run's) get it now, with the usual wallet.updated event. Returns how many changed."""
        if self._treasury is None:
            return 0
        async with self.container.reader() as scope:
            stored = await scope.store.wallets.deposit_addresses()
        stale = [(pid, address) for pid, current in stored
                 if (address := deposit_address_of(self._treasury, pid)) != current]
        if stale:
            async with self.container.uow() as scope:
                for project_id, address in stale:
                    await scope.wallets.set_deposit_address(project_id, address)
        return len(stale)

    def keep_opening(self, every_seconds: float = 5.0) -> None:
        """Start-up found the node down: keep trying in the background so the worker resumes unfinished
        payouts as soon as it is back (routes also try on each call)."""

        async def loop() -> None:
            while self.chain is None:
                try:
                    await self.get()
                except Unavailable:
                    await asyncio.sleep(every_seconds)
                except SettingsError as exc:
                    log.error("chain configuration error: %s", exc)
                    return

        self._opener = asyncio.create_task(loop(), name="smartspace-chain-open")

    async def close(self) -> None:
        if self._opener is not None:
            self._opener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._opener
        if self.worker is not None:
            await self.worker.stop()
        if self.chain is not None:
            chain, self.chain = self.chain, None
            await chain.close()
        if self.devnet is not None:  # that in-memory chain is gone: opening again is a new run, with a new key
            self.devnet = None
            self._new_run()


CHAIN = web.AppKey("chain", ChainRuntime)


def chain_context(container: Container, *, start_worker: bool = True):
    """The cleanup_ctx for the chain (devnet by default, Arc or any EVM RPC when configured)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        runtime = container.chain_runtime
        runtime.start_worker = start_worker
        app[CHAIN] = runtime
        await runtime.refresh_deposit_addresses()
        container.deps.project_created_hooks.append(runtime.on_project_created)
        if container.settings.chain == "rpc":  # a bad configuration stops start-up; a node that is down does not
            try:
                await runtime.get()
            except Unavailable:
                runtime.keep_opening(max(container.settings.chain_poll_seconds, 0.05) * 5)
        yield
        container.deps.project_created_hooks.remove(runtime.on_project_created)
        await runtime.close()

    return ctx
