"""LowerToFusedMoE: one ``ort_moe`` node (ONNX Runtime's MoE operator, emulated in PyTorch) per block, which
computes what the canonical block computes, whatever its routing."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.passes.infra.pass_manager import PassManager

from moefx.block import build_block
from moefx.methods import merge_coefficients
from moefx.passes.detect import find_moe_blocks
from moefx.passes.lower import (
    LowerToFusedMoE,
    dequantize,
    fake_quantize,
    fused_moe_blocker,
    operator_computes_routing,
    quantization_block_size,
    quantize,
    quantize_activations,
    quantize_experts,
    routing_as_logits,
)
from moefx.passes.merge import BlockPlan, MergeExperts
from moefx.zoo import example_inputs, tiny_transformers_model

GROUPS = [[0, 4, 5], [1, 2], [3, 6, 7]]


def _merged_behind_the_exact_router(block):
    table = [next(g for g, members in enumerate(GROUPS) if e in members) for e in range(8)]
    coefficients = merge_coefficients(GROUPS, torch.ones(8), False)
    plan = BlockPlan("b", 8, GROUPS, coefficients, table, True, "exact")
    return PassManager([MergeExperts(plan)])(build_block(block.module, block)).graph_module


CASES = {  # family, merged: whether the operator's own softmax top-k routing is the block's
    ("mixtral", False): True,
    ("mixtral", True): False,  # merged experts behind the exact router: summed weights per group
    ("gpt_oss", False): True,  # softmax over the top-k logits, router bias, clamped SwiGLU with biases
    ("deepseek_v3", False): False,  # sigmoid, correction bias, group limit, scaling
    ("deepseek_v3", True): False,
    ("switch", True): False,  # top-1 with capacity, ReLU experts
}


@pytest.mark.parametrize("bits", [None, 4, pytest.param(8, marks=pytest.mark.slow)])
@pytest.mark.parametrize("family, merged", list(CASES), ids=[f"{f}-{'merged' if m else 'original'}" for f, m in CASES])
def test_lowered_block_computes_what_the_canonical_block_computes(zoo, family, merged, bits):
    """Float experts: the canonical block; quantized ones: the canonical block on the rounded weights."""
    block = zoo(family)[3][0]
    canonical = _merged_behind_the_exact_router(block) if merged else build_block(block.module, block)
    assert fused_moe_blocker(canonical) is None
    assert operator_computes_routing(canonical) is CASES[family, merged]
    lowered = PassManager([LowerToFusedMoE(bits)])(copy.deepcopy(canonical)).graph_module
    op = torch.ops.moefx.ort_moe.default if bits is None else torch.ops.moefx.ort_qmoe.default
    fused = [n for n in lowered.graph.nodes if n.target is op]
    assert len(fused) == 1 and not hasattr(lowered, "experts")
    assert lowered.fc1.shape[0] == (len(GROUPS) if merged else 8)
    assert lowered.fc1.dtype == (torch.float32 if bits is None else torch.uint8)
    rerouted = any(n.target is routing_as_logits for n in lowered.graph.nodes)
    assert rerouted is (bits is not None or not CASES[family, merged])  # QMoE always takes log weights
    if bits is not None:
        quantize_experts(canonical.experts, bits)
    for seed, (batch, seq) in enumerate([(2, 5), (1, 9), (3, 1)]):
        x = torch.randn(batch, seq, block.hidden_size, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            torch.testing.assert_close(lowered(x), canonical(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("family, merged", list(CASES), ids=[f"{f}-{'merged' if m else 'original'}" for f, m in CASES])
def test_width_splits_give_each_expert_that_many_parts_and_compute_the_same(zoo, family, merged, splits):
    """Each part is an operator expert with its share of the hidden units, which every token takes as a whole."""
    block = zoo(family)[3][0]
    canonical = _merged_behind_the_exact_router(block) if merged else build_block(block.module, block)
    whole = PassManager([LowerToFusedMoE()])(copy.deepcopy(canonical)).graph_module
    split = PassManager([LowerToFusedMoE(width_splits=splits)])(copy.deepcopy(canonical)).graph_module
    (one,), (parted,) = (
        [n for n in g.graph.nodes if n.target is torch.ops.moefx.ort_moe.default] for g in (whole, split)
    )
    experts, rows, _ = whole.fc1.shape
    width = whole.fc2.shape[-1]
    parts = splits if width % splits == 0 else 1
    assert split.fc1.shape == (parts * experts, rows // parts, whole.fc1.shape[-1])
    assert split.fc2.shape == (parts * experts, whole.fc2.shape[1], width // parts)
    assert parted.args[6] == parts * one.args[6]  # k
    if hasattr(whole, "fc2_bias"):  # added once: part 0 has the bias, the others none
        torch.testing.assert_close(split.fc2_bias[:experts], whole.fc2_bias, rtol=0, atol=0)
        assert not split.fc2_bias[experts:].any()
    for seed, (batch, seq) in enumerate([(2, 5), (1, 9), (3, 1)]):
        x = torch.randn(batch, seq, block.hidden_size, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            torch.testing.assert_close(split(x), canonical(x), atol=1e-5, rtol=1e-5)


def test_width_splits_are_for_float_experts():
    with pytest.raises(ValueError, match="width_splits"):
        LowerToFusedMoE(expert_bits=4, width_splits=2)
    with pytest.raises(ValueError, match="width_splits"):
        LowerToFusedMoE(width_splits=0)


@pytest.mark.parametrize("merged", [False, True])
def test_identity_experts_stay_outside_the_operator(merged):
    # LongCat-Flash: the operator runs the 8 experts on the weights left after the identity experts' split
    model = tiny_transformers_model("longcat_flash")
    with torch.no_grad():
        model.model.layers[0].mlp.router.e_score_correction_bias[8:] = 0.05
    (block, _) = find_moe_blocks(model, example_inputs("longcat_flash"))
    canonical = _merged_behind_the_exact_router(block) if merged else build_block(block.module, block)
    assert not operator_computes_routing(canonical)
    lowered = PassManager([LowerToFusedMoE()])(copy.deepcopy(canonical)).graph_module
    assert [n.target for n in lowered.graph.nodes].count(torch.ops.moefx.ort_moe.default) == 1
    x = torch.randn(2, 7, block.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = canonical(x), lowered(x)
    torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("merged", [False, True])
def test_per_slot_rows_lower_to_one_expert_per_row(merged):
    # Llama 4 weights the experts' inputs: the operator runs the k rows of each token with weight 1 each
    model = tiny_transformers_model("llama4_text")
    (block,) = find_moe_blocks(model, example_inputs("llama4_text"))
    canonical = _merged_behind_the_exact_router(block) if merged else build_block(block.module, block)
    assert fused_moe_blocker(canonical) is None and not operator_computes_routing(canonical)
    lowered = PassManager([LowerToFusedMoE()])(copy.deepcopy(canonical)).graph_module
    (fused,) = [n for n in lowered.graph.nodes if n.target is torch.ops.moefx.ort_moe.default]
    assert fused.args[6] == 1  # k
    x = torch.randn(2, 7, block.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = canonical(x), lowered(x)
    torch.testing.assert_close(got[0], expected[0], atol=1e-4 * expected[0].abs().max().item(), rtol=1e-4)


@settings(max_examples=50, deadline=None)
@given(
    tokens=st.integers(1, 6),
    k=st.integers(1, 4),
    num_experts=st.integers(4, 9),
    seed=st.integers(0, 2**16),
    dropped=st.booleans(),
)
def test_routing_as_logits_gives_the_weights_back_through_a_softmax(tokens, k, num_experts, seed, dropped):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    if dropped:  # a token routed nowhere (capacity) and a slot merged into an earlier one: index -1, weight 0
        index[0], weights[0] = -1, 0.0
        index[-1, -1], weights[-1, -1] = -1, 0.0
    logits, total = routing_as_logits(weights, index, num_experts, torch.empty(0))
    dense = torch.zeros(tokens, num_experts)
    for t in range(tokens):
        for slot in range(k):
            if index[t, slot] >= 0:
                dense[t, index[t, slot]] += weights[t, slot]
    torch.testing.assert_close(total[:, 0], dense.sum(-1))
    torch.testing.assert_close(torch.softmax(logits, dim=-1) * total, dense, atol=1e-6, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    rows=st.integers(1, 5),
    blocks=st.integers(1, 3),
    ragged=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantization_rounds_each_weight_to_its_nearest_code_and_is_idempotent(bits, rows, blocks, ragged, seed):
    columns = 32 * blocks + (2 if ragged else 0)  # ragged: not a multiple of 32, so one scale per row
    weight = torch.randn(2, rows, columns, generator=torch.Generator().manual_seed(seed))
    block_size = quantization_block_size(bits, [columns])
    assert block_size == (32 if bits == 4 and not ragged else 0)
    codes, scales = quantize(weight, bits, block_size)
    assert codes.dtype == torch.uint8 and codes.shape == (2, rows, columns * bits // 8)
    assert scales.shape == ((2, rows) if block_size == 0 else (2, rows, blocks))
    rounded = dequantize(codes, scales, bits, block_size)
    per_column = scales[..., None] if block_size == 0 else scales.repeat_interleave(32, dim=-1)
    assert ((rounded - weight).abs() <= per_column / 2 * (1 + 1e-5)).all()  # the nearest code
    assert ((rounded / per_column).round() - rounded / per_column).abs().max() < 1e-4  # on the code grid
    torch.testing.assert_close(fake_quantize(rounded, bits, block_size), rounded, atol=1e-6, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), blocks=st.integers(1, 3), zero_block=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_activations_round_each_block_to_its_nearest_of_255_codes_and_keep_its_largest(
    rows, blocks, zero_block, seed
):
    x = torch.randn(rows, 32 * blocks, generator=torch.Generator().manual_seed(seed)) * 3
    if zero_block:
        x[0, :32] = 0.0
    rounded = quantize_activations(x, 32)
    largest = x.reshape(rows, blocks, 32).abs().amax(dim=-1, keepdim=True)
    step = (largest / 127).expand(rows, blocks, 32).reshape(x.shape)
    assert ((rounded - x).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()  # the nearest code
    codes = torch.where(step > 0, rounded / step, torch.zeros_like(x))
    assert (codes.abs() <= 127 + 1e-4).all() and ((codes.round() - codes).abs() < 1e-3).all()  # on the grid
    at_largest = x.abs() == largest.expand(rows, blocks, 32).reshape(x.shape)
    torch.testing.assert_close(rounded[at_largest], x[at_largest])  # each block's largest value is exact
    if zero_block:
        assert (rounded[0, :32] == 0.0).all()


@pytest.mark.parametrize("bits", [None, 8])
def test_int8_activations_are_for_4_bit_experts_only(bits):
    with pytest.raises(ValueError, match=f"int8 activations need 4-bit experts, not expert_bits={bits}"):
        LowerToFusedMoE(bits, int8_activations=True)


def test_experts_with_their_own_output_norms_stay_portable():
    model = tiny_transformers_model("ergo")
    block = find_moe_blocks(model, example_inputs("ergo"))[0]
    canonical = build_block(block.module, block)
    assert "their own RMSNorm" in fused_moe_blocker(canonical)
    assert not PassManager([LowerToFusedMoE()])(canonical).modified


def test_routing_as_logits_gives_the_experts_a_token_does_not_use_exactly_zero_weight():
    # every token routed to expert 0 alone (a merged group): the operator's other k-1 picks get weight 0.0,
    # which ONNX Runtime's CPU kernel skips instead of running those experts
    tokens, k, num_experts = 5, 3, 7
    index = torch.zeros(tokens, k, dtype=torch.long)
    weights = torch.tensor([1e-3, 0.3, 0.2]).expand(tokens, k)
    logits, total = routing_as_logits(weights, index, num_experts, torch.empty(0))
    shares = torch.softmax(logits, dim=-1)
    assert (logits.topk(k, dim=-1).indices[:, 0] == 0).all()
    assert (shares[:, 1:] == 0.0).all()  # underflow, not arithmetic: exp of about -1e4 is 0 in float32
    torch.testing.assert_close(shares[:, 0] * total[:, 0], torch.full((tokens,), 0.501))
