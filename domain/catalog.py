"""The model catalog: what a model costs, and which catalog entry a requested model id means.

Prices are integer micro-USDC per million tokens. A cost is rounded UP to the next micro, so a
non-zero token count at a non-zero price never costs 0. Unknown or inactive models are refused,
never priced at zero.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Literal, Protocol

import msgspec
from msgspec import UNSET, Meta, UnsetType

from domain.base import utcnow
from domain.errors import Forbidden, InvalidRequest, NotFound

if TYPE_CHECKING:
    from domain.scope import Scope

MTOK = 1_000_000
PLATFORM_PROJECT = "platform"  # the reserved event-log id for platform-wide changes (catalog, system policy)
Kind = Literal["chat", "embedding"]


class CatalogModel(msgspec.Struct, kw_only=True):
    id: str  # "provider/model"
    provider: str
    name: str  # the upstream's model id
    kind: str  # chat | embedding
    input_micros_per_mtok: int
    output_micros_per_mtok: int
    context_window: int
    max_output_tokens: int
    active: bool = True
    updated_at: datetime | None = None


class ModelNotFound(NotFound):
    code = "not_found"


class ModelUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A platform admin's edit of one catalog entry (PATCH)."""

    input_micros_per_mtok: Annotated[int, Meta(ge=0, le=10**12)] | UnsetType = UNSET
    output_micros_per_mtok: Annotated[int, Meta(ge=0, le=10**12)] | UnsetType = UNSET
    context_window: Annotated[int, Meta(ge=1, le=100_000_000)] | UnsetType = UNSET
    max_output_tokens: Annotated[int, Meta(ge=1, le=100_000_000)] | UnsetType = UNSET
    active: bool | UnsetType = UNSET

    def changes(self) -> dict[str, int | bool]:
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not UNSET}


class ModelFilter(msgspec.Struct, kw_only=True, frozen=True):
    provider: str | None = None
    search: str | None = None
    kind: str | None = None
    include_inactive: bool = False


def cost_micros(model: CatalogModel, input_tokens: int, output_tokens: int) -> int:
    """The price of a call, rounded up to the next micro-USDC."""
    if input_tokens < 0 or output_tokens < 0:
        raise InvalidRequest("token counts cannot be negative",
                             {"input_tokens": input_tokens, "output_tokens": output_tokens})
    numerator = input_tokens * model.input_micros_per_mtok + output_tokens * model.output_micros_per_mtok
    return -(-numerator // MTOK)


def split_id(model_id: str) -> tuple[str | None, str]:
    """``"openai/gpt-4o"`` → ``("openai", "gpt-4o")``; a bare id → ``(None, id)``."""
    provider, sep, name = model_id.partition("/")
    return (provider, name) if sep and provider and name else (None, model_id)


def resolve(model_id: str, candidates: Sequence[CatalogModel]) -> CatalogModel:
    """Pick the catalog entry ``model_id`` names among ``candidates`` (the view's lookup result).

    Rules: an exact ``provider/model`` id wins; otherwise a bare model id must match exactly one
    entry's upstream name (ambiguity is refused, never guessed; no prefix or fuzzy matching — the
    original's fuzzy resolver turned ``openai/gpt`` into ``gpt-4``). Inactive entries are refused.
    """
    if not model_id or len(model_id) > 200:
        raise InvalidRequest("model must be a catalog id such as 'openai/gpt-4o-mini'", {"model": model_id})
    exact = [m for m in candidates if m.id == model_id]
    if not exact:
        exact = [m for m in candidates if m.name == model_id]
    if not exact:
        raise ModelNotFound(f"the model {model_id!r} is not in the catalog", {"model": model_id})
    if len(exact) > 1:
        raise InvalidRequest(f"the model id {model_id!r} is ambiguous: use one of "
                             + ", ".join(sorted(m.id for m in exact)),
                             {"model": model_id, "candidates": sorted(m.id for m in exact)})
    model = exact[0]
    if not model.active:
        raise ModelNotFound(f"the model {model.id!r} is not available", {"model": model.id, "active": False})
    return model


def matches(model: CatalogModel, f: ModelFilter) -> bool:
    if not f.include_inactive and not model.active:
        return False
    if f.provider and model.provider != f.provider:
        return False
    if f.kind and model.kind != f.kind:
        return False
    return not f.search or f.search.lower() in model.id.lower()


def _m(provider: str, name: str, input_usd: float, output_usd: float, context: int, max_out: int,
       kind: str = "chat") -> CatalogModel:
    # USD per million tokens → micro-USDC per million tokens (exact: the list prices have ≤ 6 decimals).
    return CatalogModel(id=f"{provider}/{name}", provider=provider, name=name, kind=kind,
                        input_micros_per_mtok=round(input_usd * MTOK), output_micros_per_mtok=round(output_usd * MTOK),
                        context_window=context, max_output_tokens=max_out)


# List prices (USD per 1M tokens) as published by the providers; admins can edit them (edits win).
SEED: tuple[CatalogModel, ...] = (
    # OpenAI
    _m("openai", "gpt-4o-mini", 0.15, 0.60, 128_000, 16_384),
    _m("openai", "gpt-4o", 2.50, 10.00, 128_000, 16_384),
    _m("openai", "gpt-4.1", 2.00, 8.00, 1_047_576, 32_768),
    _m("openai", "gpt-4.1-mini", 0.40, 1.60, 1_047_576, 32_768),
    _m("openai", "gpt-4.1-nano", 0.10, 0.40, 1_047_576, 32_768),
    _m("openai", "o3-mini", 1.10, 4.40, 200_000, 100_000),
    _m("openai", "o4-mini", 1.10, 4.40, 200_000, 100_000),
    _m("openai", "gpt-4", 30.00, 60.00, 8_192, 8_192),
    _m("openai", "gpt-4-turbo", 10.00, 30.00, 128_000, 4_096),
    _m("openai", "gpt-3.5-turbo", 0.50, 1.50, 16_385, 4_096),
    _m("openai", "text-embedding-3-small", 0.02, 0, 8_191, 1, "embedding"),
    _m("openai", "text-embedding-3-large", 0.13, 0, 8_191, 1, "embedding"),
    _m("openai", "text-embedding-ada-002", 0.10, 0, 8_191, 1, "embedding"),
    # Anthropic
    _m("anthropic", "claude-3-5-haiku", 0.80, 4.00, 200_000, 8_192),
    _m("anthropic", "claude-3-5-sonnet", 3.00, 15.00, 200_000, 8_192),
    _m("anthropic", "claude-sonnet-4", 3.00, 15.00, 200_000, 64_000),
    _m("anthropic", "claude-sonnet-4-5", 3.00, 15.00, 200_000, 64_000),
    _m("anthropic", "claude-haiku-4-5", 1.00, 5.00, 200_000, 64_000),
    _m("anthropic", "claude-opus-4", 15.00, 75.00, 200_000, 32_000),
    _m("anthropic", "claude-3-opus", 15.00, 75.00, 200_000, 4_096),
    _m("anthropic", "claude-3-sonnet", 3.00, 15.00, 200_000, 4_096),
    _m("anthropic", "claude-3-haiku", 0.25, 1.25, 200_000, 4_096),
    # The built-in deterministic local provider: small non-zero prices so money really moves offline.
    _m("local", "echo-1", 0.10, 0.20, 32_768, 4_096),
    _m("local", "embed-1", 0.01, 0, 8_192, 1, "embedding"),
)


# ---------------------------------------------------------------- the service
class CatalogRepo(Protocol):
    async def list(self, f: ModelFilter) -> list[CatalogModel]: ...
    async def get(self, id_: str) -> CatalogModel | None: ...
    async def candidates(self, model_id: str) -> builtins.list[CatalogModel]: ...
    async def update(self, id_: str, **values: object) -> CatalogModel | None: ...
    async def ensure_platform_log(self) -> None: ...


class ModelList(msgspec.Struct):
    items: list[CatalogModel]
    total: int
    next_cursor: str | None = None  # the catalog is one page; kept for the list convention


class Catalog:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.repo: CatalogRepo = scope.store.catalog

    async def list(self, f: ModelFilter) -> ModelList:
        if f.include_inactive and not self.scope.actor.platform_admin:
            f = msgspec.structs.replace(f, include_inactive=False)
        items = await self.repo.list(f)
        return ModelList(items=items, total=len(items))

    async def resolve(self, model_id: str) -> CatalogModel:
        return resolve(model_id, await self.repo.candidates(model_id))

    async def update(self, model_id: str, cmd: ModelUpdate) -> CatalogModel:
        if not self.scope.actor.platform_admin:
            raise Forbidden("this needs a platform admin (SMARTSPACE_ADMIN_EMAILS)")
        changes = cmd.changes()
        if not changes:
            raise InvalidRequest("nothing to change: send at least one field")
        before = await self.repo.get(model_id)
        if before is None:
            raise ModelNotFound(f"the model {model_id!r} is not in the catalog", {"model": model_id})
        after = await self.repo.update(model_id, **changes, updated_at=utcnow())
        assert after is not None  # found above, in this transaction
        await self.repo.ensure_platform_log()
        self.scope.emit(PLATFORM_PROJECT, "catalog.updated", {
            "model": model_id, "changes": {k: {"from": getattr(before, k), "to": v} for k, v in changes.items()}})
        return after
