"""The chain implementation (web3.py 8) behind ``domain.chain.Chain``: devnet or an RPC node."""

from __future__ import annotations

import logging

from web3 import AsyncWeb3

from server.chain.devnet import Devnet
from server.chain.web3chain import GuardedHTTPProvider, Web3Chain
from server.settings import Settings, SettingsError

log = logging.getLogger("smartspace.chain")


async def open_chain(settings: Settings, *, devnet_treasury_key: str = "") -> tuple[Web3Chain, Devnet | None]:
    """Connect as configured. The treasury key comes only from the environment and is never logged."""
    if settings.chain == "devnet":
        # A fresh treasury key every run: the chain starts empty each time while the database persists, and
        # a reused key would meet its own old nonces there. SMARTSPACE_TREASURY_PRIVATE_KEY is for rpc only.
        # (The chain runtime makes that run's key at start-up, so deposit addresses exist before the devnet.)
        devnet = await Devnet.start(treasury_key=devnet_treasury_key, revenue_address=settings.revenue_address)
        log.info("devnet chain ready", extra={"chain_id": devnet.chain.chain_id,
                                              "token": devnet.chain.token_address,
                                              "treasury": devnet.chain.treasury_address})
        return devnet.chain, devnet
    if not settings.treasury_private_key:
        raise SettingsError("SMARTSPACE_TREASURY_PRIVATE_KEY is required when SMARTSPACE_CHAIN=rpc")
    if not settings.usdc_address:
        raise SettingsError("SMARTSPACE_USDC_ADDRESS is required when SMARTSPACE_CHAIN=rpc "
                            "(Arc: 0x3600000000000000000000000000000000000000)")
    w3 = AsyncWeb3(GuardedHTTPProvider(settings.chain_rpc_url))
    try:
        chain_id = await w3.eth.chain_id
        if settings.chain_id and settings.chain_id != chain_id:
            raise SettingsError(f"SMARTSPACE_CHAIN_ID={settings.chain_id} but the node at SMARTSPACE_CHAIN_RPC_URL "
                                f"reports chain id {chain_id}")
    except BaseException:
        await w3.provider.disconnect()  # its HTTP session
        raise
    chain = Web3Chain(w3, chain_id=chain_id, token_address=settings.usdc_address, decimals=settings.usdc_decimals,
                      treasury_key=settings.treasury_private_key, revenue_address=settings.revenue_address or None)
    if chain.revenue_address is None:
        log.warning("SMARTSPACE_REVENUE_ADDRESS is not set: on-chain settlement batches are disabled")
    log.info("rpc chain ready", extra={"chain_id": chain_id, "token": chain.token_address,
                                       "treasury": chain.treasury_address})
    return chain, None
