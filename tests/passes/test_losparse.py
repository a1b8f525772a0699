import copy

import pytest
import torch
from torch.fx.passes.infra.pass_manager import PassManager

from moefx.block import build_block
from moefx.losparse import LoSparseExperts, LoSparseLinear
from moefx.passes.losparse import (
    CompressExperts,
    decompose_experts,
    losparse_linears,
    residual_keep,
    sensitivity_scores,
)


def plan_losparse(banks, moments, rank, sparse_keep, activation_aware, axis):
    """Decompose, then keep the residual slices the activation scores choose."""
    experts, scores = decompose_experts(banks, moments, rank, activation_aware=activation_aware, axis=axis)
    linears = losparse_linears(experts)
    for linear, kept in zip(linears, residual_keep(linears, scores, sparse_keep), strict=True):
        linear.keep_slices(kept)
    return experts


def _signature(graph_module):
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph_module.graph.nodes]


def test_compress_experts_replaces_only_the_expert_linears(zoo):
    block = zoo("qwen2_moe")[3][0]
    graph = build_block(copy.deepcopy(block.module), block)
    before = _signature(graph)
    others = {n: p.clone() for n, p in graph.named_parameters() if not n.startswith("experts.")}
    experts = plan_losparse({"b": graph.experts}, {}, rank=4, sparse_keep=0.2, activation_aware=False, axis="columns")
    result = PassManager([CompressExperts(experts["b"])])(graph)
    compressed = result.graph_module
    assert result.modified and _signature(compressed) == before
    assert isinstance(compressed.experts, LoSparseExperts) and compressed.experts.num_experts == 8
    for expert in compressed.experts.experts:
        assert len(expert.in_linears) == 2 and all(isinstance(m, LoSparseLinear) for m in expert.in_linears)
        assert isinstance(expert.out_linear, LoSparseLinear) and expert.out_linear.rank == 4
    after = {n: p for n, p in compressed.named_parameters() if not n.startswith("experts.")}
    assert after.keys() == others.keys() and all(torch.equal(after[n], others[n]) for n in others)


def test_full_rank_compression_computes_the_same_block(zoo):
    for family in ("mixtral", "gpt_oss", "switch", "hand_written"):
        block = zoo(family)[3][0]
        graph = build_block(copy.deepcopy(block.module), block)
        x = torch.randn(2, 6, block.hidden_size)
        with torch.no_grad():
            reference = graph(x)
            experts = plan_losparse({"b": graph.experts}, {}, 1.0, 1.0, activation_aware=False, axis="rows")
            compressed = CompressExperts(experts["b"])(graph).graph_module
            got = compressed(x)
        reference, got = (reference[0], got[0]) if isinstance(reference, tuple) else (reference, got)
        assert torch.allclose(got, reference, atol=1e-5), family


def test_one_global_threshold_adapts_per_matrix_keep_ratios(zoo):
    banks = {b.name: build_block(copy.deepcopy(b.module), b).experts for b in zoo("mixtral")[3]}
    experts = plan_losparse(banks, {}, rank=8, sparse_keep=0.25, activation_aware=False, axis="columns")
    linears = [m for per_block in experts.values() for e in per_block for m in (*e.in_linears, e.out_linear)]
    kept = sum(m.index.numel() for m in linears)
    total = sum(m.in_features for m in linears)
    assert kept == round(0.25 * total)
    ratios = {round(m.index.numel() / m.in_features, 3) for m in linears}
    assert len(ratios) > 1  # not the same share everywhere


def test_activation_statistics_steer_the_kept_columns(zoo):
    block = zoo("olmoe")[3][0]
    bank = build_block(copy.deepcopy(block.module), block).experts
    hidden, inter = block.hidden_size, block.intermediate_size
    loud = torch.ones(hidden, dtype=torch.float64)
    loud[:4] = 1e4  # the first four input features carry almost all the energy
    moments = {"b": [(torch.diag(loud), torch.eye(inter, dtype=torch.float64))] * bank.num_experts}
    experts = plan_losparse({"b": bank}, moments, rank=2, sparse_keep=0.1, activation_aware=False, axis="columns")
    gate = experts["b"][0].in_linears[0]
    assert set(range(4)) <= set(gate.index.tolist())  # the residual columns that matter most are kept
    aware = plan_losparse({"b": bank}, moments, rank=2, sparse_keep=0.0, activation_aware=True, axis="columns")
    plain = plan_losparse({"b": bank}, moments, rank=2, sparse_keep=0.0, activation_aware=False, axis="columns")
    weight = bank.ffn(0).in_weights[0].double()
    loud_error = lambda m: (m.dense_weight().double() - weight)[:, :4].norm()  # noqa: E731
    assert loud_error(aware["b"][0].in_linears[0]) < loud_error(plain["b"][0].in_linears[0])


@pytest.mark.parametrize("axis", ["columns", "rows"])
def test_no_matrix_stores_more_than_its_dense_form(zoo, axis):
    banks = {b.name: build_block(copy.deepcopy(b.module), b).experts for b in zoo("mixtral")[3]}
    experts = plan_losparse(banks, {}, rank=8, sparse_keep=0.9, activation_aware=False, axis=axis)
    linears = [m for per_block in experts.values() for e in per_block for m in (*e.in_linears, e.out_linear)]
    assert all(m.num_parameters() <= m.out_features * m.in_features for m in linears)
    assert any(m.index.numel() > 0 for m in linears)  # the cap limits the sparse part, it does not drop it


def test_sensitivity_scores_sum_s_times_grad_per_column_over_batches():
    # y = S x with no low-rank part and loss sum(y): dL/dS_ij = sum_tokens x_j, so the score of column j
    # is sum_batches sum_i |S_ij * sum_tokens x_j|
    s = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    linear = LoSparseLinear(torch.zeros(2, 0), torch.zeros(0, 3), s, torch.arange(3))
    model = torch.nn.Sequential(linear)
    batches = [torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([[-3.0, 1.0, 1.0], [1.0, 0.0, 1.0]])]
    scores = sensitivity_scores(model, [linear], (model(x).sum() for x in batches))
    expected = sum(s.abs().sum(dim=0) * x.sum(dim=0).abs() for x in batches)
    assert torch.allclose(scores[0].float(), expected)
    assert linear.sparse.grad is None and model.training


def test_sensitivity_scores_leave_the_model_as_it_was(zoo):
    block = zoo("mixtral")[3][0]
    graph = build_block(copy.deepcopy(block.module), block)
    experts, _ = decompose_experts({"b": graph.experts}, {}, 4, activation_aware=False, axis="columns")
    compressed = CompressExperts(experts["b"])(graph).graph_module
    compressed.router.weight.requires_grad_(False)
    linears = losparse_linears(experts)
    x = torch.randn(2, 5, block.hidden_size)
    scores = sensitivity_scores(compressed, linears, (compressed(x)[0].square().sum() for _ in range(2)))
    assert [s.shape for s in scores] == [(m.in_features,) for m in linears]
    assert any(s.sum() > 0 for s in scores)
    assert not compressed.router.weight.requires_grad and all(m.sparse.requires_grad for m in linears)
    assert all(p.grad is None for p in compressed.parameters())
