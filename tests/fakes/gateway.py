"""A gateway test environment: the full app on a real socket, wired to the fake upstream, a funded project,
an ``sk-`` key, and the official ``openai`` client pointed at ``<server>/v1``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import openai

from server.app import create_app
from server.container import Container
from server.providers import Providers, Upstream
from storage.bus import LocalBus
from tests.factories import UserHandle, create_key, register
from tests.fakes.upstream import FakeUpstream

OPENAI_KEY = "sk-proj-UPSTREAM-openai-secret-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-api03-UPSTREAM-anthropic-secret-fedcba9876"
FUNDS = 50_000_000  # 50 USDC


@dataclass
class GatewayEnv:
    client: Any  # aiohttp test client
    container: Container
    fake: FakeUpstream
    owner: UserHandle
    key: dict[str, Any]
    oai: openai.AsyncOpenAI

    @property
    def project_id(self) -> str:
        return self.owner.project_id

    @property
    def base_url(self) -> str:
        return str(self.client.make_url("/v1"))

    def sdk(self, api_key: str | None = None, **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key or self.key["key"], max_retries=0, **kw)

    async def close(self) -> None:
        """Close the SDK client and stop the fake upstream."""
        await self.oai.close()
        await self.fake.stop()

    async def credit(self, amount: int) -> None:
        async with self.container.uow() as scope:
            await scope.wallets.credit(self.project_id, amount, kind="admin_credit", ref=None, memo="test funds")

    async def put_policy(self, **rules: Any) -> dict:
        resp = await self.client.put(f"/api/v1/projects/{self.project_id}/policy", json=rules,
                                     headers=self.owner.headers)
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def wallet(self):
        async with self.container.reader() as scope:
            return await scope.wallets.get(self.project_id)


async def start_gateway(aiohttp_client, settings, db, metrics, *, funds: int = FUNDS,
                        provider_timeout: float | None = None, upstreams: list[Upstream] | None = None,
                        fake: FakeUpstream | None = None) -> GatewayEnv:
    """``upstreams`` (built by the test, e.g. on fakes of its own) replace the two default ones on ``fake``."""
    fake = fake or await FakeUpstream().start()
    if provider_timeout is not None:
        import msgspec

        settings = msgspec.structs.replace(settings, provider_timeout_seconds=provider_timeout)
    providers = Providers(settings, upstreams=upstreams if upstreams is not None else [
        Upstream(provider="openai", kind="openai", base_url=fake.base_url, api_key=OPENAI_KEY),
        Upstream(provider="anthropic", kind="anthropic", base_url=fake.anthropic_url, api_key=ANTHROPIC_KEY),
    ])
    container = Container(settings, db, LocalBus(metrics), metrics=metrics, providers=providers)
    client = await aiohttp_client(create_app(settings, container=container))
    owner = await register(client)
    key = await create_key(client, owner)
    env = GatewayEnv(client=client, container=container, fake=fake, owner=owner, key=key, oai=None)  # type: ignore
    env.oai = env.sdk()
    if funds:
        await env.credit(funds)
    return env
