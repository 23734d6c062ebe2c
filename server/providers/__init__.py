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
"""

from __future__ import annotations

import os
from typing import Any, Literal

import aiohttp
import msgspec

from domain.providers import Provider, UnknownProvider
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
    seen: set[str] = set()
    for upstream in upstreams:
        if not upstream.provider or "/" in upstream.provider:
            raise SettingsError("SMARTSPACE_UPSTREAMS is invalid: each upstream needs a provider name without '/'")
        if upstream.provider in seen:
            raise SettingsError(f"SMARTSPACE_UPSTREAMS is invalid: provider {upstream.provider!r} is listed twice")
        if upstream.kind != "local" and not upstream.base_url.startswith(("http://", "https://")):
            raise SettingsError(
                f"SMARTSPACE_UPSTREAMS is invalid: upstream {upstream.provider!r} needs an http(s) base_url")
        seen.add(upstream.provider)
    return upstreams


class Providers:
    """``container.providers``: provider name → adapter. Implements :class:`domain.providers.ProviderRegistry`."""

    def __init__(self, settings: Settings, upstreams: list[Upstream] | None = None) -> None:
        self.settings = settings
        self.upstreams = parse_upstreams(settings.upstreams) if upstreams is None else upstreams
        self._session: aiohttp.ClientSession | None = None
        self._adapters: dict[str, Any] = {"local": LocalProvider()}
        for upstream in self.upstreams:
            self._adapters[upstream.provider] = self._build(upstream)

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
