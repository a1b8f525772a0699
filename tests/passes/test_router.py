import copy
import warnings

import pytest
import torch
from torch.fx.passes.infra.pass_manager import PassManager

import moefx
from moefx.block import build_block, selection_nodes
from moefx.methods import merge_coefficients
from moefx.passes.detect import find_moe_blocks
from moefx.passes.merge import BlockPlan, MergeExperts
from moefx.passes.observe import BlockStats
from moefx.passes.router import PruneRouter, fit_pruned_router, router_prune_blocker
from moefx.routing import RoutingSpec, combine_by_group, group_logit_targets, select_experts, split_identity_experts
from moefx.zoo import example_inputs, tiny_model, tiny_transformers_model

GROUPS = [[0, 4, 5], [1, 2], [3, 6, 7]]


def _plan(groups, num_experts=8):
    table = [-1] * num_experts
    for g, members in enumerate(groups):
        for e in members:
            table[e] = g
    return BlockPlan("b", num_experts, groups, merge_coefficients(groups, torch.ones(num_experts), False), table,
                     True, "pruned")  # fmt: skip


def _empty_stats(num_experts=8):
    zeros = torch.zeros(num_experts)
    return BlockStats(1.0, 0.0, zeros, zeros, torch.eye(num_experts), zeros, zeros, torch.zeros(num_experts, 2),
                      zeros, zeros)  # fmt: skip


def test_prune_router_graph_structure(zoo):
    block = zoo("mixtral")[3][0]
    plan = _plan(GROUPS)
    graph = PassManager([MergeExperts(plan)])(build_block(block.module, block)).graph_module
    weight, bias = fit_pruned_router(graph.router.weight, None, plan, _empty_stats())
    pruned = PassManager([PruneRouter(plan, weight, bias)])(graph).graph_module
    assert pruned.router.weight.shape == (3, block.hidden_size) and pruned.router.bias is None
    assert not any(n.target is combine_by_group for n in pruned.graph.nodes)
    assert not hasattr(pruned, "expert_to_group")
    selection, weights, index = selection_nodes(pruned.graph)
    experts = next(n for n in pruned.graph.nodes if n.target == "experts")
    assert experts.args[1:] == (index, weights)
    assert selection.kwargs["top_k"] == 2
    # the averaged rows are the groups' (uniformly) averaged expert rows
    assert torch.allclose(pruned.router.weight[1], block.router_weight[[1, 2]].mean(0), atol=1e-6)
    assert pruned(torch.randn(2, 3, block.hidden_size)).isfinite().all()


def test_pruning_plan_keeps_the_kept_rows_and_their_correction_bias(zoo):
    block = zoo("deepseek_v3")[3][0]
    plan = _plan([[1], [4], [6]])
    graph = PassManager([MergeExperts(plan)])(build_block(block.module, block)).graph_module
    weight, bias = fit_pruned_router(graph.router.weight, None, plan, _empty_stats())
    assert torch.equal(weight, block.router_weight[[1, 4, 6]])
    original_bias = graph.correction_bias.clone()
    pruned = PruneRouter(plan, weight, bias)(graph).graph_module
    assert torch.equal(pruned.correction_bias, original_bias[[1, 4, 6]])


def test_a_pruned_router_keeps_the_identity_experts_columns_after_the_kept_experts():
    model = tiny_transformers_model("longcat_flash")
    (block, _) = find_moe_blocks(model, example_inputs("longcat_flash"))
    full = block.router_weight
    for groups in ([[3], [0], [1], [2], [4], [5], [6], [7]], [[1], [4], [6], [7]]):  # every expert, reordered; 4
        plan = _plan(groups)
        graph = PassManager([MergeExperts(plan)])(build_block(copy.deepcopy(block.module), block)).graph_module
        original = copy.deepcopy(graph)
        bias = graph.correction_bias.clone()
        weight, _ = fit_pruned_router(graph.router.weight, None, plan, _empty_stats())
        pruned = PruneRouter(plan, weight, None)(graph).graph_module
        rows = [g[0] for g in groups] + [8, 9]
        assert torch.equal(pruned.router.weight, full[rows]) and torch.equal(pruned.correction_bias, bias[rows])
        split = next(n for n in pruned.graph.nodes if n.target is split_identity_experts)
        assert split.args[3] == len(groups)
        if len(groups) == 8:  # the same experts and identities, in another order: the same function
            x = torch.randn(2, 7, block.hidden_size)
            with torch.no_grad():
                assert torch.allclose(pruned(x), original(x), atol=1e-5)
    assert router_prune_blocker(block.routing, merges=True, identity_experts=2)
    assert router_prune_blocker(block.routing, merges=False, identity_experts=2) is None


def test_capacity_grows_with_the_group_size(zoo):
    block = zoo("switch")[3][0]
    plan = _plan([[0, 1, 2, 3], [4, 5, 6, 7]])
    graph = PassManager([MergeExperts(plan)])(build_block(block.module, block)).graph_module
    weight, bias = fit_pruned_router(graph.router.weight, None, plan, _empty_stats())
    pruned = PruneRouter(plan, weight, bias)(graph).graph_module
    assert selection_nodes(pruned.graph)[0].kwargs["capacity"] == 64 * 4


def test_blockers():
    assert router_prune_blocker(RoutingSpec(2, "sigmoid", n_group=4, topk_group=2, group_topk=2), False)
    assert router_prune_blocker(RoutingSpec(2, "sigmoid"), merges=True)
    assert router_prune_blocker(RoutingSpec(2, "sigmoid"), merges=False) is None
    assert router_prune_blocker(RoutingSpec(2, "softmax"), merges=True) is None


def _group_mass_error(router_weight, router_bias, original, x, table, groups):
    """Mean absolute error between the pruned router's group probabilities and the original group mass."""
    probs = torch.softmax(original(x), dim=-1)
    mass = torch.stack([probs[:, table == g].sum(-1) for g in range(groups)], dim=-1)
    pruned = torch.softmax(torch.nn.functional.linear(x, router_weight, router_bias), dim=-1)
    return (pruned - mass).abs().mean().item()


def test_least_squares_fit_tracks_group_mass_better_than_averaged_rows():
    model = tiny_model("mixtral")
    calib = [example_inputs("mixtral", batch=4, seq=16, seed=s) for s in range(6)]
    observed = moefx.prepare(model, calib[0], router="pruned")
    moefx.calibrate(observed, calib)
    name = "model.layers.0.mlp"
    graph = observed.get_submodule(name)
    plan = _plan(GROUPS)
    graph.routing_observer.fit_groups(plan.expert_to_group)
    moefx.calibrate(observed, calib)
    stats = moefx.passes.observe.collect_statistics(graph)
    router = graph.router
    fitted = fit_pruned_router(router.weight, None, plan, stats)
    averaged = fit_pruned_router(router.weight, None, plan, _empty_stats())
    # held-out router inputs: hidden states of new text
    captured = {}
    hook = graph.router.register_forward_hook(lambda m, i, o: captured.update(x=i[0]))
    with torch.no_grad():
        observed(**example_inputs("mixtral", batch=4, seq=16, seed=123))
    hook.remove()
    x = captured["x"].reshape(-1, 32)
    table = torch.tensor(plan.expert_to_group)
    err_fit = _group_mass_error(*fitted, router, x, table, 3)
    err_avg = _group_mass_error(*averaged, router, x, table, 3)
    assert err_fit < err_avg


def test_group_logit_targets_are_centred_log_masses():
    logits = torch.randn(5, 8)
    table = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    targets = group_logit_targets(logits, table, 3)
    assert torch.allclose(targets.sum(-1), torch.zeros(5, dtype=torch.float64), atol=1e-9)
    mass = torch.stack([torch.softmax(logits, -1)[:, table == g].sum(-1) for g in range(3)], -1)
    assert torch.allclose(torch.softmax(targets, -1), mass.double(), atol=1e-6)


def test_pruned_router_fallback_warns_for_group_limited_routing():
    model = tiny_model("deepseek_v3")
    calib = [example_inputs("deepseek_v3", batch=4, seq=16, seed=s) for s in range(2)]
    with pytest.warns(moefx.MoefxWarning, match="keeping the exact router"):
        compressed = moefx.compile(model, calib, experts=0.5, router="pruned")
    block = compressed.get_submodule("model.layers.1.mlp")
    assert block.router.weight.shape[0] == 8 and hasattr(block, "expert_to_group")


def test_select_experts_with_fewer_groups_than_top_k():
    weights, index = select_experts(torch.randn(4, 1), top_k=1)
    assert index.eq(0).all() and torch.allclose(weights, torch.ones(4, 1))


def test_copying_a_block_does_not_share_the_pruned_router(zoo):
    block = zoo("olmoe")[3][0]
    plan = _plan(GROUPS)
    graph = PassManager([MergeExperts(plan)])(build_block(block.module, block)).graph_module
    weight, _ = fit_pruned_router(graph.router.weight, None, plan, _empty_stats())
    pruned = PruneRouter(plan, weight, None)(copy.deepcopy(graph)).graph_module
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned.router.weight.data.zero_()
    assert weight.abs().sum() > 0
