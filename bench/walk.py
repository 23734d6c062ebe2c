"""Walk one gateway call: the repository files it runs (in order of first entry) and the domain calls the
HTTP layer makes (returns from ``domain/`` into ``server/api/gateway.py``; a coroutine counts once per
suspension).

    .venv/bin/python bench/walk.py [sqlite|postgresql]

In-process: the app on a fresh database (SQLite file or a PostgreSQL schema, as the tests make them),
the fake upstream behind the OpenAI-compatible adapter, three warm-up calls, then one traced
``POST /v1/chat/completions`` (JSON) with ``sys.setprofile``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SMARTSPACE_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from server.app import create_app  # noqa: E402
from server.container import Container  # noqa: E402
from server.metrics import Metrics  # noqa: E402
from server.providers import Providers, Upstream  # noqa: E402
from server.settings import Settings  # noqa: E402
from storage.bus import LocalBus  # noqa: E402
from tests.conftest import drop_database, make_database  # noqa: E402
from tests.factories import create_key, register  # noqa: E402
from tests.fakes.upstream import FakeUpstream  # noqa: E402


async def main(backend: str) -> None:
    tmp = Path(tempfile.mkdtemp())
    db, schema = await make_database(backend, tmp)
    fake = await FakeUpstream(record=False).start()
    settings = Settings(data_dir=str(tmp / "data"), jwt_secret="t" * 40, access_log=False)
    metrics = Metrics()
    providers = Providers(settings, upstreams=[Upstream(provider="openai", kind="openai", base_url=fake.base_url,
                                                        api_key="sk-upstream-0000000000000000")])
    container = Container(settings, db, LocalBus(metrics), metrics=metrics, providers=providers)
    client = TestClient(TestServer(create_app(settings, container=container)))
    await client.start_server()
    try:
        owner = await register(client)
        key = (await create_key(client, owner))["key"]
        async with container.uow() as scope:
            await scope.wallets.credit(owner.project_id, 10_000_000, kind="admin_credit", ref=None, memo="t")
        body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}],
                "max_tokens": 16}
        headers = {"Authorization": f"Bearer {key}"}
        for _ in range(3):  # warm: key cache, brain cache, prepared statements
            r = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status == 200, await r.text()
        files: list[str] = []

        returns: list[str] = []

        def prof(frame, event, arg):
            if event == "return":
                back = frame.f_back
                path = frame.f_code.co_filename
                if back is not None and back.f_code.co_filename.endswith("server/api/gateway.py") and \
                        path.startswith(str(ROOT / "domain")):
                    returns.append(f"{frame.f_code.co_qualname} → gateway.{back.f_code.co_qualname}")
                return
            if event != "call":
                return
            path = frame.f_code.co_filename
            if not path.startswith(str(ROOT)) or any(p in path for p in ("/tests/", "/.venv/", "/bench/")):
                return
            rel = path[len(str(ROOT)) + 1:]
            if rel not in files:
                files.append(rel)

        sys.setprofile(prof)
        r = await client.post("/v1/chat/completions", json=body, headers=headers)
        await r.read()
        sys.setprofile(None)
        assert r.status == 200
        print(f"{backend}: {len(files)} files")
        for f in files:
            print("  ", f)
        print("domain calls the HTTP layer made (each a return from domain/ into server/api/gateway.py):")
        for r in dict.fromkeys(returns):
            print("  ", r, "×", returns.count(r))
    finally:
        await client.close()
        await fake.stop()
        await drop_database(db, schema)


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "sqlite"))
