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
    # Virtual-key limits (issue 15): refused from expires_at on; null allowed_models = every model; scopes
    # grant reads beyond the gateway and the key's own requests and usage; rate_limits {per_minute?, …}.
    sa.Column("expires_at", UTCDateTime(), nullable=True),
    sa.Column("allowed_models", JSON, nullable=True),
    sa.Column("scopes", JSON, nullable=False, server_default="[]"),
    sa.Column("rate_limits", JSON, nullable=False, server_default="{}"),
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
# One row per (project, Idempotency-Key): the claim of the first request and, once it answered, that
# answer. The primary key is what makes two concurrent claims of one key impossible, whichever actor of
# the project sends them. A claim in progress holds a lease (``locked_until``, renewed while it runs);
# once it lapses the key can be taken again (``token`` says which claim may still write). Rows are
# pruned after ``expires_at`` (the retention).
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("project_id", sa.String(40), primary_key=True),
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("actor", sa.String(100), nullable=False),  # who claimed it; only they get the replay
    sa.Column("fingerprint", sa.String(64), nullable=False),  # sha256 of method, route and parsed body
    sa.Column("token", sa.String(32), nullable=False),  # the current claim's id
    sa.Column("status", sa.Integer(), nullable=False),  # 0 while in progress, then the HTTP status
    sa.Column("content_type", sa.String(100), nullable=False),
    sa.Column("headers", JSON, nullable=False),  # headers replayed with the body (receipts)
    sa.Column("body", sa.LargeBinary(), nullable=False),
    sa.Column("locked_until", UTCDateTime(), nullable=True),
    _created(),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Index("ix_idempotency_keys_expires_at", "expires_at"),
)

# ---------------------------------------------------------------- money controls (issue 3)
# The model catalog: prices in micro-USDC per million tokens.
catalog_models = sa.Table(
    "catalog_models",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),  # "provider/model"
    sa.Column("provider", sa.String(64), nullable=False, index=True),
    sa.Column("name", sa.String(160), nullable=False),  # the upstream's model id
    sa.Column("kind", sa.String(20), nullable=False, server_default="chat"),  # chat | embedding
    sa.Column("input_micros_per_mtok", sa.BigInteger(), nullable=False),
    sa.Column("output_micros_per_mtok", sa.BigInteger(), nullable=False),
    sa.Column("context_window", sa.Integer(), nullable=False),
    sa.Column("max_output_tokens", sa.Integer(), nullable=False),
    sa.Column("active", sa.Boolean(), nullable=False, server_default=sa.true()),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("aliases", JSON, nullable=False, server_default="[]"),  # other ids clients may send
    sa.Column("upstream_model", sa.String(200), nullable=True),  # the provider's own name, when not `name`
)

# One wallet per project. balance = sum(ledger_entries.amount_micros); reserved = open holds.
wallets = sa.Table(
    "wallets",
    metadata,
    sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), primary_key=True),
    sa.Column("balance_micros", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("reserved_micros", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("deposit_address", sa.String(42), nullable=True),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.CheckConstraint("reserved_micros >= 0", name="reserved_nonneg"),
    sa.CheckConstraint("balance_micros - reserved_micros >= 0", name="available_nonneg"),
)

# Signed entries: credits > 0, debits < 0. Never updated, never deleted.
ledger_entries = sa.Table(
    "ledger_entries",
    metadata,
    _id("led_"),
    sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False, index=True),
    sa.Column("kind", sa.String(32), nullable=False),  # deposit | admin_credit | spend | withdrawal | refund ...
    sa.Column("amount_micros", sa.BigInteger(), nullable=False),
    sa.Column("balance_after_micros", sa.BigInteger(), nullable=False),
    sa.Column("ref", sa.String(120), nullable=True),  # request / payment id
    sa.Column("memo", sa.String(500), nullable=False, server_default=""),
    sa.Column("actor", sa.String(100), nullable=False),
    _created(),
)

budgets = sa.Table(
    "budgets",
    metadata,
    _id("bud_"),
    sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False, index=True),
    sa.Column("agent_id", sa.String(40), sa.ForeignKey("agents.id"), nullable=True),
    sa.Column("key_id", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=True),  # a key's own budget
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("period", sa.String(10), nullable=False),  # day | week | month | total
    sa.Column("limit_micros", sa.BigInteger(), nullable=False),
    sa.Column("spent_micros", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("reserved_micros", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("period_start", UTCDateTime(), nullable=False),
    sa.Column("alert_thresholds", JSON, nullable=False),  # percentages, e.g. [50, 80, 100]
    sa.Column("alerted", JSON, nullable=False),  # thresholds already alerted in this period
    sa.Column("active", sa.Boolean(), nullable=False, server_default=sa.true()),
    _created(),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.CheckConstraint("spent_micros + reserved_micros <= limit_micros", name="within_limit"),
    sa.CheckConstraint("reserved_micros >= 0 AND spent_micros >= 0", name="nonneg"),
)

# Versioned policies: project policies keep every version; the system policy is project_id = '*'.
policies = sa.Table(
    "policies",
    metadata,
    sa.Column("project_id", sa.String(40), primary_key=True),
    sa.Column("version", sa.Integer(), primary_key=True),
    sa.Column("rules", JSON, nullable=False),
    sa.Column("created_by", sa.String(100), nullable=False),
    _created(),
)

spend_requests = sa.Table(
    "spend_requests",
    metadata,
    _id("req_"),
    sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False),
    sa.Column("agent_id", sa.String(40), nullable=True),
    sa.Column("key_id", sa.String(40), nullable=True),
    sa.Column("actor", sa.String(100), nullable=False),
    sa.Column("source", sa.String(20), nullable=False),  # api | gateway
    sa.Column("operation", sa.String(20), nullable=False),  # chat | embedding | completion
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("provider", sa.String(64), nullable=False),
    # pending_approval | approved | executing | settled | rejected | failed | expired
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("decision", JSON, nullable=True),
    sa.Column("params", JSON, nullable=False),  # what is needed to execute later (held requests)
    sa.Column("metadata", JSON, nullable=False),
    sa.Column("estimated_cost_micros", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("reserved_micros", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("cost_micros", sa.BigInteger(), nullable=True),
    sa.Column("fee_micros", sa.BigInteger(), nullable=True),  # the platform fee charged on top of cost_micros
    sa.Column("input_tokens", sa.Integer(), nullable=True),
    sa.Column("output_tokens", sa.Integer(), nullable=True),
    sa.Column("risk_score", sa.Float(), nullable=True),
    sa.Column("budget_ids", JSON, nullable=False),  # budgets the reservation holds against
    sa.Column("error", JSON, nullable=True),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("response", JSON, nullable=True),
    sa.Column("reservation_expires_at", UTCDateTime(), nullable=True),
    sa.Column("approval_expires_at", UTCDateTime(), nullable=True),
    sa.Column("resolved_by", sa.String(100), nullable=True),
    sa.Column("tx_hash", sa.String(66), nullable=True),  # on-chain settlement batch tx
    sa.Column("settlement_batch_id", sa.String(40), nullable=True),
    _created(),
    sa.Column("settled_at", UTCDateTime(), nullable=True),
    sa.Index("ix_spend_requests_project_created", "project_id", "created_at"),
    sa.Index("ix_spend_requests_status_expiry", "status", "reservation_expires_at"),
    sa.Index("ix_spend_requests_project_idempotency", "project_id", "idempotency_key"),
)

# ---------------------------------------------------------------- payments (issue 5)
# Outgoing USDC transfers from the treasury: project payouts and settlement batches. The signed raw
# transaction and its hash are stored BEFORE broadcast, so a retry re-sends the very same bytes.
payments = sa.Table(
    "payments",
    metadata,
    _id("pay_"),
    sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=True),  # null: settlement
    sa.Column("kind", sa.String(20), nullable=False),  # payout | settlement
    sa.Column("status", sa.String(20), nullable=False),  # pending | submitted | confirmed | failed
    sa.Column("chain_id", sa.BigInteger(), nullable=False),
    sa.Column("token_address", sa.String(42), nullable=False),
    sa.Column("from_address", sa.String(42), nullable=False),
    sa.Column("to_address", sa.String(42), nullable=False),
    sa.Column("amount_micros", sa.BigInteger(), nullable=False),
    sa.Column("nonce", sa.BigInteger(), nullable=False),
    sa.Column("tx_hash", sa.String(66), nullable=False),
    sa.Column("raw_tx", sa.LargeBinary(), nullable=False),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("request_hash", sa.String(64), nullable=True),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("block_number", sa.BigInteger(), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("error", sa.String(500), nullable=True),
    _created(),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("submitted_at", UTCDateTime(), nullable=True),
    sa.Column("finalized_at", UTCDateTime(), nullable=True),
    sa.UniqueConstraint("chain_id", "tx_hash", name="uq_payments_chain_tx"),
    sa.UniqueConstraint("chain_id", "from_address", "nonce", name="uq_payments_sender_nonce"),
    sa.UniqueConstraint("project_id", "idempotency_key", name="uq_payments_project_idempotency"),
    sa.Index("ix_payments_project_created", "project_id", "created_at"),
    sa.Index("ix_payments_status", "status"),
)

# Incoming USDC: one row per claimed Transfer log. log_index is -1 while the transaction is not yet mined.
deposits = sa.Table(
    "deposits",
    metadata,
    _id("dep_"),
    sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # pending | confirmed | failed
    sa.Column("chain_id", sa.BigInteger(), nullable=False),
    sa.Column("tx_hash", sa.String(66), nullable=False),
    sa.Column("log_index", sa.Integer(), nullable=False),
    sa.Column("token_address", sa.String(42), nullable=False),
    sa.Column("from_address", sa.String(42), nullable=True),
    sa.Column("to_address", sa.String(42), nullable=True),
    sa.Column("amount_micros", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("block_number", sa.BigInteger(), nullable=True),
    sa.Column("error", sa.String(500), nullable=True),
    sa.Column("created_by", sa.String(100), nullable=False),
    _created(),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("credited_at", UTCDateTime(), nullable=True),
    sa.UniqueConstraint("chain_id", "tx_hash", "log_index", name="uq_deposits_chain_tx_log"),
    sa.Index("ix_deposits_project_created", "project_id", "created_at"),
    sa.Index("ix_deposits_status", "status"),
)

# Sender addresses a project registered, for deposits into the shared treasury address.
deposit_senders = sa.Table(
    "deposit_senders",
    metadata,
    sa.Column("chain_id", sa.BigInteger(), primary_key=True),
    sa.Column("address", sa.String(42), primary_key=True),
    sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False, index=True),
    _created(),
)

# One nonce allocator per sending address: UPDATE … SET next_nonce = next_nonce + 1 … RETURNING.
chain_nonces = sa.Table(
    "chain_nonces",
    metadata,
    sa.Column("chain_id", sa.BigInteger(), primary_key=True),
    sa.Column("address", sa.String(42), primary_key=True),
    sa.Column("next_nonce", sa.BigInteger(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

# Settled request costs of on-chain projects, paid to the revenue address in one transaction per batch.
settlement_batches = sa.Table(
    "settlement_batches",
    metadata,
    _id("stb_"),
    sa.Column("payment_id", sa.String(40), sa.ForeignKey("payments.id"), nullable=False, unique=True),
    sa.Column("status", sa.String(20), nullable=False),  # pending | submitted | confirmed | failed
    sa.Column("total_micros", sa.BigInteger(), nullable=False),
    sa.Column("request_count", sa.Integer(), nullable=False),
    sa.Column("tx_hash", sa.String(66), nullable=False),
    _created(),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

# ---------------------------------------------------------------- insights (issue 11)
# The agentic brain's findings. A row holds its kind-and-subject "slot" while resolved_at is NULL (open,
# acknowledged or dismissed): the partial unique index makes "one open insight per kind and subject" a
# database fact, so two evaluators can never raise the same insight twice. A dismissed insight keeps the
# slot until its condition clears (then it is resolved), so it is not raised again meanwhile.
insights = sa.Table(
    "insights",
    metadata,
    _id("ins_"),
    sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("subject_key", sa.String(300), nullable=False),  # the subject, canonical ("" = the project)
    sa.Column("subject", JSON, nullable=False),
    sa.Column("severity", sa.String(10), nullable=False),  # info | warning | critical
    sa.Column("title", sa.String(200), nullable=False),
    sa.Column("message", sa.Text(), nullable=False),
    sa.Column("evidence", JSON, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # open | acknowledged | dismissed | resolved
    sa.Column("note", sa.String(500), nullable=True),
    sa.Column("acted_by", sa.String(100), nullable=True),  # who acknowledged / dismissed it
    _created(),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("resolved_at", UTCDateTime(), nullable=True),
    sa.Index("uq_insights_open_slot", "project_id", "kind", "subject_key", unique=True,
             sqlite_where=sa.text("resolved_at IS NULL"), postgresql_where=sa.text("resolved_at IS NULL")),
    sa.Index("ix_insights_project_id", "project_id", "id"),
)

# When each project was last evaluated (the schedule's work list, and how a second process that heard
# the same event knows the first one already covered it).
insight_runs = sa.Table(
    "insight_runs",
    metadata,
    sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), primary_key=True),
    sa.Column("evaluated_at", UTCDateTime(), nullable=False),
    sa.Index("ix_insight_runs_evaluated_at", "evaluated_at"),
)

# The platform's own books: what the platform absorbed (a request that cost more than was reserved is
# charged only the reservation; the provider's bill = the project's charge + this entry, negated), and
# what it earned (the fee on each settled request, SMARTSPACE_PLATFORM_FEE_BPS, booked in the transaction
# that debits the project's wallet cost + fee). Insert-only: the platform's balance is the sum.
platform_ledger = sa.Table(
    "platform_ledger",
    metadata,
    _id("pld_"),
    sa.Column("kind", sa.String(32), nullable=False),  # overrun_absorbed | platform_fee
    sa.Column("amount_micros", sa.BigInteger(), nullable=False),  # < 0: the platform's cost; > 0: its fee
    sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False),
    sa.Column("ref", sa.String(120), nullable=True),  # the request id
    sa.Column("memo", sa.String(500), nullable=False, server_default=""),
    sa.Column("actor", sa.String(100), nullable=False),
    _created(),
    sa.Index("ix_platform_ledger_project_created", "project_id", "created_at"),
)

# ---------------------------------------------------------------- chat assistant (issue 12)
# A user's conversations with the assistant, each tied to the project it was started on. Not in the
# event log: a conversation is private to its owner, and the log is shown to every member.
chat_conversations = sa.Table(
    "chat_conversations",
    metadata,
    _id("cnv_"),
    sa.Column("user_id", sa.String(40), sa.ForeignKey("users.id"), nullable=False),
    sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False),
    sa.Column("title", sa.String(200), nullable=False),
    _created(),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Index("ix_chat_conversations_user_updated", "user_id", "updated_at"),
)

# The turns, in time order. An answer's ``data`` holds the figures it used.
chat_messages = sa.Table(
    "chat_messages",
    metadata,
    _id("msg_"),
    sa.Column("conversation_id", sa.String(40), sa.ForeignKey("chat_conversations.id"), nullable=False),
    sa.Column("role", sa.String(20), nullable=False),  # user | assistant
    sa.Column("content", sa.Text(), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # complete | cancelled | failed
    sa.Column("project_id", sa.String(40), nullable=False),  # the project the turn was about
    sa.Column("data", JSON, nullable=True),
    _created(),
    sa.Index("ix_chat_messages_conversation", "conversation_id", "created_at"),
)
