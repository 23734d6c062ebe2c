"""Migrations: `alembic upgrade head` on an empty SQLite file and an empty PostgreSQL schema builds exactly
the schema of storage/models.py (whatever revision is head), and `smartspace migrate` does it from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from storage.db import Database
from storage.migrate import alembic_config, current, upgrade
from storage.models import metadata
from tests.conftest import drop_database, make_database


@pytest.fixture
async def empty_db(backend: str, tmp_path) -> AsyncIterator[Database]:
    """A database with no tables at all (the shared ``db`` fixture creates them from metadata)."""
    database, schema = await make_database(backend, tmp_path, tables=False)
    yield database
    await drop_database(database, schema)


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def schema_diff(db: Database) -> list:
    def compare(sync_conn: sa.Connection) -> list:
        context = MigrationContext.configure(sync_conn, opts={"compare_type": True})
        return compare_metadata(context, metadata)

    async with db.engine.connect() as conn:
        return await conn.run_sync(compare)


async def table_names(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))


async def test_upgrade_head_builds_exactly_the_models_schema(empty_db):
    await upgrade(empty_db)
    assert await current(empty_db) == head_revision()
    assert await table_names(empty_db) == set(metadata.tables) | {"alembic_version"}
    assert await schema_diff(empty_db) == []


async def test_upgrading_twice_is_a_no_op(empty_db):
    await upgrade(empty_db)
    await upgrade(empty_db)
    assert await current(empty_db) == head_revision()
    assert await schema_diff(empty_db) == []


async def test_every_migration_downgrades_to_an_empty_database_and_back(empty_db):
    await upgrade(empty_db)
    async with empty_db.engine.connect() as conn:
        await conn.run_sync(lambda sync: command.downgrade(alembic_config(sync), "base"))
        await conn.commit()
    assert await table_names(empty_db) <= {"alembic_version"}
    await upgrade(empty_db)
    assert await schema_diff(empty_db) == []


def test_the_migration_history_is_one_line():
    script = ScriptDirectory.from_config(alembic_config())
    heads = script.get_heads()
    assert len(heads) == 1, f"several heads {heads}: a new migration must revise the current head"
    revisions = list(script.walk_revisions())
    assert revisions[-1].down_revision is None


def test_smartspace_migrate_creates_the_database_from_the_command_line(tmp_path):
    db_file = tmp_path / "cli.db"
    script = Path(sys.executable).with_name("smartspace")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTSPACE_")}
    env["SMARTSPACE_DATABASE_URL"] = f"sqlite+aiosqlite:///{db_file}"
    env["SMARTSPACE_DATA_DIR"] = str(tmp_path / "data")
    result = subprocess.run([*cmd, "migrate"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert head_revision() in result.stderr
    engine = sa.create_engine(f"sqlite:///{db_file}")
    try:
        assert set(sa.inspect(engine).get_table_names()) == set(metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()
