"""The project wallet: a ledger of signed entries, and holds (reservations) against its balance.

``balance_micros`` on the wallet row is maintained in the same transaction as every ledger entry, so
it always equals the sum of the project's entries (tests check it after every scenario). Holds are
one conditional UPDATE (``reserved = reserved + n WHERE balance - reserved >= n``): never a
read-then-write, so concurrent holds from any number of processes cannot overdraw the wallet, and
the table's CHECK constraints back that up.

Other areas (payments) call this service inside their own unit of work: ``scope.wallets``.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import msgspec
from msgspec import Meta

from domain.base import Page, PageRequest, new_id, utcnow
from domain.errors import Conflict, Forbidden, InsufficientFunds, InvalidRequest, NotFound

if TYPE_CHECKING:
    from domain.scope import Scope

MAX_MICROS = 10**15  # a billion USDC: anything above is a typo, not a top-up


class Wallet(msgspec.Struct, kw_only=True):
    project_id: str
    balance_micros: int
    reserved_micros: int
    available_micros: int
    deposit_address: str | None
    updated_at: datetime
    currency: str = "USDC"


class LedgerEntry(msgspec.Struct, kw_only=True):
    id: str
    project_id: str
    kind: str  # deposit | admin_credit | spend | withdrawal | refund | ...
    amount_micros: int  # credits > 0, debits < 0
    balance_after_micros: int
    ref: str | None
    memo: str
    actor: str
    created_at: datetime


class AdminCredit(msgspec.Struct, forbid_unknown_fields=True):
    amount_micros: Annotated[int, Meta(gt=0, le=MAX_MICROS)]
    reason: Annotated[str, Meta(min_length=1, max_length=500)]


class PlatformEntry(msgspec.Struct, kw_only=True):
    """A line of the platform's own ledger: what the platform earned (the fee on a settled request)."""

    id: str
    kind: str  # platform_fee (the insights' cost overruns are booked there too: overrun_absorbed, < 0)
    amount_micros: int
    ref: str | None  # the spend request
    project_id: str  # the project that paid it
    memo: str
    actor: str
    created_at: datetime


class PlatformTotals(msgspec.Struct, kw_only=True):
    balance_micros: int  # fees earned minus overruns absorbed
    entries: int
    by_kind: dict[str, int] = {}


class WalletRepo(Protocol):
    async def ensure(self, project_id: str, now: datetime) -> None: ...
    async def get(self, project_id: str) -> Wallet | None: ...
    async def add_balance(self, project_id: str, delta: int, now: datetime) -> Wallet | None: ...
    async def hold(self, project_id: str, amount: int, now: datetime) -> Wallet | None: ...
    async def release(self, project_id: str, amount: int, now: datetime) -> Wallet | None: ...
    async def capture(self, project_id: str, held: int, charge: int, now: datetime) -> Wallet | None: ...
    async def set_deposit_address(self, project_id: str, address: str, now: datetime) -> Wallet | None: ...
    async def deposit_addresses(self) -> list[tuple[str, str | None]]: ...
    async def append(self, entry: LedgerEntry) -> None: ...
    async def entries(self, project_id: str, page: PageRequest) -> Page[LedgerEntry]: ...
    async def ledger_totals(self, project_id: str, since: datetime, until: datetime) -> dict[str, int]: ...
    async def book_platform(self, entry: PlatformEntry) -> None: ...
    async def platform_totals(self) -> PlatformTotals: ...


def _positive(amount: int, name: str = "amount_micros") -> None:
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0 or amount > MAX_MICROS:
        raise InvalidRequest(f"{name} must be a positive integer of micro-USDC", {name: amount})


class Wallets:
    """``scope.wallets``. Every change emits ``wallet.updated`` with the new figures."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.repo: WalletRepo = scope.store.wallets

    # ------------------------------------------------------------ reads
    async def get(self, project_id: str) -> Wallet:
        """The wallet (created on first use if the project predates wallets). No role check."""
        wallet = await self.repo.get(project_id)
        if wallet is None:
            await self.repo.ensure(project_id, utcnow())
            wallet = await self.repo.get(project_id)
        assert wallet is not None
        return wallet

    async def view(self, project_id: str) -> Wallet:
        """GET /projects/{id}/wallet: any member (viewer and up)."""
        await self.scope.projects.get(project_id)
        wallet = await self.repo.get(project_id)
        if wallet is None:  # a read-only scope cannot create it; show the empty wallet it would be
            return Wallet(project_id=project_id, balance_micros=0, reserved_micros=0, available_micros=0,
                          deposit_address=None, updated_at=utcnow())
        return wallet

    async def ledger(self, project_id: str, page: PageRequest) -> Page[LedgerEntry]:
        await self.scope.projects.get(project_id)
        return await self.repo.entries(project_id, page)

    # ------------------------------------------------------------ changes (no role checks: callers do them)
    async def open(self, project_id: str) -> None:
        """Create the wallet row (the project-created hook)."""
        await self.repo.ensure(project_id, utcnow())

    async def credit(self, project_id: str, amount_micros: int, *, kind: str, ref: str | None,
                     memo: str = "") -> LedgerEntry:
        """Add money: a ledger entry of +amount and the balance moved with it, one transaction."""
        _positive(amount_micros)
        await self.get(project_id)
        wallet = await self.repo.add_balance(project_id, amount_micros, utcnow())
        assert wallet is not None
        entry = await self._entry(wallet, kind, amount_micros, ref, memo)
        self._updated(wallet, kind, amount_micros, ref, entry=entry)
        return entry

    async def hold(self, project_id: str, amount_micros: int, *, ref: str | None) -> Wallet:
        """reserved += n iff available >= n (one conditional UPDATE), else InsufficientFunds."""
        _positive(amount_micros)
        wallet = await self.repo.hold(project_id, amount_micros, utcnow())
        if wallet is None:
            current = await self.get(project_id)  # maybe created just now (lazily)
            wallet = await self.repo.hold(project_id, amount_micros, utcnow())
            if wallet is None:
                raise InsufficientFunds(
                    "the wallet does not hold enough available funds",
                    {"project_id": project_id, "requested_micros": amount_micros,
                     "available_micros": current.available_micros, "ref": ref})
        self._updated(wallet, "hold", amount_micros, ref)
        return wallet

    async def release(self, project_id: str, amount_micros: int, *, ref: str | None) -> Wallet:
        """reserved -= n (a hold given back)."""
        _positive(amount_micros)
        wallet = await self.repo.release(project_id, amount_micros, utcnow())
        if wallet is None:
            raise Conflict("the wallet holds less than the amount to release",
                           {"project_id": project_id, "amount_micros": amount_micros, "ref": ref})
        self._updated(wallet, "release", amount_micros, ref)
        return wallet

    async def capture(self, project_id: str, amount_micros: int, *, kind: str, ref: str | None, memo: str = "",
                      release_micros: int = 0) -> LedgerEntry | None:
        """Turn a hold into a debit: reserved -= n + release_micros, balance -= n, a debit entry of -n.

        ``release_micros`` gives back the unused rest of the hold in the same UPDATE (a settlement
        that cost less than reserved). ``amount_micros`` may be 0 (nothing charged): then no entry."""
        if amount_micros < 0 or release_micros < 0:
            raise InvalidRequest("amounts cannot be negative", {"amount_micros": amount_micros})
        held = amount_micros + release_micros
        if held == 0:
            return None
        wallet = await self.repo.capture(project_id, held, amount_micros, utcnow())
        if wallet is None:
            raise Conflict("the wallet holds less than the amount to capture",
                           {"project_id": project_id, "amount_micros": held, "ref": ref})
        entry = None
        if amount_micros:
            entry = await self._entry(wallet, kind, -amount_micros, ref, memo)
        self._updated(wallet, kind, -amount_micros, ref, entry=entry, released_micros=release_micros)
        return entry

    async def platform_fee(self, amount_micros: int, *, ref: str, payer: str) -> PlatformEntry:
        """Book the platform's fee on a request to its own ledger (in the transaction that charged the payer)."""
        _positive(amount_micros)
        entry = PlatformEntry(id=new_id("pld"), kind="platform_fee", amount_micros=amount_micros, ref=ref,
                              project_id=payer, memo="platform fee", actor=self.scope.actor.label,
                              created_at=utcnow())
        await self.repo.book_platform(entry)
        return entry

    async def platform_totals(self) -> PlatformTotals:
        """GET /admin/platform/ledger: platform admins only."""
        if not self.scope.actor.platform_admin:
            raise Forbidden("only platform admins can read the platform's ledger", {"required": "platform_admin"})
        return await self.repo.platform_totals()

    async def set_deposit_address(self, project_id: str, address: str) -> Wallet:
        await self.get(project_id)
        wallet = await self.repo.set_deposit_address(project_id, address, utcnow())
        assert wallet is not None
        self._updated(wallet, "deposit_address", 0, None)
        return wallet

    async def admin_credit(self, project_id: str, cmd: AdminCredit) -> LedgerEntry:
        """POST /admin/projects/{id}/credits: a platform admin's manual top-up (logged like any change)."""
        if not self.scope.actor.platform_admin:
            raise Forbidden("only platform admins can credit a wallet", {"required": "platform_admin"})
        project = await self.scope.store.projects.get(project_id)  # admins need not be members
        if project is None or project.status == "deleted":
            raise NotFound("project not found", {"project_id": project_id})
        return await self.credit(project_id, cmd.amount_micros, kind="admin_credit", ref=None, memo=cmd.reason)

    # ------------------------------------------------------------ helpers
    async def _entry(self, wallet: Wallet, kind: str, amount: int, ref: str | None, memo: str) -> LedgerEntry:
        entry = LedgerEntry(id=new_id("led"), project_id=wallet.project_id, kind=kind, amount_micros=amount,
                            balance_after_micros=wallet.balance_micros, ref=ref, memo=memo[:500],
                            actor=self.scope.actor.label, created_at=utcnow())
        await self.repo.append(entry)
        return entry

    def _updated(self, wallet: Wallet, change: str, amount: int, ref: str | None, *,
                 entry: LedgerEntry | None = None, **extra: Any) -> None:
        self.scope.emit(wallet.project_id, "wallet.updated", wallet_updated(wallet, change, amount, ref, entry=entry,
                                                                            **extra))


def wallet_updated(wallet: Wallet, change: str, amount: int, ref: str | None, *, entry: LedgerEntry | None = None,
                   **extra: Any) -> dict[str, Any]:
    """The data of a ``wallet.updated`` event (every path that moves a wallet's money builds it here)."""
    if entry is not None:
        extra["entry_id"] = entry.id
        extra["memo"] = entry.memo
    return {"project_id": wallet.project_id, "balance_micros": wallet.balance_micros,
            "reserved_micros": wallet.reserved_micros, "available_micros": wallet.available_micros,
            "change": {"kind": change, "amount_micros": amount, "ref": ref, **extra}}


async def open_wallet(scope: Scope, project: Any) -> None:
    """The project-created hook: every new project gets its wallet in the same unit of work."""
    await scope.wallets.open(project.id)
