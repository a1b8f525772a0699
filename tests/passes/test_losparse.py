import copy

import pytest
import torch
from torch.fx.passes.infra.pass_manager import PassManager

from moefx.block import build_block
from moefx.losparse import LoSparseExperts, LoSparseLinear
from moefx.passes.losparse import CompressExperts, plan_losparse


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
