"""``smartspace demo``: bring the dashboard to life on the embedded defaults.

Against a running server (or one it starts), over the public API only: a demo user and project,
three agents with their keys, budgets, a policy that holds large requests for review and blocks a
model, test USDC deposited on the devnet, then simulated agent traffic through the gateway for a
while — a mix of models (``local/*`` answer; others are refused or fail), requests held for review,
a budget that runs out, a burst of refusals and a spike. A progress line shows what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

DEMO_EMAIL = "demo@smartspace.local"
DEMO_PASSWORD = "smartspace-demo"
DEMO_PROJECT = "Demo: research team"
FUNDING_MICROS = 20_000_000
WORDS = ("revenue margin cohort churn forecast invoice vendor latency token budget region launch pricing "
         "contract support backlog funnel retention upsell quota pipeline audit renewal discount").split()
TOPICS = ["quarterly revenue", "churn drivers", "the EU launch", "pricing tiers", "support backlog",
          "the onboarding funnel", "vendor contracts", "GPU spend"]


class DemoError(Exception):
    """Something the demo cannot get past; the message says what."""


@dataclass
class Tally:
    sent: int = 0
    settled: int = 0
    held: int = 0
    refused: int = 0
    failed: int = 0
    spent_micros: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def record(self, status: int, code: str | None, cost: int) -> None:
        if status == 200:
            self.settled += 1
            self.spent_micros += cost
        elif code == "approval_required":
            self.held += 1
        elif status >= 500:
            self.failed += 1
        else:
            self.refused += 1
        if code:
            self.reasons[code] = self.reasons.get(code, 0) + 1

    def line(self) -> str:
        return (f"sent {self.sent} · settled {self.settled} · held {self.held} · refused {self.refused} · "
                f"failed {self.failed} · spent ${self.spent_micros / 1_000_000:.6f}")


class Progress:
    """One line redrawn in place on a terminal; a plain line now and then otherwise."""

    def __init__(self, total: float, stream=sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.restart()

    def restart(self) -> None:
        self.start = time.monotonic()
        self.last_plain = 0.0

    def step(self, text: str) -> None:
        self.stream.write(f"{'  ' if not self.tty else ''}• {text}\n")
        self.stream.flush()

    def draw(self, tally: Tally, phase: str) -> None:
        elapsed = time.monotonic() - self.start
        done = min(1.0, elapsed / self.total) if self.total else 1.0
        if self.tty:
            bar = "█" * int(done * 24) + "░" * (24 - int(done * 24))
            self.stream.write(f"\r\x1b[2K{bar} {elapsed:5.0f}s {phase:<10} {tally.line()}")
            self.stream.flush()
        elif elapsed - self.last_plain >= 10 or phase == "done":
            self.last_plain = elapsed
            self.stream.write(f"  [{elapsed:4.0f}s/{self.total:.0f}s] {phase}: {tally.line()}\n")
            self.stream.flush()

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")


class Client:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url.rstrip("/")
        self.token: str | None = None

    async def call(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
        h = dict(headers or {})
        bearer = token or self.token
        if bearer:
            h["Authorization"] = f"Bearer {bearer}"
        async with self.http.request(method, self.url + path, json=body, headers=h) as resp:
            data = await resp.json(content_type=None) if resp.content_length != 0 else None
            return resp.status, data or {}, dict(resp.headers)

    async def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> dict:
        status, data, _ = await self.call(method, path, body, **kw)
        if status >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            raise DemoError(f"{method} {path} answered {status}: {error.get('message', data)}")
        return data


async def _ready(http: aiohttp.ClientSession, url: str) -> bool:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
        async with http.get(url.rstrip("/") + "/ready", timeout=aiohttp.ClientTimeout(total=3)) as resp:
            return resp.status == 200
    return False


def _spawn_server(url: str) -> subprocess.Popen:
    parsed = URL(url)
    os.makedirs(".smartspace", exist_ok=True)
    log = open(".smartspace/demo-server.log", "ab")  # the server outlives this function
    return subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--host", parsed.host or "127.0.0.1",
                             "--port", str(parsed.port or 8080)], stdout=log, stderr=subprocess.STDOUT)


async def _start_server(http: aiohttp.ClientSession, url: str, progress: Progress) -> subprocess.Popen:
    progress.step(f"no server answers at {url}: starting `smartspace serve` (logs in .smartspace/demo-server.log)")
    proc = _spawn_server(url)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the server exited with {proc.returncode}; see .smartspace/demo-server.log")
        if await _ready(http, url):
            return proc
        await asyncio.sleep(0.25)
    proc.terminate()
    raise DemoError("the server did not become ready within 90 s; see .smartspace/demo-server.log")


async def _by_name(client: Client, path: str) -> dict[str, dict]:
    items = (await client.ok("GET", f"{path}?limit=200"))["items"]
    return {item["name"]: item for item in items}


async def set_up(client: Client, progress: Progress) -> dict[str, Any]:
    """The demo user, project, agents, keys, budgets and policy; idempotent across runs."""
    status, data, _ = await client.call("POST", "/api/v1/auth/register",
                                        {"email": DEMO_EMAIL, "password": DEMO_PASSWORD, "name": "Demo"})
    if status == 201:
        client.token = data["access_token"]
        progress.step(f"registered {DEMO_EMAIL}")
    else:
        client.token = (await client.ok("POST", "/api/v1/auth/token",
                                        {"email": DEMO_EMAIL, "password": DEMO_PASSWORD}))["access_token"]
        progress.step(f"signed in as {DEMO_EMAIL}")
    projects = await _by_name(client, "/api/v1/projects")
    project = projects.get(DEMO_PROJECT) or await client.ok("POST", "/api/v1/projects", {
        "name": DEMO_PROJECT, "description": "simulated agents calling AI models through SmartSpace"})
    base = f"/api/v1/projects/{project['id']}"
    agents = await _by_name(client, f"{base}/agents")
    for name in ("researcher", "summariser", "rogue-bot"):
        if name not in agents:
            agents[name] = await client.ok("POST", f"{base}/agents", {"name": name})
    keys = {name: (await client.ok("POST", f"{base}/keys", {"name": f"{name} (demo run)",
                                                               "agent_id": agents[name]["id"]}))["key"]
            for name in ("researcher", "summariser", "rogue-bot")}
    budgets = await _by_name(client, f"{base}/budgets")
    # Sized for local/echo-1's prices (a request costs a few hundred micro-USDC): bars that move in a
    # minute, and one that runs out (its agent is then refused).
    wanted = [("team daily", 100_000, "day", None), ("research monthly", 60_000, "month", "researcher"),
              ("summariser weekly", 5_000, "week", "summariser")]
    for name, limit, period, agent in wanted:
        if name not in budgets:
            await client.ok("POST", f"{base}/budgets", {
                "name": name, "limit_micros": limit, "period": period,
                **({"agent_id": agents[agent]["id"]} if agent else {})})
    await client.ok("PUT", f"{base}/policy", {
        "require_approval_above_micros": 1_500,  # a long report on local/echo-1: a person looks first
        "max_per_request_micros": 200_000, "blocked_models": ["openai/gpt-4"], "review_risk_above": 6.0})
    progress.step(f"project {DEMO_PROJECT!r}: agents, keys, budgets and a policy that holds large requests")
    return {"project": project, "base": base, "keys": keys}


async def fund(client: Client, base: str, progress: Progress) -> None:
    info = await client.ok("GET", f"{base}/deposit-address")
    status, tx, _ = await client.call("POST", "/api/v1/devnet/transfer",
                                      {"to_address": info["deposit_address"], "amount_micros": FUNDING_MICROS})
    if status == 404:
        progress.step("not on the devnet (SMARTSPACE_CHAIN=rpc): fund the wallet with a real deposit")
        return
    if status >= 400:
        raise DemoError(f"the devnet transfer failed ({status}): {tx}")
    await client.ok("POST", f"{base}/deposits", {"tx_hash": tx["tx_hash"]})
    progress.step(f"deposited {FUNDING_MICROS / 1_000_000:.2f} test USDC on the devnet (tx {tx['tx_hash'][:18]}…)")


async def _gateway(client: Client, tally: Tally, key: str, model: str, *, max_tokens: int, text: str,
                   wait: int | None = None, embedding: bool = False) -> None:
    headers = {"X-SmartSpace-Wait": str(wait)} if wait else None
    body: dict[str, Any] = ({"model": model, "input": text} if embedding else
                            {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]})
    tally.sent += 1
    try:
        status, data, resp_headers = await client.call(
            "POST", "/v1/embeddings" if embedding else "/v1/chat/completions", body, token=key, headers=headers)
    except aiohttp.ClientError:
        tally.failed += 1
        return
    code = data.get("error", {}).get("code") if status >= 400 else None
    tally.record(status, code, int(resp_headers.get("x-smartspace-cost-micros", "0") or 0))


async def traffic(client: Client, keys: dict[str, str], duration: float, progress: Progress,
                  rng: random.Random, approval_wait: int = 20) -> Tally:
    tally = Tally()
    tasks: set[asyncio.Task] = set()

    def spawn(**kw: Any) -> None:
        task = asyncio.create_task(_gateway(client, tally, **kw))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def document(words: int) -> str:  # pasted context: the input tokens are most of a request's cost
        return " ".join(rng.choice(WORDS) for _ in range(words))

    progress.restart()
    start = time.monotonic()
    spiked = held = 0
    while (elapsed := time.monotonic() - start) < duration:
        phase = "spike" if 0.55 * duration <= elapsed < 0.65 * duration else "traffic"
        topic = rng.choice(TOPICS)
        roll = rng.random()
        if roll < 0.50:
            spawn(key=keys["researcher"], model="local/echo-1", max_tokens=rng.randint(40, 400),
                  text=f"Research {topic} and list three findings in: {document(rng.randint(300, 2500))}")
        elif roll < 0.62:
            spawn(key=keys["researcher"], model="local/embed-1", max_tokens=0, text=f"notes on {topic}", embedding=True)
        elif roll < 0.80:
            spawn(key=keys["summariser"], model="local/echo-1", max_tokens=rng.randint(300, 900),
                  text=f"Summarise the thread about {topic}: {document(rng.randint(800, 3000))}")
        else:  # a model the policy blocks, or one whose provider this server has no upstream for
            spawn(key=keys["rogue-bot"], model=rng.choice(["openai/gpt-4", "anthropic/claude-3-5-haiku"]),
                  max_tokens=200, text=f"Ignore the budget and analyse {topic}")
        if elapsed >= held * 8 + 3:  # now and then a large request, held for review
            held += 1
            wait = approval_wait if held % 2 else None  # every other one waits for a person's decision
            spawn(key=keys["researcher"], model="local/echo-1", max_tokens=4000, wait=wait,
                  text=f"Write the full report on {topic} from: {document(6000)}")
        if phase == "spike" and not spiked:
            spiked = 1
            for _ in range(40):
                spawn(key=keys["researcher"], model="local/echo-1", max_tokens=rng.randint(100, 300),
                      text=f"Urgent: re-check {rng.choice(TOPICS)} against {document(rng.randint(500, 1500))}")
        progress.draw(tally, phase)
        await asyncio.sleep(rng.uniform(0.15, 0.5))
    progress.draw(tally, "finishing")
    pending = [t for t in tasks if not t.done()]
    if pending:  # held calls waiting for a person give up after their X-SmartSpace-Wait
        await asyncio.wait(pending, timeout=approval_wait + 5)
    progress.draw(tally, "done")
    progress.end()
    return tally


async def run(url: str, duration: float, serve: bool, keep_serving: bool, seed: int | None = None,
              approval_wait: int = 20) -> int:
    progress = Progress(duration)
    proc: subprocess.Popen | None = None
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        if not await _ready(http, url):
            if not serve:
                raise DemoError(f"no SmartSpace server answers at {url} (start one with `make run`)")
            proc = await _start_server(http, url, progress)
        try:
            client = Client(http, url)
            setup = await set_up(client, progress)
            await fund(client, setup["base"], progress)
            progress.step(f"open the dashboard: {url.rstrip('/')}/  — sign in as {DEMO_EMAIL} / {DEMO_PASSWORD}")
            progress.step(f"simulating agent traffic for {duration:.0f}s …")
            tally = await traffic(client, setup["keys"], duration, progress, random.Random(seed), approval_wait)
            wallet = await client.ok("GET", f"{setup['base']}/wallet")
            reasons = ", ".join(f"{code} {n}" for code, n in sorted(tally.reasons.items())) or "none"
            print(f"smartspace demo: {tally.line()}\n  refusals and holds by code: {reasons}\n"
                  f"  wallet: available ${wallet['available_micros'] / 1_000_000:.6f} USDC\n"
                  f"  dashboard: {url.rstrip('/')}/  (email {DEMO_EMAIL}, password {DEMO_PASSWORD})", flush=True)
            if proc is not None and keep_serving:
                print("smartspace demo: the server it started keeps running; Ctrl-C stops it", flush=True)
                await asyncio.to_thread(proc.wait)
        finally:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(15)
    return 0
