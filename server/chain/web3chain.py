"""The chain port over web3.py 8: ``AsyncWeb3`` with ``AsyncHTTPProvider`` (Arc, any EVM RPC) or
``AsyncEthereumTesterProvider`` (the in-process devnet), signing with eth-account.

web3.py 8 traps handled here (DESIGN.md §9): ``HexBytes.hex()`` has no 0x prefix; a signed transaction
exposes ``.raw_transaction``; a reverted transaction gives a receipt with ``status == 0``; the HTTP
provider may retry ``eth_sendRawTransaction`` so "already known" / "nonce too low" are normal answers to
a re-send and are resolved by looking the hash up.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import aiohttp
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_keys.exceptions import BadSignature
from eth_typing import HexStr
from eth_utils.crypto import keccak
from web3 import AsyncWeb3
from web3.exceptions import ProviderConnectionError, TransactionNotFound, Web3RPCError
from web3.providers.rpc import AsyncHTTPProvider
from web3.types import RPCResponse

from domain.chain import BroadcastOutcome, Fees, SignedTransfer, TxLookup, normalize_address
from domain.errors import Unavailable
from domain.inputs import MAX_DEPTH, depth_exceeds
from server.chain.receipts import parse_receipt, to_hex

log = logging.getLogger("smartspace.chain")

TRANSFER_SELECTOR = bytes.fromhex("a9059cbb")  # transfer(address,uint256)
_KNOWN = ("already known", "known transaction", "alreadyknown", "already imported", "already exists")
_NONCE_USED = ("nonce too low", "oldnonce", "replacement transaction underpriced", "already been used")
_TESTER_NONCE = re.compile(r"invalid transaction nonce: expected (\d+), but got (\d+)")


P = ParamSpec("P")
R = TypeVar("R")
NODE_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, ProviderConnectionError, Web3RPCError)


def node_call(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """An unreachable or failing node is a 503 for the caller (and a retry for the worker), never a 500."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except NODE_ERRORS as exc:
            log.warning("chain node call %s failed: %s", fn.__name__, str(exc)[:300])
            raise Unavailable("the chain node is unreachable; try again shortly", {"call": fn.__name__}) from None

    return call


class GuardedHTTPProvider(AsyncHTTPProvider):
    """web3's ``AsyncHTTPProvider`` whose answers are depth-checked before they are parsed: a node (or
    whatever answers at its URL) sending JSON nested past ``MAX_DEPTH`` is a failing node, not a crash."""

    @staticmethod
    def decode_rpc_response(raw_response: bytes) -> RPCResponse:
        if depth_exceeds(raw_response):
            raise ProviderConnectionError(f"the node's answer nests JSON deeper than {MAX_DEPTH} levels")
        return AsyncHTTPProvider.decode_rpc_response(raw_response)


def encode_transfer(recipient: str, units: int) -> bytes:
    to = bytes.fromhex(normalize_address(recipient)[2:])
    return TRANSFER_SELECTOR + to.rjust(32, b"\0") + units.to_bytes(32, "big")


def classify_send_error(message: str) -> BroadcastOutcome:
    text = message.lower()
    if any(k in text for k in _KNOWN):
        return "known"
    if any(k in text for k in _NONCE_USED):
        return "nonce_used"
    match = _TESTER_NONCE.search(text)  # py-evm's wording
    if match:
        expected, got = int(match.group(1)), int(match.group(2))
        return "nonce_used" if got < expected else "retry"
    return "retry"


def recover_personal_signer(message: str, signature: bytes) -> str | None:
    """EIP-191 version 0x45 (``personal_sign``): the normalised address whose key signed ``message``."""
    try:
        signer = Account.recover_message(encode_defunct(text=message), signature=signature)
    except (BadSignature, ValueError):  # s above the curve order, v not 27/28, r/s off the curve
        return None
    return normalize_address(signer)


class _Treasury:
    """Holds the treasury key; its repr never shows it."""

    __slots__ = ("account",)

    def __init__(self, private_key: str | bytes) -> None:
        self.account: LocalAccount = Account.from_key(private_key)

    def __repr__(self) -> str:
        return f"<treasury {self.account.address}>"

    def derive(self, label: str) -> LocalAccount:
        """A deterministic child account (deposit addresses): keccak(treasury key ‖ label)."""
        return Account.from_key(keccak(bytes(self.account.key) + b"smartspace:" + label.encode()))


def deposit_address_of(treasury: _Treasury, project_id: str) -> str:
    """A project's deposit address: derived from the treasury key alone (no node needed)."""
    return normalize_address(treasury.derive(f"deposit:{project_id}").address)


class Web3Chain:
    def __init__(self, w3: AsyncWeb3, *, chain_id: int, token_address: str, decimals: int, treasury_key: str | bytes,
                 revenue_address: str | None, gas_limit: int = 120_000, min_priority_fee: int = 0) -> None:
        self.w3 = w3
        self.chain_id = chain_id
        self.token_address = normalize_address(token_address)
        self.decimals = decimals
        self._treasury = _Treasury(treasury_key)
        self.treasury_address = normalize_address(self._treasury.account.address)
        self.revenue_address = normalize_address(revenue_address) if revenue_address else None
        self.gas_limit = gas_limit
        self.min_priority_fee = min_priority_fee

    def __repr__(self) -> str:
        return f"<Web3Chain chain_id={self.chain_id} token={self.token_address} treasury={self.treasury_address}>"

    # ------------------------------------------------------------ reads
    @node_call
    async def head(self) -> int:
        return await self.w3.eth.block_number

    @node_call
    async def lookup(self, tx_hash: str) -> TxLookup:
        try:
            raw = await self.w3.eth.get_transaction_receipt(HexStr(tx_hash))
        except TransactionNotFound:
            raw = None
        if raw is not None:
            receipt = parse_receipt(raw)
            head = await self.head()
            return TxLookup(known=True, receipt=receipt, confirmations=max(0, head - receipt.block_number + 1))
        try:
            await self.w3.eth.get_transaction(HexStr(tx_hash))
        except TransactionNotFound:
            return TxLookup(known=False)
        return TxLookup(known=True)

    @node_call
    async def fees(self) -> Fees:
        block = await self.w3.eth.get_block("latest")
        base = int(block.get("baseFeePerGas") or await self.w3.eth.gas_price)
        try:
            tip = int(await self.w3.eth.max_priority_fee)
        except Exception:  # nodes without eth_maxPriorityFeePerGas
            tip = 10**9
        tip = max(tip, self.min_priority_fee)
        # Twice the base fee: stays valid through several full blocks of base-fee growth.
        return Fees(max_fee_per_gas=2 * base + tip, max_priority_fee_per_gas=tip)

    @node_call
    async def next_nonce(self, address: str) -> int:
        return await self.w3.eth.get_transaction_count(AsyncWeb3.to_checksum_address(address), "pending")

    @node_call
    async def token_balance(self, address: str) -> int:
        data = bytes.fromhex("70a08231") + bytes.fromhex(normalize_address(address)[2:]).rjust(32, b"\0")
        out = await self.w3.eth.call({"to": AsyncWeb3.to_checksum_address(self.token_address), "data": data})
        return int.from_bytes(out, "big") if out else 0

    # ------------------------------------------------------------ writes
    def sign_transfer(self, recipient: str, units: int, nonce: int, fees: Fees) -> SignedTransfer:
        tx: dict[str, Any] = {
            "type": 2,
            "chainId": self.chain_id,
            "nonce": nonce,
            "to": AsyncWeb3.to_checksum_address(self.token_address),
            "value": 0,
            # A fixed limit, not an estimate: an estimate raises for a transfer that would revert, and a
            # reverted payout must still be mined so it can fail visibly and be credited back.
            "gas": self.gas_limit,
            "maxFeePerGas": fees.max_fee_per_gas,
            "maxPriorityFeePerGas": fees.max_priority_fee_per_gas,
            "data": encode_transfer(recipient, units),
        }
        signed = self._treasury.account.sign_transaction(tx)
        return SignedTransfer(tx_hash=signed.hash.to_0x_hex(), raw_tx=bytes(signed.raw_transaction),
                              sender=self.treasury_address, recipient=normalize_address(recipient),
                              nonce=nonce, units=units)

    async def broadcast(self, raw_tx: bytes) -> tuple[BroadcastOutcome, str]:
        try:
            sent = await self.w3.eth.send_raw_transaction(raw_tx)
        except Exception as exc:  # node errors arrive as many exception types; the message decides
            message = str(exc)
            outcome = classify_send_error(message)
            if outcome == "retry":
                log.warning("broadcast failed, will retry the same bytes: %s", message[:300])
            return outcome, message[:300]
        return "sent", to_hex(sent)

    def recover_signer(self, message: str, signature: bytes) -> str | None:
        return recover_personal_signer(message, signature)

    def deposit_address(self, project_id: str) -> str:
        return deposit_address_of(self._treasury, project_id)

    def derived_address(self, label: str) -> str:
        return normalize_address(self._treasury.derive(label).address)

    async def close(self) -> None:
        disconnect = getattr(self.w3.provider, "disconnect", None)
        if disconnect is not None:
            try:
                await disconnect()
            except Exception:  # closing is best effort
                log.debug("provider disconnect failed", exc_info=True)
