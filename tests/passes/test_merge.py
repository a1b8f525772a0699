import copy
import operator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.passes.infra.pass_manager import PassManager

from moefx.block import build_block, selection_nodes
from moefx.errors import ConfigError
from moefx.experts import FFN, per_slot_rows
from moefx.methods import merge_coefficients
from moefx.passes.detect import find_moe_blocks
from moefx.passes.merge import (
    BlockPlan,
    MergeExperts,
    align_ffn,
    align_group,
    allocate_experts,
)
from moefx.routing import combine_by_group, select_experts
from moefx.zoo import example_inputs, tiny_transformers_model


def _random_ffn(gen: torch.Generator, hidden: int, units: int, gated: bool, bias: bool, normed: bool = False) -> FFN:
    n_in = 2 if gated else 1
    return FFN(
        [torch.randn(units, hidden, generator=gen) for _ in range(n_in)],
        [torch.randn(units, generator=gen) if bias else None for _ in range(n_in)],
        torch.randn(hidden, units, generator=gen),
        torch.randn(hidden, generator=gen) if bias else None,
        torch.randn(hidden, generator=gen) if normed else None,
        1e-6 if normed else None,
    )


def _ffn_forward(f: FFN, x: torch.Tensor) -> torch.Tensor:
    hs = [torch.nn.functional.linear(x, w, b) for w, b in zip(f.in_weights, f.in_biases, strict=True)]
    h = torch.nn.functional.silu(hs[0]) * hs[1] if len(hs) == 2 else torch.nn.functional.gelu(hs[0])
    y = torch.nn.functional.linear(h, f.out_weight, f.out_bias)
    return y if f.out_norm is None else torch.nn.functional.rms_norm(y, (y.shape[-1],), f.out_norm, f.norm_eps)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000), units=st.integers(2, 24), gated=st.booleans(), bias=st.booleans(), normed=st.booleans()
)
def test_alignment_recovers_a_permutation_and_preserves_function(seed, units, gated, bias, normed):
    gen = torch.Generator().manual_seed(seed)
    reference = _random_ffn(gen, 8, units, gated, bias, normed)
    perm = torch.randperm(units, generator=gen)
    shuffled = reference.units(perm)
    x = torch.randn(5, 8, generator=gen)
    assert torch.allclose(_ffn_forward(shuffled, x), _ffn_forward(reference, x), atol=1e-5)
    aligned = shuffled.units(align_ffn(reference, shuffled))
    for a, b in zip(aligned.tensors(), reference.tensors(), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000), units=st.integers(2, 16), gated=st.booleans(), bias=st.booleans(), normed=st.booleans()
)
def test_alignment_of_unrelated_experts_keeps_their_function(seed, units, gated, bias, normed):
    gen = torch.Generator().manual_seed(seed)
    a, b = (_random_ffn(gen, 6, units, gated, bias, normed) for _ in range(2))
    x = torch.randn(4, 6, generator=gen)
    aligned = b.units(align_ffn(a, b))
    assert torch.allclose(_ffn_forward(aligned, x), _ffn_forward(b, x), atol=1e-5)


def test_merging_a_permuted_copy_returns_the_original():
    gen = torch.Generator().manual_seed(0)
    ffn = _random_ffn(gen, 8, 12, gated=True, bias=True, normed=True)
    copy_ = ffn.units(torch.randperm(12, generator=gen))
    merged = FFN.weighted_sum(align_group([ffn, copy_], align=True), [0.3, 0.7])
    assert all(torch.allclose(m, o, atol=1e-6) for m, o in zip(merged.tensors(), ffn.tensors(), strict=True))
    unaligned = FFN.weighted_sum(align_group([ffn, copy_], align=False), [0.3, 0.7])
    assert not torch.allclose(unaligned.out_weight, ffn.out_weight)


@settings(max_examples=60, deadline=None)
@given(
    layers=st.lists(st.integers(4, 16), min_size=1, max_size=5),
    top_k=st.integers(1, 3),
    fraction=st.floats(0.3, 1.0),
    seed=st.integers(0, 1000),
)
def test_adaptive_allocation_keeps_the_requested_average(layers, top_k, fraction, seed):
    rng = np.random.default_rng(seed)
    scores = [torch.tensor(rng.random(n)) for n in layers]
    budget = round(fraction * sum(layers))
    if budget < top_k * len(layers):
        with pytest.raises(ConfigError, match="fewer than their top_k"):
            allocate_experts(scores, fraction, True, [top_k] * len(layers))
        return
    kept = allocate_experts(scores, fraction, True, [top_k] * len(layers))
    assert sum(len(k) for k in kept) == budget
    for k, s, n in zip(kept, scores, layers, strict=True):
        assert top_k <= len(k) <= n and len(set(k)) == len(k)
        assert sorted(k) == sorted(torch.argsort(s, descending=True)[: len(k)].tolist())  # the layer's best


def test_adaptive_allocation_follows_normalised_scores():
    # layer 0's experts are used evenly, layer 1 has two dominant experts: layer 0 should keep more
    scores = [torch.tensor([1.0, 0.95, 0.9, 0.85]), torch.tensor([1.0, 0.9, 0.05, 0.01])]
    kept = allocate_experts(scores, 0.5, True, [1, 1])
    assert [len(k) for k in kept] == [3, 1]
    assert [len(k) for k in allocate_experts(scores, 0.5, False, [1, 1])] == [2, 2]


def test_uniform_allocation_below_top_k_is_rejected():
    with pytest.raises(ConfigError, match="fewer than its top_k=2"):
        allocate_experts([torch.rand(8)], 0.125, False, [2])


def test_keeping_everything_is_the_identity_allocation():
    scores = [torch.rand(8), torch.rand(6)]
    assert [sorted(k) for k in allocate_experts(scores, 1.0, True, [2, 2])] == [list(range(8)), list(range(6))]


def _plan(groups, num_experts=8):
    table = [-1] * num_experts
    for g, members in enumerate(groups):
        for e in members:
            table[e] = g
    return BlockPlan("block", num_experts, groups, merge_coefficients(groups, torch.ones(num_experts), False),
                     table, True, "exact")  # fmt: skip


@pytest.mark.parametrize("family", ["mixtral", "switch", "gpt_oss", "hand_written"])
def test_merging_a_neuron_permuted_copy_changes_no_output(zoo, family):
    block = copy.deepcopy(zoo(family)[3][0])
    block.module = copy.deepcopy(block.module)
    graph = build_block(block.module, block)
    bank = graph.experts
    gen = torch.Generator().manual_seed(3)
    perm = torch.randperm(block.intermediate_size, generator=gen)
    ffns = [bank.ffn(e) for e in range(8)]
    ffns[1] = ffns[0].units(perm)  # expert 1 becomes a neuron-permuted copy of expert 0
    graph.experts = bank.with_experts(ffns, [0, 0, 2, 3, 4, 5, 6, 7])
    x = torch.randn(2, 9, block.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = graph(x)
        merged = PassManager([MergeExperts(_plan([[0, 1], [2], [3], [4], [5], [6], [7]]))])(graph).graph_module
        after = merged(x)
    assert merged.experts.num_experts == 7
    before, after = (before[0], after[0]) if isinstance(before, tuple) else (before, after)
    assert torch.allclose(after, before, atol=1e-5)


def test_merging_per_slot_rows_keeps_each_slot_apart():
    # Llama 4's weights scale the experts' inputs: a token whose two slots fall in one group must run the
    # group twice, on w0 * x and w1 * x, not once with w0 + w1; expert 1 becomes a copy of expert 0
    model = tiny_transformers_model("llama4_text")
    (block,) = find_moe_blocks(model, example_inputs("llama4_text"))
    graph = build_block(copy.deepcopy(block.module), block)
    ffns = [graph.experts.ffn(e) for e in range(8)]
    graph.experts = graph.experts.with_experts([ffns[0], *ffns[:1], *ffns[2:]], [0, 0, 2, 3, 4, 5, 6, 7])
    with torch.no_grad():
        graph.router.weight[1] = graph.router.weight[0] + 0.1  # experts 0 and 1 are both chosen, often
    x = torch.randn(2, 9, block.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = graph(x)[0]
        merged = PassManager([MergeExperts(_plan([[0, 1], [2], [3], [4], [5], [6], [7]]))])(graph).graph_module
        after = merged(x)[0]
        _, index = select_experts(graph.router(x.reshape(-1, block.hidden_size)), top_k=2, scoring="sigmoid")
    assert ((index == 0).any(-1) & (index == 1).any(-1)).any()  # the case that matters occurs
    combine = next(n for n in merged.graph.nodes if n.target is combine_by_group)
    assert combine.args[1].args[0].target is per_slot_rows  # grouping the rows' indices, not the selection's
    assert torch.allclose(after, before, atol=1e-5)


def test_merge_experts_graph_structure(zoo):
    block = zoo("qwen3_moe")[3][0]
    graph = build_block(block.module, block)
    params_before = sum(p.numel() for p in graph.experts.parameters())
    merged = PassManager([MergeExperts(_plan([[0, 4, 5], [1, 2], [3, 6, 7]]))])(graph).graph_module
    assert merged.experts.num_experts == 3
    assert sum(p.numel() for p in merged.experts.parameters()) == params_before * 3 // 8
    combine = next(n for n in merged.graph.nodes if n.target is combine_by_group)
    _, weights, index = selection_nodes(merged.graph)
    assert combine.args[:2] == (weights, index) and combine.args[2].op == "get_attr"
    experts = next(n for n in merged.graph.nodes if n.target == "experts")
    assert [a.target for a in experts.args[1:]] == [operator.getitem, operator.getitem]
    assert all(a.args[0] is combine for a in experts.args[1:])
    assert merged.expert_to_group.tolist() == [0, 1, 1, 2, 0, 0, 2, 2]
    assert MergeExperts(BlockPlan.identity("b", 8))(build_block(block.module, block)).modified is False


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), groups=st.integers(1, 6))
def test_combine_by_group_sums_each_group_once(seed, k, groups):
    gen = torch.Generator().manual_seed(seed)
    num_experts = 8
    table = torch.randint(0, groups, (num_experts,), generator=gen)
    table[torch.randperm(num_experts, generator=gen)[:1]] = -1  # one dropped expert
    logits = torch.randn(10, num_experts, generator=gen)
    weights, index = torch.softmax(logits, -1).topk(k, dim=-1)
    index[0, 0] = -1  # a token slot routed nowhere
    group_weights, group_index = combine_by_group(weights, index, table)
    for t in range(10):
        expected = {}
        for w, e in zip(weights[t].tolist(), index[t].tolist(), strict=True):
            g = int(table[e]) if e >= 0 else -1
            if g >= 0:
                expected[g] = expected.get(g, 0.0) + w
        got = {int(g): float(w) for g, w in zip(group_index[t], group_weights[t], strict=True) if g >= 0}
        assert got.keys() == expected.keys() and all(abs(got[g] - expected[g]) < 1e-6 for g in got)
        assert float(group_weights[t][group_index[t] < 0].abs().sum()) == 0.0
