"""USDC in and out: deposits (verified on chain, credited once), payouts from the treasury, and
settlement batches that pay on-chain projects' settled costs to the revenue address.

Chain I/O never happens inside a unit of work except the one-time seeding of a sender's nonce row:
callers look a transaction up (or take fee caps) first and hand the result in. Signing is pure CPU, so
a payout is held, given its nonce, signed and stored — raw bytes and hash — in ONE transaction; the
worker then broadcasts those exact bytes, as often as it takes, and finalises exactly once (every
status change is a conditional UPDATE from the expected status).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec
from msgspec import Meta

from domain.base import Page, PageRequest, new_id, utcnow
from domain.chain import (
    ZERO_ADDRESS,
    Chain,
    ChainReceipt,
    Fees,
    TokenTransfer,
    TxLookup,
    checksum_address,
    micros_to_units,
    normalize_address,
    normalize_tx_hash,
    parse_signature,
    units_to_micros,
)
from domain.errors import (
    Conflict,
    DomainError,
    InsufficientFunds,
    InvalidRequest,
    NotFound,
    PolicyViolation,
    Unavailable,
)
from domain.policies import recipient_refusal

if TYPE_CHECKING:
    from domain.scope import Scope

MAX_PAYOUT_MICROS = 10**15
PENDING_DEPOSIT_TTL = timedelta(hours=1)  # a claimed transaction the chain never heard of is given up after this
PaymentStatus = Literal["pending", "submitted", "confirmed", "failed"]


class DepositRejected(DomainError):
    """The transaction is not a deposit this project can claim (reason in details)."""

    code = "deposit_rejected"
    status = 422


class InvalidSignature(DomainError):
    """A deposit sender's signature does not prove that the caller holds the address's key."""

    code = "invalid_signature"
    status = 422


# ---------------------------------------------------------------- entities and commands
class Payment(msgspec.Struct, kw_only=True):
    id: str
    project_id: str | None  # None for a settlement batch
    kind: str  # payout | settlement
    status: str  # pending | submitted | confirmed | failed
    chain_id: int
    token_address: str
    from_address: str
    to_address: str
    amount_micros: int
    nonce: int
    tx_hash: str
    block_number: int | None = None
    confirmations: int = 0
    error: str | None = None
    created_by: str
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime | None = None
    finalized_at: datetime | None = None


class Deposit(msgspec.Struct, kw_only=True):
    id: str
    project_id: str
    status: str  # pending | confirmed | failed
    chain_id: int
    tx_hash: str
    log_index: int  # -1 until the transaction is mined
    token_address: str
    from_address: str | None = None
    to_address: str | None = None
    amount_micros: int = 0
    block_number: int | None = None
    confirmations: int = 0
    error: str | None = None
    created_by: str
    created_at: datetime
    updated_at: datetime
    credited_at: datetime | None = None


class DepositSender(msgspec.Struct, kw_only=True):
    chain_id: int
    address: str
    project_id: str
    created_at: datetime


class DepositInfo(msgspec.Struct, kw_only=True):
    """Where and how to pay USDC into a project's wallet."""

    project_id: str
    chain_id: int
    token_address: str
    decimals: int
    deposit_address: str  # the project's own address: any sender
    treasury_address: str  # the shared address: only from registered senders
    registered_senders: list[str]
    confirmations_required: int


class SettlementBatch(msgspec.Struct, kw_only=True):
    id: str
    payment_id: str
    status: str
    total_micros: int
    request_count: int
    tx_hash: str
    created_at: datetime
    updated_at: datetime


class UnbatchedCost(msgspec.Struct, frozen=True):
    request_id: str
    project_id: str
    cost_micros: int
    settled_at: datetime


TxHash = Annotated[str, Meta(pattern=r"^(0x)?[0-9a-fA-F]{64}$", description="a transaction hash (64 hex digits)")]
Address = Annotated[str, Meta(pattern=r"^(0x)?[0-9a-fA-F]{40}$", description="an address: 40 hex digits, 0x first")]


class DepositClaim(msgspec.Struct, forbid_unknown_fields=True):
    tx_hash: TxHash


class WithdrawalCreate(msgspec.Struct, forbid_unknown_fields=True):
    to_address: Address
    amount_micros: Annotated[int, Meta(gt=0, le=MAX_PAYOUT_MICROS)]
    memo: Annotated[str, Meta(max_length=500)] = ""


Signature = Annotated[str, Meta(pattern=r"^(0x)?[0-9a-fA-F]{130}$",
                                  description="a signature: 130 hex digits, 0x first")]


class SenderRegister(msgspec.Struct, forbid_unknown_fields=True):
    address: Address
    signature: Signature  # EIP-191 personal_sign of the challenge message by the address's key


class SenderChallenge(msgspec.Struct, kw_only=True):
    """The text a would-be deposit sender signs (``personal_sign``) to prove it holds the address's key."""

    address: str
    message: str
    project_id: str
    chain_id: int


# ---------------------------------------------------------------- the repository port (storage/payments.py)
class PaymentRepo(Protocol):
    async def insert_payment(self, payment: Payment, raw_tx: bytes, idempotency_key: str | None,
                             request_hash: str | None) -> None: ...
    async def get_payment(self, payment_id: str) -> Payment | None: ...
    async def by_idempotency(self, project_id: str, key: str) -> tuple[Payment, str | None] | None: ...
    async def payments(self, project_id: str, page: PageRequest) -> Page[Payment]: ...
    async def unfinished(self, chain_id: int, sender: str, limit: int) -> list[tuple[Payment, bytes]]: ...
    async def move_payment(self, payment_id: str, from_status: tuple[str, ...], **values: Any) -> Payment | None: ...
    async def unfinished_on_chain(self, chain_id: int, limit: int) -> list[Payment]: ...
    async def forget_nonces(self, chain_id: int) -> None: ...
    async def record_attempt(self, payment_id: str, error: str, now: datetime) -> None: ...
    async def allocate_nonce(self, chain_id: int, address: str, seed: int | None, now: datetime) -> int | None: ...
    async def raise_nonce(self, chain_id: int, address: str, at_least: int, now: datetime) -> None: ...
    async def insert_deposit(self, deposit: Deposit) -> None: ...
    async def deposits_for_tx(self, chain_id: int, tx_hash: str) -> list[Deposit]: ...
    async def get_deposit(self, deposit_id: str) -> Deposit | None: ...
    async def deposits(self, project_id: str, page: PageRequest) -> Page[Deposit]: ...
    async def pending_deposits(self, chain_id: int, limit: int) -> list[Deposit]: ...
    async def move_deposit(self, deposit_id: str, from_status: tuple[str, ...], **values: Any) -> Deposit | None: ...
    async def add_sender(self, sender: DepositSender) -> None: ...
    async def senders(self, chain_id: int, project_id: str) -> list[str]: ...
    async def unbatched_costs(self, limit: int) -> list[UnbatchedCost]: ...
    async def assign_batch(self, request_ids: list[str], batch_id: str, tx_hash: str) -> int: ...
    async def unassign_batch(self, batch_id: str) -> int: ...
    async def insert_batch(self, batch: SettlementBatch) -> None: ...
    async def batch_for_payment(self, payment_id: str) -> SettlementBatch | None: ...
    async def move_batch(self, batch_id: str, status: str, now: datetime) -> None: ...


def request_hash(value: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def deposit_transfers(receipt: ChainReceipt, *, token_address: str, deposit_address: str,
                      shared_address: str | None = None, senders: frozenset[str] = frozenset()) -> list[TokenTransfer]:
    """The receipt's transfers that pay this project: emitted by the token (never a look-alike contract or
    Arc's system log), to the project's own address, or to the shared address from a registered sender."""
    own = normalize_address(deposit_address)
    shared = normalize_address(shared_address) if shared_address else None
    return [t for t in receipt.token_transfers(token_address)
            if t.units > 0 and (t.recipient == own or (shared is not None and t.recipient == shared
                                                       and t.sender in senders))]


def sender_challenge_message(*, address: str, project_id: str, chain_id: int, treasury_address: str) -> str:
    """What a deposit sender signs. It names the project, the chain and the treasury, so a signature given
    for one project (or chain, or deployment) proves nothing for another; it is derived, not stored, so the
    same inputs always give the same text."""
    return ("SmartSpace deposit sender\n\n"
            f"I control {checksum_address(address)} and ask that its USDC transfers to the treasury "
            f"{checksum_address(treasury_address)} be credited to project {project_id}.\n\n"
            f"Project: {project_id}\nAddress: {normalize_address(address)}\nChain ID: {chain_id}")


def _rejection_reason(receipt: ChainReceipt, token_address: str, deposit_address: str) -> str:
    own = normalize_address(deposit_address)
    if any(t.recipient == own for t in receipt.transfers if t.emitter != normalize_address(token_address)):
        return "wrong_token"
    return "wrong_recipient"


# ---------------------------------------------------------------- the service
class Payments:
    """``scope.payments``: deposits, payouts and settlement batches for one unit of work."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.repo: PaymentRepo = scope.store.payments

    @property
    def chain(self) -> Chain:
        chain = self.scope.deps.chain
        if chain is None:
            raise Unavailable("the chain is not connected yet; try again shortly")
        return chain

    @property
    def confirmations_required(self) -> int:
        return self.scope.deps.confirmations

    # ------------------------------------------------------------ deposit addresses and senders
    async def deposit_address(self, project_id: str) -> str:
        """The project's own deposit address, stored in its wallet the first time (write scope)."""
        wallet = await self.scope.wallets.get(project_id)
        address = self.chain.deposit_address(project_id)
        if wallet.deposit_address != address:
            await self.scope.wallets.set_deposit_address(project_id, address)
        return address

    async def deposit_info(self, project_id: str) -> DepositInfo:
        await self.scope.projects.require(project_id, "viewer")
        chain = self.chain
        return DepositInfo(project_id=project_id, chain_id=chain.chain_id, token_address=chain.token_address,
                           decimals=chain.decimals, deposit_address=await self.deposit_address(project_id),
                           treasury_address=chain.treasury_address,
                           registered_senders=await self.repo.senders(chain.chain_id, project_id),
                           confirmations_required=self.confirmations_required)

    def _sender_address(self, raw: str) -> str:
        address = normalize_address(raw, "address")
        if address in (ZERO_ADDRESS, self.chain.treasury_address, self.chain.token_address):
            raise InvalidRequest("this address cannot be registered as a deposit sender", {"address": raw})
        return address

    async def sender_challenge(self, project_id: str, raw_address: str) -> SenderChallenge:
        """GET .../deposit-senders/challenge: the message the address's key must sign to register it."""
        await self.scope.projects.require(project_id, "admin")
        address, chain = self._sender_address(raw_address), self.chain
        return SenderChallenge(address=address, project_id=project_id, chain_id=chain.chain_id,
                               message=sender_challenge_message(address=address, project_id=project_id,
                                                                chain_id=chain.chain_id,
                                                                treasury_address=chain.treasury_address))

    async def register_sender(self, project_id: str, cmd: SenderRegister) -> DepositSender:
        """A sender address whose transfers to the shared treasury address count for this project — only
        with proof that the caller holds its key (anyone can see a wallet's transfers to the treasury
        on chain; without the proof they could claim them)."""
        challenge = await self.sender_challenge(project_id, cmd.address)
        address = challenge.address
        signer = self.chain.recover_signer(challenge.message, parse_signature(cmd.signature))
        if signer != address:
            raise InvalidSignature("the signature was not made by this address's key over the challenge message "
                                   "(GET .../deposit-senders/challenge?address=)", {"address": cmd.address})
        sender = DepositSender(chain_id=self.chain.chain_id, address=address, project_id=project_id,
                               created_at=utcnow())
        await self.repo.add_sender(sender)  # Conflict if any project registered it already
        return sender

    # ------------------------------------------------------------ deposits
    async def claim_deposit(self, project_id: str, tx_hash: str, lookup: TxLookup) -> Deposit:
        """POST /deposits: verify the looked-up transaction and record (and, when confirmed, credit) each of
        its transfers into this project. A transfer is claimed once across all projects."""
        await self.scope.projects.require(project_id, "member")
        chain = self.chain
        tx_hash = normalize_tx_hash(tx_hash)
        claimed = await self.repo.deposits_for_tx(chain.chain_id, tx_hash)
        if claimed:
            mine = [d.id for d in claimed if d.project_id == project_id]
            raise Conflict("this transaction has already been claimed as a deposit",
                           {"tx_hash": tx_hash, **({"deposit_id": mine[0]} if mine else {})})
        if not lookup.known:
            raise DepositRejected("the chain does not know this transaction",
                                  {"tx_hash": tx_hash, "reason": "not_found"})
        deposit_address = await self.deposit_address(project_id)
        now = utcnow()
        if lookup.receipt is None:  # in the pool, not mined: the watcher verifies it later
            deposit = Deposit(id=new_id("dep"), project_id=project_id, status="pending", chain_id=chain.chain_id,
                              tx_hash=tx_hash, log_index=-1, token_address=chain.token_address,
                              to_address=deposit_address, created_by=self.scope.actor.label, created_at=now,
                              updated_at=now)
            await self.repo.insert_deposit(deposit)
            return deposit
        transfers = await self._verify(project_id, lookup.receipt, deposit_address)
        confirmed = lookup.confirmations >= self.confirmations_required
        first: Deposit | None = None
        for transfer in transfers:
            deposit = self._deposit_from(project_id, lookup.receipt, transfer, now, lookup.confirmations)
            await self.repo.insert_deposit(deposit)
            if confirmed:
                deposit = await self._credit(deposit)
            first = first or deposit
        assert first is not None
        return first

    async def _verify(self, project_id: str, receipt: ChainReceipt, deposit_address: str) -> list[TokenTransfer]:
        chain = self.chain
        if receipt.status != 1:
            raise DepositRejected("the transaction failed (reverted) on chain",
                                  {"tx_hash": receipt.tx_hash, "reason": "reverted"})
        senders = frozenset(await self.repo.senders(chain.chain_id, project_id))
        transfers = deposit_transfers(receipt, token_address=chain.token_address, deposit_address=deposit_address,
                                      shared_address=chain.treasury_address, senders=senders)
        transfers = [t for t in transfers if units_to_micros(t.units, chain.decimals) > 0]
        if not transfers:
            reason = _rejection_reason(receipt, chain.token_address, deposit_address)
            raise DepositRejected(
                "the transaction pays no USDC to this project's deposit address (or to the treasury from a "
                "sender this project registered)",
                {"tx_hash": receipt.tx_hash, "reason": reason, "deposit_address": deposit_address,
                 "token_address": chain.token_address})
        return transfers

    def _deposit_from(self, project_id: str, receipt: ChainReceipt, transfer: TokenTransfer, now: datetime,
                      confirmations: int) -> Deposit:
        chain = self.chain
        return Deposit(id=new_id("dep"), project_id=project_id, status="pending", chain_id=chain.chain_id,
                       tx_hash=receipt.tx_hash, log_index=transfer.log_index, token_address=transfer.emitter,
                       from_address=transfer.sender, to_address=transfer.recipient,
                       amount_micros=units_to_micros(transfer.units, chain.decimals),
                       block_number=receipt.block_number, confirmations=confirmations,
                       created_by=self.scope.actor.label, created_at=now, updated_at=now)

    async def _credit(self, deposit: Deposit) -> Deposit:
        now = utcnow()
        moved = await self.repo.move_deposit(deposit.id, ("pending",), status="confirmed", credited_at=now,
                                             updated_at=now)
        if moved is None:  # someone else credited it
            return deposit
        await self.scope.wallets.credit(deposit.project_id, deposit.amount_micros, kind="deposit", ref=deposit.id,
                                        memo=f"USDC deposit {deposit.tx_hash}#{deposit.log_index}")
        moved.confirmations = deposit.confirmations
        self.scope.emit(deposit.project_id, "deposit.credited", {
            "deposit_id": deposit.id, "project_id": deposit.project_id, "tx_hash": deposit.tx_hash,
            "log_index": deposit.log_index, "amount_micros": deposit.amount_micros,
            "from_address": deposit.from_address, "to_address": deposit.to_address,
            "block_number": deposit.block_number})
        return moved

    async def recheck_deposit(self, deposit: Deposit, lookup: TxLookup) -> Deposit | None:
        """The watcher's step for one pending deposit (system scope)."""
        now = utcnow()
        if lookup.receipt is None:
            if not lookup.known and now - deposit.created_at > PENDING_DEPOSIT_TTL:
                return await self.repo.move_deposit(deposit.id, ("pending",), status="failed", updated_at=now,
                                                    error="the chain never saw this transaction")
            return None
        confirmed = lookup.confirmations >= self.confirmations_required
        if deposit.log_index >= 0:
            if lookup.receipt.status != 1:  # only possible after a reorg
                return await self.repo.move_deposit(deposit.id, ("pending",), status="failed", updated_at=now,
                                                    error="reverted")
            deposit.confirmations = lookup.confirmations
            return await self._credit(deposit) if confirmed else None
        # Claimed while still in the pool: verify now that the receipt exists.
        try:
            transfers = await self._verify(deposit.project_id, lookup.receipt, deposit.to_address or "")
        except DepositRejected as exc:
            return await self.repo.move_deposit(deposit.id, ("pending",), status="failed", updated_at=now,
                                                error=str(exc.details.get("reason", exc.message)))
        if not confirmed:
            return None
        first, *rest = transfers
        resolved = self._deposit_from(deposit.project_id, lookup.receipt, first, now, lookup.confirmations)
        moved = await self.repo.move_deposit(
            deposit.id, ("pending",), log_index=first.log_index, token_address=first.emitter,
            from_address=first.sender, to_address=first.recipient, amount_micros=resolved.amount_micros,
            block_number=lookup.receipt.block_number, updated_at=now)
        if moved is None:
            return None
        moved.confirmations = lookup.confirmations
        result = await self._credit(moved)
        for transfer in rest:
            extra = self._deposit_from(deposit.project_id, lookup.receipt, transfer, now, lookup.confirmations)
            await self.repo.insert_deposit(extra)
            await self._credit(extra)
        return result

    async def get_deposit(self, deposit_id: str) -> Deposit:
        deposit = await self.repo.get_deposit(deposit_id)
        if deposit is None:
            raise NotFound("deposit not found", {"deposit_id": deposit_id})
        await self.scope.projects.require(deposit.project_id, "viewer")
        return deposit

    async def list_deposits(self, project_id: str, page: PageRequest) -> Page[Deposit]:
        await self.scope.projects.require(project_id, "viewer")
        return await self.repo.deposits(project_id, page)

    # ------------------------------------------------------------ payouts
    async def withdraw(self, project_id: str, cmd: WithdrawalCreate, idempotency_key: str | None,
                       fees: Fees) -> Payment:
        """POST /withdrawals: hold the amount, take the next nonce, sign, store — one transaction. The key
        is claimed once per project by server/idempotency.py; the payment keeps it (unique per project)."""
        await self.scope.projects.require(project_id, "admin")
        if not idempotency_key or len(idempotency_key) > 200:
            raise InvalidRequest("an Idempotency-Key header (1-200 characters) is required to move money",
                                 {"header": "Idempotency-Key"})
        to_address = normalize_address(cmd.to_address, "to_address")
        fingerprint = request_hash({"to_address": to_address, "amount_micros": cmd.amount_micros, "memo": cmd.memo})
        chain = self.chain
        if to_address == ZERO_ADDRESS:
            raise InvalidRequest("cannot pay out to the zero address", {"to_address": cmd.to_address})
        if to_address in (chain.token_address, chain.treasury_address):
            raise InvalidRequest("cannot pay out to the token contract or the treasury itself",
                                 {"to_address": cmd.to_address})
        units = micros_to_units(cmd.amount_micros, chain.decimals)
        refusal = recipient_refusal(await self.scope.policies.current(project_id),
                                    await self.scope.policies.current_system(), to_address)
        if refusal is not None:
            raise PolicyViolation(refusal.message, {"to_address": cmd.to_address, "rule": "allowed_recipients",
                                                    "scope": refusal.scope})
        payment_id = new_id("pay")
        await self.scope.wallets.hold(project_id, cmd.amount_micros, ref=payment_id)
        payment = await self._sign_and_store(payment_id, project_id, "payout", to_address, cmd.amount_micros, units,
                                             fees, idempotency_key, fingerprint)
        self.scope.emit(project_id, "payment.created", self._event(payment, memo=cmd.memo))
        self._wake_worker()
        return payment

    async def payout_for_key(self, project_id: str, idempotency_key: str) -> Payment | None:
        """The payout made with this Idempotency-Key, as it stands now."""
        await self.scope.projects.require(project_id, "viewer")
        found = await self.repo.by_idempotency(project_id, idempotency_key)
        return found[0] if found is not None else None

    def _wake_worker(self) -> None:
        worker = self.scope.deps.payment_worker
        if worker is not None:
            async def wake() -> None:
                worker.wake()

            self.scope.after_commit.append(wake)

    async def _sign_and_store(self, payment_id: str, project_id: str | None, kind: str, to_address: str,
                              amount_micros: int, units: int, fees: Fees, idempotency_key: str | None,
                              fingerprint: str | None) -> Payment:
        chain = self.chain
        now = utcnow()
        nonce = await self.repo.allocate_nonce(chain.chain_id, chain.treasury_address, None, now)
        if nonce is None:  # first transaction from this sender: seed the allocator from the node, once
            seed = await chain.next_nonce(chain.treasury_address)
            nonce = await self.repo.allocate_nonce(chain.chain_id, chain.treasury_address, seed, now)
            assert nonce is not None
        signed = chain.sign_transfer(to_address, units, nonce, fees)
        payment = Payment(id=payment_id, project_id=project_id, kind=kind, status="pending",
                          chain_id=chain.chain_id, token_address=chain.token_address,
                          from_address=signed.sender, to_address=to_address, amount_micros=amount_micros,
                          nonce=nonce, tx_hash=signed.tx_hash, created_by=self.scope.actor.label,
                          created_at=now, updated_at=now)
        await self.repo.insert_payment(payment, signed.raw_tx, idempotency_key, fingerprint)
        return payment

    async def get_payment(self, payment_id: str) -> Payment:
        payment = await self.repo.get_payment(payment_id)
        if payment is None or payment.project_id is None:  # settlement batches are not a project's
            raise NotFound("payment not found", {"payment_id": payment_id})
        await self.scope.projects.require(payment.project_id, "viewer")
        return payment

    async def list_payments(self, project_id: str, page: PageRequest) -> Page[Payment]:
        await self.scope.projects.require(project_id, "viewer")
        return await self.repo.payments(project_id, page)

    # ------------------------------------------------------------ the worker's transitions (system scope)
    async def mark_submitted(self, payment: Payment) -> Payment | None:
        now = utcnow()
        moved = await self.repo.move_payment(payment.id, ("pending",), status="submitted", submitted_at=now,
                                             updated_at=now, error=None)
        if moved is not None:
            await self._batch_status(moved, "submitted")
            if moved.project_id:
                self.scope.emit(moved.project_id, "payment.submitted", self._event(moved))
        return moved

    async def note_attempt(self, payment: Payment, error: str) -> None:
        await self.repo.record_attempt(payment.id, error[:500], utcnow())

    async def finalize(self, payment: Payment, receipt: ChainReceipt | None, *, error: str | None = None,
                       confirmations: int = 0) -> Payment | None:
        """Confirmed (receipt status 1) captures the hold; failed (reverted, or the nonce was taken by another
        transaction) gives it back. Exactly once: the status moves only from pending/submitted."""
        now = utcnow()
        ok = receipt is not None and receipt.status == 1
        status = "confirmed" if ok else "failed"
        if error is None and not ok:
            error = "the transfer reverted on chain"
        moved = await self.repo.move_payment(
            payment.id, ("pending", "submitted"), status=status, finalized_at=now, updated_at=now,
            block_number=receipt.block_number if receipt else None, error=error)
        if moved is None:
            return None
        moved.confirmations = confirmations
        if moved.project_id:
            if ok:
                await self.scope.wallets.capture(moved.project_id, moved.amount_micros, kind="withdrawal",
                                                 ref=moved.id, memo=f"USDC payout to {moved.to_address}")
            else:
                await self.scope.wallets.release(moved.project_id, moved.amount_micros, ref=moved.id)
            self.scope.emit(moved.project_id, f"payment.{status}", self._event(moved))
        await self._batch_status(moved, status)
        return moved

    async def forget_devnet_run(self, chain_id: int) -> int:
        """A new in-process devnet starts empty: transactions of an earlier run (same chain id, same database)
        can never be mined now. Fail them (holds go back; batched requests are re-batched), fail pending
        deposits, and let the nonce allocator re-seed from the new chain. Never called for a real chain."""
        failed = 0
        for payment in await self.repo.unfinished_on_chain(chain_id, 10_000):
            failed += int(await self.finalize(payment, None, error="the devnet was restarted") is not None)
        for deposit in await self.repo.pending_deposits(chain_id, 10_000):
            await self.repo.move_deposit(deposit.id, ("pending",), status="failed", updated_at=utcnow(),
                                         error="the devnet was restarted")
        await self.repo.forget_nonces(chain_id)
        return failed

    def _event(self, payment: Payment, **extra: Any) -> dict[str, Any]:
        return {"payment_id": payment.id, "project_id": payment.project_id, "kind": payment.kind,
                "status": payment.status, "amount_micros": payment.amount_micros,
                "to_address": payment.to_address, "tx_hash": payment.tx_hash, "nonce": payment.nonce,
                "block_number": payment.block_number, "error": payment.error, **extra}

    # ------------------------------------------------------------ settlement batches (system scope)
    async def settle_batch(self, fees: Fees, *, min_micros: int, max_age_seconds: float, now: datetime,
                           treasury_micros: int | None = None, limit: int = 2000) -> SettlementBatch | None:
        """Pay the unbatched settled costs of on-chain projects to the revenue address in one transaction,
        when they add up to ``min_micros`` or the oldest waited ``max_age_seconds``. The batch's tx hash is
        written to every request in it, in the same transaction that signs it. A treasury that cannot cover
        the batch (``treasury_micros``, read before) raises InsufficientFunds rather than sending a transfer
        that would revert, be re-batched and revert again, burning gas every round."""
        chain = self.chain
        if chain.revenue_address is None:
            return None
        costs = await self.repo.unbatched_costs(limit)
        if not costs:
            return None
        total = sum(c.cost_micros for c in costs)
        oldest = min(c.settled_at for c in costs)
        if total < min_micros and (now - oldest).total_seconds() < max_age_seconds:
            return None
        if treasury_micros is not None and treasury_micros < total:
            raise InsufficientFunds("the treasury cannot cover the settlement batch",
                                    {"total_micros": total, "treasury_micros": treasury_micros})
        batch_id = new_id("stb")
        payment = await self._sign_and_store(new_id("pay"), None, "settlement", chain.revenue_address, total,
                                             micros_to_units(total, chain.decimals), fees, None, None)
        ids = [c.request_id for c in costs]
        if await self.repo.assign_batch(ids, batch_id, payment.tx_hash) != len(ids):
            raise Conflict("another process batched some of these requests first", {"batch_id": batch_id})
        batch = SettlementBatch(id=batch_id, payment_id=payment.id, status="pending", total_micros=total,
                                request_count=len(ids), tx_hash=payment.tx_hash, created_at=payment.created_at,
                                updated_at=payment.created_at)
        await self.repo.insert_batch(batch)
        return batch

    async def _batch_status(self, payment: Payment, status: str) -> None:
        if payment.kind != "settlement":
            return
        batch = await self.repo.batch_for_payment(payment.id)
        if batch is None:
            return
        await self.repo.move_batch(batch.id, status, utcnow())
        if status == "failed":  # its requests go back into the next batch, under a new transaction
            await self.repo.unassign_batch(batch.id)
