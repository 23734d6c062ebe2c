"""Receipts as the node returns them → :class:`domain.chain.ChainReceipt`.

Accepts web3.py's AttributeDict (ints, HexBytes) and raw JSON-RPC dicts (hex strings) alike, so the
parser is tested with hand-built receipts. It decodes every ERC-20 ``Transfer`` log by its topic, whoever
emitted it; choosing the token's own logs is the caller's job (``ChainReceipt.token_transfers``) because
``process_receipt`` in web3.py does not check the emitter and Arc emits a second, system Transfer log.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from domain.chain import ChainReceipt, TokenTransfer, normalize_address

# keccak256("Transfer(address,address,uint256)")
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"


def to_hex(value: Any) -> str:
    """bytes/HexBytes/str → lower-case 0x-hex (HexBytes.hex() has no 0x prefix in web3.py 8)."""
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    text = str(value).lower()
    return text if text.startswith("0x") else "0x" + text


def to_int(value: Any) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, bytes | bytearray):
        return int.from_bytes(value, "big") if value else 0
    text = str(value)
    return int(text, 16) if text.lower().startswith("0x") else int(text)


def _topic_address(topic: Any) -> str:
    return normalize_address("0x" + to_hex(topic)[-40:])


def parse_transfer(log: Mapping[str, Any]) -> TokenTransfer | None:
    """A Transfer(address indexed, address indexed, uint256) log, or None for anything else."""
    topics = [to_hex(t) for t in log.get("topics") or ()]
    if len(topics) != 3 or topics[0] != TRANSFER_TOPIC:
        return None  # not an ERC-20 Transfer (ERC-721 Transfer has 4 topics)
    data = to_hex(log.get("data") or b"")
    if len(data) != 2 + 64:
        return None
    return TokenTransfer(
        emitter=normalize_address(str(log["address"])),
        sender=_topic_address(topics[1]),
        recipient=_topic_address(topics[2]),
        units=int(data, 16),
        log_index=to_int(log["logIndex"]),
    )


def parse_receipt(receipt: Mapping[str, Any]) -> ChainReceipt:
    transfers = tuple(t for t in (parse_transfer(log) for log in receipt.get("logs") or ()) if t is not None)
    return ChainReceipt(
        tx_hash=to_hex(receipt["transactionHash"]),
        status=to_int(receipt["status"]),
        block_number=to_int(receipt["blockNumber"]),
        sender=normalize_address(str(receipt["from"])),
        transfers=transfers,
    )
