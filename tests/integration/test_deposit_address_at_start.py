"""A wallet's deposit_address is there from the first read: derived from the treasury key, which the chain
runtime knows at start-up — before the devnet runs, and without the rpc node."""

from __future__ import annotations

import msgspec

from domain.chain import normalize_address
from server.app import create_app
from server.chain.workers import CHAIN
from server.container import Container
from storage.bus import LocalBus
from tests.factories import register
from tests.integration.payments_support import deposit_address
from tests.integration.spend_helpers import wallet


def assert_address(value) -> None:
    assert isinstance(value, str) and value.startswith("0x") and len(value) == 42
    assert normalize_address(value) == value  # EIP-55 checksummed


async def test_a_fresh_apps_first_wallet_read_has_the_deposit_address(client, db):
    alice = await register(client)
    rt = client.app[CHAIN]
    assert rt.chain is None and rt.devnet is None  # nothing on the payments side has run
    first = (await wallet(client, alice))["deposit_address"]
    assert_address(first)
    assert rt.chain is None  # the devnet did not have to start for it
    info = await deposit_address(client, alice)  # now the devnet starts: the same address
    assert info["deposit_address"] == first
    assert (await wallet(client, alice))["deposit_address"] == first
    bob = await register(client)
    assert (await wallet(client, bob))["deposit_address"] not in (None, first)


async def test_a_restart_shows_the_new_runs_addresses_at_once(aiohttp_client, settings, db, metrics):
    first_app = await aiohttp_client(create_app(settings, container=Container(settings, db, LocalBus(metrics),
                                                                              metrics=metrics)))
    alice = await register(first_app)
    before = (await wallet(first_app, alice))["deposit_address"]
    await first_app.close()
    # A new process on the same database: the devnet is a new run with a new treasury key.
    again = await aiohttp_client(create_app(settings, container=Container(settings, db, LocalBus(metrics),
                                                                         metrics=metrics)))
    now = (await wallet(again, alice))["deposit_address"]
    assert_address(now)
    assert now != before
    assert (await deposit_address(again, alice))["deposit_address"] == now


async def test_rpc_mode_derives_addresses_without_reaching_the_node(aiohttp_client, settings, db, metrics):
    rpc = msgspec.structs.replace(settings, chain="rpc", chain_rpc_url="http://127.0.0.1:1",  # nothing listens
                                  treasury_private_key="0x" + "7a" * 32, chain_worker=False,
                                  usdc_address="0x3600000000000000000000000000000000000000")
    client = await aiohttp_client(create_app(rpc, container=Container(rpc, db, LocalBus(metrics), metrics=metrics)))
    alice = await register(client)
    address = (await wallet(client, alice))["deposit_address"]
    assert_address(address)
    from server.chain.web3chain import _Treasury, deposit_address_of

    assert address == deposit_address_of(_Treasury("0x" + "7a" * 32), alice.project_id)
    assert client.app[CHAIN].chain is None  # the node is down; the address did not need it
