"""Properties of the mix arithmetic: targets, epoch caps, ratios, determinism, shortfalls."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synth_cpt.mix.plan import MixShortfall, Part, plan_mix, shard_bounds, split, take

sizes = st.lists(st.integers(1, 500), min_size=1, max_size=60)


@given(total=st.integers(0, 10**9), ratios=st.lists(st.floats(0.01, 100), min_size=1, max_size=8))
def test_split_is_exact_and_proportional(total, ratios):
    parts = split(total, ratios)
    assert sum(parts) == total
    assert all(abs(p - total * r / sum(ratios)) < 1 for p, r in zip(parts, ratios, strict=True))


@settings(max_examples=200)
@given(tokens=sizes, target=st.integers(0, 40000), epochs=st.integers(1, 5), seed=st.integers(0, 3))
def test_take_meets_the_target_within_one_document_and_the_cap(tokens, target, epochs, seed):
    picked = take(tokens, target, epochs, seed, "original")
    got = sum(tokens[i] for i in picked)
    assert got <= target
    repeats = Counter(picked)
    assert max(repeats.values(), default=0) <= epochs
    if got < target and len(picked) < len(tokens) * epochs:
        assert target - got < max(tokens), "short by less than one document (the one it stopped at)"
    if target >= sum(tokens) * epochs:
        assert sorted(repeats.values()) == [epochs] * len(tokens), "every document, every epoch"
    assert picked == take(tokens, target, epochs, seed, "original"), "deterministic"


@settings(max_examples=200)
@given(
    available=st.lists(st.integers(0, 10**6), min_size=2, max_size=5),
    ratios=st.lists(st.floats(0.1, 10), min_size=5, max_size=5),
    epochs=st.lists(st.integers(1, 4), min_size=5, max_size=5),
    target=st.integers(1, 10**7),
)
def test_plans_hit_their_targets_or_report_shortfalls_or_shrink(available, ratios, epochs, target):
    parts = [Part(f"c{i}", ratios[i], epochs[i], a) for i, a in enumerate(available)]
    targets = split(target, [p.ratio for p in parts])
    short_by = {p.origin: t - p.available * p.max_epochs for p, t in zip(parts, targets, strict=True) if t > p.available * p.max_epochs}
    if short_by:  # a component's share is more than its epochs can give: the plan fails unless told otherwise
        with pytest.raises(MixShortfall, match="short by") as short:
            plan_mix(parts, target_tokens=target)
        assert short.value.plan.shortfalls == short_by
        shrunk = plan_mix(parts, target_tokens=target, on_shortfall="shrink")
        assert shrunk.shrunk and shrunk.total < target and not any(p.shortfall for p in shrunk.parts)
        assert shrunk.shortfalls == short_by
        return
    plan = plan_mix(parts, target_tokens=target)
    assert plan.total == target and [p.target for p in plan.parts] == targets
    assert all(p.target <= p.capacity for p in plan.parts)


def test_target_as_a_multiple_of_the_originals_and_whole_components():
    parts = [Part("original", 1, 4, 1000), Part("rewrite:easy", 3, 1, 5000)]
    plan = plan_mix(parts, target_originals=4)
    assert plan.total == 4000 and [p.target for p in plan.parts] == [1000, 3000]
    whole = plan_mix([Part("entigraph", 1, 1, 777)])
    assert whole.total == 777 and whole.parts[0].target == 777
    with pytest.raises(MixShortfall, match=r"rewrite:easy: needs 3,000 tokens, has 0 x 1 epoch\(s\) = 0, short by 3,000"):
        plan_mix([Part("original", 1, 1, 1000), Part("rewrite:easy", 3, 1, 0)], target_originals=4)


@given(tokens=st.lists(st.integers(1, 300), max_size=80), shard=st.integers(1, 1000))
def test_shards_have_the_configured_size(tokens, shard):
    bounds = shard_bounds(tokens, shard)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(len(tokens)))
    for k, (a, b) in enumerate(bounds):
        size = sum(tokens[a:b])
        assert size <= shard or b - a == 1, "over the size only for a row longer than a shard"
        if k + 1 < len(bounds):
            assert size + tokens[b] > shard, "closed only when the next row would not fit"


def test_take_available_gives_all_of_a_short_component_and_keeps_the_others():
    parts = [Part("original", 1, 1, 1000), Part("rewrite:easy", 1, 1, 300), Part("rewrite:qa", 1, 1, 0)]
    plan = plan_mix(parts, target_tokens=1800, on_shortfall="take_available")
    assert [p.target for p in plan.parts] == [600, 300, 0] and plan.total == 900 and plan.shrunk
    assert plan.shortfalls == {"rewrite:easy": 300, "rewrite:qa": 600}


def test_a_recipe_needs_components_and_parquet_shards():
    from pydantic import ValidationError

    from synth_cpt.core.config import MixComponent, MixRecipe

    with pytest.raises(ValidationError, match="at least 1"):
        MixRecipe(components=())
    with pytest.raises(ValidationError, match="formats must include parquet"):
        MixRecipe(components=(MixComponent(source="originals"),), formats=("tokens",))
