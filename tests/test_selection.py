"""Error-driven selection and per-layer budgets: the search against its starts, the allocation's invariants,
and planning with them (the substitution-error statistic is tested with the observers)."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moefx
from moefx.errors import ConfigError
from moefx.passes.merge import SCORES, expert_counts, ranking
from moefx.passes.observe import collect_statistics
from moefx.selection import error_gains, greedy_additions, select_by_error, substitution_cost
from moefx.zoo import example_inputs, tiny_model


def _cost_by_brute_force(errors: torch.Tensor, kept: list[int]) -> float:
    return sum(min(float(errors[e, d]) for d in kept) for e in range(errors.shape[0]) if e not in kept)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), num_experts=st.integers(2, 12), data=st.data())
def test_error_selection_is_never_worse_than_its_starts_and_no_single_swap_improves_it(seed, num_experts, data):
    count = data.draw(st.integers(1, num_experts))
    gen = torch.Generator().manual_seed(seed)
    errors = torch.rand(num_experts, num_experts, generator=gen, dtype=torch.float64) ** 3
    starts = [torch.randperm(num_experts, generator=gen).tolist() for _ in range(2)]
    kept = select_by_error(errors, count, starts)
    assert len(kept) == count == len(set(kept)) and kept == sorted(kept)
    cost = substitution_cost(errors, kept)
    assert cost == pytest.approx(_cost_by_brute_force(errors, kept), rel=1e-9, abs=1e-12)
    for start in starts:
        assert cost <= substitution_cost(errors, start[:count]) + 1e-12
    for out, new in itertools.product(kept, set(range(num_experts)) - set(kept)):
        swapped = [new if e == out else e for e in kept]
        assert cost <= substitution_cost(errors, swapped) + 1e-9 * max(cost, 1e-12)


def test_greedy_additions_lower_the_cost_at_every_step():
    errors = torch.rand(10, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    order, costs = greedy_additions(errors)
    assert sorted(order) == list(range(10)) and costs[-1] == 0.0
    assert all(before >= after for before, after in itertools.pairwise(costs))
    assert costs == pytest.approx([substitution_cost(errors, order[: c + 1]) for c in range(10)])
    gains = error_gains(errors)
    assert gains[0] == float("inf") and gains[1:] == pytest.approx([b - a for b, a in itertools.pairwise(costs)])


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 16), min_size=1, max_size=6),
    fraction=st.floats(0.05, 1.0),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_adaptive_budget_keeps_the_global_count_and_every_layer_s_top_k(sizes, fraction, seed, data):
    min_keep = [data.draw(st.integers(1, n)) for n in sizes]
    gen = torch.Generator().manual_seed(seed)
    gains = [torch.rand(n, generator=gen).tolist() for n in sizes]  # not monotone, as greedy errors need not be
    budget = round(fraction * sum(sizes))
    if budget < sum(min_keep):
        with pytest.raises(ConfigError, match="fewer than their top_k"):
            expert_counts(sizes, fraction, True, min_keep, gains)
        return
    counts = expert_counts(sizes, fraction, True, min_keep, gains)
    assert sum(counts) == budget
    assert all(m <= c <= n for c, m, n in zip(counts, min_keep, sizes, strict=True))


def test_adaptive_budget_goes_where_one_more_expert_gains_most():
    # layer 0 gains little from a third expert, layer 1 much from its third and fourth
    gains = [[9.0, 9.0, 0.1, 0.1], [9.0, 9.0, 5.0, 4.0]]
    assert expert_counts([4, 4], 0.75, True, [2, 2], gains) == [2, 4]
    assert expert_counts([4, 4], 0.75, False, [2, 2], gains) == [3, 3]


def _calibrated_blocks(family: str, **options):
    model = moefx.prepare(tiny_model(family), example_inputs(family), **options)
    moefx.calibrate(model, [example_inputs(family, batch=4, seq=16, seed=s) for s in range(3)])
    return [collect_statistics(model.get_submodule(b.name)) for b in moefx.api.prepared_blocks(model)]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "hand_written"])
def test_error_selection_beats_every_score_on_real_blocks(family):
    differs = False
    for stats in _calibrated_blocks(family, selection="error"):
        errors = stats.substitution_errors
        chosen = select_by_error(errors, 4, [ranking(getattr(stats, s)) for s in SCORES.values()])
        for score in SCORES.values():
            by_score = ranking(getattr(stats, score))[:4]
            assert substitution_cost(errors, chosen) <= substitution_cost(errors, by_score) + 1e-12
            differs |= sorted(by_score) != chosen
    assert differs  # otherwise the test shows nothing


def test_error_selection_plans_keep_the_budget_and_compress(compiled_tiny):
    original = tiny_model("olmoe")
    uniform = compiled_tiny("olmoe", selection="error", experts=0.5)
    adaptive = compiled_tiny("olmoe", selection="error", experts=0.5, adaptive=True)
    for model in (uniform, adaptive):
        counts = [b.kept for b in model.moefx_report.blocks]
        assert sum(counts) == 0.5 * sum(b.num_experts for b in model.moefx_report.blocks)
        assert all(c >= 2 for c in counts)  # top_k
        with torch.no_grad():
            inputs = example_inputs("olmoe")
            assert torch.isfinite(model(**inputs).logits).all()
            assert not torch.allclose(model(**inputs).logits, original(**inputs).logits)
    assert all(b.kept == 4 for b in uniform.moefx_report.blocks)


def test_error_selection_is_refused_for_methods_that_drop_experts():
    with pytest.raises(ConfigError, match="selection='error'.*method='reap'") as caught:
        moefx.CompressionConfig(method="reap", selection="error")
    assert "\n" not in str(caught.value)
