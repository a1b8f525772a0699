import copy
import itertools
import operator

import pytest
import torch
from torch.fx.passes.infra.pass_manager import PassManager

from moefx.block import build_block
from moefx.passes.detect import find_moe_blocks
from moefx.passes.observe import (
    CalibrationNeeds,
    RemoveObservers,
    collect_statistics,
    install_mask_hook,
)
from moefx.routing import select_experts
from moefx.zoo import example_inputs, tiny_transformers_model


def test_insert_observers_graph_structure_and_numerics(zoo, observed_block):
    block = zoo("qwen2_moe")[3][0]
    canonical = build_block(block.module, block)
    observed = observed_block(block)
    nodes = {n.target: n for n in observed.graph.nodes if n.op == "call_module"}
    assert "routing_observer" in nodes and "observed_experts" in nodes and "experts" not in nodes
    observer = nodes["routing_observer"]
    weights, index, logits, router_input = observer.args
    assert weights.target is operator.getitem and weights.args[0].target is select_experts
    assert logits is weights.args[0].args[0] and router_input is logits.args[0]
    assert nodes["observed_experts"].args[2] is observer  # the experts read the weights through the observer
    x = torch.randn(2, 9, block.hidden_size)
    with torch.no_grad():
        assert torch.equal(observed(x), canonical(x))


def test_remove_observers_restores_the_canonical_graph(zoo, observed_block):
    block = zoo("mixtral")[3][0]
    canonical = build_block(block.module, block)
    observed = observed_block(block, CalibrationNeeds(all_token_outputs=True, expert_input_moments=True))
    restored = PassManager([RemoveObservers()])(observed).graph_module
    signature = lambda g: [(n.op, str(n.target)) for n in g.graph.nodes]  # noqa: E731
    assert signature(restored) == signature(canonical)
    assert not hasattr(restored, "routing_observer") and not hasattr(restored, "observed_experts")
    x = torch.randn(2, 5, block.hidden_size)
    with torch.no_grad():
        assert torch.equal(restored(x), canonical(x))


def test_routing_statistics_match_direct_computation(zoo, observed_block):
    block = zoo("mixtral")[3][0]
    observed = observed_block(block)
    x = torch.randn(3, 7, block.hidden_size)
    with torch.no_grad():
        observed(x)
        logits = observed.router(x.reshape(-1, block.hidden_size)).double()
        _, index = select_experts(logits, top_k=2)
    stats = collect_statistics(observed)
    assert stats.tokens == 21 and stats.dropped == 0
    assert torch.equal(stats.counts, torch.bincount(index.flatten(), minlength=8).double())
    assert torch.allclose(stats.logit_gram, logits.T @ logits)
    assert torch.equal(stats.routed, stats.counts)


def test_a_block_routed_outside_itself_is_observed_on_the_routing_it_is_given(observed_block):
    model = tiny_transformers_model("gemma4_text")
    block = find_moe_blocks(model, example_inputs("gemma4_text"))[0]
    observed = observed_block(block, CalibrationNeeds(router_input_moments=True, weighted_input_moments=True))
    observer = next(n for n in observed.graph.nodes if n.target == "routing_observer")
    assert len(observer.args) == 2  # weights and indices: no logits, no router input
    x, given = torch.randn(11, block.hidden_size), block.given_routing.random_inputs(11, 8, 2, seed=3)
    given["top_k_weights"][0] = 0.0  # a token sent to skip slots (Zaya's skip expert: expert 0, weight 0)
    with torch.no_grad():
        assert torch.equal(observed(x, **given), build_block(block.module, block)(x, **given))
    stats = collect_statistics(observed)
    assert stats.logit_gram is None and stats.router_input_gram is None and (stats.tokens, stats.dropped) == (11, 1)
    routed, weights = given["top_k_index"][1:].flatten(), given["top_k_weights"][1:].flatten().double()
    assert torch.equal(stats.counts, torch.bincount(routed, minlength=8).double())
    # the experts see the block's tokens: each expert's routing-weighted input moment has trace sum w |x|^2
    squares = (x[1:].double().square().sum(dim=-1)[:, None] * torch.ones(10, 2, dtype=torch.float64)).flatten()
    expected = torch.zeros(8, dtype=torch.float64).index_add_(0, routed, weights * squares)
    traces = stats.weighted_input_grams.diagonal(dim1=1, dim2=2).sum(dim=-1).double()
    torch.testing.assert_close(traces, expected, rtol=1e-4, atol=1e-4)


def test_padding_tokens_are_excluded(zoo, observed_block):
    model, inputs, _, blocks = zoo("mixtral")
    model = copy.deepcopy(model)
    for b in blocks:
        model.set_submodule(b.name, observed_block(b))
    hooks = install_mask_hook(model)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        model(input_ids=inputs["input_ids"], attention_mask=mask)
    for h in hooks:
        h.remove()
    stats = collect_statistics(model.get_submodule(blocks[0].name))
    assert stats.tokens == 11
    assert stats.counts.sum() == 22 and stats.routed.sum() == 22


def test_padding_rows_of_per_slot_experts_are_excluded(observed_block):
    # Llama 4's experts run on one row per (token, slot): a padding token's k rows are all left out
    model = tiny_transformers_model("llama4_text")
    inputs = example_inputs("llama4_text")
    (block,) = find_moe_blocks(model, inputs)
    model.set_submodule(block.name, observed_block(block, CalibrationNeeds(substitution_errors=True)))
    hooks = install_mask_hook(model)
    mask = torch.ones_like(inputs["attention_mask"])
    mask[0, :5] = 0
    with torch.no_grad():
        model(input_ids=inputs["input_ids"], attention_mask=mask)
    for h in hooks:
        h.remove()
    stats = collect_statistics(model.get_submodule(block.name))
    valid = int(mask.sum())
    assert stats.tokens == valid and stats.counts.sum() == 2 * valid and stats.routed.sum() == 2 * valid


def test_routing_statistics_leave_out_identity_experts(observed_block):
    # LongCat-Flash: the router's 2 columns after its 8 experts' choose identity experts
    model = tiny_transformers_model("longcat_flash")
    with torch.no_grad():
        model.model.layers[0].mlp.router.e_score_correction_bias[8:] = 0.05
    (block, _) = find_moe_blocks(model, example_inputs("longcat_flash"))
    observed = observed_block(block)
    x = torch.randn(4, 6, block.hidden_size)
    with torch.no_grad():
        observed(x)
        logits = observed.router(x.reshape(24, -1)).double()
        _, index = select_experts(logits, observed.correction_bias, **block.routing.as_kwargs())
    stats = collect_statistics(observed)
    real = index < 8
    assert (~real).any() and stats.counts.shape == (8,) and stats.logit_gram.shape == (8, 8)
    assert torch.equal(stats.counts, torch.bincount(index[real], minlength=8).double())
    assert stats.dropped == (~real).all(dim=-1).sum()  # tokens that chose identity experts only
    assert torch.allclose(stats.logit_gram, logits[:, :8].T @ logits[:, :8])


def test_dropped_tokens_count_as_routed_nowhere(zoo, observed_block):
    block = zoo("switch")[3][0]
    observed = observed_block(block)
    graph_selection = next(n for n in observed.graph.nodes if n.target is select_experts)
    graph_selection.kwargs = {**graph_selection.kwargs, "capacity": 1}
    observed.recompile()
    x = torch.randn(1, 12, block.hidden_size)
    with torch.no_grad():
        observed(x)
        _, index = select_experts(observed.router(x), top_k=1, capacity=1)
    stats = collect_statistics(observed)
    dropped = int((index == -1).sum())
    assert dropped > 0
    assert stats.dropped == dropped and stats.counts.sum() == 12 - dropped
    assert stats.counts[0] == (index == 0).sum()  # a dropped token is not counted for expert 0


def test_substitution_errors_match_every_expert_run_on_each_routed_token(zoo, observed_block):
    block = zoo("mixtral")[3][0]
    observed = observed_block(block, CalibrationNeeds(substitution_errors=True))
    x = torch.randn(3, 7, block.hidden_size)
    with torch.no_grad():
        observed(x)
        tokens = x.reshape(-1, block.hidden_size)
        weights, index = select_experts(observed.router(tokens), **block.routing.as_kwargs())
        bank = observed.get_submodule("observed_experts").bank
        outputs = torch.stack([bank.expert_forward(e, tokens).double() for e in range(8)], dim=1)  # [T, E, H]
    expected = torch.zeros(8, 8, dtype=torch.float64)
    for t, slot in itertools.product(range(tokens.shape[0]), range(2)):
        e = int(index[t, slot])
        expected[e] += float(weights[t, slot]) ** 2 * (outputs[t] - outputs[t, e]).square().sum(dim=-1)
    errors = collect_statistics(observed).substitution_errors
    assert torch.allclose(errors, expected, rtol=1e-4, atol=1e-9)
    assert torch.all(errors.diagonal().abs() <= 1e-6 * errors.max())  # an expert stands in for itself exactly


@pytest.mark.parametrize("needs", [CalibrationNeeds(), CalibrationNeeds(True, True, True, substitution_errors=True)])
def test_statistics_do_not_grow_with_tokens(zoo, needs, observed_block):
    block = zoo("gpt_oss")[3][0]
    observed = observed_block(block, needs)
    size = lambda: sum(b.numel() for b in observed.buffers())  # noqa: E731
    with torch.no_grad():
        observed(torch.randn(1, 2, block.hidden_size))
        after_one = size()
        for _ in range(5):
            observed(torch.randn(4, 64, block.hidden_size))
    assert size() == after_one
    assert collect_statistics(observed).tokens == 2 + 5 * 256
