"""The upstream adapters against the fake upstream on loopback (no database involved)."""

from __future__ import annotations

import logging

import pytest

from domain.errors import InvalidRequest, ProviderTimeout
from domain.providers import ProviderCall, UpstreamError, Usage
from server.providers import Providers, Upstream, parse_upstreams
from server.providers.wire import RawChunk
from server.settings import Settings, SettingsError
from tests.fakes.upstream import Behavior, FakeUpstream

KEY_O = "sk-upstream-openai-SECRET-0123456789"
KEY_A = "sk-ant-upstream-SECRET-9876543210"


@pytest.fixture
async def fake():
    upstream = await FakeUpstream().start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def registry(fake: FakeUpstream, tmp_path):
    settings = Settings(data_dir=str(tmp_path), jwt_secret="x" * 40, provider_timeout_seconds=0.5)
    providers = Providers(settings, upstreams=[
        Upstream(provider="openai", kind="openai", base_url=fake.base_url, api_key=KEY_O),
        Upstream(provider="anthropic", kind="anthropic", base_url=fake.anthropic_url, api_key=KEY_A),
    ])
    yield providers
    await providers.close()


def chat(provider: str, max_tokens: int | None = None, **params) -> ProviderCall:
    return ProviderCall(provider=provider, model="m1", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world again"}],
        max_tokens=max_tokens, params=params)


async def test_openai_complete_sends_the_key_and_returns_usage(registry: Providers, fake: FakeUpstream):
    result = await registry.get("openai").complete(chat("openai", temperature=0.2))
    assert result.body["object"] == "chat.completion"
    assert result.body["choices"][0]["message"]["content"].startswith("Reply")
    assert result.usage == Usage(fake.reported[0].input_tokens, fake.reported[0].output_tokens)
    got = fake.received[0]
    assert got.headers["Authorization"] == f"Bearer {KEY_O}"
    assert got.body["temperature"] == 0.2 and got.body["model"] == "m1"
    assert result.raw is not None and b"chat.completion" in result.raw


async def test_openai_stream_asks_for_usage_and_forwards_raw_chunks(registry: Providers, fake: FakeUpstream):
    chunks = [c async for c in registry.get("openai").stream(chat("openai", max_tokens=5))]
    assert fake.received[0].body["stream_options"] == {"include_usage": True}
    assert fake.received[0].body["max_tokens"] == 5
    assert all(isinstance(c, RawChunk) and c.raw.startswith(b"{") for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(text.split()) == 5
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


async def test_openai_embeddings(registry: Providers, fake: FakeUpstream):
    result = await registry.get("openai").embed(
        ProviderCall(provider="openai", model="e", operation="embedding", input=["abc", "defgh"]))
    assert len(result.body["data"]) == 2
    assert result.usage == Usage(fake.reported[0].input_tokens, 0)


async def test_errors_map_to_provider_error_with_status_and_no_key(registry: Providers, fake: FakeUpstream,
                                                                  caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    fake.plan(Behavior(status=429, retry_after=7, echo_key=True), Behavior(status=500, echo_key=True))
    with pytest.raises(UpstreamError) as err:
        await registry.get("openai").complete(chat("openai"))
    assert err.value.upstream_status == 429 and err.value.retry_after == 7 and err.value.retryable
    assert KEY_O not in err.value.message and "[redacted]" in err.value.message
    with pytest.raises(UpstreamError) as err:
        await registry.get("anthropic").complete(chat("anthropic"))
    assert err.value.upstream_status == 500 and KEY_A not in str(err.value.to_dict())
    assert KEY_O not in caplog.text and KEY_A not in caplog.text


async def test_timeouts_map_to_provider_timeout(registry: Providers, fake: FakeUpstream):
    fake.plan(Behavior(delay=2.0))
    with pytest.raises(ProviderTimeout):
        await registry.get("openai").complete(chat("openai"))
    fake.plan(Behavior(delay=2.0, stall_after=2))
    seen = []
    with pytest.raises(ProviderTimeout):
        async for c in registry.get("anthropic").stream(chat("anthropic")):
            seen.append(c)
    assert seen  # some chunks arrived before the stall


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_cut_streams_raise_after_the_chunks_that_arrived(registry: Providers, fake: FakeUpstream, provider):
    fake.plan(Behavior(cut_after=3))
    seen = []
    with pytest.raises(UpstreamError):
        async for c in registry.get(provider).stream(chat(provider)):
            seen.append(c)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in seen if c["choices"])
    assert len(text.split()) == 3


async def test_anthropic_complete_and_stream_translate(registry: Providers, fake: FakeUpstream):
    result = await registry.get("anthropic").complete(chat("anthropic", max_tokens=4, stop="END"))
    sent = fake.received[0]
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == KEY_A
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.body["system"] == "be brief" and sent.body["max_tokens"] == 4
    assert sent.body["stop_sequences"] == ["END"]
    assert sent.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello world again"}]}]
    assert result.body["choices"][0]["finish_reason"] == "length"
    assert result.usage == Usage(fake.reported[0].input_tokens, 4)
    chunks = [c async for c in registry.get("anthropic").stream(chat("anthropic"))]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == fake.reported[1].output_tokens
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    with pytest.raises(InvalidRequest):
        await registry.get("anthropic").embed(ProviderCall(provider="anthropic", model="x", operation="embedding",
                                                           input="a"))


async def test_usage_omitted_is_none(registry: Providers, fake: FakeUpstream):
    fake.plan(Behavior(omit_usage=True), Behavior(omit_usage=True))
    assert (await registry.get("openai").complete(chat("openai"))).usage is None
    chunks = [c async for c in registry.get("anthropic").stream(chat("anthropic"))]
    assert not any("usage" in c for c in chunks)


def test_upstream_configuration_is_validated_and_keys_do_not_print(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-from-env-123456")
    ups = parse_upstreams('[{"provider":"openai","kind":"openai","base_url":"http://x/v1","api_key_env":"MY_KEY"}]')
    assert ups[0].resolved_key() == "sk-from-env-123456" and "sk-from" not in repr(ups[0])
    for bad in ['{"provider": 1}', '[{"provider":"a/b","base_url":"http://x"}]', '[{"provider":"a"}]',
                '[{"provider":"a","base_url":"http://x"},{"provider":"a","kind":"anthropic","base_url":"http://y"}]',
                '[{"provider":"a","base_url":"http://x","models":[{"id":"m","input_micros_per_mtok":-1,'
                '"output_micros_per_mtok":1}]}]',
                '[{"provider":"a","base_url":"http://x","models":[{"id":"m"}]}]',
                '[{"provider":"a","base_url":"http://x","kind":"weird"}]']:
        with pytest.raises(SettingsError):
            parse_upstreams(bad)


async def test_local_provider_is_deterministic_and_respects_max_tokens(registry: Providers):
    local = registry.get("local")
    call = ProviderCall(provider="local", model="echo", messages=[{"role": "user", "content": "one two three four"}],
                        max_tokens=3)
    a, b = await local.complete(call), await local.complete(call)
    assert a.body["choices"][0]["message"] == b.body["choices"][0]["message"]
    assert a.usage.output_tokens <= 3 and a.body["choices"][0]["finish_reason"] == "length"
    streamed = [c async for c in local.stream(call)]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in streamed if c["choices"])
    assert text == a.body["choices"][0]["message"]["content"]
    emb = await local.embed(ProviderCall(provider="local", model="e", operation="embedding", input="x"))
    emb2 = await local.embed(ProviderCall(provider="local", model="e", operation="embedding", input="x"))
    assert emb.body == emb2.body and emb.usage.input_tokens == 1
    with pytest.raises(Exception) as err:
        registry.get("nope")
    assert err.value.code == "not_found"


async def test_max_completion_tokens_keeps_its_name_for_o_series_models(registry: Providers, fake: FakeUpstream):
    call = ProviderCall(provider="openai", model="o4-mini", messages=[{"role": "user", "content": "hi"}],
                        max_tokens=7, params={"max_completion_tokens": 7})
    await registry.get("openai").complete(call)
    sent = fake.received[-1].body
    assert sent["max_completion_tokens"] == 7 and "max_tokens" not in sent
