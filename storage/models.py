"""Every table, in one module. SQLAlchemy Core (no ORM identity map on the hot path).

Money columns are BigInteger micro-USDC. Times are timezone-aware UTC (see ``UTCDateTime``).
Sections: identity, event log, idempotency — later areas append their own sections below.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

JSON = sa.JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(sa.TypeDecorator):
    """Stores UTC; always returns aware datetimes (SQLite drops the zone otherwise)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _id(prefix_note: str = "") -> sa.Column:
    return sa.Column("id", sa.String(40), primary_key=True, comment=prefix_note or None)


def _created() -> sa.Column:
    return sa.Column("created_at", UTCDateTime(), nullable=False)


# ---------------------------------------------------------------- identity
users = sa.Table(
    "users",
    metadata,
    _id("usr_"),
    sa.Column("email", sa.String(320), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("password_hash", sa.String(200), nullable=False),
    _created(),
)

projects = sa.Table(
    "projects",
    metadata,
    _id("prj_"),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("description", sa.Text(), nullable=False, server_default=""),
    sa.Column("status", sa.String(20), nullable=False, server_default="active"),
    sa.Column("settlement", sa.String(20), nullable=False, server_default="ledger"),
    sa.Column("owner_id", sa.String(40), sa.ForeignKey("users.id"), nullable=False),
    _created(),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("deleted_at", UTCDateTime(), nullable=True),
)

memberships = sa.Table(
    "memberships",
    metadata,
    sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), primary_key=True),
    sa.Column("user_id", sa.String(40), sa.ForeignKey("users.id"), primary_key=True),
    sa.Column("role", sa.String(20), nullable=False),
    _created(),
    sa.Index("ix_memberships_user_id", "user_id"),
)

agents = sa.Table(
    "agents",
    metadata,
    _id("agt_"),
    sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False, index=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("status", sa.String(20), nullable=False, server_default="active"),
    _created(),
    sa.UniqueConstraint("project_id", "name", name="uq_agents_project_name"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    _id("key_"),
    sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False, index=True),
    sa.Column("agent_id", sa.String(40), sa.ForeignKey("agents.id"), nullable=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("prefix", sa.String(20), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_by", sa.String(40), nullable=False),
    _created(),
    sa.Column("last_used_at", UTCDateTime(), nullable=True),
    sa.Column("use_count", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("revoked_at", UTCDateTime(), nullable=True),
)

# ---------------------------------------------------------------- event log
# One head row per project: the counter that makes seq gap-free and the tip of the hash chain.
event_heads = sa.Table(
    "event_heads",
    metadata,
    sa.Column("project_id", sa.String(40), primary_key=True),
    sa.Column("seq", sa.BigInteger(), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    _id("evt_"),
    sa.Column("project_id", sa.String(40), nullable=False),
    sa.Column("seq", sa.BigInteger(), nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("actor", sa.String(100), nullable=False),
    sa.Column("data", JSON, nullable=False),
    sa.Column("ts", sa.String(40), nullable=False),  # the exact RFC 3339 string that was hashed
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.UniqueConstraint("project_id", "seq", name="uq_events_project_seq"),
    sa.Index("ix_events_project_type", "project_id", "type"),
)

# ---------------------------------------------------------------- idempotency
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("scope", sa.String(120), primary_key=True),  # principal + route
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("status", sa.Integer(), nullable=False),
    sa.Column("body", sa.LargeBinary(), nullable=False),
    _created(),
)
