import dataclasses
import operator

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.passes.infra.pass_manager import PassManager

import moefx
import moefx.export
from moefx.block import TokenIdRouting, build_block, max_block_diff
from moefx.capture import max_output_diff
from moefx.experts import FusedExperts, GatedActivation, per_slot_rows, sum_slots
from moefx.passes.detect import DetectMoEBlocks, find_moe_blocks, unread_expert_banks
from moefx.passes.lower import operator_computes_routing
from moefx.routing import select_experts, split_identity_experts, split_shared_columns
from moefx.zoo import example_inputs, tiny_model, tiny_transformers_model

EXPECTED = {
    # family: (block names, top_k, scoring, normalize, experts kind, gated, bias, shared, shared gate)
    "mixtral": (["model.layers.0.mlp", "model.layers.1.mlp"], 2, "softmax", True, "fused", True, False, 0, False),
    "qwen2_moe": (["model.layers.0.mlp", "model.layers.1.mlp"], 2, "softmax", False, "fused", True, False, 1, True),
    "qwen3_moe": (["model.layers.0.mlp", "model.layers.1.mlp"], 2, "softmax", True, "fused", True, False, 0, False),
    "olmoe": (["model.layers.0.mlp", "model.layers.1.mlp"], 2, "softmax", False, "fused", True, False, 0, False),
    "deepseek_v3": (["model.layers.1.mlp", "model.layers.2.mlp"], 2, "sigmoid", True, "fused", True, False, 1, False),
    "switch": (
        ["encoder.block.0.layer.1.mlp", "encoder.block.1.layer.1.mlp",
         "decoder.block.0.layer.2.mlp", "decoder.block.1.layer.2.mlp"],
        1, "softmax", False, "modules", False, False, 0, False,
    ),
    "gpt_oss": (["model.layers.0.mlp", "model.layers.1.mlp"], 2, "softmax_topk", False, "fused", True, True, 0, False),
    "hand_written": (["moes.0", "moes.1"], 2, "softmax", True, "modules", False, True, 0, False),
}  # fmt: skip


def test_blocks_found_per_family(family, prepared):
    _, _, _, blocks = prepared
    names, top_k, scoring, normalize, kind, gated, bias, shared, shared_gate = EXPECTED[family]
    assert [b.name for b in blocks] == names
    for b in blocks:
        assert (b.num_experts, b.top_k, b.scoring, b.routing.normalize) == (8, top_k, scoring, normalize)
        assert (b.experts_kind, b.gated, b.experts_bias) == (kind, gated, bias)
        assert (len(b.shared_experts), bool(b.shared_expert_gates)) == (shared, shared_gate)
        assert b.router_weight.shape == (8, 32)
        assert b.module is prepared[0].get_submodule(b.name)


def test_deepseek_routing_details(zoo):
    r = zoo("deepseek_v3")[3][0].routing
    assert (r.has_correction_bias, r.n_group, r.topk_group, r.group_topk, r.scale, r.norm_eps) == (
        True, 4, 2, 2, 2.5, 1e-20)  # fmt: skip


@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 4)])
def test_group_limited_routing_that_limits_nothing_reads_as_plain_routing(n_group, topk_group):
    # one group is the shipped default of glm4_moe, dots1, mistral4 and others; all groups eligible is the same
    model = tiny_model("deepseek_v3")
    for layer in model.model.layers[model.config.first_k_dense_replace :]:  # the routers read these at call time
        layer.mlp.gate.num_group, layer.mlp.gate.topk_group = n_group, topk_group
    batches = [example_inputs("deepseek_v3", seed=s) for s in range(2)]
    for b in find_moe_blocks(model, batches[0]):
        r = b.routing
        assert (r.scoring, r.has_correction_bias, r.n_group, r.topk_group, r.group_topk) == (
            "sigmoid", True, None, None, None)  # fmt: skip
    kept_all = moefx.compile(model, batches, experts=1.0)
    with torch.no_grad():
        assert (kept_all(**batches[0]).logits - model(**batches[0]).logits).abs().max() <= 1e-5


def test_switch_capacity_and_gpt_oss_layout(zoo):
    assert {b.routing.capacity for b in zoo("switch")[3]} == {64}
    gpt = zoo("gpt_oss")[3][0]
    assert gpt.experts_source.layout == "interleaved" and gpt.experts_source.in_transposed
    assert gpt.second_output == "weights" and not gpt.scales_inputs
    mixtral = zoo("mixtral")[3][0]
    assert mixtral.experts_source.layout == "concat" and not mixtral.experts_source.in_transposed


def test_canonical_block_reproduces_original(prepared):
    _, _, _, blocks = prepared
    for b in blocks:
        canonical = build_block(b.module, b)
        for seed in range(3):
            assert max_block_diff(b.module, canonical, b, ndim=3, seed=seed) <= 1e-5


def test_canonical_block_graph_structure(prepared):
    _, _, _, blocks = prepared
    b = blocks[0]
    graph = build_block(b.module, b).graph
    ops = [(n.op, n.target) for n in graph.nodes]
    assert ops[0] == ("placeholder", "hidden_states")
    assert ("call_module", "router") in ops and ("call_module", "experts") in ops
    assert [n.target for n in graph.nodes if n.op == "call_function"].count(select_experts) == 1
    experts = next(n for n in graph.nodes if n.target == "experts")
    selection = next(n for n in graph.nodes if n.target is select_experts)
    assert {a.target for a in experts.args[1:]} == {operator.getitem}
    assert all(a.args[0] is selection for a in experts.args[1:])
    shared = [n.target for n in graph.nodes if n.op == "call_module" and n.target.startswith("shared_expert")]
    assert len(shared) == len(b.shared_experts) + len(b.shared_expert_gates)


def test_small_capacity_drops_tokens_exactly_as_switch_does():
    model = tiny_model("switch")
    for module in model.modules():
        if hasattr(module, "expert_capacity"):
            module.expert_capacity = 2
    blocks = find_moe_blocks(model, example_inputs("switch"))
    b = blocks[0]
    assert b.routing.capacity == 2
    canonical = build_block(b.module, b)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        _, index = select_experts(canonical.router(x), top_k=1, capacity=2)
        assert (index == -1).sum() > 0  # tokens really were dropped
        assert torch.allclose(canonical(x), b.module(x), atol=1e-6)


def test_dbrx_experts_stacked_in_2d_with_gate_and_up_apart():
    # DBRX: w1, v1, w2 are [E*I, H] (w2 holds each expert's down projection transposed); its experts loop
    # is captured opaque, and its weights are renormalised by their L1 norm
    model = tiny_transformers_model("dbrx")
    x = example_inputs("dbrx")
    blocks = find_moe_blocks(model, x)
    assert [b.name for b in blocks] == ["transformer.blocks.0.ffn", "transformer.blocks.1.ffn"]
    for b in blocks:
        src = b.experts_source
        assert (src.in_proj, src.up_proj, src.out_proj) == ("experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2")
        assert src.flat and src.layout == "concat" and not src.in_transposed and src.out_transposed
        assert (b.scoring, b.routing.normalize, b.top_k, b.intermediate_size) == ("softmax", True, 2, 48)
        graph = build_block(b.module, b)
        assert isinstance(graph.experts, FusedExperts) and isinstance(graph.experts.act, GatedActivation)
        assert graph.experts.in_proj.shape == (8, 96, 32) and graph.experts.out_proj.shape == (8, 32, 48)
        assert max_block_diff(b.module, graph, b, b.input_ndim) <= 1e-5


def test_dbrx_weights_normalised_by_another_norm_are_reported_not_approximated():
    model = tiny_transformers_model("dbrx")
    for block in model.transformer.blocks:
        block.ffn.moe_normalize_expert_weights = 2.0  # an L2 norm of the top-k weights
    with pytest.raises(moefx.DetectionError, match="does not reproduce"):
        find_moe_blocks(model, example_inputs("dbrx"))


@settings(max_examples=30, deadline=None)
@given(
    tokens=st.integers(1, 9),
    experts=st.integers(3, 12),
    jitter_eps=st.sampled_from([0.0, 0.01, 0.1, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_sparse_mixer_routing_equals_phimoe_in_eval_mode(tokens, experts, jitter_eps, seed):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * 3
    expected_weights, expected_index = sparsemixer(logits, jitter_eps=jitter_eps, training=False, top_k=2)
    weights, index = select_experts(logits, top_k=2, scoring="sparsemixer", jitter_eps=jitter_eps)
    assert torch.equal(index, expected_index)
    assert torch.allclose(weights, expected_weights, atol=1e-6)


def test_phimoe_sparse_mixer_routing_is_read():
    model = tiny_transformers_model("phimoe")
    blocks = find_moe_blocks(model, example_inputs("phimoe"))
    assert [b.name for b in blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for b in blocks:
        assert (b.top_k, b.scoring, b.routing.jitter_eps, b.routing.normalize) == (2, "sparsemixer", 0.01, False)
        graph = build_block(b.module, b)
        selection = next(n for n in graph.graph.nodes if n.target is select_experts)
        assert selection.kwargs["scoring"] == "sparsemixer" and selection.kwargs["jitter_eps"] == 0.01


def test_a_sparse_mixer_of_another_threshold_is_read_with_it():
    model = tiny_transformers_model("phimoe")
    for layer in model.model.layers:
        layer.mlp.router.router_jitter_noise = 0.2
    assert {b.routing.jitter_eps for b in find_moe_blocks(model, example_inputs("phimoe"))} == {0.2}


def test_a_sparse_mixer_whose_threshold_moefx_cannot_read_is_left_as_it_is_before_its_experts(monkeypatch):
    from transformers.models.phimoe import modeling_phimoe

    def sparsemixer_at_least(scores, jitter_eps, training, top_k=2):  # ">=" where PhiMoE compares with ">"
        with torch.no_grad():
            best, chosen = scores.max(dim=-1, keepdim=True)
            far = (best - scores) / scores.abs().clamp(min=best) >= 2 * jitter_eps
        return torch.softmax(scores.masked_fill(far, float("-inf")), dim=-1).gather(-1, chosen), chosen

    monkeypatch.setattr(modeling_phimoe, "sparsemixer", sparsemixer_at_least)
    model, batch = tiny_transformers_model("phimoe"), example_inputs("phimoe")
    # PhiMoE's experts module takes the routing as arguments, so it is compressed behind the unread router
    unread = r"^model.layers.[01].mlp: a sparse-mixer routing whose threshold moefx cannot read.*, left as it is$"
    with pytest.warns(moefx.MoefxWarning, match=unread):
        blocks = find_moe_blocks(model, batch)
    assert [(b.name, b.given_routing is not None) for b in blocks] == [(f"model.layers.{i}.mlp.experts", True)
                                                                       for i in range(2)]  # fmt: skip
    with torch.no_grad(), pytest.warns(moefx.MoefxWarning, match="cannot read"):
        same = moefx.compile(model, [batch], experts=1.0)
        assert max_output_diff(same(**batch).logits, model(**batch).logits) <= 1e-5


def test_a_correction_bias_on_the_logits_is_read_apart_from_one_on_the_scores():
    # Kolibri chooses by logits + bias and weights by the sigmoid of the chosen logits (DeepSeek-V3 adds its
    # bias to the sigmoid scores): with a bias that changes choices, only the right reading reproduces it
    model = tiny_transformers_model("kolibri1")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.linspace(-2.0, 2.0, 8))
    batches = [example_inputs("kolibri1", seed=s) for s in range(2)]
    blocks = find_moe_blocks(model, batches[0])
    assert {(b.scoring, b.routing.has_correction_bias, b.routing.bias_on_logits) for b in blocks} == {
        ("sigmoid", True, True)}  # fmt: skip
    logits, bias = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), torch.linspace(-2.0, 2.0, 8)
    on_logits = select_experts(logits, bias, top_k=2, scoring="sigmoid", bias_on_logits=True)[1].sort().values
    assert torch.equal(on_logits, torch.topk(logits + bias, 2).indices.sort().values)
    assert not torch.equal(on_logits, select_experts(logits, bias, top_k=2, scoring="sigmoid")[1].sort().values)
    kept_all = moefx.compile(model, batches, experts=1.0)
    with torch.no_grad():
        assert (kept_all(**batches[0]).logits - model(**batches[0]).logits).abs().max() <= 1e-5


def test_routing_weights_that_scale_the_experts_inputs_are_read_and_run_per_slot():
    # Llama 4 multiplies each expert's input by the sigmoid of its top-k logit and runs every expert densely:
    # only the reading whose experts run on per-slot rows ``w * x`` reproduces it (a SwiGLU is not linear)
    model = tiny_transformers_model("llama4_text")
    (block,) = find_moe_blocks(model, example_inputs("llama4_text"))
    assert (block.scales_inputs, block.scoring, block.routing.normalize) == (True, "sigmoid", False)
    assert (block.second_output, block.flattens_output) == ("logits", True)  # as Llama4TextMoe returns them
    graph = build_block(block.module, block)
    experts = next(n for n in graph.graph.nodes if n.target == "experts")
    assert all(a.target is operator.getitem and a.args[0].target is per_slot_rows for a in experts.args)
    assert [u.target for u in experts.users] == [sum_slots]
    x = torch.randn(3, 5, block.hidden_size)
    with torch.no_grad():
        expected, got = block.module(x), graph(x)
        output_scaled = build_block(block.module, dataclasses.replace(block, scales_inputs=False))(x)
    scale = expected[0].abs().max()
    assert all(torch.allclose(a, b, atol=1e-4 * scale) for a, b in zip(expected, got, strict=True))
    assert (output_scaled[0] - expected[0]).abs().max() > 0.01 * scale


def _longcat_choosing_identity_experts():
    """LongCat-Flash's tiny model, 8 experts and 2 identity experts, with a correction bias that makes the
    identity experts a common choice; and its first block's reading."""
    model = tiny_transformers_model("longcat_flash")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.e_score_correction_bias[8:] = 0.05
    return model, find_moe_blocks(model, example_inputs("longcat_flash"))[0]


def test_identity_experts_are_read_beside_fewer_experts():
    # LongCat-Flash's router has 10 columns for 8 experts: its last 2 choose zero-computation experts,
    # which pass the token through, times their weight
    _, block = _longcat_choosing_identity_experts()
    assert (block.num_experts, block.identity_experts, block.routing.scale) == (8, 2, 6.0)
    assert block.router_weight.shape[0] == 10 and block.routing.has_correction_bias
    graph = build_block(block.module, block)
    split = next(n for n in graph.graph.nodes if n.target is split_identity_experts)
    experts = next(n for n in graph.graph.nodes if n.target == "experts")
    assert split.args[3] == 8 and all(a.args[0] is split for a in experts.args[1:])
    x = torch.randn(3, 5, block.hidden_size)
    with torch.no_grad():
        index = select_experts(graph.router(x.reshape(15, -1)), graph.correction_bias, **block.routing.as_kwargs())[1]
        expected, got = block.module(x), graph(x)
        without = build_block(block.module, dataclasses.replace(block, identity_experts=0))(x)
    assert (index >= 8).any()  # identity experts are chosen
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(without, expected, atol=1e-3)


def test_a_linear_feeding_a_top_k_beside_experts_another_router_reads_is_no_block():
    # Qwen4-Exp's hyper-connections: a linear with as many outputs as there are experts, whose top-k is not a
    # routing; moefx looks for experts around it, finds the layer's, cannot read it, and must not fail for it
    model = tiny_model("mixtral")
    for layer in model.model.layers:
        layer.hyper = torch.nn.Linear(32, 8)
        layer.post_attention_layernorm.register_forward_hook(
            lambda m, args, out, hyper=layer.hyper: out + hyper(out).topk(2).values.mean(-1, keepdim=True)
        )
    blocks = find_moe_blocks(model, example_inputs("mixtral"))
    assert [b.name for b in blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_bfloat16_model_is_detected():
    model = tiny_model("mixtral").to(torch.bfloat16)
    blocks = find_moe_blocks(model, example_inputs("mixtral"))
    assert len(blocks) == 2
    canonical = build_block(blocks[0].module, blocks[0])
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert canonical(x).dtype == torch.bfloat16
        assert (canonical(x).float() - blocks[0].module(x).float()).abs().max() < 3e-2


def test_detection_runs_as_a_pass_in_a_pass_manager(prepared):
    model, _, graph, blocks = prepared
    detect = DetectMoEBlocks(model)
    result = PassManager([detect])(graph)
    assert result.graph_module is graph and not result.modified
    assert [b.name for b in detect.blocks] == [b.name for b in blocks]


def test_dense_model_gets_one_clear_error():
    with pytest.raises(moefx.DetectionError, match="no MoE block found in MistralForCausalLM") as info:
        moefx.find_moe_blocks(tiny_model("dense"), example_inputs("dense"))
    message = str(info.value)
    assert "\n" not in message and "router" in message and "searched" in message


class ToyMoE(torch.nn.Module):
    """An MoE whose routing moefx may not model: ``scores_of`` and ``weights_of`` are free functions."""

    def __init__(self, scores_of, weights_of):
        super().__init__()
        self.scores_of, self.weights_of = scores_of, weights_of
        self.router = torch.nn.Linear(8, 4, bias=False)
        self.experts = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)) for _ in range(4)
        )

    def forward(self, x):
        flat = x.reshape(-1, 8)
        w, idx = self.scores_of(self.router(flat)).topk(2, dim=-1)
        return self.run_experts(flat, self.weights_of(w), idx).reshape(x.shape)

    def run_experts(self, flat, w, idx):
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, expert(flat[tok]) * w[tok, slot, None])
        return out


@pytest.mark.parametrize(
    "scores_of, weights_of, message",
    [
        (lambda logits: torch.softmax(logits, -1), lambda w: w**2, "does not reproduce its outputs"),
        (lambda logits: torch.softmax(logits**3, -1), lambda w: w, "not a softmax, sigmoid or sqrt-softplus"),
    ],
)
def test_unknown_routing_variant_is_reported_not_approximated(scores_of, weights_of, message):
    with pytest.raises(moefx.DetectionError, match=message) as info:
        find_moe_blocks(torch.nn.Sequential(ToyMoE(scores_of, weights_of)), torch.randn(2, 5, 8))
    assert "\n" not in str(info.value)


def test_sqrt_softplus_scores_are_read_and_reproduced(tmp_path):
    # DeepSeek-V4's scoring: independent sqrt(softplus(logit)) scores, the chosen ones renormalised
    toy = ToyMoE(lambda logits: F.softplus(logits).sqrt(), lambda w: w / (w.sum(-1, keepdim=True) + 1e-20))
    model, x = torch.nn.Sequential(toy), torch.randn(2, 5, 8)
    (block,) = find_moe_blocks(model, x)
    assert (block.scoring, block.routing.normalize, block.routing.norm_eps) == ("sqrtsoftplus", True, 1e-20)
    logits = torch.randn(6, 4)
    weights, index = select_experts(logits, top_k=2, scoring="sqrtsoftplus", normalize=True)
    scores = F.softplus(logits).sqrt()
    assert torch.equal(index, scores.topk(2).indices)
    torch.testing.assert_close(weights, scores.topk(2).values / scores.topk(2).values.sum(-1, keepdim=True))
    with torch.no_grad():
        same = moefx.compile(model, [x], experts=1.0)
        assert (same(x) - model(x)).abs().max() <= 1e-5
        with pytest.warns(moefx.MoefxWarning, match="independent sqrtsoftplus scores"):
            half = moefx.compile(model, [x], experts=0.5, router="pruned")
    assert [b.kept for b in half.moefx_report.blocks] == [2] and torch.isfinite(half(x)).all()
    assert moefx.export.onnx(half, tmp_path / "m.onnx", x).is_file()  # its parity with eager is checked inside


class ScaledAfterExperts(ToyMoE):
    """Beam's and Ernie 4.5's variants: weights renormalised by a sum floored with ``clamp``, and a
    constant applied to the summed routed output (with a shared expert, to everything)."""

    def __init__(self, shared: bool):
        super().__init__(lambda logits: torch.softmax(logits, -1), lambda w: w / w.sum(-1, keepdim=True).clamp(1e-12))
        self.shared = torch.nn.Linear(8, 8) if shared else None

    def forward(self, x):
        out = super().forward(x)
        return 2.5 * (out if self.shared is None else out + self.shared(x))


def test_a_constant_after_the_experts_is_read_as_routing_scale():
    (block,) = find_moe_blocks(torch.nn.Sequential(ScaledAfterExperts(shared=False)), torch.randn(2, 5, 8))
    routing = block.routing
    assert (routing.scale, routing.normalize, routing.norm_min) == (2.5, True, 1e-12)  # verified numerically


def test_a_constant_on_the_shared_expert_too_is_reported_not_approximated():
    with pytest.raises(moefx.DetectionError, match="does not reproduce its outputs") as info:
        find_moe_blocks(torch.nn.Sequential(ScaledAfterExperts(shared=True)), torch.randn(2, 5, 8))
    assert "\n" not in str(info.value)


class NormedAfterExperts(ToyMoE):
    """A.X-K1's variant: a norm applied to the sum of the routed and shared experts' outputs."""

    def __init__(self):
        super().__init__(lambda logits: torch.softmax(logits, -1), lambda w: w)
        self.shared = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(super().forward(x) + self.shared(x))


def test_a_norm_after_the_experts_is_read_as_the_output_norm():
    (block,) = find_moe_blocks(torch.nn.Sequential(NormedAfterExperts()), torch.randn(2, 5, 8))
    assert (block.output_norm, block.shared_experts) == ("norm", ["shared"])  # verified numerically
    canonical = build_block(block.module, block)
    assert [n.target for n in canonical.graph.nodes if n.op == "call_module"][-1] == "output_norm"


class HashRouted(ToyMoE):
    """DeepSeek-V4's hash routing, with softmax scores: a token's experts are its row of a fixed table, and
    the router's scores only weight them."""

    def __init__(self):
        super().__init__(lambda logits: torch.softmax(logits, -1), lambda w: w / w.sum(-1, keepdim=True))
        self.register_buffer("table", torch.rand(16, 4, generator=torch.Generator().manual_seed(0)).argsort(-1)[:, :2])

    def forward(self, x, input_ids=None):
        flat = x.reshape(-1, 8)
        idx = self.table[input_ids.reshape(-1)]
        w = self.weights_of(self.scores_of(self.router(flat)).gather(1, idx))
        return self.run_experts(flat, w, idx).reshape(x.shape)


class TakingTokenIds(HashRouted):
    def forward(self, x, token_ids=None):
        return super().forward(x, token_ids)


class HashRoutedLM(torch.nn.Module):
    def __init__(self, moe: HashRouted):
        super().__init__()
        self.embed, self.moe = torch.nn.Embedding(16, 8), moe

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        if isinstance(self.moe, TakingTokenIds):
            return self.moe(hidden, token_ids=input_ids)
        return self.moe(hidden, input_ids=input_ids)


def test_experts_chosen_by_token_id_are_read_and_keep_their_table(tmp_path):
    model, ids = HashRoutedLM(HashRouted()), torch.randint(0, 16, (2, 6))
    (block,) = find_moe_blocks(model, ids)
    assert block.routing.hash_routed and (block.scoring, block.top_k, block.routing.normalize) == ("softmax", 2, True)
    assert block.token_id_routing == TokenIdRouting("table", "input_ids", 16)
    canonical = build_block(block.module, block)
    selection = next(n for n in canonical.graph.nodes if n.target is select_experts)
    assert [a.target for a in selection.args[2:]] == ["hash_table", "input_ids"]
    assert not operator_computes_routing(canonical)  # softmax scores, but the table chooses
    with torch.no_grad():
        assert (moefx.compile(model, [ids], experts=1.0)(ids) - model(ids)).abs().max() <= 1e-5
        with pytest.warns(moefx.MoefxWarning, match="chosen by token id"):
            pruned = moefx.compile(model, [ids], experts=0.5, router="pruned")
    assert [b.kept for b in pruned.moefx_report.blocks] == [2] and torch.isfinite(pruned(ids)).all()
    assert moefx.export.onnx(pruned, tmp_path / "m.onnx", ids).is_file()  # its parity with eager is checked inside


def test_token_ids_the_block_takes_under_another_name_get_one_line():
    model = HashRoutedLM(TakingTokenIds())
    with pytest.raises(moefx.DetectionError, match="chosen by token id, but from 'input_ids'") as info:
        find_moe_blocks(model, torch.randint(0, 16, (2, 6)))
    assert "\n" not in str(info.value)


class ChosenByPosition(torch.nn.Module):
    """Fused experts that no router chooses: token t of the flattened batch goes to expert t mod 4."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Parameter(torch.randn(4, 8, 16))
        self.down = torch.nn.Parameter(torch.randn(4, 16, 8))

    def forward(self, x):
        flat = x.reshape(-1, 8)
        expert = torch.arange(flat.shape[0]) % 4
        hidden = torch.relu(torch.bmm(flat[:, None], self.up[expert]))
        return torch.bmm(hidden, self.down[expert]).reshape(x.shape)


def test_expert_banks_no_router_chooses_are_named_and_left_as_they_are():
    model, x = (
        torch.nn.Sequential(ToyMoE(lambda logits: torch.softmax(logits, -1), lambda w: w), ChosenByPosition()),
        torch.randn(2, 5, 8),
    )
    assert unread_expert_banks(model, ["0"]) == ["1"]
    with pytest.warns(moefx.MoefxWarning, match=r"^1: expert weights that no router moefx can read selects"):
        half = moefx.compile(model, [x], experts=0.5)
    assert torch.equal(half[1].up, model[1].up) and [b.name for b in half.moefx_report.blocks] == ["0"]


class GivenRoutingExperts(torch.nn.Module):
    """Fused SwiGLU experts that take their routing as arguments (transformers' experts modules, which
    Gemma 4 and Zaya call from outside an MoE block); ``weights_first`` swaps the two."""

    def __init__(self, weights_first: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 32, 8, generator=g) / 3)
        self.down_proj = torch.nn.Parameter(torch.randn(4, 8, 16, generator=g) / 4)
        self.weights_first = weights_first

    def forward(self, hidden_states, first, second):
        index, weights = (second, first) if self.weights_first else (first, second)
        out = torch.zeros_like(hidden_states)
        for e in range(4):
            tok, slot = torch.where(index == e)
            gate, up = F.linear(hidden_states[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            out.index_add_(0, tok, F.linear(F.silu(gate) * up, self.down_proj[e]) * weights[tok, slot, None])
        return out


class RoutedBeside(torch.nn.Module):
    """Gemma 4's layout: a router module (a norm, a linear, softmax top-2, renormalised, times a learned
    per-expert scale) beside the experts, which see another norm of the input."""

    def __init__(self, weights_first: bool = False):
        super().__init__()
        self.router_norm, self.experts_norm = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8)
        self.router = torch.nn.Linear(8, 4, bias=False)
        self.per_expert_scale = torch.nn.Parameter(torch.rand(4, generator=torch.Generator().manual_seed(1)) + 0.5)
        self.experts, self.weights_first = GivenRoutingExperts(weights_first), weights_first

    def forward(self, x):
        flat = x.reshape(-1, 8)
        w, idx = self.router(self.router_norm(flat)).softmax(-1).topk(2, dim=-1)
        w = w / w.sum(-1, keepdim=True) * self.per_expert_scale[idx]
        routing = (w, idx) if self.weights_first else (idx, w)
        return x + self.experts(self.experts_norm(flat), *routing).reshape(x.shape)


@pytest.mark.filterwarnings("ignore:0 looks like an MoE block")  # asserted once below; loading re-detects
@pytest.mark.parametrize("weights_first", [False, True])
def test_experts_routed_by_a_router_beside_them_are_a_block_of_their_own(weights_first, tmp_path):
    model, x = torch.nn.Sequential(RoutedBeside(weights_first)), torch.randn(2, 6, 8)
    # the module holding both is no MoE block (its residual and norms are not a block's), so its router is unread
    with pytest.warns(moefx.MoefxWarning, match=r"^0 looks like an MoE block.*compressed as routed by that router"):
        (block,) = find_moe_blocks(model, x)
    assert (block.name, block.num_experts, block.top_k, block.input_ndim) == ("0.experts", 4, 2, 2)
    assert block.router_weight is None and block.given_routing.index == ("second" if weights_first else "first")
    canonical = build_block(block.module, block)
    assert [n.target for n in canonical.graph.nodes if n.op == "placeholder"] == ["hidden_states", "first", "second"]
    assert not hasattr(canonical, "router") and not operator_computes_routing(canonical)
    with torch.no_grad(), pytest.warns(moefx.MoefxWarning, match="looks like an MoE block"):
        assert (moefx.compile(model, [x], experts=1.0)(x) - model(x)).abs().max() <= 1e-5
    with pytest.warns(moefx.MoefxWarning) as caught:
        half = moefx.compile(model, [x, torch.randn(2, 6, 8)], experts=0.5, router="pruned")
    messages = [str(w.message) for w in caught]
    assert any("0.experts: router='pruned' is not possible here (its experts are chosen by a router outside" in m
               for m in messages)  # fmt: skip
    assert any("grouped by expert-weight similarity: router-logits needs that router" in m for m in messages)
    assert [(b.num_experts, b.kept, b.router) for b in half.moefx_report.blocks] == [(4, 2, "exact")]
    assert torch.equal(half[0].router.weight, model[0].router.weight)  # the router is left as it is
    assert moefx.export.onnx(half, tmp_path / "m.onnx", x).is_file()  # its parity with eager is checked inside
    moefx.save(half, tmp_path / "saved", {"input": x})
    with torch.no_grad():
        assert (moefx.load(tmp_path / "saved", model)(x) - half(x)).abs().max() <= 1e-6


def test_experts_that_end_in_their_own_rms_norm_are_read_with_it():
    # Ergo: each expert's output goes through an RMSNorm with the expert's own weight, before its routing weight
    model, batches = tiny_transformers_model("ergo"), [example_inputs("ergo", seed=s) for s in range(2)]
    blocks = find_moe_blocks(model, batches[0])
    assert len(blocks) == 2
    src = blocks[0].experts_source
    assert (src.out_norm, src.norm_eps, src.out_bias) == ("experts.post_expert_norm.weight", 1e-12, None)
    canonical = build_block(blocks[0].module, blocks[0])
    without = build_block(
        blocks[0].module, dataclasses.replace(blocks[0], experts_source=dataclasses.replace(src, out_norm=None))
    )
    x = torch.randn(2, 5, blocks[0].hidden_size)
    with torch.no_grad():
        assert (canonical(x) - blocks[0].module(x)).abs().max() <= 1e-5
        assert (without(x) - blocks[0].module(x)).abs().max() > 1e-2
    with pytest.warns(moefx.MoefxWarning, match="refit on their input projections only"):
        half = moefx.compile(model, batches, experts=0.5)
    merged = half.get_submodule(blocks[0].name).experts
    assert merged.out_norm.shape == (4, blocks[0].hidden_size)
    mc = moefx.compile(model, batches, experts=0.5, method="mc-smoe")
    assert all(e.out_norm is not None for e in mc.get_submodule(blocks[0].name).experts.experts)  # LoSparse experts


def _inkling(global_scale: float = 1.5):
    model = tiny_transformers_model("inkling_text")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.global_scale.fill_(global_scale)
    return model


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 12), seed=st.integers(0, 1000))
def test_shared_columns_select_as_inklings_router_does(tokens, seed):
    # the router's last 2 of 10 columns score the 2 shared experts: always taken, normalised with the top 2
    gate = _inkling().model.layers[0].mlp.gate
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _, weights, index, gammas = gate(x)
        got_weights, got_index = select_experts(
            F.linear(x, gate.weight), gate.e_score_correction_bias, top_k=2, scoring="sigmoid", normalize=True,
            scale=8.0 * 1.5, shared_columns=2,
        )  # fmt: skip
    routed, routed_index, shared = split_shared_columns(got_weights, got_index, 2)
    assert torch.equal(got_index[:, 2:], torch.tensor([8, 9]).expand(tokens, 2))
    assert torch.equal(routed_index.sort(-1).values, index.sort(-1).values)
    torch.testing.assert_close(routed.gather(1, routed_index.argsort(-1)), weights.gather(1, index.argsort(-1)))
    torch.testing.assert_close(shared, gammas)


def test_router_columns_that_score_shared_experts_are_read_and_kept_by_a_pruned_router(tmp_path):
    model, batches = _inkling(), [example_inputs("inkling_text", seed=s) for s in range(2)]
    blocks = find_moe_blocks(model, batches[0])
    b = blocks[0]
    assert (b.routing.shared_columns, b.identity_experts, b.num_experts, b.routing.scale) == (2, 0, 8, 12.0)
    assert b.scale_parameter_path == "gate.global_scale" and b.shared_experts == ["shared_experts"]
    canonical = build_block(b.module, b)
    split = next(n for n in canonical.graph.nodes if n.target is split_shared_columns)
    shared = next(n for n in canonical.graph.nodes if n.target == "shared_expert_0")
    assert shared.args[1].args == (split, 2)  # the shared experts take their scores
    unshared = dataclasses.replace(b, routing=dataclasses.replace(b.routing, shared_columns=0))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert (canonical(x) - b.module(x)).abs().max() <= 1e-5
        with pytest.raises(RuntimeError, match="must match"):  # the plain reading cannot run: 8 biases, 10 scores
            build_block(b.module, unshared)(x)
    pruned = moefx.compile(model, batches, experts=0.5, method="reap", router="pruned")
    assert pruned.get_submodule(b.name).router.out_features == 4 + 2
    path = moefx.export.save_pretrained(pruned, tmp_path / "plain", batches[0])
    plain = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert (plain(**batches[0]).logits - pruned(**batches[0]).logits).abs().max() <= 1e-5
    assert plain.model.layers[0].mlp.gate.global_scale.item() == 1.5
