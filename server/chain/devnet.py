"""The in-process devnet: eth-tester + py-evm, the compiled USDC token deployed, a funded treasury.

Used by default (``SMARTSPACE_CHAIN=devnet``) and by the tests. Nothing is downloaded: the token's
compiled artifact is committed in ``contracts/USDC.json`` (``make contracts`` rebuilds it from
``contracts/USDC.vy``). The chain lives in memory and is gone when the process exits.

Dev helpers (``mint``, ``pay``) use eth-tester's unlocked accounts; the dev API exposes them so a
user can make a real on-chain deposit in a demo.
"""

from __future__ import annotations

import json
import secrets
from functools import cache
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_tester.exceptions import TransactionFailed
from web3 import AsyncWeb3
from web3.exceptions import ContractLogicError
from web3.providers.eth_tester import AsyncEthereumTesterProvider
from web3.types import Wei

from domain.chain import micros_to_units, normalize_address
from domain.errors import InvalidRequest
from server.chain.receipts import to_hex
from server.chain.web3chain import Web3Chain

ARTIFACT = Path(__file__).resolve().parents[2] / "contracts" / "USDC.json"
TREASURY_START_MICROS = 1_000_000 * 1_000_000  # 1M test USDC
NATIVE_FUNDING_WEI = 10**21


@cache
def token_artifact() -> dict[str, Any]:
    return json.loads(ARTIFACT.read_text())


class Devnet:
    """Owns the tester and the token; ``chain`` is the port the app uses."""

    def __init__(self, w3: AsyncWeb3, chain: Web3Chain, deployer: str, payers: list[str]) -> None:
        self.w3 = w3
        self.chain = chain
        self.deployer = deployer
        self.payers = payers  # unlocked tester accounts that can send test USDC
        self.keys: dict[str, bytes] = {}  # normalised address → key, for the accounts new_account made

    @property
    def tester(self) -> Any:
        return self.w3.provider.ethereum_tester

    @classmethod
    async def start(cls, *, treasury_key: str = "", revenue_address: str = "", gas_limit: int = 120_000,
                    treasury_micros: int = TREASURY_START_MICROS) -> Devnet:
        w3 = AsyncWeb3(AsyncEthereumTesterProvider())
        accounts: list[str] = list(await w3.eth.accounts)
        deployer = accounts[0]
        token_address = await deploy_token(w3, deployer)
        key = treasury_key or "0x" + secrets.token_hex(32)  # per run unless the environment fixes one
        chain = Web3Chain(w3, chain_id=await w3.eth.chain_id, token_address=token_address, decimals=6,
                          treasury_key=key, revenue_address=revenue_address or None, gas_limit=gas_limit)
        if chain.revenue_address is None:
            chain.revenue_address = chain.derived_address("devnet-revenue")
        devnet = cls(w3, chain, deployer, accounts[1:])
        await devnet.send_native(chain.treasury_address, NATIVE_FUNDING_WEI)
        if treasury_micros:
            await devnet.mint(chain.treasury_address, treasury_micros)
        return devnet

    # ------------------------------------------------------------ dev helpers
    async def wait(self, tx_hash: Any) -> dict[str, Any]:
        return dict(await self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30))

    async def send_native(self, to: str, wei: int) -> str:
        tx_hash = await self.w3.eth.send_transaction(
            {"from": self.deployer, "to": AsyncWeb3.to_checksum_address(to), "value": Wei(wei)})
        await self.wait(tx_hash)
        return to_hex(tx_hash)

    def token(self, address: str | None = None) -> Any:
        address = address or self.chain.token_address
        return self.w3.eth.contract(address=AsyncWeb3.to_checksum_address(address), abi=token_artifact()["abi"])

    async def mint(self, to: str, amount_micros: int, token: str | None = None) -> str:
        units = micros_to_units(amount_micros, self.chain.decimals)
        tx_hash = await _transact(self.token(token).functions.mint(AsyncWeb3.to_checksum_address(to), units),
                                  {"from": self.deployer})
        await self.wait(tx_hash)
        return to_hex(tx_hash)

    async def pay(self, to: str, amount_micros: int, *, payer: str | None = None, token: str | None = None,
                  mint: bool = True, gas: int | None = None, wait: bool = True) -> str:
        """A USDC transfer ``payer → to`` (a deposit as a user's wallet would make it); returns its hash.
        With ``mint`` the payer is first given the amount. ``gas`` skips estimation (to mine a revert);
        ``wait=False`` returns as soon as it is sent (with auto-mining off it then waits in the pool)."""
        payer = payer or self.payers[0]
        if mint:
            await self.mint(payer, amount_micros, token)
        units = micros_to_units(amount_micros, self.chain.decimals)
        tx: dict[str, Any] = {"from": AsyncWeb3.to_checksum_address(payer)}
        if gas is not None:
            tx["gas"] = gas
        fn = self.token(token).functions.transfer(AsyncWeb3.to_checksum_address(to), units)
        tx_hash = await _transact(fn, tx)
        if wait:
            await self.wait(tx_hash)
        return to_hex(tx_hash)

    async def balance_micros(self, address: str, token: str | None = None) -> int:
        units = await self.token(token).functions.balanceOf(AsyncWeb3.to_checksum_address(address)).call()
        return int(units)  # 6 decimals: units are micro-USDC

    async def deploy_other_token(self) -> str:
        """A second token with the same code (for "wrong token" deposits)."""
        return await deploy_token(self.w3, self.deployer)

    def mine(self, blocks: int = 1) -> None:
        self.tester.mine_blocks(blocks)

    def auto_mine(self, on: bool) -> None:
        """Off: sent transactions wait in the pool until ``mine`` (one per sender, in eth-tester)."""
        if on:
            self.tester.enable_auto_mine_transactions()
        else:
            self.tester.disable_auto_mine_transactions()

    def new_account(self) -> str:
        """An unlocked tester account with native funds (a user's wallet)."""
        account = Account.create()
        self.tester.add_account(bytes(account.key).hex())
        self.payers.append(account.address)
        address = normalize_address(account.address)
        self.keys[address] = bytes(account.key)
        return address

    def sign_message(self, address: str, text: str) -> str:
        """What a wallet's ``personal_sign`` (EIP-191) returns, for an account made by ``new_account``."""
        signed = Account.sign_message(encode_defunct(text=text), self.keys[normalize_address(address)])
        return signed.signature.to_0x_hex()

    async def fund_new_account(self) -> str:
        address = self.new_account()
        await self.send_native(address, 10**19)
        return address

    async def close(self) -> None:
        await self.chain.close()


async def _transact(fn: Any, tx: dict[str, Any]) -> Any:
    """Send a token call. A call the contract would revert is refused while web3 estimates its gas (before
    anything is sent): that is the caller's input, a 422 naming the contract's reason, not a server error."""
    try:
        return await fn.transact(tx)
    except (TransactionFailed, ContractLogicError) as exc:
        reason = str(exc.args[0] if exc.args else exc).removeprefix("execution reverted: ")
        raise InvalidRequest(f"the devnet token refused the transaction: {reason}", {"reason": reason}) from None


async def deploy_token(w3: AsyncWeb3, deployer: str) -> str:
    artifact = token_artifact()
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    tx_hash = await factory.constructor().transact({"from": deployer})
    receipt = await w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
    address = receipt["contractAddress"]
    if address is None:
        raise RuntimeError("the token deployment created no contract")
    return normalize_address(address)
