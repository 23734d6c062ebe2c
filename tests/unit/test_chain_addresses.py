"""Addresses, hashes and signatures as they arrive from users: exact hex, EIP-55 when mixed case, nothing
stripped; and EIP-191 signer recovery as wallets produce it (``personal_sign``)."""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import to_checksum_address

from domain.chain import checksum_address, normalize_address, normalize_tx_hash, parse_signature
from domain.errors import InvalidRequest
from server.chain.web3chain import recover_personal_signer as recover

EIP55 = [  # the examples of EIP-55 itself
    "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
    "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB", "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
]


def test_checksums_match_eip55_and_eth_utils():
    for address in EIP55:
        assert checksum_address(address.lower()) == address
    for _ in range(100):
        address = "0x" + secrets.token_hex(20)
        assert checksum_address(address) == to_checksum_address(address)


@pytest.mark.parametrize("spelling", [
    EIP55[0], EIP55[0].lower(), "0x" + EIP55[0][2:].upper(), EIP55[0][2:].lower(), "0X" + EIP55[0][2:].lower()])
def test_every_unambiguous_spelling_normalises_to_lower_case(spelling):
    assert normalize_address(spelling) == EIP55[0].lower()


@pytest.mark.parametrize("bad", [
    EIP55[0][:-1] + EIP55[0][-1].upper(),  # ...eAeD: one letter's case off, the checksum fails
    "0x5aaeb6053F3E94C9b9A09f33669435E7Ef1BeAed",  # mixed case, not EIP-55's
    EIP55[0] + "\n", EIP55[0].lower() + "\n", " " + EIP55[0], EIP55[0] + " ", "\t" + EIP55[0].lower(),
    EIP55[0][:-1], EIP55[0] + "0", "0x", "", "0x" + "g" * 40, "0x0x" + "0" * 38, "0x" + "0" * 39 + "\x00",
    None, 42,
])
def test_a_doubtful_address_is_refused_naming_the_field(bad):
    with pytest.raises(InvalidRequest) as exc:
        normalize_address(bad, "to_address")  # type: ignore[arg-type]
    assert exc.value.status == 422 and exc.value.details == {"to_address": bad}
    assert exc.value.message.startswith("to_address ")


def test_tx_hashes_take_any_case_but_nothing_around_them():
    tx = "0x" + "aB" * 32
    assert normalize_tx_hash(tx) == tx.lower() == normalize_tx_hash(tx[2:].upper())
    for bad in (tx + "\n", " " + tx, tx[:-1], tx + "a", "0x" + "z" * 64):
        with pytest.raises(InvalidRequest) as exc:
            normalize_tx_hash(bad)
        assert exc.value.details == {"tx_hash": bad}


def test_signatures_are_65_bytes_of_hex():
    assert parse_signature("0x" + "ab" * 65) == bytes([0xAB]) * 65
    for bad in ("0x" + "ab" * 64, "0x" + "ab" * 65 + "\n", "ab" * 66, ""):
        with pytest.raises(InvalidRequest) as exc:
            parse_signature(bad)
        assert exc.value.details == {"signature": bad}


def test_the_signer_of_a_personal_sign_message_is_recovered():
    account = Account.create()
    signature = Account.sign_message(encode_defunct(text="hello"), account.key).signature
    assert recover("hello", bytes(signature)) == account.address.lower()
    assert recover("hello!", bytes(signature)) != account.address.lower()  # another message
    assert recover("hello", bytes(65)) is None  # r = s = 0
    assert recover("hello", b"\xff" * 65) is None  # s above the curve order
    assert recover("hello", bytes(signature)[:64] + b"\x05") is None  # v neither 27 nor 28
