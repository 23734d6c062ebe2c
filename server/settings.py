"""Settings from ``SMARTSPACE_*`` environment variables, validated at start-up.

Every field of :class:`Settings` is read from ``SMARTSPACE_<FIELD NAME UPPER>``; an optional
``.env`` file in the working directory is read first (real environment variables win).
A bad value raises :class:`SettingsError` naming the variable and what it expects.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import msgspec
from dotenv import dotenv_values

from domain.chain import normalize_address
from domain.errors import InvalidRequest

PREFIX = "SMARTSPACE_"


class SettingsError(Exception):
    """A ``SMARTSPACE_*`` variable has a value the server cannot use."""


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    # --- server ---
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "INFO"
    access_log: bool = True
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the REST API and the gateway
    data_dir: str = ".smartspace"
    # --- storage and fan-out ---
    database_url: str = ""  # empty: SQLite file in data_dir
    database_pool_size: int = 10
    redis_url: str = ""  # empty: in-process event bus
    redis_channel_prefix: str = "smartspace"  # the event channel is "<prefix>:events"
    migrate_on_start: bool = True
    hot_path: bool = True  # reserve and settle through storage/hot.py (PostgreSQL) / storage/sqlite_hot.py
    # --- identity ---
    jwt_secret: str = ""  # empty: a random secret persisted in data_dir
    access_token_ttl_seconds: int = 3600
    admin_emails: tuple[str, ...] = ()
    # --- money controls ---
    reservation_ttl_seconds: int = 600
    approval_ttl_seconds: int = 3600
    sweep_interval_seconds: float = 5.0
    default_output_tokens: int = 1024
    platform_fee_bps: int = 0  # the platform's markup on each request's cost, basis points (500 = 5%); 0: at cost
    idempotency_retention_hours: float = 24.0  # how long an Idempotency-Key and its answer are kept
    idempotency_lease_seconds: float = 30.0  # a dead request's key is free again this long after it died
    # --- provider gateway ---
    upstreams: str = ""  # JSON list of upstream definitions, see README
    provider_timeout_seconds: float = 60.0
    provider_connect_timeout_seconds: float = 5.0
    # --- chat assistant ---
    assistant_model: str = ""  # a catalog model ("provider/model"): an LLM agent; empty: the built-in assistant
    assistant_history_messages: int = 10  # earlier messages of a conversation given as context
    # --- chain ---
    chain: str = "devnet"  # "devnet" (in-process EVM) or "rpc"
    chain_rpc_url: str = ""
    chain_id: int = 0  # 0: read from the node
    usdc_address: str = ""
    usdc_decimals: int = 6
    confirmations: int = 1
    treasury_private_key: str = ""
    revenue_address: str = ""
    settlement_batch_seconds: float = 30.0
    settlement_batch_micros: int = 10_000_000
    chain_poll_seconds: float = 1.0  # how often the payments worker looks at the chain
    chain_worker: bool = True  # run the payouts / deposit watcher / settlement loop in this process
    # --- insights (issue 11): when each kind fires, when the evaluator runs, outbound alerts ---
    insight_evaluator: bool = True  # evaluate projects in this process (after their events, and on a schedule)
    insight_debounce_seconds: float = 1.0
    insight_schedule_seconds: float = 60.0
    insight_update_seconds: float = 60.0
    insight_runway_hours: float = 72.0
    insight_spike_ratio: float = 3.0
    insight_spike_min_requests: int = 10
    insight_baseline_days: int = 30
    insight_rejection_count: int = 10
    insight_rejection_window_seconds: int = 600
    insight_idle_key_days: int = 30
    insight_cheaper_window_days: int = 7
    insight_cheaper_min_saving_micros: int = 10_000
    insight_cheaper_min_saving_ratio: float = 0.2
    alert_webhook_url: str = ""  # receives each new warning / critical insight as signed JSON
    alert_webhook_secret: str = ""

    def __post_init__(self) -> None:
        checks = [
            ("port", 0 < self.port < 65536, "a TCP port between 1 and 65535"),
            ("log_level", self.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
             "one of DEBUG, INFO, WARNING, ERROR"),
            ("database_url", self.database_url == "" or self.database_url.startswith(
                ("sqlite+aiosqlite://", "postgresql+asyncpg://")),
             "a URL starting with sqlite+aiosqlite:// or postgresql+asyncpg://"),
            ("redis_url", self.redis_url == "" or self.redis_url.startswith(
                ("redis://", "rediss://", "unix://")), "a URL starting with redis:// or rediss://"),
            ("redis_channel_prefix", re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", self.redis_channel_prefix) is not None,
             "1-64 letters, digits or _ . : -"),
            ("access_token_ttl_seconds", self.access_token_ttl_seconds > 0, "a positive number"),
            ("reservation_ttl_seconds", self.reservation_ttl_seconds > 0, "a positive number"),
            ("platform_fee_bps", 0 <= self.platform_fee_bps <= 10_000,
             "basis points of each request's cost from 0 to 10000 (500 = 5%)"),
            ("approval_ttl_seconds", self.approval_ttl_seconds > 0, "a positive number"),
            ("assistant_model", self.assistant_model == "" or "/" in self.assistant_model.strip("/"),
             "a catalog model id such as 'openai/gpt-4o-mini' (or unset for the built-in assistant)"),
            ("assistant_history_messages", 0 <= self.assistant_history_messages <= 100, "a number from 0 to 100"),
            ("database_pool_size", self.database_pool_size > 0, "a positive number"),
            ("idempotency_retention_hours", self.idempotency_retention_hours > 0, "a positive number of hours"),
            ("idempotency_lease_seconds", 0 < self.idempotency_lease_seconds <= 3600,
             "a number of seconds between 0 and 3600"),
            ("chain", self.chain in {"devnet", "rpc"}, "'devnet' or 'rpc'"),
            ("chain_rpc_url", self.chain != "rpc" or self.chain_rpc_url.startswith(("http://", "https://")),
             "an http(s) URL when SMARTSPACE_CHAIN=rpc"),
            ("treasury_private_key", self.chain != "rpc" or _is_private_key(self.treasury_private_key),
             "the treasury's private key (0x + 64 hex digits) when SMARTSPACE_CHAIN=rpc"),
            ("usdc_address", self.chain != "rpc" or bool(self.usdc_address),
             "the USDC token's address when SMARTSPACE_CHAIN=rpc (Arc: 0x3600000000000000000000000000000000000000)"),
            ("confirmations", self.confirmations >= 1, "at least 1"),
            ("jwt_secret", self.jwt_secret == "" or len(self.jwt_secret) >= 32,
             "at least 32 characters (or unset, to generate one)"),
            ("cors_origins", all(_is_origin(o) for o in self.cors_origins),
             "comma-separated origins such as https://app.example.com or http://localhost:5173 (no path), or *"),
            ("chain_poll_seconds", self.chain_poll_seconds > 0, "a positive number"),
            ("usdc_decimals", 0 <= self.usdc_decimals <= 36, "a number of decimals between 0 and 36"),
            *((field, _is_address(getattr(self, field)), "an EVM address: 0x + 40 hex digits, EIP-55 if mixed case")
              for field in ("usdc_address", "revenue_address") if getattr(self, field)),
            *_insight_checks(self),
        ]
        for field, ok, expected in checks:
            if not ok:
                value = getattr(self, field)
                state = " is not set" if value == "" else f"={_shown(field, value)} is invalid"
                raise SettingsError(f"{PREFIX}{field.upper()}{state}: expected {expected}")

    def __repr__(self) -> str:  # the treasury key and the JWT secret never reach a log line through repr()
        hidden = {"treasury_private_key", "jwt_secret", "alert_webhook_secret"}
        return "Settings(" + ", ".join(
            f"{f}={'***' if f in hidden and getattr(self, f) else repr(getattr(self, f))}"
            for f in self.__struct_fields__) + ")"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{Path(self.data_dir).resolve() / 'smartspace.db'}"

    @property
    def resolved_jwt_secret(self) -> str:
        if self.jwt_secret:
            return self.jwt_secret
        # A per-install secret shared by every process on this data dir, so tokens survive restarts.
        path = Path(self.data_dir) / "jwt-secret"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
        return path.read_text().strip()


def _is_address(value: str) -> bool:
    try:
        normalize_address(value)
    except InvalidRequest:
        return False
    return True


def _insight_checks(s: Settings) -> list[tuple[str, bool, str]]:
    positive = ("insight_debounce_seconds", "insight_schedule_seconds", "insight_runway_hours", "insight_baseline_days",
                "insight_rejection_count", "insight_rejection_window_seconds", "insight_idle_key_days",
                "insight_cheaper_window_days")
    checks = [(f, getattr(s, f) > 0, "a positive number") for f in positive]
    checks += [
        ("insight_update_seconds", s.insight_update_seconds >= 0, "zero or a positive number"),
        ("insight_spike_ratio", s.insight_spike_ratio > 1, "a ratio above 1"),
        ("insight_spike_min_requests", s.insight_spike_min_requests >= 1, "at least 1"),
        ("insight_cheaper_min_saving_micros", s.insight_cheaper_min_saving_micros >= 0, "zero or more micro-USDC"),
        ("insight_cheaper_min_saving_ratio", 0 <= s.insight_cheaper_min_saving_ratio < 1, "a fraction from 0 to 1"),
        ("alert_webhook_url", s.alert_webhook_url == "" or s.alert_webhook_url.startswith(("http://", "https://")),
         "an http(s) URL"),
        ("alert_webhook_secret", s.alert_webhook_url == "" or len(s.alert_webhook_secret) >= 16,
         "at least 16 characters when SMARTSPACE_ALERT_WEBHOOK_URL is set"),
    ]
    return checks


def _is_origin(value: str) -> bool:
    return value == "*" or re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", value) is not None


def _is_private_key(value: str) -> bool:
    return re.fullmatch(r"(0x)?[0-9a-fA-F]{64}", value) is not None


def _shown(field: str, value: Any) -> str:
    """A value as it may appear in an error message: secrets and URL passwords are masked."""
    if any(word in field for word in ("secret", "private_key", "password")) and value:
        return "'***'"
    if isinstance(value, str):
        value = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", value)
    return repr(value)


def _read_dotenv(path: Path) -> dict[str, str]:
    """The file's assignments as python-dotenv parses them (``export`` lines, quotes, inline comments,
    multi-line quoted values, ``${VAR}`` expansion); a bare ``NAME`` line without ``=`` sets nothing."""
    if not path.is_file():
        return {}
    return {key: value for key, value in dotenv_values(path).items() if value is not None}


def _convert(name: str, raw: str, annotation: Any) -> Any:
    var = PREFIX + name.upper()
    origin = get_origin(annotation)
    try:
        if annotation is bool:
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError("expected true or false")
        if annotation is int:
            return int(raw.replace("_", ""))
        if annotation is float:
            return float(raw)
        if origin is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError as exc:
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(annotation, str(exc))
        raise SettingsError(f"{var}={raw!r} is invalid: expected {expected}") from None


def load_settings(environ: dict[str, str] | None = None, dotenv: Path | None = Path(".env")) -> Settings:
    env = dict(_read_dotenv(dotenv)) if dotenv is not None else {}
    env.update(os.environ if environ is None else environ)
    hints = get_type_hints(Settings)
    values: dict[str, Any] = {}
    known = {PREFIX + f.upper() for f in Settings.__struct_fields__}
    for key in env:
        if key.startswith(PREFIX) and key not in known and not key.startswith(PREFIX + "TEST_"):
            raise SettingsError(f"{key} is not a SmartSpace setting (known: see the README's table)")
    for field in Settings.__struct_fields__:
        raw = env.get(PREFIX + field.upper())
        if raw is None:
            continue
        values[field] = _convert(field, raw, hints[field])
    return Settings(**values)
