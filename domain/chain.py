"""The chain port: what the payments domain needs from an EVM chain holding a USDC ERC-20.

Amounts cross this boundary in two units and are converted only here: the domain counts micro-USDC
(``*_micros``), the token counts its own base units (``10**decimals`` per USDC; 6 for USDC, so the
two coincide). Native balances (18 decimals on Arc) never enter the domain: gas is the chain
implementation's business.
"""

from __future__ import annotations

from typing import Literal, Protocol

import msgspec
from eth_utils.crypto import keccak

from domain.errors import InvalidRequest

MICROS_DECIMALS = 6
ZERO_ADDRESS = "0x" + "0" * 40


def _pow10(exponent: int) -> int:
    """10**exponent for exponent >= 0 (typed: ``int ** int`` is ``Any`` to a type checker, a float below 0)."""
    result: int = 10**exponent
    return result


def micros_to_units(amount_micros: int, decimals: int) -> int:
    """micro-USDC → token base units (exact: a token with fewer than 6 decimals cannot carry every micro)."""
    if decimals >= MICROS_DECIMALS:
        return amount_micros * _pow10(decimals - MICROS_DECIMALS)
    factor = _pow10(MICROS_DECIMALS - decimals)
    if amount_micros % factor:
        raise InvalidRequest(f"amount must be a multiple of {factor} micro-USDC for a {decimals}-decimal token")
    return amount_micros // factor


def units_to_micros(units: int, decimals: int) -> int:
    """Token base units → micro-USDC, rounded down (dust below one micro is not credited)."""
    if decimals >= MICROS_DECIMALS:
        return units // _pow10(decimals - MICROS_DECIMALS)
    return units * _pow10(MICROS_DECIMALS - decimals)


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _hex_digits(value: object, digits: int, what: str, field: str) -> str:
    """The hex digits of ``value`` as given ("0x" prefix optional), exactly ``digits`` of them. Nothing is
    stripped: a space or a trailing newline is refused, never silently repaired. InvalidRequest names
    ``field``."""
    text = value if isinstance(value, str) else ""
    body = text[2:] if text[:2] in ("0x", "0X") else text
    if len(body) != digits or not _HEX_DIGITS.issuperset(body):
        raise InvalidRequest(f"{field} is not {what} (0x + {digits} hex digits, nothing else)", {field: value})
    return body


def checksum_address(address: str) -> str:
    """EIP-55: a hex letter is upper case where the same nibble of keccak256(lower-case hex) is >= 8."""
    body = address[2:].lower() if address[:2] in ("0x", "0X") else address.lower()
    digest = keccak(body.encode()).hex()
    return "0x" + "".join(c.upper() if int(h, 16) >= 8 else c for c, h in zip(body, digest[:40], strict=True))


def normalize_address(value: str, field: str = "address") -> str:
    """Lower-case 0x-prefixed 20-byte hex; compare addresses only in this form. All-lower or all-upper hex
    is accepted as is; mixed case is a checksum and must be EIP-55's, or the address was mistyped
    (InvalidRequest naming ``field`` otherwise)."""
    body = _hex_digits(value, 40, "an EVM address", field)
    if body != body.lower() and body != body.upper() and checksum_address(body)[2:] != body:
        raise InvalidRequest(f"{field} has mixed case but fails its EIP-55 checksum: a mistyped address?",
                             {field: value})
    return "0x" + body.lower()


def parse_signature(value: str, field: str = "signature") -> bytes:
    """A 65-byte secp256k1 signature (r, s, v) given as hex, as ``personal_sign`` returns it."""
    return bytes.fromhex(_hex_digits(value, 130, "a 65-byte signature", field))


def normalize_tx_hash(value: str, field: str = "tx_hash") -> str:
    """Lower-case 0x-prefixed 32-byte hex (hashes carry no checksum: any case)."""
    return "0x" + _hex_digits(value, 64, "a transaction hash", field).lower()


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

    def recover_signer(self, message: str, signature: bytes) -> str | None:
        """The (normalised) address whose key made this EIP-191 ``personal_sign`` signature of ``message``;
        None if no key could have (a malformed signature). Pure CPU, no I/O."""
        ...

    def deposit_address(self, project_id: str) -> str:
        """The project's own deposit address (deterministic; stored in its wallet on first use)."""
        ...

    async def token_balance(self, address: str) -> int: ...
