"""``smartspace demo`` against a real server: it sets up a demo project and drives mixed traffic."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from server.demo import DEMO_EMAIL, DEMO_PASSWORD, DEMO_PROJECT, FUNDING_MICROS
from tests.e2e.procs import ROOT, Server, free_port, server_env

pytestmark = pytest.mark.e2e


async def _demo(url: str, env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "demo", "--url", url, "--no-serve", "--exit", *args,
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(errors="replace")


async def test_the_demo_sets_up_a_project_and_drives_mixed_traffic(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    env = server_env(f"sqlite+aiosqlite:///{data / 'demo.db'}", data, access_log="false", log_level="WARNING")
    server = Server("demo-server", env, tmp_path)
    try:
        async with aiohttp.ClientSession() as http:
            await server.ready(http)
            code, out = await _demo(server.url, env, "--duration", "8", "--seed", "7", "--approval-wait", "1")
            assert code == 0, out
            assert f"email {DEMO_EMAIL}, password {DEMO_PASSWORD}" in out and f"{server.url}/" in out

            async def get(path: str, token: str) -> dict:
                async with http.get(server.url + path, headers={"Authorization": f"Bearer {token}"}) as resp:
                    assert resp.status == 200, (path, await resp.text())
                    return await resp.json()

            async with http.post(server.url + "/api/v1/auth/token",
                                 json={"email": DEMO_EMAIL, "password": DEMO_PASSWORD}) as resp:
                token = (await resp.json())["access_token"]
            project = next(p for p in (await get("/api/v1/projects", token))["items"] if p["name"] == DEMO_PROJECT)
            base = f"/api/v1/projects/{project['id']}"
            agents = {a["name"] for a in (await get(f"{base}/agents", token))["items"]}
            assert agents == {"researcher", "summariser", "rogue-bot"}
            assert len((await get(f"{base}/budgets", token))["items"]) == 3
            policy = await get(f"{base}/policy", token)
            assert policy["require_approval_above_micros"] == 1_500 and policy["version"] >= 1
            deposits = (await get(f"{base}/deposits", token))["items"]
            assert [(d["status"], d["amount_micros"]) for d in deposits] == [("confirmed", FUNDING_MICROS)]

            requests = (await get(f"{base}/requests?limit=200", token))["items"]
            statuses = {r["status"] for r in requests}
            models = {r["model"] for r in requests}
            assert {"settled", "rejected"} <= statuses
            assert statuses & {"pending_approval", "expired", "approved"}, statuses  # some were held for review
            assert {"local/echo-1", "local/embed-1", "openai/gpt-4"} <= models
            spent = sum(r["cost_micros"] or 0 for r in requests if r["status"] == "settled")
            wallet = await get(f"{base}/wallet", token)
            assert spent > 0 and wallet["balance_micros"] == FUNDING_MICROS - spent

            # a second run signs in again and reuses the project, its agents and budgets
            code, out = await _demo(server.url, env, "--duration", "2", "--seed", "8", "--approval-wait", "1")
            assert code == 0, out
            assert "signed in as" in out
            names = [p["name"] for p in (await get("/api/v1/projects", token))["items"]]
            assert names.count(DEMO_PROJECT) == 1
            assert len((await get(f"{base}/budgets", token))["items"]) == 3
            assert len((await get(f"{base}/agents", token))["items"]) == 3
    except BaseException:
        print(f"----- server log tail -----\n{server.tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()


def test_the_demo_fails_clearly_without_a_server() -> None:
    proc = subprocess.run([sys.executable, "-m", "server.cli", "demo", "--url", "http://127.0.0.1:9", "--no-serve",
                           "--duration", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "no SmartSpace server answers at http://127.0.0.1:9" in proc.stderr


async def test_the_demo_starts_a_server_when_none_answers_and_stops_it_with_exit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = server_env(f"sqlite+aiosqlite:///{tmp_path / 'own.db'}", data, access_log="false", log_level="WARNING")
    url = f"http://127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "demo", "--url", url, "--exit", "--duration", "2", "--approval-wait", "1",
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 180))[0].decode(errors="replace")
    assert proc.returncode == 0, out
    assert f"no server answers at {url}: starting `smartspace serve`" in out
    assert "settled" in out and f"dashboard: {url}/" in out
    assert (tmp_path / ".smartspace" / "demo-server.log").is_file()
    async with aiohttp.ClientSession() as http:  # --exit: the server it started is gone
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(url + "/health")
