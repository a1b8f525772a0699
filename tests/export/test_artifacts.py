"""Every family, original and compressed, exports to ONNX, pt2 and TorchScript; each artifact's built-in
parity check (new input shape, max abs diff <= 1e-4 against eager) must pass.

The whole family x variant x format matrix takes several minutes on 2 cores, so the default run covers every
family in ONNX and TorchScript and five families in pt2 (every variant once), with a rotation of variants, and
``pytest -m slow`` runs the rest of the matrix."""

import sys

import onnx as onnx_pkg
import onnxruntime
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import moefx
import moefx.export
from moefx.export.serving import (
    ParityReference,
    TopkTiesToLowerIndex,
    check_parity,
    is_canonical_block,
    new_shape_inputs,
    serving_model,
)
from moefx.passes.lower import LowerToFusedMoE, quantization_block_size
from moefx.zoo import FAMILIES, example_inputs, tiny_model

VARIANTS = {
    "original": {},
    "merge-refit exact": {"experts": 0.5},  # the default method
    "m-smoe pruned": {"experts": 0.5, "method": "m-smoe", "router": "pruned"},
    "mc-smoe": {"experts": 0.5, "method": "mc-smoe", "rank": 4},
    "m-smoe exact": {"experts": 0.5, "method": "m-smoe"},  # the paper's merging behind the original router
}


SWIGLU = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]  # ORT's MoE activation
FUSABLE = [*SWIGLU, "switch"]  # every method but MC-SMoE (LoSparse experts) lowers to the fused operator
NAMES = list(VARIANTS)


def _matrix(default_variants):
    """(family, variant) pairs: ``default_variants(i, family)`` run by default, the others are marked slow."""
    cases = []
    for i, family in enumerate(FAMILIES):
        for variant in VARIANTS:
            marks = [] if variant in default_variants(i, family) else [pytest.mark.slow]
            cases.append(pytest.param(family, variant, marks=marks, id=f"{family}-{variant}"))
    return cases


# one variant per family by default: the fused lowering after each method (mixtral's default-tier fused
# export is test_generation's: the default method, fused, with a key/value cache; switch's encoder-decoder
# export takes half a minute, so all of its variants are in the slow tier)
ONNX_DEFAULT = {
    "qwen2_moe": "m-smoe pruned",
    "qwen3_moe": "mc-smoe",
    "olmoe": "original",
    "deepseek_v3": "merge-refit exact",
    "gpt_oss": "m-smoe pruned",
    "hand_written": "merge-refit exact",
}


def _onnx_default(i, family):
    return {ONNX_DEFAULT.get(family)}


@pytest.mark.parametrize("family, variant", _matrix(_onnx_default))
def test_fused_onnx_export_matches_eager(compiled_tiny, family, variant, tmp_path):
    model = compiled_tiny(family, **VARIANTS[variant])
    path = moefx.export.onnx(model, tmp_path / "model.onnx", example_inputs(family), fused=True)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    moe = [n for n in onnx_pkg.load(str(path)).graph.node if n.op_type == "MoE" and n.domain == "com.microsoft"]
    blocks = moefx.export.fused_blocks(path)
    num_blocks = 4 if family == "switch" else 2  # the tiny models' MoE blocks
    assert len(blocks) == num_blocks and all(name in dict(model.named_modules()) for name in blocks)
    if family in FUSABLE and variant != "mc-smoe":
        assert len(moe) == num_blocks and set(blocks.values()) == {None}  # one fused node per MoE block
        attributes = {a.name: onnx_pkg.helper.get_attribute_value(a) for a in moe[0].attribute}
        if family in SWIGLU:
            assert attributes["activation_type"] == b"swiglu" and attributes["swiglu_fusion"] == 1
        # every routed token takes both halves of each expert (width_splits=2; the tiny widths are even)
        assert attributes["k"] == 2 * (1 if family == "switch" else 2)
    else:  # LoSparse experts, or an activation the operator lacks: portable, with the reason in the metadata
        assert moe == [] and all(reason is not None for reason in blocks.values())


@pytest.mark.parametrize("bits", [pytest.param(8, marks=pytest.mark.slow), 4])
@pytest.mark.parametrize("family", ["mixtral", pytest.param("deepseek_v3", marks=pytest.mark.slow)])
def test_quantized_experts_export_to_qmoe_and_match_eager_on_the_same_quantized_weights(
    compiled_tiny, family, bits, tmp_path
):
    model = compiled_tiny(family, **VARIANTS["merge-refit exact"])
    path = moefx.export.onnx(model, tmp_path / "q.onnx", example_inputs(family), expert_bits=bits)  # parity inside
    graph = onnx_pkg.load(str(path)).graph
    qmoe = [n for n in graph.node if n.op_type == "QMoE" and n.domain == "com.microsoft"]
    assert len(qmoe) == 2 and not [n for n in graph.node if n.op_type == "MoE"]
    attributes = {a.name: onnx_pkg.helper.get_attribute_value(a) for a in qmoe[0].attribute}
    codes = {i.name: i for i in graph.initializer if i.name.endswith(("fc1", "fc2"))}
    assert len(codes) == 4 and {i.data_type for i in codes.values()} == {onnx_pkg.TensorProto.UINT8}
    _, hidden, packed = next(i.dims for name, i in codes.items() if name.endswith("fc2"))  # [E, H, I * bits / 8]
    assert attributes["expert_weight_bits"] == bits
    assert attributes["block_size"] == quantization_block_size(bits, [hidden, packed * 8 // bits])
    float_path = moefx.export.onnx(model, tmp_path / "f.onnx", example_inputs(family), fused=True)

    def expert_weight_bytes(file):
        initializers = onnx_pkg.load(str(file)).graph.initializer
        return sum(onnx_pkg.numpy_helper.to_array(i).nbytes for i in initializers if i.name.endswith(("fc1", "fc2")))

    assert expert_weight_bytes(path) * 32 // bits == expert_weight_bytes(float_path)  # 4 or 8 times fewer bytes
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {k: v.numpy() for k, v in example_inputs(family).items()})[0]
    with torch.no_grad():
        float_logits = model(**example_inputs(family)).logits
    assert (torch.from_numpy(logits) - float_logits).abs().max() > 1e-4  # the weights really are quantized


def _mixtral_of_32_column_blocks(seed: int = 0) -> nn.Module:
    """The tiny Mixtral compiled by default, with expert sizes that divide into int8 activations' blocks."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, pad_token_id=0,
    )  # fmt: skip
    calib = [example_inputs("mixtral", batch=4, seq=16, seed=s) for s in range(2)]
    return moefx.compile(transformers.MixtralForCausalLM(config).eval(), calib, experts=0.5, progress=False)


def test_int8_activations_run_qmoe_at_accuracy_level_4_and_match_eager_that_rounds_them_alike(tmp_path):
    model, inputs, bits = _mixtral_of_32_column_blocks(), example_inputs("mixtral"), 4
    path = moefx.export.onnx(model, tmp_path / "a8.onnx", inputs, expert_bits=bits, int8_activations=True)
    qmoe = [n for n in onnx_pkg.load(str(path)).graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == 2
    for node in qmoe:
        attributes = {a.name: onnx_pkg.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["accuracy_level"] == 4 and attributes["block_size"] == 32
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])
    with torch.no_grad():
        rounded = moefx.export.with_quantized_experts(model, inputs, bits, int8_activations=True)(**inputs).logits
        weights_only = moefx.export.with_quantized_experts(model, inputs, bits)(**inputs).logits
    off = (logits - rounded).abs()
    assert off.mean() < 1e-5 and off.max() < 1e-2
    assert (logits - weights_only).abs().mean() > 100 * off.mean()  # the activations really are rounded


def test_quantized_export_refuses_what_qmoe_cannot_run(compiled_tiny, tmp_path):
    with pytest.raises(moefx.ConfigError, match="expert_bits must be 8 or 4"):
        moefx.export.onnx(compiled_tiny("mixtral"), tmp_path / "m.onnx", example_inputs("mixtral"), expert_bits=3)
    with pytest.raises(moefx.ConfigError, match="QMoE operator, which cannot run model.layers.0.mlp: LoSparseExperts"):
        moefx.export.onnx(
            compiled_tiny("mixtral", **VARIANTS["mc-smoe"]),
            tmp_path / "m.onnx",
            example_inputs("mixtral"),
            expert_bits=4,
        )
    mixtral, inputs = compiled_tiny("mixtral"), example_inputs("mixtral")
    for bits in (None, 8):
        with pytest.raises(moefx.ConfigError, match=f"applies to 4-bit experts, not expert_bits={bits}"):
            moefx.export.onnx(mixtral, tmp_path / "m.onnx", inputs, expert_bits=bits, int8_activations=True)
    with pytest.raises(moefx.ConfigError, match="blocks of 32 columns, which model.layers.0.mlp's experts .inputs of "
                       "32 and 48. do not divide into; export it without int8_activations"):  # fmt: skip
        moefx.export.onnx(mixtral, tmp_path / "m.onnx", inputs, expert_bits=4, int8_activations=True)
    for splits in (0, 1.5, True):
        with pytest.raises(moefx.ConfigError, match=f"width_splits must be a positive whole number.*not {splits}"):
            moefx.export.onnx(mixtral, tmp_path / "m.onnx", inputs, fused=True, width_splits=splits)
    assert list(tmp_path.iterdir()) == []


PT2_DEFAULT = {  # torch.export is what the ONNX exporter runs too: five families, each variant once, suffice
    "mixtral": "original",
    "qwen2_moe": "m-smoe pruned",
    "olmoe": "m-smoe exact",
    "gpt_oss": "merge-refit exact",
    "hand_written": "mc-smoe",
}


@pytest.mark.parametrize("family, variant", _matrix(lambda i, family: {PT2_DEFAULT.get(family)}))
def test_pt2_export_matches_eager(compiled_tiny, family, variant, tmp_path):
    model = compiled_tiny(family, **VARIANTS[variant])
    path = moefx.export.pt2(model, tmp_path / "model.pt2", example_inputs(family))
    program = torch.export.load(str(path)).module()
    serving, inputs = serving_model(model, example_inputs(family))
    feed = new_shape_inputs(inputs, serving.input_names)
    with torch.no_grad():
        assert torch.allclose(program(*feed), serving(*feed), atol=1e-4)


def test_a_one_row_example_exports_a_pt2_program_for_any_batch(compiled_tiny, tmp_path):
    """Traced on two rows and 11 positions, checked on the one-row example itself, run here on five rows."""
    model = compiled_tiny("mixtral")
    path = moefx.export.pt2(model, tmp_path / "model.pt2", example_inputs("mixtral", batch=1))
    program = torch.export.load(str(path)).module()
    feed = example_inputs("mixtral", batch=5, seq=6, seed=3)
    with torch.no_grad():
        assert torch.allclose(program(*feed.values()), model(**feed).logits, atol=1e-4)


def test_an_artifact_that_cannot_run_the_example_gets_one_line_and_is_not_written(compiled_tiny, tmp_path):
    """transformers' mask code branches on a one-token query, so a program traced on 4 positions guards
    against 1: the one-token example itself fails the check."""
    with pytest.raises(moefx.MoefxError, match=r"pt2 artifact cannot run on the check inputs \(1x1, .*Guard") as error:
        moefx.export.pt2(compiled_tiny("mixtral"), tmp_path / "m.pt2", example_inputs("mixtral", batch=1, seq=1))
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family, variant", _matrix(lambda i, family: {NAMES[(i + 2) % len(NAMES)]}))
def test_torchscript_export_matches_eager(compiled_tiny, family, variant, tmp_path):
    path = moefx.export.torchscript(
        compiled_tiny(family, **VARIANTS[variant]), tmp_path / "model.ts", example_inputs(family)
    )
    assert isinstance(torch.jit.load(str(path)), torch.jit.ScriptModule)


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)])
def test_a_half_precision_model_exports_float32_onnx_that_passes_parity(dtype, tmp_path):
    calib = [example_inputs("qwen3_moe", batch=4, seq=16, seed=s) for s in range(2)]
    model = moefx.compile(tiny_model("qwen3_moe").to(dtype), calib, experts=0.5)
    assert {p.dtype for p in model.parameters()} == {dtype}  # compile keeps the weights' dtype
    path = moefx.export.onnx(model, tmp_path / "half.onnx", example_inputs("qwen3_moe"))  # parity checked inside
    types = {i.data_type for i in onnx_pkg.load(str(path)).graph.initializer}
    half = {onnx_pkg.TensorProto.BFLOAT16, onnx_pkg.TensorProto.FLOAT16}
    assert onnx_pkg.TensorProto.FLOAT in types and not types & half
    assert {p.dtype for p in model.parameters()} == {dtype}  # the model itself is unchanged
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {k: v.numpy() for k, v in example_inputs("qwen3_moe").items()})[0]
    with torch.no_grad():
        expected = model(**example_inputs("qwen3_moe")).logits.float()
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=0.05, rtol=0.05)  # the model's own precision


def test_portable_onnx_is_standard_onnx(compiled_tiny, tmp_path):
    model = compiled_tiny("mixtral", **VARIANTS["m-smoe pruned"])
    path = moefx.export.onnx(model, tmp_path / "p.onnx", example_inputs("mixtral"))  # portable by default
    domains = {n.domain for n in onnx_pkg.load(str(path)).graph.node}
    assert domains <= {"", "ai.onnx"}
    assert moefx.export.fused_blocks(path) == {"model.layers.0.mlp": "not asked (fused=False)",
                                               "model.layers.1.mlp": "not asked (fused=False)"}  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["logits"]


def test_weights_beyond_the_threshold_go_to_an_external_data_file(compiled_tiny, monkeypatch, tmp_path):
    model = compiled_tiny("olmoe", **VARIANTS["m-smoe pruned"])
    small = moefx.export.onnx(model, tmp_path / "small.onnx", example_inputs("olmoe"), verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx"]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(sys.modules["moefx.export.onnx"], "EXTERNAL_DATA_BYTES", weights // 2)
    path = moefx.export.onnx(model, tmp_path / "m.onnx", example_inputs("olmoe"))  # parity runs it from both files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "small.onnx"]
    assert moefx.export.file_bytes(path) == path.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert moefx.export.file_bytes(path) == pytest.approx(moefx.export.file_bytes(small), rel=0.01)


def test_static_export_runs_on_the_example_shape(compiled_tiny, tmp_path):
    path = moefx.export.onnx(
        compiled_tiny("qwen3_moe", **VARIANTS["m-smoe pruned"]), tmp_path / "s.onnx", example_inputs("qwen3_moe"),
        dynamic=False, verify=False,
    )  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {k: v.numpy() for k, v in example_inputs("qwen3_moe").items()}
    assert session.run(None, feed)[0].shape == (2, 8, 96)


def test_parity_check_skips_only_rows_whose_routing_is_tied(compiled_tiny):
    model = compiled_tiny("mixtral", **VARIANTS["merge-refit exact"])
    serving, inputs = serving_model(model, example_inputs("mixtral"))
    reference = ParityReference.of(serving, serving.check_inputs(inputs))
    assert not reference.tied.any()  # random routers: no near-ties

    def differs_in_row(row, expected):
        def run(_):
            out = expected.clone()
            out[row] += 1.0
            return out

        return run

    with pytest.raises(moefx.MoefxError, match="differs from eager"):
        check_parity("test", reference, differs_in_row(0, reference.expected[0]))
    for m in serving.modules():  # duplicate each router's top logit: every token is tied at the k boundary
        if is_canonical_block(m):
            with torch.no_grad():
                m.router.weight[:] = m.router.weight[0]
    tied = ParityReference.of(serving, serving.check_inputs(inputs))
    assert tied.tied.all()
    with pytest.raises(moefx.MoefxError, match="every row of the check inputs has a routing tie"):
        check_parity("test", tied, differs_in_row(0, tied.expected[0]))


def test_onnx_parity_is_checked_against_the_model_before_lowering(compiled_tiny, monkeypatch, tmp_path):
    """A wrong lowering cannot pass: the reference is eager before the fused rewrite."""
    original = LowerToFusedMoE.call

    def twice_the_output(self, graph_module):  # a broken lowering: the block's output doubled
        result = original(self, graph_module)
        output = next(n for n in graph_module.graph.nodes if n.op == "output")
        with graph_module.graph.inserting_before(output):
            doubled = graph_module.graph.call_function(torch.mul, (output.args[0], 2.0))
        output.args = (doubled,)
        graph_module.recompile()
        return result

    monkeypatch.setattr(LowerToFusedMoE, "call", twice_the_output)
    with pytest.raises(moefx.MoefxError, match="differs from eager"):
        moefx.export.onnx(compiled_tiny("mixtral"), tmp_path / "m.onnx", example_inputs("mixtral"), fused=True)
    assert list(tmp_path.iterdir()) == []


def test_an_exporter_failure_names_its_cause_and_writes_nothing(compiled_tiny, monkeypatch, tmp_path):
    def export(*args, **kwargs):
        try:
            raise ValueError("No ONNX function found for aten.unsqueeze with a complex-valued input")
        except ValueError as cause:
            raise RuntimeError("Failed to convert. \x1b[96mThis is step 3/3\x1b[0m of exporting") from cause

    monkeypatch.setattr(torch.onnx, "export", export)
    with pytest.raises(moefx.MoefxError, match="ONNX export of MixtralForCausalLM failed: No ONNX function found"):
        moefx.export.onnx(compiled_tiny("mixtral"), tmp_path / "m.onnx", example_inputs("mixtral"))
    assert list(tmp_path.iterdir()) == []


def test_a_file_onnx_runtime_cannot_run_on_a_new_shape_gets_one_line_and_is_not_written(
    compiled_tiny, monkeypatch, tmp_path
):
    def run(self, *args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Reshape")

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", run)
    with pytest.raises(moefx.MoefxError, match=r"the ONNX artifact cannot run on the check inputs \(2x8, ") as error:
        moefx.export.onnx(compiled_tiny("mixtral"), tmp_path / "m.onnx", example_inputs("mixtral"))
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


class _LengthAsPythonInt(nn.Module):
    """Reads its sequence length as a Python int, which a trace keeps as the traced length."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = int(input_ids.shape[1])
        return self.model(input_ids=input_ids[:, :length], attention_mask=attention_mask).logits


@pytest.mark.parametrize("export", [moefx.export.onnx, moefx.export.pt2])
def test_an_export_whose_code_fixes_a_dynamic_axis_gets_one_line_and_is_not_written(compiled_tiny, export, tmp_path):
    model = _LengthAsPythonInt(compiled_tiny("mixtral"))  # traced with 8 + 3 positions
    with pytest.raises(moefx.MoefxError, match="fixed axis 1 of input_ids at 11 .* export with dynamic=False") as error:
        export(model, tmp_path / "m.onnx", example_inputs("mixtral"))
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), width=st.integers(2, 9), seed=st.integers(0, 2**16), data=st.data())
def test_the_onnx_reference_breaks_topk_ties_as_onnx_runtime_does(rows, width, seed, data):
    # scores from {0, 1, 2}: ties everywhere, as a ReLU'd sparse-attention indexer gives
    k = data.draw(st.integers(1, width))
    scores = torch.randint(0, 3, (rows, width), generator=torch.Generator().manual_seed(seed)).float()
    helper, tensor = onnx_pkg.helper, onnx_pkg.TensorProto
    inputs = [helper.make_tensor_value_info("x", tensor.FLOAT, [rows, width]),
              helper.make_tensor_value_info("k", tensor.INT64, [1])]  # fmt: skip
    outputs = [helper.make_tensor_value_info("values", tensor.FLOAT, None),
               helper.make_tensor_value_info("index", tensor.INT64, None)]  # fmt: skip
    topk = helper.make_node("TopK", ["x", "k"], ["values", "index"], axis=-1)
    graph = helper.make_graph([topk], "topk", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values, index = session.run(None, {"x": scores.numpy(), "k": torch.tensor([k]).numpy()})
    with TopkTiesToLowerIndex():
        eager_values, eager_index = torch.topk(scores, k)
    assert eager_index.tolist() == index.tolist()
    assert torch.equal(eager_values, torch.from_numpy(values))
