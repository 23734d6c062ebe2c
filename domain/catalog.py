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
from domain.errors import Conflict, Forbidden, InvalidRequest, NotFound

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
    aliases: list[str] = []  # other ids a client may send for this model (e.g. a dated Anthropic id)
    upstream_model: str | None = None  # the name the provider knows it by, when not ``name``

    @property
    def wire_name(self) -> str:
        """The model name sent upstream."""
        return self.upstream_model or self.name


class ModelNotFound(NotFound):
    code = "not_found"


# the columns: provider ≤ 64 characters, model ≤ 160, the whole id ≤ 200
ModelId = Annotated[str, Meta(min_length=3, max_length=200,
                              pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}/[^\s/][^\n]{0,159}$",
                              description="provider/model, e.g. ollama/llama3.2 (provider up to 64 characters, "
                                          "model up to 160)")]
Alias = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^\S+$", description="a name without spaces")]
Price = Annotated[int, Meta(ge=0, le=10**12)]
Tokens = Annotated[int, Meta(ge=1, le=100_000_000)]


class ModelCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A platform admin's new catalog entry (POST /api/v1/admin/models), or one declared in configuration."""

    id: ModelId
    input_micros_per_mtok: Price
    output_micros_per_mtok: Price
    kind: Kind = "chat"
    context_window: Tokens = 128_000
    max_output_tokens: Tokens = 8_192
    aliases: Annotated[list[Alias], Meta(max_length=20)] = []
    upstream_model: Annotated[str, Meta(min_length=1, max_length=200)] | None = None

    def entity(self) -> CatalogModel:
        provider, name = split_id(self.id)
        assert provider is not None  # the pattern guarantees "provider/name"
        return CatalogModel(id=self.id, provider=provider, name=name, kind=self.kind,
                            input_micros_per_mtok=self.input_micros_per_mtok,
                            output_micros_per_mtok=self.output_micros_per_mtok, context_window=self.context_window,
                            max_output_tokens=self.max_output_tokens, aliases=list(self.aliases),
                            upstream_model=self.upstream_model, active=True)


class ModelUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A platform admin's edit of one catalog entry (PATCH)."""

    input_micros_per_mtok: Price | UnsetType = UNSET
    output_micros_per_mtok: Price | UnsetType = UNSET
    context_window: Tokens | UnsetType = UNSET
    max_output_tokens: Tokens | UnsetType = UNSET
    kind: Kind | UnsetType = UNSET
    aliases: Annotated[list[Alias], Meta(max_length=20)] | UnsetType = UNSET
    upstream_model: Annotated[str, Meta(min_length=1, max_length=200)] | UnsetType | None = UNSET
    active: bool | UnsetType = UNSET

    def changes(self) -> dict[str, object]:
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
    entry's name, else one entry's alias (bare, or prefixed with its provider). Ambiguity is refused,
    never guessed; no prefix or fuzzy matching (the original's fuzzy resolver turned ``openai/gpt`` into
    ``gpt-4``). Inactive entries are refused.
    """
    if not model_id or len(model_id) > 200:
        raise InvalidRequest("model must be a catalog id such as 'openai/gpt-4o-mini'", {"model": model_id})
    exact = [m for m in candidates if m.id == model_id]
    if not exact:
        exact = [m for m in candidates if m.name == model_id]
    if not exact:  # an alias, bare or with its provider: "claude-sonnet-4-5-20250929", "anthropic/…"
        provider, name = split_id(model_id)
        exact = [m for m in candidates if model_id in m.aliases
                 or (provider == m.provider and name in m.aliases)]
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
       kind: str = "chat", upstream: str | None = None, aliases: tuple[str, ...] = ()) -> CatalogModel:
    # USD per million tokens → micro-USDC per million tokens (exact: the list prices have ≤ 6 decimals).
    # A dated upstream id is also accepted as an alias, so clients sending the provider's own id resolve.
    return CatalogModel(id=f"{provider}/{name}", provider=provider, name=name, kind=kind,
                        input_micros_per_mtok=round(input_usd * MTOK), output_micros_per_mtok=round(output_usd * MTOK),
                        context_window=context, max_output_tokens=max_out, upstream_model=upstream,
                        aliases=[*([upstream] if upstream else []), *aliases])


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
    # Anthropic: the real API wants dated ids (or the "-latest" aliases it publishes)
    _m("anthropic", "claude-3-5-haiku", 0.80, 4.00, 200_000, 8_192, upstream="claude-3-5-haiku-20241022",
       aliases=("claude-3-5-haiku-latest",)),
    _m("anthropic", "claude-3-5-sonnet", 3.00, 15.00, 200_000, 8_192, upstream="claude-3-5-sonnet-20241022",
       aliases=("claude-3-5-sonnet-latest",)),
    _m("anthropic", "claude-sonnet-4", 3.00, 15.00, 200_000, 64_000, upstream="claude-sonnet-4-20250514"),
    _m("anthropic", "claude-sonnet-4-5", 3.00, 15.00, 200_000, 64_000, upstream="claude-sonnet-4-5-20250929"),
    _m("anthropic", "claude-haiku-4-5", 1.00, 5.00, 200_000, 64_000, upstream="claude-haiku-4-5-20251001"),
    _m("anthropic", "claude-opus-4", 15.00, 75.00, 200_000, 32_000, upstream="claude-opus-4-20250514"),
    _m("anthropic", "claude-3-opus", 15.00, 75.00, 200_000, 4_096, upstream="claude-3-opus-20240229",
       aliases=("claude-3-opus-latest",)),
    _m("anthropic", "claude-3-sonnet", 3.00, 15.00, 200_000, 4_096, upstream="claude-3-sonnet-20240229"),
    _m("anthropic", "claude-3-haiku", 0.25, 1.25, 200_000, 4_096, upstream="claude-3-haiku-20240307"),
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
    async def insert(self, entity: CatalogModel) -> CatalogModel: ...
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

    def _require_admin(self) -> None:
        if not self.scope.actor.platform_admin:
            raise Forbidden("this needs a platform admin (SMARTSPACE_ADMIN_EMAILS)")

    async def _check_names(self, model: CatalogModel) -> None:
        """A new id or alias must not name another model already (resolution stays unambiguous)."""
        taken: dict[str, str] = {}
        for other in await self.repo.list(ModelFilter(include_inactive=True)):
            if other.id == model.id:
                continue
            for n in (other.id, *other.aliases, *(f"{other.provider}/{a}" for a in other.aliases)):
                taken[n] = other.id
        for n in (model.id, *model.aliases, *(f"{model.provider}/{a}" for a in model.aliases)):
            if n in taken:
                raise Conflict(f"{n!r} already names the model {taken[n]!r}", {"name": n, "model": taken[n]})

    async def create(self, cmd: ModelCreate) -> CatalogModel:
        """Add a model to the catalog (platform admins; audited as ``catalog.created``)."""
        self._require_admin()
        model = cmd.entity()
        if await self.repo.get(model.id) is not None:
            raise Conflict(f"the model {model.id!r} is already in the catalog: PATCH it instead", {"model": model.id})
        await self._check_names(model)
        model.updated_at = utcnow()
        await self.repo.insert(model)
        await self.repo.ensure_platform_log()
        self.scope.emit(PLATFORM_PROJECT, "catalog.created", {"model": model.id, "entry": _audited(model)})
        return model

    async def declare(self, cmds: Sequence[ModelCreate], source: str) -> builtins.list[str]:
        """Models declared in the server's configuration (``source`` names it): added when missing, brought
        in line when they differ, left alone when equal — each change audited. Returns the ids changed."""
        changed: builtins.list[str] = []
        for cmd in cmds:
            model = cmd.entity()
            before = await self.repo.get(model.id)
            if before is None:
                await self._check_names(model)
                model.updated_at = utcnow()
                await self.repo.insert(model)
                await self.repo.ensure_platform_log()
                self.scope.emit(PLATFORM_PROJECT, "catalog.created",
                                {"model": model.id, "entry": _audited(model), "source": source})
                changed.append(model.id)
                continue
            wanted = {k: v for k, v in _audited(model).items() if k != "id"}
            changes = {k: v for k, v in wanted.items() if getattr(before, k) != v}
            if not before.active:
                changes["active"] = True  # declared again: back in service
            if not changes:
                continue
            await self._check_names(model)
            await self.repo.update(model.id, **changes, updated_at=utcnow())
            await self.repo.ensure_platform_log()
            self.scope.emit(PLATFORM_PROJECT, "catalog.updated", {
                "model": model.id, "source": source,
                "changes": {k: {"from": getattr(before, k), "to": v} for k, v in changes.items()}})
            changed.append(model.id)
        return changed

    async def retire(self, model_id: str) -> CatalogModel:
        """Take a model out of service (kept for the requests that used it; audited as ``catalog.retired``)."""
        self._require_admin()
        before = await self.repo.get(model_id)
        if before is None:
            raise ModelNotFound(f"the model {model_id!r} is not in the catalog", {"model": model_id})
        if not before.active:
            return before
        after = await self.repo.update(model_id, active=False, updated_at=utcnow())
        await self.repo.ensure_platform_log()
        self.scope.emit(PLATFORM_PROJECT, "catalog.retired", {"model": model_id})
        assert after is not None
        return after

    async def update(self, model_id: str, cmd: ModelUpdate) -> CatalogModel:
        self._require_admin()
        changes = cmd.changes()
        if not changes:
            raise InvalidRequest("nothing to change: send at least one field")
        before = await self.repo.get(model_id)
        if before is None:
            raise ModelNotFound(f"the model {model_id!r} is not in the catalog", {"model": model_id})
        if "aliases" in changes:
            aliases = changes["aliases"]
            assert isinstance(aliases, builtins.list)
            await self._check_names(msgspec.structs.replace(before, aliases=builtins.list(aliases)))
        after = await self.repo.update(model_id, **changes, updated_at=utcnow())
        assert after is not None  # found above, in this transaction
        await self.repo.ensure_platform_log()
        self.scope.emit(PLATFORM_PROJECT, "catalog.updated", {
            "model": model_id, "changes": {k: {"from": getattr(before, k), "to": v} for k, v in changes.items()}})
        return after


def _audited(model: CatalogModel) -> dict[str, object]:
    """The fields of a catalog entry an audit event records."""
    return {k: v for k, v in msgspec.structs.asdict(model).items()
            if k not in ("provider", "name", "active", "updated_at")}
