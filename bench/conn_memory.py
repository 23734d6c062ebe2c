"""Where a live connection's memory goes: tracemalloc on an in-process server around N connect + subscribe.

    .venv/bin/python bench/conn_memory.py [--clients 200] [--top 25] [--profile]

The server (the real app: SQLite in a temporary directory, in-process bus) runs in this process; the clients
(raw aiohttp websockets speaking engine.io 4 / Socket.IO 5, subscribing with ``since`` = the head, as
bench/fanout.py's) in a child process, so only
the server's allocations are traced. After a warm-up of 20 connections, a snapshot; then ``--clients`` more
connect and subscribe; a second snapshot. Prints the bytes per connection still allocated, grouped by the
source line that allocated them (the top ``--top``), and by file. ``--profile``: instead, the server CPU per
connect + subscribe and a pyinstrument profile of it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from server.app import create_app  # noqa: E402
from server.container import Container  # noqa: E402
from server.metrics import Metrics  # noqa: E402
from server.settings import Settings  # noqa: E402
from storage.bus import LocalBus  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.models import metadata  # noqa: E402

NS = "/budgets"


async def _client(session: aiohttp.ClientSession, url: str, token: str, project: str, since: int,
                  done: asyncio.Queue, stop: asyncio.Event) -> None:
    async with session.ws_connect(url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket") as ws:
        assert (await ws.receive_str()).startswith("0")
        await ws.send_str(f"40{NS}," + json.dumps({"token": token}))
        assert (await ws.receive_str()).startswith(f"40{NS},")
        await ws.send_str(f"42{NS},0" + json.dumps(["subscribe", {"project_id": project, "since": since}]))
        while True:
            msg = await ws.receive_str()
            if msg.startswith(f"43{NS},0"):
                break
        await done.put(1)
        while not stop.is_set():
            try:
                msg = await asyncio.wait_for(ws.receive_str(), 0.5)
            except TimeoutError:
                continue
            if msg == "2":
                await ws.send_str("3")


def _clients(url: str, token: str, project: str, since: int, counts: list[int], pipe) -> None:
    async def main() -> None:
        done: asyncio.Queue = asyncio.Queue()
        stop = asyncio.Event()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            tasks = []
            for n in counts:
                for _ in range(n):
                    tasks.append(asyncio.create_task(_client(session, url, token, project, since, done, stop)))
                for _ in range(n):
                    await done.get()
                pipe.send(n)
                pipe.recv()  # go on
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="conn-memory-"))
    db = Database(f"sqlite+aiosqlite:///{tmp / 'bench.db'}")
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    settings = Settings(data_dir=str(tmp / "data"), jwt_secret="bench-secret-" + "x" * 32, access_log=False)
    metrics = Metrics()
    app = create_app(settings, container=Container(settings, db, LocalBus(metrics), metrics=metrics))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/api/v1/auth/register", json={
                "email": "memory@smartspace.test", "password": "bench password 1", "name": "Memory"}) as r:
            token = (await r.json())["access_token"]
        async with http.get(url + "/api/v1/projects", headers={"Authorization": f"Bearer {token}"}) as r:
            project = (await r.json())["items"][0]["id"]
        async with http.get(f"{url}/api/v1/projects/{project}/audit?limit=1",
                            headers={"Authorization": f"Bearer {token}"}) as r:
            head = (await r.json())["items"][0]["seq"]
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=_clients, args=(url, token, project, head,
                                                                              [20, args.clients], child))
    proc.start()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, parent.recv)  # the warm-up connected
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001, async_mode="disabled")  # the whole loop, not one task
        profiler.start()
        cpu = time.process_time()
        parent.send("go")
        await loop.run_in_executor(None, parent.recv)
        cpu = time.process_time() - cpu
        profiler.stop()
        parent.send("go")
        print(f"{args.clients} connect + subscribe: {cpu / args.clients * 1000:.2f} ms server CPU each (profiled)")
        print(profiler.output_text(unicode=False, color=False))
        proc.join(30)
        await runner.cleanup()
        await db.dispose()
        return
    gc.collect()
    tracemalloc.start(args.frames)
    before = tracemalloc.take_snapshot()
    parent.send("go")
    await loop.run_in_executor(None, parent.recv)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    parent.send("go")
    exclude = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = before.filter_traces(exclude), after.filter_traces(exclude)
    n = args.clients
    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    print(f"{n} connect + subscribe: {total / n / 1024:.1f} KB per connection still allocated (tracemalloc)")
    print("\nby source line (bytes per connection, allocations per connection):")
    for stat in after.compare_to(before, "lineno")[:args.top]:
        frame = stat.traceback[0]
        print(f"  {stat.size_diff / n:8.0f} B {stat.count_diff / n:6.1f}  {_short(frame.filename)}:{frame.lineno}")
    print("\nby file:")
    for stat in after.compare_to(before, "filename")[:12]:
        print(f"  {stat.size_diff / n:8.0f} B  {_short(stat.traceback[0].filename)}")
    proc.join(30)
    await runner.cleanup()
    await db.dispose()


def _short(path: str) -> str:
    return path.split("site-packages/")[-1].replace(str(ROOT) + "/", "")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="pyinstrument the connects' server CPU instead")
    asyncio.run(main(ap.parse_args()))
