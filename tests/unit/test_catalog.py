"""Catalog rules: cost rounding, model resolution, filters, seed sanity."""

from __future__ import annotations

import msgspec
import pytest

from domain.catalog import SEED, CatalogModel, ModelFilter, ModelNotFound, cost_micros, matches, resolve, split_id
from domain.errors import InvalidRequest

BY_ID = {m.id: m for m in SEED}


def model(**kw) -> CatalogModel:
    values = dict(id="p/m", provider="p", name="m", kind="chat", input_micros_per_mtok=150_000,
                  output_micros_per_mtok=600_000, context_window=1000, max_output_tokens=100)
    values.update(kw)
    return CatalogModel(**values)


def test_cost_is_exact_for_whole_micros():
    assert cost_micros(model(), 1_000_000, 0) == 150_000
    assert cost_micros(model(), 1_000_000, 1_000_000) == 750_000
    assert cost_micros(model(), 1000, 1000) == 750


def test_cost_rounds_up_and_is_never_zero_for_priced_tokens():
    assert cost_micros(model(), 1, 0) == 1  # 0.15 µUSDC
    assert cost_micros(model(), 0, 1) == 1  # 0.6
    assert cost_micros(model(), 7, 0) == 2  # 1.05 → 2
    assert cost_micros(model(input_micros_per_mtok=1), 1, 0) == 1
    assert cost_micros(model(), 0, 0) == 0
    assert cost_micros(model(input_micros_per_mtok=0, output_micros_per_mtok=0), 10, 10) == 0


def test_cost_refuses_negative_tokens():
    with pytest.raises(InvalidRequest):
        cost_micros(model(), -1, 0)


def test_cost_is_integer_arithmetic_even_for_huge_counts():
    assert cost_micros(model(input_micros_per_mtok=10**12), 10**9, 0) == 10**15


def test_resolve_exact_id_then_unambiguous_bare_name():
    a = model(id="openai/gpt-4o", provider="openai", name="gpt-4o")
    b = model(id="azure/gpt-4o", provider="azure", name="gpt-4o")
    assert resolve("openai/gpt-4o", [a]) is a
    assert resolve("gpt-4o", [a]) is a
    with pytest.raises(InvalidRequest) as exc:
        resolve("gpt-4o", [a, b])
    assert exc.value.details["candidates"] == ["azure/gpt-4o", "openai/gpt-4o"]
    assert resolve("azure/gpt-4o", [b]) is b


def test_resolve_refuses_unknown_inactive_and_empty_ids():
    with pytest.raises(ModelNotFound):
        resolve("openai/gpt-9", [])
    with pytest.raises(ModelNotFound):
        resolve("p/m", [model(active=False)])
    with pytest.raises(InvalidRequest):
        resolve("", [])


def test_split_id():
    assert split_id("openai/gpt-4o") == ("openai", "gpt-4o")
    assert split_id("gpt-4o") == (None, "gpt-4o")
    assert split_id("x/meta-llama/llama-3") == ("x", "meta-llama/llama-3")


def test_filters():
    m = BY_ID["openai/gpt-4o-mini"]
    assert matches(m, ModelFilter(provider="openai", search="MINI", kind="chat"))
    assert not matches(m, ModelFilter(provider="anthropic"))
    assert not matches(m, ModelFilter(kind="embedding"))
    assert not matches(msgspec.structs.replace(m, active=False), ModelFilter())
    assert matches(msgspec.structs.replace(m, active=False), ModelFilter(include_inactive=True))


def test_seed_has_the_list_prices_and_limits():
    assert (BY_ID["openai/gpt-4o-mini"].input_micros_per_mtok, BY_ID["openai/gpt-4o-mini"].output_micros_per_mtok) \
        == (150_000, 600_000)
    assert (BY_ID["openai/gpt-4o"].input_micros_per_mtok, BY_ID["openai/gpt-4o"].output_micros_per_mtok) \
        == (2_500_000, 10_000_000)
    assert BY_ID["openai/gpt-4"].input_micros_per_mtok == 30_000_000
    assert BY_ID["openai/gpt-3.5-turbo"].output_micros_per_mtok == 1_500_000
    assert BY_ID["openai/text-embedding-3-small"].input_micros_per_mtok == 20_000
    assert BY_ID["anthropic/claude-3-opus"].output_micros_per_mtok == 75_000_000
    assert len(BY_ID) == len(SEED)  # ids are unique
    for m in SEED:
        assert m.input_micros_per_mtok > 0, m.id  # nothing is free
        assert m.kind in ("chat", "embedding")
        assert m.context_window > 0 and m.max_output_tokens > 0
        assert m.id == f"{m.provider}/{m.name}"
    assert {m.provider for m in SEED} >= {"openai", "anthropic", "local"}
    assert {m.kind for m in SEED if m.provider == "local"} == {"chat", "embedding"}
