"""The chain port: what the payments domain needs from an EVM chain holding a USDC ERC-20.

Amounts cross this boundary in two units and are converted only here: the domain counts micro-USDC
(``*_micros``), the token counts its own base units (``10**decimals`` per USDC; 6 for USDC, so the
two coincide). Native balances (18 decimals on Arc) never enter the domain: gas is the chain
implementation's business.
"""

from __future__ import annotations

from typing import Literal, Protocol

import msgspec

from domain.errors import InvalidRequest

MICROS_DECIMALS = 6
ZERO_ADDRESS = "0x" + "0" * 40


def micros_to_units(amount_micros: int, decimals: int) -> int:
    """micro-USDC → token base units (exact: a token with fewer than 6 decimals cannot carry every micro)."""
    if decimals >= MICROS_DECIMALS:
        return amount_micros * 10 ** (decimals - MICROS_DECIMALS)
    factor = 10 ** (MICROS_DECIMALS - decimals)
    if amount_micros % factor:
        raise InvalidRequest(f"amount must be a multiple of {factor} micro-USDC for a {decimals}-decimal token")
    return amount_micros // factor


def units_to_micros(units: int, decimals: int) -> int:
    """Token base units → micro-USDC, rounded down (dust below one micro is not credited)."""
    if decimals >= MICROS_DECIMALS:
        return units // 10 ** (decimals - MICROS_DECIMALS)
    return units * 10 ** (MICROS_DECIMALS - decimals)


def _normalize_hex(value: str, digits: int, what: str, field: str) -> str:
    """Lower-case 0x-prefixed hex of exactly ``digits`` digits; raises InvalidRequest naming ``what`` otherwise."""
    text = value.strip().lower() if isinstance(value, str) else ""
    if not text.startswith("0x"):
        text = "0x" + text
    if len(text) != 2 + digits or any(c not in "0123456789abcdef" for c in text[2:]):
        raise InvalidRequest(f"not {what} (0x + {digits} hex digits)", {field: value})
    return text


def normalize_address(value: str) -> str:
    """Lower-case 0x-prefixed 20-byte hex; raises InvalidRequest otherwise. Compare addresses only in this form."""
    return _normalize_hex(value, 40, "an EVM address", "address")


def normalize_tx_hash(value: str) -> str:
    return _normalize_hex(value, 64, "a transaction hash", "tx_hash")


class TokenTransfer(msgspec.Struct, frozen=True, kw_only=True):
    """One ERC-20 ``Transfer`` log as found in a receipt (addresses normalised, value in token units)."""

    emitter: str  # the contract that emitted the log
    sender: str
    recipient: str
    units: int
    log_index: int


class ChainReceipt(msgspec.Struct, frozen=True, kw_only=True):
    tx_hash: str
    status: int  # 1 success, 0 reverted
    block_number: int
    sender: str
    transfers: tuple[TokenTransfer, ...] = ()

    def token_transfers(self, token_address: str) -> list[TokenTransfer]:
        """Only the logs the configured token emitted. On Arc one transfer also emits a second Transfer log
        from a system address; counting it would double every deposit."""
        token = normalize_address(token_address)
        return [t for t in self.transfers if t.emitter == token]


class TxLookup(msgspec.Struct, frozen=True, kw_only=True):
    """What the chain knows about a transaction hash right now."""

    known: bool  # mined or waiting in the node's pool
    receipt: ChainReceipt | None = None
    confirmations: int = 0  # head - block + 1 when mined


class Fees(msgspec.Struct, frozen=True):
    """EIP-1559 fee caps in native wei, taken before a unit of work so signing needs no I/O."""

    max_fee_per_gas: int
    max_priority_fee_per_gas: int


class SignedTransfer(msgspec.Struct, frozen=True, kw_only=True):
    tx_hash: str
    raw_tx: bytes
    sender: str
    recipient: str
    nonce: int
    units: int


BroadcastOutcome = Literal["sent", "known", "nonce_used", "retry"]


class Chain(Protocol):
    """An EVM chain holding the USDC token, with the platform's treasury account able to sign."""

    chain_id: int
    token_address: str  # normalised
    decimals: int
    treasury_address: str  # normalised; never the key
    revenue_address: str | None  # where on-chain settlement pays; None disables it

    async def lookup(self, tx_hash: str) -> TxLookup: ...

    async def fees(self) -> Fees: ...

    async def next_nonce(self, address: str) -> int:
        """The node's pending nonce for ``address`` (seeds the database allocator once)."""
        ...

    def sign_transfer(self, recipient: str, units: int, nonce: int, fees: Fees) -> SignedTransfer:
        """The treasury signs ``token.transfer(recipient, units)``; pure CPU, no I/O."""
        ...

    async def broadcast(self, raw_tx: bytes) -> tuple[BroadcastOutcome, str]:
        """Send signed bytes. ``known``: already in the pool or mined (a retry); ``nonce_used``: the nonce is
        spent, check the hash; ``retry``: transient (node down, nonce gap) — try the same bytes later."""
        ...

    def deposit_address(self, project_id: str) -> str:
        """The project's own deposit address (deterministic; stored in its wallet on first use)."""
        ...

    async def token_balance(self, address: str) -> int: ...
