"""Receipt parsing from hand-built receipts: Arc's double Transfer logs (one from the USDC ERC-20, one from a
system address) count once; other tokens, other events and other recipients never count; both web3.py's
shape (ints, HexBytes) and raw JSON-RPC (hex strings) parse the same. Plus unit conversion and send errors."""

from __future__ import annotations

import pytest
from hexbytes import HexBytes

from domain.chain import micros_to_units, normalize_address, units_to_micros
from domain.errors import InvalidRequest
from domain.payments import deposit_transfers
from server.chain.receipts import TRANSFER_TOPIC, parse_receipt
from server.chain.web3chain import classify_send_error, encode_transfer

ARC_USDC = "0x3600000000000000000000000000000000000000"
ARC_SYSTEM = "0x0000000000000000000000000000000000000800"  # stands for Arc's system emitter
OTHER_TOKEN = "0x1111111111111111111111111111111111111111"
PAYER = "0x2b5ad5c4795c026514f8317c7a215e218dccd6cf"
DEPOSIT = "0x0f0fc6a2617b916639f2dbbb04c0871733797afe"
TREASURY = "0x760e52fb3d5ec7fd8658f489d77f012e88d384d8"
TX = "0x" + "5a" * 32
APPROVAL_TOPIC = "0x8c5be1e5ebec7d5bd14f71427d1e84f3dd0314c0f7b2291e5b200ac8c7c3b925"


def topic(address: str) -> str:
    return "0x" + address[2:].rjust(64, "0")


def word(value: int) -> str:
    return "0x" + hex(value)[2:].rjust(64, "0")


def log(emitter: str, sender: str, recipient: str, value: int, index: int, *, event: str = TRANSFER_TOPIC) -> dict:
    return {"address": emitter, "topics": [event, topic(sender), topic(recipient)], "data": word(value),
            "logIndex": hex(index)}


def rpc_receipt(logs: list[dict], status: str = "0x1") -> dict:
    return {"transactionHash": TX, "status": status, "blockNumber": "0x1a", "from": PAYER, "logs": logs}


def web3_receipt(logs: list[dict], status: int = 1) -> dict:
    """The same receipt as web3.py returns it: ints and HexBytes, checksummed addresses."""
    return {"transactionHash": HexBytes(TX), "status": status, "blockNumber": 26,
            "from": "0x2B5AD5c4795c026514f8317c7a215E218DcCD6cF",
            "logs": [{"address": entry["address"].upper().replace("0X", "0x"),
                      "topics": [HexBytes(t) for t in entry["topics"]], "data": HexBytes(entry["data"]),
                      "logIndex": int(entry["logIndex"], 16)} for entry in logs]}


def arc_double_transfer(value: int = 5_000_000) -> list[dict]:
    return [log(ARC_USDC, PAYER, DEPOSIT, value, 0), log(ARC_SYSTEM, PAYER, DEPOSIT, value * 10**12, 1)]


@pytest.mark.parametrize("shape", [rpc_receipt, web3_receipt])
def test_arc_double_transfer_logs_count_once(shape):
    receipt = parse_receipt(shape(arc_double_transfer()))
    assert receipt.tx_hash == TX and receipt.status == 1 and receipt.block_number == 26 and receipt.sender == PAYER
    assert len(receipt.transfers) == 2  # both are decoded ...
    counted = deposit_transfers(receipt, token_address=ARC_USDC, deposit_address=DEPOSIT)
    assert [(t.emitter, t.units, t.log_index) for t in counted] == [(ARC_USDC, 5_000_000, 0)]  # ... one counts
    assert units_to_micros(counted[0].units, 6) == 5_000_000


def test_the_emitter_is_compared_whatever_the_address_case():
    receipt = parse_receipt(web3_receipt(arc_double_transfer()))
    assert deposit_transfers(receipt, token_address=ARC_USDC.upper().replace("0X", "0x"), deposit_address=DEPOSIT)


def test_only_the_configured_token_to_the_deposit_address_counts():
    receipt = parse_receipt(rpc_receipt([
        log(OTHER_TOKEN, PAYER, DEPOSIT, 9_000_000, 0),  # a look-alike token
        log(ARC_USDC, PAYER, TREASURY, 1_000_000, 1),  # to the treasury, from an unregistered sender
        log(ARC_USDC, PAYER, DEPOSIT, 2_000_000, 2, event=APPROVAL_TOPIC),  # not a Transfer
        log(ARC_USDC, PAYER, DEPOSIT, 0, 3),  # nothing moved
        log(ARC_USDC, PAYER, DEPOSIT, 3_000_000, 4),
    ]))
    counted = deposit_transfers(receipt, token_address=ARC_USDC, deposit_address=DEPOSIT, shared_address=TREASURY)
    assert [(t.units, t.log_index) for t in counted] == [(3_000_000, 4)]
    with_sender = deposit_transfers(receipt, token_address=ARC_USDC, deposit_address=DEPOSIT,
                                    shared_address=TREASURY, senders=frozenset({PAYER}))
    assert [(t.units, t.log_index) for t in with_sender] == [(1_000_000, 1), (3_000_000, 4)]


def test_a_reverted_receipt_parses_with_status_zero_and_no_logs():
    receipt = parse_receipt(rpc_receipt([], status="0x0"))
    assert receipt.status == 0 and receipt.transfers == ()


def test_malformed_logs_are_skipped_not_fatal():
    nft = {"address": ARC_USDC, "topics": [TRANSFER_TOPIC, topic(PAYER), topic(DEPOSIT), word(7)], "data": "0x",
           "logIndex": "0x0"}  # ERC-721 Transfer: 4 topics
    short = {"address": ARC_USDC, "topics": [TRANSFER_TOPIC, topic(PAYER), topic(DEPOSIT)], "data": "0x01",
             "logIndex": "0x1"}
    assert parse_receipt(rpc_receipt([nft, short, log(ARC_USDC, PAYER, DEPOSIT, 1, 2)])).transfers[0].log_index == 2


def test_amounts_convert_only_at_the_boundary():
    assert micros_to_units(1_234_567, 6) == 1_234_567  # USDC's ERC-20: 6 decimals, the same unit
    assert micros_to_units(1, 18) == 10**12  # an 18-decimal token
    assert units_to_micros(10**12 + 5, 18) == 1  # dust below a micro is not credited
    assert micros_to_units(1_000_000, 2) == 100
    with pytest.raises(InvalidRequest):
        micros_to_units(1, 2)


def test_addresses_are_normalised_or_refused():
    assert normalize_address("0x2B5AD5c4795c026514f8317c7a215E218DcCD6cF") == PAYER
    assert normalize_address(PAYER[2:]) == PAYER
    for bad in ("0x1234", "0x" + "g" * 40, "", 42):
        with pytest.raises(InvalidRequest):
            normalize_address(bad)  # type: ignore[arg-type]


def test_transfer_calldata_is_the_erc20_abi_encoding():
    data = encode_transfer(DEPOSIT, 5_000_000)
    assert data[:4].hex() == "a9059cbb" and data[4:36].hex() == DEPOSIT[2:].rjust(64, "0")
    assert int.from_bytes(data[36:], "big") == 5_000_000 and len(data) == 68


@pytest.mark.parametrize(("message", "outcome"), [
    ("already known", "known"),
    ("{'code': -32000, 'message': 'ALREADY_EXISTS: already known'}", "known"),
    ("nonce too low: next nonce 8, tx nonce 7", "nonce_used"),
    ("replacement transaction underpriced", "nonce_used"),
    ("Invalid transaction nonce: Expected 1, but got 0", "nonce_used"),  # py-evm
    ("Invalid transaction nonce: Expected 1, but got 5", "retry"),  # a gap: an earlier nonce is not sent yet
    ("insufficient funds for gas * price + value", "retry"),
    ("Cannot connect to host rpc.testnet.arc.network:443", "retry"),
])
def test_send_errors_are_classified(message, outcome):
    assert classify_send_error(message) == outcome
