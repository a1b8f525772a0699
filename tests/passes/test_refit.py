import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moefx
from moefx.errors import ConfigError
from moefx.experts import FFN
from moefx.passes import observe
from moefx.passes.observe import CalibrationNeeds, collect_statistics
from moefx.passes.refit import (
    FLOAT32_MIN_RIDGE,
    least_squares_inputs,
    least_squares_output,
    least_squares_units,
    select_units,
)
from moefx.zoo import example_inputs, tiny_model

NEEDS = CalibrationNeeds(weighted_input_moments=True)


def _perturbed(ffn: FFN, gen: torch.Generator) -> FFN:
    """``ffn`` with a wrong output projection (and bias), as a poor merge would leave it."""
    noise = lambda t: None if t is None else t + torch.randn(t.shape, generator=gen)  # noqa: E731
    return FFN(ffn.in_weights, ffn.in_biases, noise(ffn.out_weight), noise(ffn.out_bias))


def _refit_statistics(observed, merged_bank, batches):
    experts = observed.get_submodule("observed_experts")
    experts.start_refit(list(range(experts.num_experts)), merged_bank)
    with torch.no_grad():
        for x in batches:
            observed(x)
    return collect_statistics(observed)


@pytest.mark.parametrize("family", ["mixtral", "switch", "hand_written"])  # gated; plain; plain with biases
def test_refit_of_single_member_groups_without_ridge_reproduces_each_expert(zoo, family, observed_block):
    block = zoo(family)[3][0]
    observed = observed_block(block, NEEDS)
    bank = observed.get_submodule("observed_experts").bank
    gen = torch.Generator().manual_seed(0)
    originals = [bank.ffn(e) for e in range(bank.num_experts)]
    perturbed = [_perturbed(f, gen) for f in originals]
    stats = _refit_statistics(observed, bank.with_experts(perturbed), [torch.randn(16, 128, block.hidden_size)])
    systems = [stats.refit_system(g) for g in range(len(perturbed))]
    refit = bank.with_experts(
        [least_squares_output(f, gram, cross, 0.0) for f, (gram, cross) in zip(perturbed, systems, strict=True)]
    )
    # only where the tokens determine the projection (a full-rank Gram matrix) is it recovered exactly
    determined = [e for e, (gram, _) in enumerate(systems) if torch.linalg.matrix_rank(gram) == len(gram)]
    assert determined
    x = torch.randn(40, block.hidden_size)  # new tokens: the projection itself is recovered, not just a fit
    with torch.no_grad():
        for e in determined:
            torch.testing.assert_close(refit.expert_forward(e, x), bank.expert_forward(e, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "hand_written"])  # gated; plain with biases
def test_unit_refit_pool_extends_the_output_refit_and_fits_its_members_no_worse(zoo, family, observed_block):
    block = zoo(family)[3][0]
    batches = [torch.randn(8, 32, block.hidden_size, generator=torch.Generator().manual_seed(1))]
    bank = observed_block(block, NEEDS).get_submodule("observed_experts").bank
    pairs = [[e, e + 1] for e in range(0, bank.num_experts, 2)]  # every group merges two experts
    merged_bank = bank.with_experts([FFN.weighted_sum([bank.ffn(e) for e in p], [0.5, 0.5]) for p in pairs])
    expert_to_group = [e // 2 for e in range(bank.num_experts)]
    plain, pooled = observed_block(block, NEEDS), observed_block(block, NEEDS)
    plain.get_submodule("observed_experts").start_refit(expert_to_group, merged_bank)
    pooled.get_submodule("observed_experts").start_refit(expert_to_group, merged_bank, None, pairs)
    for observed in (plain, pooled):
        with torch.no_grad():
            observed(batches[0])
    plain_stats, pooled_stats = collect_statistics(plain), collect_statistics(pooled)
    width = bank.intermediate_size
    for g, members in enumerate(pairs):
        gram, cross = plain_stats.refit_system(g)
        pool_gram, pool_cross = pooled_stats.refit_system(g)
        own = [*range(width), *range(len(pool_gram) - (len(gram) - width), len(pool_gram))]  # + bias column
        torch.testing.assert_close(pool_gram[own][:, own], gram)
        torch.testing.assert_close(pool_cross[:, own], cross)
        merged, originals = merged_bank.ffn(g), [bank.ffn(e) for e in members]
        pool = FFN.concatenated([merged, *originals])
        unit_refit = least_squares_units(merged, originals, [0.5, 0.5], pool_gram, pool_cross, 1e-2)
        output_refit = least_squares_output(merged, gram, cross, 1e-2)
        assert unit_refit.hidden_units == merged.hidden_units
        unit_error = _pool_fit_error(unit_refit, pool, pool_gram, pool_cross)
        assert unit_error <= _pool_fit_error(output_refit, pool, pool_gram, pool_cross) + 1e-4 * abs(unit_error)


def _pool_fit_error(ffn: FFN, pool: FFN, gram: torch.Tensor, cross: torch.Tensor) -> float:
    """``sum w |ffn(x) - y|^2 - sum w |y|^2`` from a pool's refit sums, for an ``ffn`` made of pool units."""
    chosen = torch.cdist(ffn.in_weights[0].float(), pool.in_weights[0].float()).argmin(dim=1).tolist()
    solution = ffn.out_weight.double()
    if ffn.out_bias is not None:
        chosen.append(len(gram) - 1)
        solution = torch.cat([solution, ffn.out_bias.double()[:, None]], dim=1)
    system, target = gram[chosen][:, chosen].double(), cross[:, chosen].double()
    return float(((solution @ system) * solution).sum() - 2 * (solution * target).sum())


@pytest.mark.parametrize("units", [False, True])
def test_a_refit_whose_statistics_exceed_the_available_memory_is_refused_in_one_line(
    zoo, observed_block, monkeypatch, units
):
    block = zoo("mixtral")[3][0]
    experts = observed_block(block, NEEDS).get_submodule("observed_experts")
    bank = experts.bank
    monkeypatch.setattr(observe, "available_memory_bytes", lambda: 1000)
    candidates = [[e] for e in range(bank.num_experts)] if units else None
    with pytest.raises(ConfigError, match="GB of statistics, more than the 0.0 GB of memory available") as error:
        experts.start_refit(list(range(bank.num_experts)), bank, None, candidates)
    assert "\n" not in str(error.value) and ("refit='in+out'" in str(error.value)) == units
    assert experts.merged is None and experts.refit_grams is None  # refused before the observer changed mode


def test_refit_statistics_do_not_grow_with_calibration_tokens(zoo, observed_block):
    block = zoo("mixtral")[3][0]
    sizes = []
    for tokens in (16, 1024):
        observed = observed_block(block, NEEDS)
        bank = observed.get_submodule("observed_experts").bank
        _refit_statistics(observed, bank, [torch.randn(2, tokens // 2, block.hidden_size)])
        state = [t for m in observed.modules() for t in (*m.buffers(recurse=False), *vars(m).values())]
        sizes.append(sum(t.numel() for t in state if isinstance(t, torch.Tensor)))
    assert sizes[0] == sizes[1]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), bias=st.booleans(), gated=st.booleans())
def test_input_least_squares_of_one_member_returns_its_projections(seed, bias, gated):
    gen = torch.Generator().manual_seed(seed)
    hidden, units = 6, 5
    rows = lambda: torch.randn(units, hidden, generator=gen, dtype=torch.float64)  # noqa: E731
    member = FFN(
        [rows() for _ in range(1 + gated)],
        [torch.randn(units, generator=gen, dtype=torch.float64) if bias else None for _ in range(1 + gated)],
        torch.randn(hidden, units, generator=gen, dtype=torch.float64),
        None,
    )
    x = torch.randn(50, hidden + bias, generator=gen, dtype=torch.float64)
    if bias:
        x[:, -1] = 1.0
    start = FFN([w + 1.0 for w in member.in_weights], member.in_biases, member.out_weight, None)
    fitted = least_squares_inputs(start, [member], [x.T @ x], ridge=0.0)
    for got, want in zip(fitted.in_weights, member.in_weights, strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip(fitted.in_biases, member.in_biases, strict=True):
        assert (got is None) == (want is None) and (got is None or torch.allclose(got, want))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), tokens=st.sampled_from([40, 400]), ridge=st.sampled_from([FLOAT32_MIN_RIDGE, 1e-2]))
def test_damped_float32_solve_is_as_good_as_float64(seed, tokens, ridge):
    # hidden activations with a few outlier dimensions, as real LLMs' have: an ill-conditioned Gram matrix
    gen = torch.Generator().manual_seed(seed)
    units, hidden = 256, 64
    h = torch.randn(tokens, units, generator=gen) * torch.where(torch.arange(units) < 4, 100.0, 1.0)
    target = torch.randn(hidden, units, generator=gen) * 0.02
    gram, cross = h.T @ h, (h @ target.T).T @ h
    prior = target + 0.01 * torch.randn(hidden, units, generator=gen)
    ffn = FFN([torch.zeros(units, hidden)], [None], prior, None)
    damping = ridge * float(gram.double().diagonal().mean())

    def objective(out_weight: torch.Tensor) -> float:  # sum ||D h - y||^2 + lambda ||D - prior||^2, y = target h
        error = (out_weight - target).double()
        return float((error @ gram.double() * error).sum() + damping * ((out_weight - prior).double() ** 2).sum())

    system = gram.double() + damping * torch.eye(units, dtype=torch.float64)
    exact = torch.linalg.solve(system, (cross.double() + damping * prior.double()).T).T
    solved = least_squares_output(ffn, gram, cross, ridge).out_weight
    assert solved.dtype == torch.float32
    best = objective(exact)
    assert objective(solved) - best <= 1e-6 * abs(best)


@pytest.mark.parametrize("refit", ["in+out", "units"])
def test_sequential_calibration_of_a_one_layer_model_equals_the_joint_one(refit):
    model = tiny_model("mixtral")
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    batches = [example_inputs("mixtral", batch=2, seq=8, seed=s) for s in range(3)]
    joint = moefx.compile(model, batches, experts=0.5, refit=refit)
    sequential = moefx.compile(model, batches, experts=0.5, sequential=True, refit=refit)
    assert joint.moefx_report.blocks[0].groups == sequential.moefx_report.blocks[0].groups
    for (name, a), (_, b) in zip(joint.state_dict().items(), sequential.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def _fit_error(ffn: FFN, x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> float:
    """``sum_t w_t |ffn(x_t) - y_t|^2``, the quantity every refit minimises (without its ridge)."""
    return float((weights[:, None] * (_outputs(ffn, x) - targets).square()).sum())


def _hidden(ffn: FFN, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x @ ffn.in_weights[0].T) * (x @ ffn.in_weights[1].T)


def _outputs(ffn: FFN, x: torch.Tensor) -> torch.Tensor:
    return _hidden(ffn, x) @ ffn.out_weight.T + (0.0 if ffn.out_bias is None else ffn.out_bias)


def _gated(units: int, hidden: int, gen: torch.Generator, bias: bool = False) -> FFN:
    rows = lambda: torch.randn(units, hidden, generator=gen)  # noqa: E731
    out_bias = torch.randn(hidden, generator=gen) if bias else None
    return FFN([rows(), rows()], [None, None], torch.randn(hidden, units, generator=gen) / units**0.5, out_bias)


def _unit_statistics(pool: FFN, x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
    h = _hidden(pool, x)
    if pool.out_bias is not None:
        h = torch.cat([h, torch.ones(len(h), 1)], dim=1)
    return (h * weights[:, None]).T @ h, targets.T @ (h * weights[:, None])


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), members=st.integers(1, 3), bias=st.booleans(), ridge=st.sampled_from([1e-3, 1e-2]))
def test_unit_refit_never_fits_worse_than_the_merged_units_refit(seed, members, bias, ridge):
    gen = torch.Generator().manual_seed(seed)
    hidden, units, tokens = 8, 6, 200
    experts = [_gated(units, hidden, gen, bias) for _ in range(members + 1)]
    merged = FFN.weighted_sum(experts, [1 / len(experts)] * len(experts))
    x = torch.randn(tokens, hidden, generator=gen)
    owner = torch.randint(len(experts), (tokens,), generator=gen)  # the member each token is routed to
    weights = torch.rand(tokens, generator=gen)
    targets = torch.cat([_outputs(experts[int(e)], x[t : t + 1]) for t, e in enumerate(owner)])
    pool = FFN.concatenated([merged, *experts])
    gram, cross = _unit_statistics(pool, x, targets, weights)
    own_gram, own_cross = _unit_statistics(merged, x, targets, weights)
    coefficients = [1 / len(experts)] * len(experts)
    chosen = least_squares_units(merged, experts, coefficients, gram, cross, ridge)
    refit = least_squares_output(merged, own_gram, own_cross, ridge)
    assert chosen.hidden_units == merged.hidden_units
    assert _fit_error(chosen, x, targets, weights) <= _fit_error(refit, x, targets, weights) * (1 + 1e-4) + 1e-6


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), count=st.integers(1, 40))
def test_unit_selection_finds_the_units_the_targets_are_made_of(seed, count):
    gen = torch.Generator().manual_seed(seed)
    features, outputs, tokens = 120, 16, 2000
    h = torch.randn(tokens, features, generator=gen)
    true = sorted(torch.randperm(features, generator=gen)[:count].tolist())
    y = h[:, true] @ torch.randn(outputs, count, generator=gen).T
    assert select_units(h.T @ h, y.T @ h, count, 1e-4) == true
