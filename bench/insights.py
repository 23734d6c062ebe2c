"""Insight evaluation time per project against a project with a million settled requests (PostgreSQL).

The requests are generated in SQL (``generate_series``) over the 30-day baseline window: three models,
costs and token counts varying per row, every 50th request rejected, spread evenly in time. Measured,
each the median of ``--repeat`` runs after one warm-up:

    baseline   SELECT count(*) FROM spend_requests WHERE project_id = :p   (the same rows, once)
    cold read  the read model alone (storage/insights.py ``activity``: every aggregate the kinds need),
               the per-model history of the 29 days before the last one included
    read       the same with that history cached (SqlInsightView keeps it 5 minutes; the last day is
               always read fresh) — what an evaluation after an event costs
    evaluate   one whole evaluation: advisory lock, read, agentic evaluation, persist (InsightRunner.evaluate)

    .venv/bin/python bench/insights.py [--requests 1000000] [--repeat 7]

The database: SMARTSPACE_BENCH_DATABASE_URL, else SMARTSPACE_TEST_DATABASE_URL, else the local
PostgreSQL test database. The script works in a fresh schema and drops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.reserve import URL, create_schema, drop_schema, make_project
from domain.base import PageRequest, utcnow
from server.container import Container
from server.metrics import Metrics
from server.settings import Settings
from storage.bus import LocalBus
from storage.catalog import seed_catalog
from storage.db import Database
from storage.insights import SqlInsightView
from storage.models import metadata

GENERATE = """
INSERT INTO spend_requests (id, project_id, agent_id, key_id, actor, source, operation, model, provider, status,
                            params, metadata, estimated_cost_micros, reserved_micros, cost_micros, input_tokens,
                            output_tokens, budget_ids, error, created_at, settled_at)
SELECT 'req_bench_' || g, :project_id, 'agt_' || (g % 5), 'key_' || (g % 3), 'key:bench', 'gateway', 'chat',
       (ARRAY['openai/gpt-4o', 'openai/gpt-4o-mini', 'anthropic/claude-3-5-haiku'])[1 + g % 3],
       (ARRAY['openai', 'openai', 'anthropic'])[1 + g % 3],
       CASE WHEN g % 50 = 0 THEN 'rejected' ELSE 'settled' END,
       '{}'::jsonb, '{}'::jsonb, 2000, CASE WHEN g % 50 = 0 THEN 0 ELSE 2000 END,
       CASE WHEN g % 50 = 0 THEN NULL ELSE 100 + g % 1900 END,
       CASE WHEN g % 50 = 0 THEN NULL ELSE 200 + g % 800 END,
       CASE WHEN g % 50 = 0 THEN NULL ELSE 50 + g % 400 END,
       '[]'::jsonb,
       CASE WHEN g % 50 = 0 THEN '{"code": "policy_violation", "message": "blocked"}'::jsonb END,
       CAST(:now AS timestamptz) - make_interval(secs => g * CAST(:span_seconds AS float8) / CAST(:n AS integer)),
       CAST(:now AS timestamptz) - make_interval(secs => g * CAST(:span_seconds AS float8) / CAST(:n AS integer))
FROM generate_series(1, CAST(:n AS integer)) AS g
"""


async def timed(fn, repeat: int) -> tuple[float, float]:
    await fn()  # warm-up (plans, pools, caches)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), max(samples)


async def main(n: int, repeat: int) -> None:
    schema = await create_schema("bench_ins_")
    db = Database(URL, schema=schema)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        await seed_catalog(db)
        project_id = await make_project(db, 0)  # bench/reserve.py's: funded wallet, a month budget, an agent
        now = utcnow()
        started = time.perf_counter()
        async with db.write() as conn:
            await conn.execute(sa.text(GENERATE), {"project_id": project_id, "now": now, "n": n,
                                                   "span_seconds": 30 * 86400 - 60})
        async with db.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("VACUUM ANALYZE spend_requests")
        print(f"generated {n:,} requests in {time.perf_counter() - started:.1f} s (schema {schema})")

        settings = Settings(data_dir="/tmp/smartspace-bench-insights", jwt_secret="b" * 40, access_log=False,
                            insight_evaluator=False, insight_update_seconds=0)
        container = Container(settings, db, LocalBus(), metrics=Metrics())

        async def count() -> None:
            async with db.read() as conn:
                await conn.execute(sa.text("SELECT count(*) FROM spend_requests WHERE project_id = :p"),
                                   {"p": project_id})

        async def cold_read() -> None:  # a fresh view: the 30-day history is read too
            await SqlInsightView(db, container.insight_thresholds).activity(project_id, utcnow())

        async def read() -> None:  # the container's view: the history (older than a day) from its cache
            await container.insight_view.activity(project_id, utcnow())

        async def evaluate() -> None:
            assert await container.insights.evaluate(project_id) is True

        rows = []
        for name, fn in (("baseline SELECT count(*)", count), ("read model, cold (30-day history read)", cold_read),
                         ("read model, history cached", read), ("whole evaluation (history cached)", evaluate)):
            median, worst = await timed(fn, repeat)
            rows.append((name, median, worst))
        base = rows[0][1]
        print(f"\n| {n:,} requests, one project | median ms | max ms | vs count(*) |")
        print("| --- | ---: | ---: | ---: |")
        for name, median, worst in rows:
            print(f"| {name} | {median:.1f} | {worst:.1f} | {median / base:.2f}x |")
        activity = await container.insight_view.activity(project_id, utcnow())
        counted = sum(m.base_requests + m.hour_requests for m in activity.models)
        print(f"\nthe read model returned {len(activity.models)} model rows, {len(activity.rejections)} rejection "
              f"groups, {len(activity.burn)} burn series for {counted:,} requests in the window")
        async with container.reader() as scope:
            page = await scope.store.insights.list(project_id, PageRequest(), None, None)
        print("insights raised:", sorted(i.kind for i in page.items))
    finally:
        await db.dispose()
        await drop_schema(schema)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.repeat))
