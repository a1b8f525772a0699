import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moefx
from moefx.experts import FFN
from moefx.passes.observe import CalibrationNeeds, collect_statistics
from moefx.passes.refit import FLOAT32_MIN_RIDGE, least_squares_inputs, least_squares_output
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
    refit = bank.with_experts(
        [least_squares_output(f, stats.refit_grams[g], stats.refit_cross[g], 0.0) for g, f in enumerate(perturbed)]
    )
    # only where the tokens determine the projection (a full-rank Gram matrix) is it recovered exactly
    determined = [e for e, gram in enumerate(stats.refit_grams) if torch.linalg.matrix_rank(gram) == len(gram)]
    assert determined
    x = torch.randn(40, block.hidden_size)  # new tokens: the projection itself is recovered, not just a fit
    with torch.no_grad():
        for e in determined:
            torch.testing.assert_close(refit.expert_forward(e, x), bank.expert_forward(e, x), atol=1e-4, rtol=1e-4)


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


def test_sequential_calibration_of_a_one_layer_model_equals_the_joint_one():
    model = tiny_model("mixtral")
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    batches = [example_inputs("mixtral", batch=2, seq=8, seed=s) for s in range(3)]
    joint = moefx.compile(model, batches, experts=0.5)
    sequential = moefx.compile(model, batches, experts=0.5, sequential=True)
    assert joint.moefx_report.blocks[0].groups == sequential.moefx_report.blocks[0].groups
    for (name, a), (_, b) in zip(joint.state_dict().items(), sequential.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
