"""Live fan-out: N websocket clients over M server processes, SmartSpace next to stock python-socketio, one run.

    .venv/bin/python bench/fanout.py [--clients 200] [--servers 2] [--step-seconds 10] [--rates 10,20,40,…]
                                     [--faults] [--only smartspace|stock] [--database-url …] [--redis-url …]

SmartSpace: M ``smartspace serve`` processes on a fresh PostgreSQL database (dropped afterwards) and Redis
(a channel prefix of its own, so other users of the Redis are not heard), ``SMARTSPACE_ACCESS_LOG=false``.
One user, one project; every client connects to ``/budgets`` with the user's access token (checked) and
subscribes to the project. Events are caused by ``PATCH /api/v1/projects/{id}`` on process 0, open loop,
at each rate of ``--rates`` for ``--step-seconds``, until saturation (deliveries fall under 80% of what was
asked, or the p50 latency passes 1 s). Stock: ``bench/stock_sio.py`` (``AsyncServer`` + ``AsyncRedisManager``)
on the same number of processes, fed by ``POST /trigger`` on process 0, measured on the same clients.

Clients are raw aiohttp websockets speaking engine.io 4 / Socket.IO 5 (cheap: many per process), spread
round-robin over the processes, in ``--client-procs`` processes. Per step: commit→client latency from each
event's ``ts`` (p50/p99) on clients of process 0 (local) and of the others (cross-process, via Redis),
deliveries/s (events of the step delivered ÷ time from the step's start to its last delivery), server CPU
per delivery (all server processes, /proc/<pid>/stat), the REST latency of the causing calls. Once: connect
+ subscribe rate, RSS per connection (servers' RSS after connecting minus before ÷ connections), and lost
and duplicated events per client at the end. Redis is reached through a TCP proxy (tests/live.py); with
``--faults`` a last phase cuts it for 3 s and freezes it for 4 s under load (the shared Redis server itself
is never touched) and reports loss, duplicates and how long SmartSpace's listener took to notice the freeze.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
import uuid
from array import array
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.e2e.procs import Server, create_database, drop_database, free_port, migrate, server_env  # noqa: E402
from tests.live import TcpProxy  # noqa: E402

PY = sys.executable
NS = "/budgets"
SAMPLE = 4000  # latencies kept per (step, local|cross) per client process


# ---------------------------------------------------------------- client processes
class _Env(msgspec.Struct):
    seq: int
    ts: str


_event = msgspec.json.Decoder(tuple[str, _Env]).decode


class Client:
    __slots__ = ("ack", "dups", "local", "records", "seen")

    def __init__(self, local: bool) -> None:
        self.local = local
        self.ack: int | None = None
        self.seen: set[int] = set()
        self.dups = 0
        self.records = array("d")  # (event ts, latency) pairs


async def run_client(session: aiohttp.ClientSession, url: str, token: str, project: str, since: int, client: Client,
                     subscribed: asyncio.Future, ts_cache: dict[str, float], progress: asyncio.Event) -> None:
    ws_url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    async with session.ws_connect(ws_url, max_msg_size=0) as ws:
        first = await ws.receive_str()
        assert first.startswith("0"), first
        await ws.send_str(f"40{NS}," + json.dumps({"token": token}))
        ack_prefix, event_prefix = f"43{NS},1", f"42{NS},"
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = msg.data
            if data.startswith(event_prefix):
                now = time.time()
                _, env = _event(data[len(event_prefix):])
                if env.seq in client.seen:
                    client.dups += 1
                    continue
                client.seen.add(env.seq)
                at = ts_cache.get(env.ts)
                if at is None:
                    at = ts_cache[env.ts] = datetime.fromisoformat(env.ts).timestamp()
                client.records.append(at)
                client.records.append(now - at)
                progress.set()
            elif data == "2":
                await ws.send_str("3")
            elif data.startswith(f"40{NS},"):
                await ws.send_str(f"42{NS},1" + json.dumps(["subscribe", {"project_id": project, "since": since}]))
            elif data.startswith(f"44{NS},"):
                subscribed.set_exception(RuntimeError(f"connect refused: {data}"))
                return
            elif data.startswith(ack_prefix):
                ack = json.loads(data[len(ack_prefix):])[0]
                if not ack.get("ok"):
                    subscribed.set_exception(RuntimeError(f"subscribe refused: {ack}"))
                    return
                client.ack = ack["seq"]
                subscribed.set_result(None)


def summarise(clients: list[Client], t0: float, t1: float) -> dict:
    """Deliveries of events with ts in [t0, t1): count, last arrival, latency samples (local / cross)."""
    out = {"n": 0, "last": 0.0, "local": [], "cross": []}
    pools: dict[str, list[float]] = {"local": [], "cross": []}
    for c in clients:
        rec = c.records
        pool = pools["local" if c.local else "cross"]
        for i in range(0, len(rec), 2):
            at, lat = rec[i], rec[i + 1]
            if t0 <= at < t1:
                out["n"] += 1
                out["last"] = max(out["last"], at + lat)
                pool.append(lat)
    for key, pool in pools.items():
        out[key] = random.sample(pool, SAMPLE) if len(pool) > SAMPLE else pool
    return out


async def worker(spec: dict) -> None:
    """A client process: commands on stdin, one JSON line answer each on stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    clients: list[Client] = []
    tasks: list[asyncio.Task] = []
    ts_cache: dict[str, float] = {}
    progress = asyncio.Event()  # set on every event received

    async def until(done, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not done() and (left := deadline - time.monotonic()) > 0:
            progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.wait(), min(left, 0.5))

    gate = asyncio.Semaphore(64)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["cmd"] == "connect":
                errors = 0

                async def one(url: str, local: bool) -> None:
                    nonlocal errors
                    async with gate:
                        client, done = Client(local), loop.create_future()
                        task = asyncio.create_task(run_client(
                            session, url, spec["token"], spec["project"], spec["since"], client, done, ts_cache,
                            progress))
                        task.add_done_callback(lambda t, d=done: d.done() or d.set_exception(
                            RuntimeError(repr(t.exception()) if not t.cancelled() else "cancelled")))
                        try:
                            await asyncio.wait_for(done, 60)
                            clients.append(client)
                            tasks.append(task)
                        except Exception as exc:  # counted, the first few shown
                            errors += 1
                            if errors <= 3:
                                print(f"client error: {exc!r}", file=sys.stderr)
                            task.cancel()

                t0 = time.monotonic()
                await asyncio.gather(*(one(url, local) for url, local in spec["targets"]))
                answer = {"seconds": time.monotonic() - t0, "errors": errors,
                          "acks": sorted({c.ack for c in clients})}
            elif cmd["cmd"] == "step":  # wait until every client has seen `hi`, then summarise the window
                await until(lambda hi=cmd["hi"]: not any((c.ack or 0) < hi and hi not in c.seen for c in clients),
                            cmd["wait"])
                answer = summarise(clients, cmd["t0"], cmd["t1"])
            elif cmd["cmd"] == "final":
                hi = cmd["hi"]

                def missing(c: Client, hi: int = hi) -> int:
                    return hi - (c.ack or 0) - sum(1 for s in c.seen if (c.ack or 0) < s <= hi)

                await until(lambda: not any(missing(c) for c in clients), cmd["wait"])
                lost = [missing(c) for c in clients]
                answer = {"lost": sum(lost), "lost_max": max(lost, default=0),
                          "clients_losing": sum(1 for n in lost if n), "dups": sum(c.dups for c in clients),
                          "dups_max": max((c.dups for c in clients), default=0), "clients": len(clients)}
            else:
                break
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Workers:
    def __init__(self, procs: list[asyncio.subprocess.Process]) -> None:
        self.procs = procs

    @classmethod
    async def start(cls, n: int, urls: list[str], clients: int, token: str, project: str, since: int) -> Workers:
        targets = [(urls[i % len(urls)], i % len(urls) == 0) for i in range(clients)]
        procs = []
        for w in range(n):
            spec = {"targets": targets[w::n], "token": token, "project": project, "since": since}
            procs.append(await asyncio.create_subprocess_exec(
                PY, __file__, "--worker", json.dumps(spec), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, limit=64 * 1024 * 1024))
        return cls(procs)

    async def ask(self, cmd: dict) -> list[dict]:
        for p in self.procs:
            p.stdin.write((json.dumps(cmd) + "\n").encode())
            await p.stdin.drain()
        answers = []
        for p in self.procs:
            line = await p.stdout.readline()
            if not line:
                raise SystemExit("bench: a client process died")
            answers.append(json.loads(line))
        return answers

    async def stop(self) -> None:
        for p in self.procs:
            with _quiet():
                p.stdin.write(b'{"cmd": "stop"}\n')
                p.stdin.close()
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 20)
            except TimeoutError:
                p.kill()
                await p.wait()


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (OSError, RuntimeError))


# ---------------------------------------------------------------- server side
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000 if xs else float("nan")


class System:
    """One side of the comparison: its processes, how to cause an event, what it acks at subscribe."""

    name: str
    token: str
    project: str

    def __init__(self, args, proxy: TcpProxy) -> None:
        self.args, self.proxy = args, proxy
        self.pids: list[int] = []
        self.urls: list[str] = []

    async def start(self, logs: Path, http: aiohttp.ClientSession) -> None:
        raise NotImplementedError

    async def cause(self, http: aiohttp.ClientSession, n: int) -> bool:
        raise NotImplementedError

    async def head(self, http: aiohttp.ClientSession) -> int:
        return 0

    async def close(self) -> None:
        raise NotImplementedError


class SmartSpace(System):
    name = "smartspace"

    servers: list[Server] = []
    db_name: str | None = None

    async def start(self, logs: Path, http: aiohttp.ClientSession) -> None:
        args = self.args
        db_name = f"smartspace_fanout_{uuid.uuid4().hex[:10]}"
        database = await create_database(args.database_url, db_name)
        self.db_name = db_name
        redis = urlparse(args.redis_url)._replace(netloc=f"127.0.0.1:{self.proxy.port}").geturl()
        env = server_env(database, logs / "data", access_log="false", chain_worker="false", redis_url=redis,
                         log_level="WARNING")
        if not args.server_root:  # (a tree from before the setting listens on the shared smartspace:events)
            env["SMARTSPACE_REDIS_CHANNEL_PREFIX"] = f"bench-{uuid.uuid4().hex[:8]}"
        await migrate(env)
        # --server-root: another tree's server (e.g. an older commit) measured by this bench
        root = Path(args.server_root) if args.server_root else ROOT
        self.servers = [Server(f"fanout-{i}", env, logs, cwd=root) for i in range(args.servers)]
        for s in self.servers:
            await s.ready(http)
        self.pids = [s.proc.pid for s in self.servers]
        self.urls = [s.url for s in self.servers]
        async with http.post(self.urls[0] + "/api/v1/auth/register", json={
                "email": f"fanout-{uuid.uuid4().hex[:6]}@smartspace.test", "password": "bench password 1",
                "name": "Fanout"}) as r:
            self.token = (await r.json())["access_token"]
        self.headers = {"Authorization": f"Bearer {self.token}"}
        async with http.get(self.urls[0] + "/api/v1/projects", headers=self.headers) as r:
            self.project = (await r.json())["items"][0]["id"]

    async def cause(self, http: aiohttp.ClientSession, n: int) -> bool:
        async with http.patch(f"{self.urls[0]}/api/v1/projects/{self.project}", headers=self.headers,
                              json={"name": f"fanout {n}"}) as r:
            await r.read()
            return r.status == 200

    async def head(self, http: aiohttp.ClientSession) -> int:
        async with http.get(f"{self.urls[0]}/api/v1/projects/{self.project}/audit?limit=1",
                            headers=self.headers) as r:
            return (await r.json())["items"][0]["seq"]

    async def listen_errors(self, http: aiohttp.ClientSession) -> float:
        total = 0.0
        for url in self.urls[1:]:
            async with http.get(url + "/metrics") as r:
                for line in (await r.text()).splitlines():
                    if line.startswith('smartspace_bus_errors_total{op="listen"}'):
                        total += float(line.rsplit(" ", 1)[1])
        return total

    async def close(self) -> None:
        for s in self.servers:
            s.stop()
        if self.db_name:
            await drop_database(self.args.database_url, self.db_name)


class Stock(System):
    name = "stock"

    procs: list = []

    async def start(self, logs: Path, http: aiohttp.ClientSession) -> None:
        import subprocess
        self.token = uuid.uuid4().hex * 2
        self.project = "prj_bench"
        redis = urlparse(self.args.redis_url)._replace(netloc=f"127.0.0.1:{self.proxy.port}").geturl()
        channel = f"bench-stock-{uuid.uuid4().hex[:8]}"
        self.procs = []
        for i in range(self.args.servers):
            port = free_port()
            log = (logs / f"stock-{i}.log").open("wb")
            self.procs.append(subprocess.Popen(  # noqa: ASYNC220 - started once, before measuring
                [PY, str(ROOT / "bench" / "stock_sio.py"), "--port", str(port), "--redis-url", redis,
                 "--channel", channel, "--token", self.token], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
            self.urls.append(f"http://127.0.0.1:{port}")
        for url in self.urls:
            for _ in range(300):
                try:
                    async with http.get(url + "/ready") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        self.pids = [p.pid for p in self.procs]
        await asyncio.sleep(0.5)  # the Redis manager subscribes in a background task with no signal to await

    async def cause(self, http: aiohttp.ClientSession, n: int) -> bool:
        async with http.post(self.urls[0] + "/trigger", json={"project_id": self.project,
                                                              "name": f"fanout {n}"}) as r:
            await r.read()
            return r.status == 200

    async def close(self) -> None:
        import subprocess
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


# ---------------------------------------------------------------- the measurement
class Run:
    def __init__(self, system: System, workers: Workers | None, head: int) -> None:
        self.system, self.workers = system, workers
        self.head = head  # the seq every client acked at subscribe
        self.caused = 0
        self.failed = 0

    async def load(self, http: aiohttp.ClientSession, rate: float, seconds: float,
                   during=None) -> tuple[list[float], float, float]:
        """Open-loop causes at ``rate``/s for ``seconds``: REST latencies and the window [t0, t1) in wall time."""
        latencies: list[float] = []
        pending: set[asyncio.Task] = set()

        async def one(n: int) -> None:
            start = time.perf_counter()
            ok = False
            try:
                ok = await self.system.cause(http, n)
            except aiohttp.ClientError:
                pass
            if ok:
                self.caused += 1
                latencies.append(time.perf_counter() - start)
            else:
                self.failed += 1

        t0 = time.time()
        start = time.perf_counter()
        side = asyncio.create_task(during()) if during else None
        i = 0
        while (elapsed := time.perf_counter() - start) < seconds:
            due = int(elapsed * rate) + 1
            while i < due:
                task = asyncio.create_task(one(self.caused + self.failed + len(pending)))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
            await asyncio.sleep(max(0.0, (i / rate) - (time.perf_counter() - start)))
        if pending:
            await asyncio.wait(pending, timeout=120)
        if side:
            await side
        return latencies, t0, time.time()

    @property
    def hi(self) -> int:
        return self.head + self.caused


async def measure(system: System, args, http: aiohttp.ClientSession) -> dict:
    print(f"\n== {system.name}: {args.clients} clients over {len(system.urls)} processes", file=sys.stderr)
    # The causing call's own CPU, measured with nobody subscribed: subtracted for "CPU per delivery, fan-out only".
    calibrate = Run(system, None, 0)
    cpu0 = sum(cpu_seconds(p) for p in system.pids)
    await calibrate.load(http, 10, 3)
    cause_cpu = (sum(cpu_seconds(p) for p in system.pids) - cpu0) / max(1, calibrate.caused)
    rss0 = sum(rss_bytes(p) for p in system.pids)
    cpu0 = sum(cpu_seconds(p) for p in system.pids)
    since = await system.head(http)  # clients pass the last seq they saw: nothing old to replay
    workers = await Workers.start(args.client_procs, system.urls, args.clients, system.token, system.project, since)
    result: dict = {"steps": []}
    try:
        t = time.monotonic()
        answers = await workers.ask({"cmd": "connect"})
        connect_seconds = time.monotonic() - t
        connected = args.clients - sum(a["errors"] for a in answers)
        acks = {seq for a in answers for seq in a["acks"]}
        connect_cpu = sum(cpu_seconds(p) for p in system.pids) - cpu0
        result["connect"] = {"clients": connected, "seconds": connect_seconds, "per_s": connected / connect_seconds,
                             "cpu_ms_each": connect_cpu * 1000 / max(1, connected)}
        await asyncio.sleep(1.0)  # let the servers' allocations settle before reading RSS
        result["rss_per_conn_kb"] = (sum(rss_bytes(p) for p in system.pids) - rss0) / 1024 / max(1, connected)
        print(f"   connected {connected} in {connect_seconds:.2f}s; acks {sorted(acks)}", file=sys.stderr)
        result["cause_cpu_ms"] = cause_cpu * 1000
        run = Run(system, workers, head=max(acks) if acks else 0)
        idle, _, _ = await run.load(http, 2, 3)  # REST latency with clients connected but little to deliver
        await workers.ask({"cmd": "step", "t0": 0, "t1": 0, "hi": run.hi, "wait": 10})
        result["rest_idle_ms"] = (pct(idle, 50), pct(idle, 99))
        for rate in args.rates:
            cpu_before = sum(cpu_seconds(p) for p in system.pids)
            rest, t0, t1 = await run.load(http, rate, args.step_seconds)
            answers = await workers.ask({"cmd": "step", "t0": t0, "t1": t1, "hi": run.hi, "wait": 60})
            cpu = sum(cpu_seconds(p) for p in system.pids) - cpu_before
            n = sum(a["n"] for a in answers)
            last = max((a["last"] for a in answers), default=t1)
            local = [x for a in answers for x in a["local"]]
            cross = [x for a in answers for x in a["cross"]]
            step = {"rate": rate, "caused": len(rest) / args.step_seconds, "deliveries": n,
                    "per_s": n / max(last - t0, 1e-9), "asked_per_s": rate * connected,
                    "local": (pct(local, 50), pct(local, 99)), "cross": (pct(cross, 50), pct(cross, 99)),
                    "cpu_us": cpu * 1e6 / max(1, n), "rest": (pct(rest, 50), pct(rest, 99)),
                    "fanout_cpu_us": max(0.0, cpu - len(rest) * cause_cpu) * 1e6 / max(1, n)}
            result["steps"].append(step)
            print(f"   {rate:>5} ev/s: caused {step['caused']:.1f}/s, {step['per_s']:.0f} deliveries/s "
                  f"(asked {step['asked_per_s']}), local p50/p99 {step['local'][0]:.1f}/{step['local'][1]:.1f} ms, "
                  f"cross {step['cross'][0]:.1f}/{step['cross'][1]:.1f} ms, {step['cpu_us']:.1f} µs CPU/delivery "
                  f"({step['fanout_cpu_us']:.1f} without the causing call), "
                  f"REST p50/p99 {step['rest'][0]:.1f}/{step['rest'][1]:.1f} ms", file=sys.stderr)
            if step["per_s"] < 0.8 * step["asked_per_s"] or step["local"][0] > 1000 or step["caused"] < 0.8 * rate:
                break
        final = await workers.ask({"cmd": "final", "hi": run.hi, "wait": 30})
        result["loss"] = _loss(final)
        if args.faults:
            result["faults"] = await faults(system, run, workers, args, http)
        result["failed_causes"] = run.failed
    finally:
        await workers.stop()
    return result


def _loss(answers: list[dict]) -> dict:
    return {"lost": sum(a["lost"] for a in answers), "lost_max": max(a["lost_max"] for a in answers),
            "clients_losing": sum(a["clients_losing"] for a in answers), "dups": sum(a["dups"] for a in answers),
            "dups_max": max(a["dups_max"] for a in answers)}


async def faults(system: System, run: Run, workers: Workers, args, http: aiohttp.ClientSession) -> dict:
    """Under load: Redis cut for 3 s, then (after 3 s) frozen for 4 s — through the proxy only."""
    noticed: list[float] = []

    async def script() -> None:
        await asyncio.sleep(2)
        await system.proxy.cut()
        await asyncio.sleep(3)
        await system.proxy.restore()
        await asyncio.sleep(3)
        before = await system.listen_errors(http) if isinstance(system, SmartSpace) else 0.0
        system.proxy.freeze()
        frozen_at = time.monotonic()
        if isinstance(system, SmartSpace):
            while time.monotonic() - frozen_at < 4:
                if await system.listen_errors(http) > before:
                    noticed.append(time.monotonic() - frozen_at)
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, 4 - (time.monotonic() - frozen_at)))
        system.proxy.thaw()

    rest, _, _ = await run.load(http, args.fault_rate, 15, during=script)
    final = await workers.ask({"cmd": "final", "hi": run.hi, "wait": 60})
    out = {"rate": args.fault_rate, "rest": (pct(rest, 50), pct(rest, 99)), **_loss(final),
           "deaf_noticed_s": noticed[0] if noticed else None}
    print(f"   faults: {out}", file=sys.stderr)
    return out


def table(results: dict[str, dict]) -> str:
    names = list(results)
    rows = [("connect + subscribe /s (token checked)", lambda r: f"{r['connect']['per_s']:.0f}"),
            ("server CPU per connect + subscribe", lambda r: f"{r['connect']['cpu_ms_each']:.2f} ms"),
            ("RSS per connection", lambda r: f"{r['rss_per_conn_kb']:.1f} KB"),
            ("server CPU per causing call (no subscribers)", lambda r: f"{r['cause_cpu_ms']:.2f} ms"),
            ("REST p50/p99, idle", lambda r: "{:.1f}/{:.1f} ms".format(*r["rest_idle_ms"]))]
    steps = max(len(r["steps"]) for r in results.values())
    for i in range(steps):
        def get(r, key, i=i, fmt="{:.1f}/{:.1f} ms"):
            if i >= len(r["steps"]):
                return "—"
            v = r["steps"][i][key]
            return fmt.format(*v) if isinstance(v, tuple | list) else fmt.format(v)
        rate = next(r["steps"][i]["rate"] for r in results.values() if i < len(r["steps"]))
        rows += [(f"{rate} ev/s: local commit→client p50/p99", lambda r, g=get: g(r, "local")),
                 (f"{rate} ev/s: cross-process p50/p99", lambda r, g=get: g(r, "cross")),
                 (f"{rate} ev/s: deliveries/s", lambda r, g=get: g(r, "per_s", fmt="{:.0f}")),
                 (f"{rate} ev/s: server CPU per delivery", lambda r, g=get: g(r, "cpu_us", fmt="{:.1f} µs")),
                 (f"{rate} ev/s: … without the causing call", lambda r, g=get: g(r, "fanout_cpu_us", fmt="{:.1f} µs")),
                 (f"{rate} ev/s: REST p50/p99 of the causes", lambda r, g=get: g(r, "rest"))]
    rows += [("peak deliveries/s", lambda r: f"{max(s['per_s'] for s in r['steps']):.0f}"),
             ("lost / duplicated (all clients)", lambda r: f"{r['loss']['lost']} / {r['loss']['dups']}")]
    if all("faults" in r for r in results.values()):
        rows += [("faults: lost / duplicated", lambda r: f"{r['faults']['lost']} / {r['faults']['dups']} "
                  f"({r['faults']['clients_losing']} clients losing)"),
                 ("faults: frozen Redis noticed after", lambda r: "—" if r["faults"]["deaf_noticed_s"] is None
                  else f"{r['faults']['deaf_noticed_s']:.2f} s")]
    out = ["| measure | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for label, f in rows:
        out.append(f"| {label} | " + " | ".join(f(results[n]) for n in names) + " |")
    return "\n".join(out)


async def main(args) -> None:
    logs = Path(args.logs or f"/tmp/fanout-{uuid.uuid4().hex[:6]}")
    logs.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    redis = urlparse(args.redis_url)
    results: dict[str, dict] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        for kind in [k for k in ("smartspace", "stock") if args.only in (None, k)]:
            proxy = await TcpProxy(redis.hostname or "127.0.0.1", redis.port or 6379).start()
            system = (SmartSpace if kind == "smartspace" else Stock)(args, proxy)
            try:
                await system.start(logs, http)
                results[kind] = await measure(system, args, http)
            finally:
                await system.close()  # also after a partial start: nothing left running
                await proxy.close()
    print(f"\nfanout: {args.clients} clients over {args.servers} processes, {args.step_seconds:g} s per step "
          f"(logs in {logs})\n")
    print(table(results))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        asyncio.run(worker(json.loads(sys.argv[2])))
        raise SystemExit(0)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--step-seconds", type=float, default=10.0)
    ap.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                    default=[10, 20, 40, 80, 160, 320, 640])
    ap.add_argument("--faults", action="store_true", help="a last phase with Redis cut for 3 s, frozen for 4 s")
    ap.add_argument("--fault-rate", type=float, default=20.0)
    ap.add_argument("--only", choices=["smartspace", "stock"], default=None)
    ap.add_argument("--server-root", default=None, help="run `smartspace serve` from this source tree instead")
    ap.add_argument("--logs", default=None)
    ap.add_argument("--database-url", default=os.environ.get(
        "SMARTSPACE_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--redis-url", default=os.environ.get("SMARTSPACE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    asyncio.run(main(ap.parse_args()))
