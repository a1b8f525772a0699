import pytest
import torch
from torch import nn

import moefx
from moefx.capture import call_model, max_output_diff, normalize_inputs
from moefx.zoo import example_inputs, tiny_model


def test_captured_graph_matches_eager_on_new_shapes(prepared, new_shape_inputs):
    model, _, graph, _ = prepared
    inputs = new_shape_inputs
    with torch.no_grad():
        diff = max_output_diff(model(**inputs), graph(**inputs))
    assert diff <= 1e-5


def test_every_node_maps_to_its_module(prepared):
    model, _, graph, blocks = prepared
    modules = dict(model.named_modules())
    compute = [n for n in graph.graph.nodes if n.op in ("call_function", "call_module")]
    owned = [n for n in compute if n.meta.get("nn_module_stack")]
    assert len(owned) >= 0.9 * len(compute)
    for node in owned:
        for path, _ in node.meta["nn_module_stack"].values():
            assert path in modules or path.startswith("_empty_nn_module_stack")  # torch's marker for no owner
    owners = {list(n.meta["nn_module_stack"].values())[-1][0] for n in owned}
    assert all(any(o == b.name or o.startswith(b.name + ".") for o in owners) for b in blocks)


def test_switch_experts_are_captured_as_leaf_modules(prepared, family):
    _, _, graph, _ = prepared
    leaves = {n.target for n in graph.graph.nodes if n.op == "call_module"} - {
        "_guards_fn"
    }  # torch.export's input guard
    if family == "switch":
        assert leaves == {
            f"{stack}.mlp.experts"
            for stack in (
                "encoder.block.0.layer.1",
                "encoder.block.1.layer.1",
                "decoder.block.0.layer.2",
                "decoder.block.1.layer.2",
            )
        }
    else:
        assert leaves == set()


def test_trace_leaves_the_model_as_it_was():
    model = tiny_model("switch").train()
    flags = {id(m): m.training for m in model.modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moefx.trace(model, example_inputs("switch"))
    assert {id(m): m.training for m in model.modules()} == flags
    assert model.config.use_cache is True and model.decoder.config.use_cache is True
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert nn.Module.to.__name__ == "to"


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict"])
def test_example_inputs_forms(form):
    model = tiny_model("hand_written")
    ids = example_inputs("hand_written")["input_ids"]
    as_form = {"tensor": lambda t: t, "tuple": lambda t: (t,), "dict": lambda t: {"input_ids": t}}[form]
    graph = moefx.trace(model, as_form(ids))
    other = example_inputs("hand_written", batch=4, seq=3, seed=5)["input_ids"]
    assert torch.allclose(call_model(graph, as_form(other)), model(other), atol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [(3, "must be a tensor"), ({"use_cache": False}, "hold no tensor"), ("ids", "must be a tensor")],
)
def test_bad_example_inputs_get_one_line_errors(bad, message):
    with pytest.raises(moefx.MoefxError, match=message) as info:
        normalize_inputs(bad)
    assert "\n" not in str(info.value)


def test_uncapturable_model_gets_a_clear_error():
    class BranchesOnData(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(moefx.CaptureError, match="could not capture BranchesOnData") as info:
        moefx.trace(BranchesOnData(), torch.randn(2, 3))
    assert "\n" not in str(info.value)


class Selector(nn.Module):
    """Branches on data, takes keywords and None, returns a tuple holding None and a tensor of another shape:
    an attention indexer's form (Kolibri-1.1, Qwen4-Exp)."""

    def forward(self, scores, mask=None, *, keep=2):
        picked = scores.topk(keep, dim=-1).indices
        if (picked == 0).any():  # data-dependent
            picked = picked.flip(-1)
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, picked, True)
        return chosen if mask is None else chosen & mask, None, scores.new_ones(*scores.shape[:-1], keep)


class IndexedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.selector = Selector()

    def forward(self, x):
        scores = self.proj(x)
        chosen, nothing, extra = self.selector(scores, None, keep=3)
        assert nothing is None
        return torch.where(chosen, scores, 0.0).sum(-1) + extra.sum(-1)


def test_a_data_dependent_module_with_keywords_and_tuple_outputs_is_captured_as_a_leaf():
    model = IndexedModel()
    graph = moefx.trace(model, torch.randn(4, 5, 8))  # checked against eager inside
    (call,) = [n for n in graph.graph.nodes if n.op == "call_module" and n.target == "selector"]
    assert call.args[1] is None and call.kwargs == {"keep": 3}
    for shape in [(2, 7, 8), (6, 3, 8)]:  # the leaf's output shapes follow the inputs'
        x = torch.randn(shape)
        with torch.no_grad():
            assert max_output_diff(graph(x), model(x)) <= 1e-6


def test_meta_device_model_is_rejected():
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    with pytest.raises(moefx.MoefxError, match="meta device"):
        moefx.trace(model, torch.randn(2, 4))


def test_a_batch_without_attention_mask_captures_as_eager_runs_it():
    # SwitchTransformers' traced encoder indexes the mask its eager forward would make itself
    model = tiny_model("switch")
    batch = {k: v for k, v in example_inputs("switch").items() if k != "attention_mask"}
    kept_all = moefx.compile(model, [batch], experts=1.0)
    with torch.no_grad():
        assert max_output_diff(kept_all(**batch), model(**batch)) <= 1e-5
    assert moefx.compile(model, [batch], experts=0.5).moefx_report.expert_params_after < (
        kept_all.moefx_report.expert_params_after
    )


@pytest.mark.parametrize("family", ["mixtral", "hand_written"])
def test_a_batch_key_the_forward_does_not_take_gets_one_line(family):
    model = tiny_model(family)
    batch = {**example_inputs(family), "token_type_ids": example_inputs(family)["input_ids"]}
    with pytest.raises(moefx.CaptureError, match=rf"'token_type_ids' is not an argument of {type(model).__name__}"
                       r".forward, which takes input_ids") as info:  # fmt: skip
        moefx.compile(model, [batch])
    assert "\n" not in str(info.value)
