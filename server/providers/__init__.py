"""The provider registry: the built-in ``local`` provider plus the upstreams from configuration.

``SMARTSPACE_UPSTREAMS`` is a JSON list, one object per provider::

    [{"provider": "openai", "kind": "openai", "base_url": "https://api.openai.com/v1",
      "api_key_env": "OPENAI_API_KEY"},
     {"provider": "anthropic", "kind": "anthropic", "base_url": "https://api.anthropic.com",
      "api_key_env": "ANTHROPIC_API_KEY"},
     {"provider": "ollama", "kind": "openai", "base_url": "http://127.0.0.1:11434/v1"}]

``kind`` is ``openai`` (any OpenAI-compatible server: OpenAI, Ollama, vLLM, Together, …),
``anthropic`` (the Messages API, translated both ways) or ``local``. The key is read from the
environment variable named by ``api_key_env`` (or given inline as ``api_key``); it is sent upstream
and nowhere else. All upstreams share one pooled aiohttp ``ClientSession``, created on first use
and closed by the application's cleanup context (:meth:`Providers.close`).

**Models beside their upstream.** An entry may declare the models it serves (``models``: ``[{"id",
"input_micros_per_mtok", "output_micros_per_mtok", "upstream_model"?, "aliases"?, "kind"?,
"context_window"?, "max_output_tokens"?}]``; ``id`` is ``provider/model`` or just the model, the
provider then implied). They are written to the catalog at start (added, or brought in line with the
configuration) and audited in the platform log (:func:`configured_models`).

**Several upstreams for one provider.** Entries may repeat a provider (same ``kind``): requests are
spread across them in turn; a call answered 429 or 5xx (or not answered: connection failure, time-out)
is retried at once on the next one, and the failing one cools down — for its ``Retry-After`` when it
sent one, else for its ``cooldown_seconds`` (default 30) — before it is asked again (:class:`Pool`).
When every member is cooling down they are asked anyway, the soonest ready first.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import aiohttp
import msgspec

from domain.catalog import ModelCreate
from domain.errors import ProviderTimeout
from domain.providers import Completion, Provider, ProviderCall, UnknownProvider, UpstreamError
from server.providers.local import LocalProvider
from server.settings import Settings, SettingsError


class Upstream(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    provider: str
    kind: Literal["openai", "anthropic", "local"] = "openai"
    base_url: str = ""
    api_key_env: str = ""
    api_key: str = ""
    headers: dict[str, str] = {}
    timeout_seconds: float | None = None
    cooldown_seconds: float = 30.0  # when several upstreams serve the provider: a failing one rests this long
    models: list[dict[str, Any]] = []  # models this upstream serves (see the module docs), validated at parse

    def __repr__(self) -> str:  # never print the key
        return f"Upstream(provider={self.provider!r}, kind={self.kind!r}, base_url={self.base_url!r})"

    __str__ = __repr__

    def resolved_key(self) -> str:
        if self.api_key:
            return self.api_key
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""


def parse_upstreams(raw: str) -> list[Upstream]:
    if not raw.strip():
        return []
    try:
        upstreams = msgspec.json.decode(raw.encode(), type=list[Upstream])
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise SettingsError(f"SMARTSPACE_UPSTREAMS is invalid: expected a JSON list of upstreams ({exc})") from None
    kinds: dict[str, str] = {}
    for upstream in upstreams:
        if not upstream.provider or "/" in upstream.provider:
            raise SettingsError("SMARTSPACE_UPSTREAMS is invalid: each upstream needs a provider name without '/'")
        if kinds.setdefault(upstream.provider, upstream.kind) != upstream.kind:
            raise SettingsError(f"SMARTSPACE_UPSTREAMS is invalid: the upstreams of provider {upstream.provider!r} "
                                "must all have the same kind")
        if upstream.kind != "local" and not upstream.base_url.startswith(("http://", "https://")):
            raise SettingsError(
                f"SMARTSPACE_UPSTREAMS is invalid: upstream {upstream.provider!r} needs an http(s) base_url")
        if upstream.cooldown_seconds < 0:
            raise SettingsError(f"SMARTSPACE_UPSTREAMS is invalid: upstream {upstream.provider!r} has a negative "
                                "cooldown_seconds")
        configured_models([upstream])  # the models list is checked here, at start-up
    return upstreams


def configured_models(upstreams: list[Upstream]) -> list[ModelCreate]:
    """The catalog entries the upstreams declare (``models``), ids completed with their provider; a model
    declared twice is taken once (the first declaration)."""
    out: dict[str, ModelCreate] = {}
    for upstream in upstreams:
        for i, raw in enumerate(upstream.models):
            entry = dict(raw)
            given = entry.get("id")
            if isinstance(given, str) and given and not given.startswith(f"{upstream.provider}/"):
                entry["id"] = f"{upstream.provider}/{given}"
            try:
                model = msgspec.convert(entry, ModelCreate)
            except msgspec.ValidationError as exc:
                raise SettingsError(f"SMARTSPACE_UPSTREAMS is invalid: models[{i}] of upstream "
                                    f"{upstream.provider!r}: {exc}") from None
            out.setdefault(model.id, model)
    return list(out.values())


class Providers:
    """``container.providers``: provider name → adapter. Implements :class:`domain.providers.ProviderRegistry`."""

    def __init__(self, settings: Settings, upstreams: list[Upstream] | None = None) -> None:
        self.settings = settings
        self.upstreams = parse_upstreams(settings.upstreams) if upstreams is None else upstreams
        self._session: aiohttp.ClientSession | None = None
        self._adapters: dict[str, Any] = {"local": LocalProvider()}
        groups: dict[str, list[Upstream]] = {}
        for upstream in self.upstreams:
            groups.setdefault(upstream.provider, []).append(upstream)
        for provider, members in groups.items():
            built = [(u, self._build(u)) for u in members]
            self._adapters[provider] = built[0][1] if len(built) == 1 else Pool(provider, built)

    def _build(self, upstream: Upstream) -> Any:
        if upstream.kind == "local":
            return LocalProvider()
        if upstream.kind == "anthropic":
            from server.providers.anthropic import AnthropicProvider

            return AnthropicProvider(upstream, self)
        from server.providers.openai_compat import OpenAICompatProvider

        return OpenAICompatProvider(upstream, self)

    def get(self, provider: str) -> Provider:
        adapter = self._adapters.get(provider)
        if adapter is None:
            raise UnknownProvider(f"provider {provider!r} is not configured on this server",
                                  {"provider": provider, "configured": sorted(self._adapters)})
        return adapter

    def names(self) -> list[str]:
        return sorted(self._adapters)

    def timeout_seconds(self, provider: str) -> float:
        """The provider's time limit (its upstream's ``timeout_seconds``, else the server's)."""
        for upstream in self.upstreams:
            if upstream.provider == provider and upstream.timeout_seconds:
                return upstream.timeout_seconds
        return self.settings.provider_timeout_seconds

    def timeout(self, upstream: Upstream, stream: bool = False) -> aiohttp.ClientTimeout:
        """JSON calls: the whole call within the provider timeout. Streams: at most that long between
        two reads (a long answer may stream for longer, a stalled one is cut)."""
        limit = upstream.timeout_seconds or self.settings.provider_timeout_seconds
        connect = self.settings.provider_connect_timeout_seconds
        if stream:
            return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=limit)
        return aiohttp.ClientTimeout(total=limit, sock_connect=connect, sock_read=limit)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled session, created on first use (inside the running loop)."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=256, limit_per_host=128, keepalive_timeout=60,
                                             ttl_dns_cache=300, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector, json_serialize=lambda v: msgspec.json.encode(v).decode(),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.settings.provider_connect_timeout_seconds,
                                              sock_read=self.settings.provider_timeout_seconds),
                auto_decompress=True, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


# ---------------------------------------------------------------- several upstreams for one provider
def _worth_another(exc: Exception) -> bool:
    """A failure the next upstream may not have: 429, 5xx, no answer at all."""
    return isinstance(exc, ProviderTimeout) or (isinstance(exc, UpstreamError) and exc.retryable)


class Pool:
    """One provider served by several upstreams: round robin, retry on the next, cool a failing one down."""

    def __init__(self, provider: str, members: list[tuple[Upstream, Any]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = provider
        self.members = members
        self.clock = clock
        self.resting_until = [0.0] * len(members)
        self._next = 0

    def __repr__(self) -> str:
        return f"Pool({self.name!r}, {len(self.members)} upstreams)"

    def order(self) -> list[int]:
        """Members to try, in turn: the ready ones from the next in the rotation, then the resting ones,
        soonest ready first."""
        n = len(self.members)
        start = self._next
        self._next = (start + 1) % n
        now = self.clock()
        rotation = [(start + i) % n for i in range(n)]
        ready = [i for i in rotation if self.resting_until[i] <= now]
        resting = sorted((i for i in rotation if self.resting_until[i] > now), key=lambda i: self.resting_until[i])
        return ready + resting

    def _rest(self, i: int, exc: Exception) -> None:
        retry_after = getattr(exc, "retry_after", None)
        seconds = float(retry_after) if retry_after else self.members[i][0].cooldown_seconds
        self.resting_until[i] = self.clock() + seconds

    async def _each(self, run: Callable[[Any], Any]) -> Any:
        last: Exception | None = None
        for i in self.order():
            try:
                result = await run(self.members[i][1])
            except Exception as exc:
                if not _worth_another(exc):
                    raise
                self._rest(i, exc)
                last = exc
                continue
            self.resting_until[i] = 0.0
            return result
        assert last is not None
        raise last

    async def complete(self, call: ProviderCall) -> Completion:
        return await self._each(lambda adapter: adapter.complete(call))

    async def embed(self, call: ProviderCall) -> Completion:
        return await self._each(lambda adapter: adapter.embed(call))

    async def stream(self, call: ProviderCall) -> AsyncIterator[Any]:
        """Moves on to the next upstream only before the first chunk: once output flowed, a failure stands."""
        async def open_(adapter: Any) -> tuple[Any, Any]:
            iterator = adapter.stream(call).__aiter__()
            try:
                return iterator, await anext(iterator, None)
            except BaseException:
                await iterator.aclose()
                raise

        iterator, first = await self._each(open_)
        try:
            if first is not None:
                yield first
            async for chunk in iterator:
                yield chunk
        finally:
            await iterator.aclose()
