"""Issue 9 item 1 against a real ``smartspace serve`` (the embedded defaults: SQLite, devnet): input that used
to segfault the process — an unauthenticated 60 KB body of nested brackets, a Socket.IO frame of ~99 000
nested brackets right after the Engine.IO open — is refused, and the process keeps serving (``/health``,
a sign-up, the devnet chain). In-process tests cannot survive a segfault, hence the subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import aiohttp
import pytest

from tests.e2e.procs import ROOT, server_env, serving
from tests.live import WAIT

pytestmark = pytest.mark.e2e


async def _alive(http: aiohttp.ClientSession, server) -> None:
    assert server.proc.poll() is None, f"the server died ({server.proc.returncode}):\n{server.tail()}"
    async with http.get(server.url + "/health") as resp:
        assert resp.status == 200


async def _ws_open(http: aiohttp.ClientSession, server) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(server.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket")
    assert (await ws.receive_str(timeout=WAIT)).startswith("0")  # Engine.IO open
    return ws


async def _closed_without_answer(ws: aiohttp.ClientWebSocketResponse) -> list[str]:
    seen = []
    while True:
        msg = await ws.receive(timeout=WAIT)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                        aiohttp.WSMsgType.ERROR):
            return seen
        seen.append(msg.data)


async def test_deep_json_is_refused_and_the_process_lives(tmp_path):
    env = server_env(f"sqlite+aiosqlite:///{tmp_path / 'smartspace.db'}", tmp_path / "data")
    async with aiohttp.ClientSession() as http, serving(["edge"], env, tmp_path, http) as (server,):
        deep = b"[" * 30_000 + b"]" * 30_000
        async with http.post(server.url + "/api/v1/auth/register", data=deep,
                             headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "invalid_request"
        await _alive(http, server)
        # The gateway's body too (no key needed to be refused).
        async with http.post(server.url + "/v1/chat/completions", data=b'{"messages":' + deep + b"}",
                             headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
        await _alive(http, server)

        # Socket.IO: right after the Engine.IO open, no namespace joined.
        ws = await _ws_open(http, server)
        await ws.send_str("42" + "[" * 99_000 + "]" * 99_000)
        assert not any(m.startswith("43") for m in await _closed_without_answer(ws))
        await ws.close()
        await _alive(http, server)

        # And on a namespace, signed in.
        email = f"edge-{uuid.uuid4().hex[:8]}@example.com"
        async with http.post(server.url + "/api/v1/auth/register",
                             json={"email": email, "password": "correct horse", "name": "Edge"}) as resp:
            assert resp.status == 201, await resp.text()
            token = (await resp.json())["access_token"]
        ws = await _ws_open(http, server)
        await ws.send_str("40/budgets," + json.dumps({"token": token}))
        while not (await ws.receive_str(timeout=WAIT)).startswith("40/budgets,"):
            pass
        await ws.send_str("42/budgets,1" + '["subscribe",' + "[" * 99_000 + "]" * 99_000 + "]")
        assert not any(m.startswith("43/budgets,1") for m in await _closed_without_answer(ws))
        await ws.close()
        await _alive(http, server)

        # The devnet (py-evm, web3) still works with the recursion limit put back.
        headers = {"Authorization": f"Bearer {token}"}
        async with http.post(server.url + "/api/v1/devnet/fund", headers=headers,
                             json={"address": "0x" + "ab" * 20, "amount_micros": 5_000_000}) as resp:
            assert resp.status == 201, await resp.text()
            assert (await resp.json())["tx_hash"].startswith("0x")
        await _alive(http, server)
        assert "unhandled error" not in server.tail(400)


SERVE_LIKE = """
import asyncio, sys
import msgspec
import server.cli  # what `smartspace serve` imports first
from server import RECURSION_LIMIT
from server.app import after_start, create_app  # web3, py_ecc (and py-evm, depending on what imports it)
from server.chain.devnet import Devnet
from server.settings import load_settings

raised = sys.getrecursionlimit()  # what the eth stack set on import
app = create_app(load_settings())
assert sys.getrecursionlimit() == RECURSION_LIMIT, sys.getrecursionlimit()

async def main():
    devnet = await Devnet.start()  # py-evm raises the limit again if this is its first import
    assert after_start in app.on_startup
    await after_start(app)  # what the app runs once every cleanup context has started
    assert sys.getrecursionlimit() == RECURSION_LIMIT
    await devnet.mint("0x" + "cd" * 20, 1_000_000)  # the EVM still runs, and imports nothing that raises it
    assert sys.getrecursionlimit() == RECURSION_LIMIT

asyncio.run(main())
try:
    msgspec.json.decode(b"[" * 30_000 + b"]" * 30_000)
except RecursionError:
    print("recursion-error", raised)
"""


def test_the_served_process_keeps_a_recursion_limit_the_c_stack_can_hold(tmp_path):
    env = server_env(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", tmp_path / "data")
    done = subprocess.run([sys.executable, "-c", SERVE_LIKE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    # Without the limit put back, the decode below segfaults (returncode -11) instead of raising.
    assert done.returncode == 0, done.stderr[-3000:]
    word, raised = done.stdout.split()
    assert word == "recursion-error" and int(raised) > 1000  # the imports did raise it: the reset is what helps
