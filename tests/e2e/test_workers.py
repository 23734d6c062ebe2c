"""``smartspace serve --workers 2``: two worker processes on one port (SO_REUSEPORT), PostgreSQL + Redis.

Both workers answer (each scrape of ``/metrics`` on a fresh connection names the worker that served it), sockets
land on both, and an event caused through either reaches every socket, exactly once and in order — so events
cross between the workers through Redis. Stopping the supervisor stops both workers.

Runs whenever SMARTSPACE_TEST_DATABASE_URL (PostgreSQL) and SMARTSPACE_TEST_REDIS_URL are set.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.procs import ROOT, Server, fresh_database, migrate, server_env
from tests.live import WAIT, LiveClient

PG_URL = os.environ.get("SMARTSPACE_TEST_DATABASE_URL", "")
REDIS_URL = os.environ.get("SMARTSPACE_TEST_REDIS_URL", "")
CLIENTS = 16  # all on one worker by chance: 2 ** -15

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (PG_URL.startswith("postgresql") and REDIS_URL),
                       reason="needs SMARTSPACE_TEST_DATABASE_URL (PostgreSQL) and SMARTSPACE_TEST_REDIS_URL"),
]
WORKER = re.compile(r'^smartspace_worker\{pid="(\d+)",worker="(\d+)"\} 1\.0$', re.M)
SOCKETS = re.compile(r'^smartspace_socket_connections\{namespace="/budgets"\} (\S+)$', re.M)


async def scrape(url: str) -> tuple[str, float]:
    """One /metrics on a new connection: (worker index, its /budgets socket count)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http, \
            http.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=WAIT)) as resp:
        text = await resp.text()
    worker = WORKER.search(text)
    sockets = SOCKETS.search(text)
    assert worker, text[:500]
    return worker.group(2), float(sockets.group(1)) if sockets else 0.0


async def each_worker(url: str, until=lambda seen: len(seen) == 2) -> dict[str, float]:
    """Scrape on fresh connections until both workers have answered (and ``until`` holds)."""
    seen: dict[str, float] = {}
    async with asyncio.timeout(WAIT):
        while not until(seen):
            worker, sockets = await scrape(url)
            seen[worker] = sockets
    return seen


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


async def test_two_workers_share_the_port_and_events_cross_between_them(tmp_path: Path):
    async with fresh_database(PG_URL) as database, aiohttp.ClientSession() as http:
        env = server_env(database, tmp_path / "data", log_level="INFO", redis_url=REDIS_URL,
                         redis_channel_prefix=f"test-workers-{uuid.uuid4().hex[:8]}")
        await migrate(env)
        server = Server("workers", env, tmp_path, args=("--workers", "2"))
        clients: list[LiveClient] = []
        try:
            await server.ready(http)
            workers = children(server.proc.pid)
            assert len(workers) == 2, workers
            assert set(await each_worker(server.url)) == {"0", "1"}  # both answer on the one port

            async with http.post(server.url + "/api/v1/auth/register", json={
                    "email": f"w-{uuid.uuid4().hex[:8]}@example.com", "password": "correct horse",
                    "name": "Workers"}) as resp:
                assert resp.status == 201
                token = (await resp.json())["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(server.url + "/api/v1/projects", headers=headers) as resp:
                project_id = (await resp.json())["items"][0]["id"]

            clients = [await LiveClient(server.url, token).connect() for _ in range(CLIENTS)]
            for client in clients:
                assert (await client.subscribe(project_id))["seq"] == 1
            sockets = await each_worker(server.url, lambda seen: len(seen) == 2 and sum(seen.values()) == CLIENTS)
            assert all(n > 0 for n in sockets.values()), sockets  # sockets on both workers

            for i in range(6):  # each PATCH on a new connection: caused on either worker
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as one, \
                        one.patch(f"{server.url}/api/v1/projects/{project_id}", headers=headers,
                                  json={"name": f"w{i}"}) as resp:
                    assert resp.status == 200, await resp.text()
            for client in clients:
                await client.until_seq(7)
            for client in clients:
                assert client.seqs() == [1, 2, 3, 4, 5, 6, 7]  # the replay of seq 1, then each live event once
                assert [e["data"]["project"]["name"] for e in client.received[1:]] == [f"w{i}" for i in range(6)]
        finally:
            for client in clients:
                await client.disconnect()
            server.stop()
        assert server.proc.returncode == 0, server.tail()
        assert not any(alive(pid) for pid in workers)  # the workers went with the supervisor


@pytest.mark.parametrize(("settings", "message"), [
    ({}, "--workers needs SMARTSPACE_REDIS_URL"),
    ({"redis_url": "redis://127.0.0.1:1/0"}, "--workers needs PostgreSQL"),
])
def test_workers_refuse_a_setup_where_events_could_not_cross(tmp_path: Path, settings, message):
    env = server_env("sqlite+aiosqlite:///" + str(tmp_path / "x.db"), tmp_path / "data", **settings)
    env.pop("SMARTSPACE_DATABASE_URL")  # SQLite in the data dir
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--workers", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    bad = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--workers", "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a number of workers" in bad.stderr
