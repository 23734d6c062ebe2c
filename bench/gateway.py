"""Gateway overhead: the same load sent to the fake upstream directly and through the gateway, in one run.

    .venv/bin/python bench/gateway.py [--requests 2000] [--serial 300] [--database-url postgresql+asyncpg://…]

Starts the fake upstream (``tests/fakes/upstream.py``) and a real ``smartspace serve`` subprocess on
PostgreSQL (a fresh database, dropped afterwards; ``SMARTSPACE_ACCESS_LOG=false``), funds a project,
then for concurrency 1 and 50, non-streaming and streaming, sends the load directly and through the
gateway and prints p50/p99 latency, the p50/p99 added by the gateway, requests/s for both, their
ratio, and the server's CPU time per request (from /proc). At the end it checks that every gateway
request was fully accounted (settled, nothing left reserved, ledger == usage == sum of receipts).
``--profile`` runs py-spy on the server during the concurrency-50 non-streaming phase and prints the
hottest functions. Bounded: each phase stops at its request count or ``--phase-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import msgspec
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.fakes.upstream and tests.e2e.procs, when run as a script
from tests.e2e.procs import Server, create_database, drop_database, free_port, server_env  # noqa: E402

PY = sys.executable
UPSTREAM_KEY = "sk-bench-upstream-key-0000000000000000"
ADMIN = "bench-admin@smartspace.test"
BODY = {"model": "gpt-4o-mini", "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Summarise the plot of a short story about a lighthouse keeper in two lines."}],
    "max_tokens": 64}


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


async def wait_http(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {url} did not come up")
            await asyncio.sleep(0.2)


class Phase(msgspec.Struct):
    latencies: list[float]
    seconds: float
    errors: int
    cpu: float = 0.0
    cpu_user: float = 0.0
    stages: dict[str, list[float]] = {}  # the gateway's Server-Timing, ms per stage

    def stage_line(self) -> str:
        if not self.stages:
            return ""
        parts = [f"{k} {sorted(v)[len(v) // 2]:.2f}" for k, v in self.stages.items()]
        user = f"; server CPU user {self.cpu_user * 1000 / self.done:.2f} ms/req, kernel " \
               f"{(self.cpu - self.cpu_user) * 1000 / self.done:.2f}" if self.done else ""
        return "    server-side p50 ms per stage: " + ", ".join(parts) + user

    @property
    def done(self) -> int:
        return len(self.latencies)

    def pct(self, p: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000 if xs else float("nan")

    @property
    def rps(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


async def load(url: str, headers: dict | list[dict], body: dict, *, concurrency: int, total: int, stream: bool,
               max_seconds: float, costs: list[int] | None = None) -> Phase:
    payload = msgspec.json.encode({**body, "stream": stream})
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + max_seconds
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=60)
    cost_re = re.compile(rb"cost_micros=(\d+)")
    timing_re = re.compile(rb"timing=(\S+)")
    stages: dict[str, list[float]] = collections.defaultdict(list)

    def add_timing(raw: str) -> None:
        for part in raw.split(","):
            name, _, dur = part.strip().partition(";dur=")
            if dur:
                stages[name].append(float(dur))

    variants = [{**h, "Content-Type": "application/json"}
                for h in (headers if isinstance(headers, list) else [headers])]
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker(i: int) -> None:
            nonlocal issued, errors
            hdrs = variants[i % len(variants)]
            while issued < total and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=payload, headers=hdrs) as resp:
                        data = await resp.read()
                        if resp.status != 200:
                            errors += 1
                            if errors <= 3:
                                print(f"  error {resp.status}: {data[:200]!r}", file=sys.stderr)
                            continue
                        if costs is not None:
                            if stream:
                                m = cost_re.search(data)
                                costs.append(int(m.group(1)) if m else -1)
                                t = timing_re.search(data)
                                if t:
                                    add_timing(t.group(1).decode())
                            else:
                                costs.append(int(resp.headers.get("x-smartspace-cost-micros", "-1")))
                                add_timing(resp.headers.get("Server-Timing", ""))
                except aiohttp.ClientError as exc:
                    errors += 1
                    if errors <= 3:
                        print(f"  error {exc!r}", file=sys.stderr)
                    continue
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        seconds = time.perf_counter() - t0
    return Phase(latencies=latencies, seconds=seconds, errors=errors, stages=dict(stages))


async def setup_project(base: str, projects: int = 1) -> tuple[str, list[str], list[dict]]:
    """The admin user, ``projects`` funded projects with permissive policies, one key each."""
    async with aiohttp.ClientSession() as s:
        async def call(method: str, path: str, token: str | None = None, **kw):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with s.request(method, base + path, headers=headers, **kw) as r:
                body = await r.json()
                if r.status >= 300:
                    raise SystemExit(f"bench setup: {method} {path} → {r.status} {body}")
                return body

        reg = await call("POST", "/api/v1/auth/register",
                         json={"email": ADMIN, "password": "bench password 1", "name": "Bench"})
        token = reg["access_token"]
        system = await call("GET", "/api/v1/admin/policy", token)
        system = {k: v for k, v in system.items() if k not in ("version", "created_at", "created_by")}
        system.update(max_rate_per_minute=None, max_per_day_micros=10**15)
        await call("PUT", "/api/v1/admin/policy", token, json=system)
        ids = [(await call("GET", "/api/v1/projects", token))["items"][0]["id"]]
        for i in range(1, projects):
            ids.append((await call("POST", "/api/v1/projects", token, json={"name": f"bench {i}"}))["id"])
        keys = []
        for project in ids:
            key = (await call("POST", f"/api/v1/projects/{project}/keys", token, json={"name": "bench"}))["key"]
            await call("POST", f"/api/v1/admin/projects/{project}/credits", token,
                       json={"amount_micros": 10**12, "reason": "bench funds"})
            await call("PUT", f"/api/v1/projects/{project}/policy", token,
                       json={"max_risk_score": 10, "review_risk_above": 10, "require_approval_above_micros": None})
            keys.append({"Authorization": f"Bearer {key}"})
        return token, ids, keys


async def accounting(base: str, token: str, projects: list[str], costs: list[int]) -> str:
    requests = cost = spent = reserved = settled = 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
        for project in projects:
            async with s.get(f"{base}/api/v1/projects/{project}/usage") as r:
                usage = await r.json()
            async with s.get(f"{base}/api/v1/projects/{project}/wallet") as r:
                wallet = await r.json()
            requests += usage["totals"]["requests"]
            cost += usage["totals"]["cost_micros"]
            spent += -usage["ledger"].get("spend", 0)
            reserved += wallet["reserved_micros"]
            settled += usage["requests_by_status"].get("settled", 0)
    ok = (requests == len(costs) == settled and cost == sum(costs) == spent and reserved == 0
          and min(costs, default=1) > 0)
    return (f"{'OK' if ok else 'MISMATCH'}: {len(costs)} gateway requests, settled {settled}, receipts "
            f"{sum(costs)} µUSDC, /usage {cost} µUSDC over {requests} requests, ledger spend {spent} µUSDC, "
            f"wallets reserved {reserved}")


def _frame(f: str) -> str:
    """``func (/path/to/file.py:12)`` → ``func (file.py)``."""
    name, _, where = f.partition(" (")
    return f"{name} ({where.rstrip(')').split(':')[0].rsplit('/', 1)[-1]})" if where else name


def profile_top(raw: str, n: int = 25) -> str:
    """Aggregate py-spy's collapsed stacks: self time and inclusive time per function."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] += samples
        for f in set(frames):
            incl[f] += samples
    if not total:
        return "  (no samples)"
    out = [f"  {total} samples; self time:"]
    out += [f"    {c * 100 / total:5.1f}%  {f}" for f, c in own.most_common(n)]
    out.append("  inclusive (functions of ours):")
    ours = [(f, c) for f, c in incl.most_common(400)
            if any(f"({m}" in f for m in ("spend.py", "gateway.py", "wallet.py", "budgets.py", "brain.py",
                                           "pipeline.py", "container.py", "uow.py", "events.py", "identity.py",
                                           "openai_compat.py", "wire.py", "db.py", "base.py", "catalog.py",
                                           "policies.py", "ratelimit.py", "middleware.py", "risk.py"))]
    out += [f"    {c * 100 / total:5.1f}%  {f}" for f, c in ours[:n]]
    return "\n".join(out)


def _callers() -> tuple[str, str]:
    """The innermost domain/agentic function and storage function on the stack (who issued this SQL)."""
    import greenlet

    # SQLAlchemy runs the driver in a greenlet: the awaiting coroutines are on the parent's stack.
    parent = greenlet.getcurrent().parent
    frame = parent.gr_frame if parent is not None and parent.gr_frame is not None else sys._getframe(2)
    service = repo = ""
    while frame is not None:
        path = frame.f_code.co_filename
        rel = path[len(str(ROOT)) + 1:] if path.startswith(str(ROOT)) else ""
        name = f"{rel.rsplit('/', 1)[-1]}:{frame.f_code.co_qualname}"
        if not repo and rel.startswith("storage/"):
            repo = name
        if not service and rel.startswith(("domain/", "agentic/", "server/")):
            service = name
        if service and repo:
            break
        frame = frame.f_back
    return service, repo


async def gateway_layer_alone(client, base: str, container, fake, body: bytes, headers: dict, requests: int) -> None:
    """The gateway's own cost: the same requests with the spend path stubbed out (no database), against
    the same requests sent straight to the fake upstream, both from this process (sequential)."""
    from domain.base import utcnow
    from domain.spend import Prepared, Receipt, Spending

    class StubSpending(Spending):  # the real execute path; its database steps stubbed
        def __init__(self, real: Spending) -> None:
            self.__dict__.update(real.__dict__)

        async def prepare(self, actor, cmd, *, source="api", idempotency_key=None):
            return Prepared(request_id="req_stub", project_id=actor.project_id or "", model="openai/gpt-4o-mini",
                            provider="openai", upstream_model="gpt-4o-mini", operation=cmd.operation,
                            estimated_cost_micros=100, reserved_micros=100, input_tokens=30,
                            max_output_tokens=cmd.max_tokens or 64, input_micros_per_mtok=150_000,
                            output_micros_per_mtok=600_000, budget_ids=[], actor=actor.label, source=source,
                            messages=cmd.messages, input=cmd.input, params=cmd.params, stream=cmd.stream)

        async def settle(self, prepared, usage, response=None):
            return Receipt(request_id=prepared.request_id, model=prepared.model, input_tokens=usage.input_tokens,
                           output_tokens=usage.output_tokens, estimated_cost_micros=100,
                           cost_micros=prepared.cost(usage), settled_at=utcnow())

        async def fail(self, prepared, error, usage=None):
            return None

    real = container.spending
    container.spending = StubSpending(real)
    direct_body = msgspec.json.encode({**BODY})
    try:
        async def timed(url: str, data: bytes, hdrs: dict) -> tuple[float, float]:
            for _ in range(20):
                async with client.session.post(url, data=data, headers=hdrs) as r:
                    await r.read()
            cpu = time.process_time()
            lat = []
            for _ in range(requests):
                t = time.perf_counter()
                async with client.session.post(url, data=data, headers=hdrs) as r:
                    await r.read()
                    assert r.status == 200, r.status
                lat.append(time.perf_counter() - t)
            lat.sort()
            return lat[len(lat) // 2] * 1000, (time.process_time() - cpu) / requests * 1000

        d50, dcpu = await timed(f"{fake.base_url}/chat/completions", direct_body,
                                {"Content-Type": "application/json", "Authorization": f"Bearer {UPSTREAM_KEY}"})
        g50, gcpu = await timed(f"{base}/v1/chat/completions", body, headers)
        print(f"\ngateway layer alone (spend path stubbed, sequential, client + servers in one process): "
              f"p50 {g50:.2f} ms vs direct {d50:.2f} ms → added {g50 - d50:.2f} ms; "
              f"CPU {gcpu:.2f} vs {dcpu:.2f} ms/request → added {gcpu - dcpu:.2f} ms")
    finally:
        container.spending = real


async def breakdown(admin_url: str, requests: int, sqlite: bool = False) -> None:
    """In-process, sequential: where one gateway request spends its time in SQL (statement, issuing
    function, count and ms per request), plus a pyinstrument profile of the spend path."""
    from aiohttp.test_utils import TestClient, TestServer
    from sqlalchemy import event

    from server.app import create_app
    from server.container import Container
    from server.metrics import Metrics
    from server.providers import Providers, Upstream
    from server.settings import Settings
    from storage.bus import LocalBus
    from storage.db import Database
    from storage.models import metadata
    from tests.fakes.upstream import FakeUpstream

    dbname = f"bench_breakdown_{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="smartspace-bench-"))
    db_url = (make_url(f"sqlite+aiosqlite:///{tmp / 'smartspace.db'}") if sqlite
              else await create_database(admin_url, dbname))
    db = Database(db_url.render_as_string(hide_password=False), pool_size=20)
    fake = await FakeUpstream(record=False).start()
    client = None
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        settings = Settings(data_dir=str(tmp), jwt_secret="bench-" + "x" * 40, access_log=False,
                            admin_emails=(ADMIN,))
        metrics = Metrics()
        providers = Providers(settings, upstreams=[Upstream(provider="openai", kind="openai",
                                                            base_url=fake.base_url, api_key=UPSTREAM_KEY)])
        container = Container(settings, db, LocalBus(metrics), metrics=metrics, providers=providers)
        client = TestClient(TestServer(create_app(settings, container=container)))
        await client.start_server()
        base = str(client.make_url("")).rstrip("/")
        _, _, keys = await setup_project(base)
        body = msgspec.json.encode({**BODY, "model": "openai/gpt-4o-mini"})
        headers = {**keys[0], "Content-Type": "application/json"}

        async def one() -> None:
            async with client.session.post(f"{base}/v1/chat/completions", data=body, headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status

        for _ in range(30):
            await one()
        stats: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)
        txs = collections.Counter()

        @event.listens_for(db.engine.sync_engine, "before_cursor_execute")
        def before(conn, cursor, statement, params, context, executemany):
            context._bench_t0 = time.perf_counter()
            context._bench_who = _callers()

        @event.listens_for(db.engine.sync_engine, "after_cursor_execute")
        def after(conn, cursor, statement, params, context, executemany):
            words = statement.split()
            head = " ".join(words[:2] if words[0] != "SELECT" else [words[0], "… FROM",
                            words[words.index("FROM") + 1] if "FROM" in words else ""])
            service, repo = context._bench_who
            stats[(service, repo, head)].append(time.perf_counter() - context._bench_t0)

        @event.listens_for(db.engine.sync_engine, "commit")
        def on_commit(conn):
            txs["commit"] += 1

        t0 = time.perf_counter()
        for _ in range(requests):
            await one()
        wall = (time.perf_counter() - t0) / requests * 1000
        sql_ms = sum(sum(v) for v in stats.values()) / requests * 1000
        n_stmts = sum(len(v) for v in stats.values()) / requests
        print(f"\nSQL per gateway request (sequential, in-process, {db.dialect}): {n_stmts:.1f} statements, "
              f"{txs['commit'] / requests:.1f} commits, {sql_ms:.2f} ms in statements of {wall:.2f} ms wall")
        print(f"  {'ms/req':>7} {'n/req':>6}  issued by → repository: statement")
        for (service, repo, head), v in sorted(stats.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {sum(v) / requests * 1000:7.2f} {len(v) / requests:6.1f}  {service} → {repo}: {head}")
        event.remove(db.engine.sync_engine, "before_cursor_execute", before)
        event.remove(db.engine.sync_engine, "after_cursor_execute", after)
        await gateway_layer_alone(client, base, container, fake, body, headers, requests)
        try:
            from pyinstrument import Profiler
        except ImportError:
            return
        profiler = Profiler(interval=0.0005, async_mode="enabled")
        profiler.start()
        for _ in range(requests):
            await one()
        profiler.stop()
        print("\npyinstrument, the same requests (time shown is wall time of the request's task):")
        print(profiler.output_text(unicode=False, color=False, show_all=False, short_mode=True,
                                   time="percent_of_total")[:12000] if hasattr(profiler, "output_text") else "")
    finally:
        if client is not None:
            await client.close()
        await fake.stop()
        await db.dispose()
        if not sqlite:
            await drop_database(admin_url, dbname)
        shutil.rmtree(tmp, ignore_errors=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency-50 phase")
    ap.add_argument("--serial", type=int, default=300, help="requests per concurrency-1 phase")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--projects", type=int, default=1,
                    help="spread the gateway load over this many projects (keys), worker i → project i %% n")
    ap.add_argument("--phase-seconds", type=float, default=40.0)
    ap.add_argument("--database-url", default=os.environ.get(
        "SMARTSPACE_BENCH_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql",
                    help="sqlite: the server on a fresh SQLite file in its data directory (make run's default)")
    ap.add_argument("--profile", action="store_true", help="py-spy the server in the c=50 JSON phase")
    ap.add_argument("--breakdown", type=int, default=0, metavar="N",
                    help="instead: N sequential in-process requests, SQL per request by issuing function")
    args = ap.parse_args()
    if args.breakdown:
        await breakdown(args.database_url, args.breakdown, args.database == "sqlite")
        return

    sqlite = args.database == "sqlite"
    dbname = f"bench_gateway_{uuid.uuid4().hex[:8]}"
    admin_url = args.database_url
    tmp = Path(tempfile.mkdtemp(prefix="smartspace-bench-"))
    db_url = (f"sqlite+aiosqlite:///{tmp / 'smartspace.db'}" if sqlite  # what make run gives a newcomer
              else await create_database(admin_url, dbname))
    up_port = free_port()
    upstream: subprocess.Popen | None = None
    server: Server | None = None
    try:
        upstream = subprocess.Popen([PY, "-m", "tests.fakes.upstream", "--port", str(up_port)],  # noqa: ASYNC220
                                    cwd=ROOT, stdout=subprocess.DEVNULL)
        env = server_env(db_url, tmp, access_log="false", log_level="WARNING", admin_emails=ADMIN,
                         database_pool_size="20", upstreams=msgspec.json.encode([{
                             "provider": "openai", "kind": "openai", "base_url": f"http://127.0.0.1:{up_port}/v1",
                             "api_key": UPSTREAM_KEY}]).decode())
        server = Server("gateway", env, tmp, ready_path="/health")  # its log: <tmp>/gateway.log
        gw = server.url
        await wait_http(f"http://127.0.0.1:{up_port}/v1/chat/completions")
        async with aiohttp.ClientSession() as http:
            await server.ready(http, within=60.0)
        token, projects, key_headers = await setup_project(gw, args.projects)
        direct_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        gateway_url = f"{gw}/v1/chat/completions"
        gw_body = {**BODY, "model": "openai/gpt-4o-mini"}
        direct_headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
        costs: list[int] = []

        # warm-up (connections, caches, JIT-free but import-lazy paths)
        await load(direct_url, direct_headers, BODY, concurrency=4, total=100, stream=False, max_seconds=10)
        await load(gateway_url, key_headers, gw_body, concurrency=4, total=100, stream=False, max_seconds=20,
                   costs=costs)
        await load(gateway_url, key_headers, gw_body, concurrency=4, total=50, stream=True, max_seconds=20,
                   costs=costs)

        print(f"gateway bench: python {sys.version.split()[0]}, {os.cpu_count()} cores, "
              f"{'SQLite' if sqlite else 'PostgreSQL'}, "
              f"fake upstream on loopback, 1 server process, {args.projects} project(s), "
              f"load average before {os.getloadavg()[0]:.1f}\n")
        header = (f"{'phase':<22}{'n':>6}{'err':>5}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}"
                  f"{'+p50 ms':>9}{'+p99 ms':>9}{'ratio':>7}{'cpu ms/req':>12}")
        print(header)
        print("-" * len(header))
        for concurrency, total in ((1, args.serial), (args.concurrency, args.requests)):
            for stream in (False, True):
                label = f"c={concurrency} {'stream' if stream else 'json'}"
                direct = await load(direct_url, direct_headers, BODY, concurrency=concurrency, total=total,
                                    stream=stream, max_seconds=args.phase_seconds)
                spy = None
                if args.profile and concurrency > 1 and not stream:
                    spy_out = tmp / "pyspy.txt"
                    spy = subprocess.Popen(  # noqa: ASYNC220
                        [str(Path(PY).parent / "py-spy"), "record", "--pid", str(server.proc.pid), "--format", "raw",
                         "--output", str(spy_out), "--rate", "250", "--nonblocking", "--nolineno"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    await asyncio.sleep(1.0)
                cpu0 = cpu_seconds(server.proc.pid)
                user0 = cpu_split(server.proc.pid)[0]
                through = await load(gateway_url, key_headers, gw_body, concurrency=concurrency, total=total,
                                     stream=stream, max_seconds=args.phase_seconds, costs=costs)
                through.cpu = cpu_seconds(server.proc.pid) - cpu0
                user1 = cpu_split(server.proc.pid)[0]
                through.cpu_user = user1 - user0
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=30)
                for name, ph in (("direct", direct), ("gateway", through)):
                    added = ""
                    if name == "gateway":
                        cpu = ph.cpu * 1000 / ph.done if ph.done else float("nan")
                        added = (f"{ph.pct(50) - direct.pct(50):>9.2f}{ph.pct(99) - direct.pct(99):>9.2f}"
                                 f"{ph.rps / direct.rps if direct.rps else 0:>7.2f}{cpu:>12.2f}")
                    print(f"{label + ' ' + name:<22}{ph.done:>6}{ph.errors:>5}{ph.pct(50):>9.2f}{ph.pct(99):>9.2f}"
                          f"{ph.rps:>9.1f}{added}", flush=True)
                print(through.stage_line())
                if spy is not None and (tmp / "pyspy.txt").exists():
                    print("\nprofile of the server, c=50 JSON through the gateway (py-spy):")
                    print(profile_top((tmp / "pyspy.txt").read_text()))
                    shutil.copy(tmp / "pyspy.txt", "/tmp/smartspace-gateway-pyspy.txt")
                    print("  (collapsed stacks kept in /tmp/smartspace-gateway-pyspy.txt)")
                    print()
        await asyncio.sleep(0.5)
        print("\naccounting:", await accounting(gw, token, projects, costs))
        print(f"load average after: {os.getloadavg()[0]:.1f} (other processes on this machine skew every figure)")
    finally:
        if server is not None:
            server.stop()
        if upstream is not None:
            upstream.send_signal(signal.SIGINT)
            try:
                upstream.wait(timeout=15)
            except subprocess.TimeoutExpired:
                upstream.kill()
        await asyncio.sleep(0.5)
        if not sqlite:
            await drop_database(admin_url, dbname)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
