"""ONNX export with a key/value cache, and greedy decoding of it in ONNX Runtime against transformers' generate."""

from __future__ import annotations

import functools

import onnx as onnx_pkg
import pytest
import torch

import moefx
import moefx.export
from moefx.export.generation import OnnxGenerator
from moefx.zoo import example_inputs, tiny_model

DECODERS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
NEW_TOKENS = 16


def _decoder_model(compiled_tiny, family: str, variant: str):
    """The original, or the default method at 50% experts (exported fused or with int4 experts)."""
    return compiled_tiny(family) if variant == "original" else compiled_tiny(family, experts=0.5)


def _prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 9 tokens, the first left-padded by 3."""
    ids = torch.randint(3, 96, (3, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def _cases():
    cases = []
    for family in DECODERS:
        for variant in ("original", "default fused", "default int4"):
            default = (family, variant) == ("mixtral", "default fused")
            cases.append(pytest.param(family, variant, marks=[] if default else [pytest.mark.slow],
                                      id=f"{family}-{variant}"))  # fmt: skip
    return cases


@pytest.fixture(scope="session")
def decoder_file(compiled_tiny, tmp_path_factory):
    """``decoder_file(family, variant)``: the kv-cache ONNX file of that model (exported once a session)."""

    @functools.cache
    def export(family: str, variant: str):
        model = _decoder_model(compiled_tiny, family, variant)
        options = {"default fused": {"fused": True}, "default int4": {"expert_bits": 4}}.get(variant, {})
        path = tmp_path_factory.mktemp("decoders") / f"{family}-{variant.replace(' ', '-')}.onnx"
        return moefx.export.onnx(model, path, example_inputs(family), kv_cache=True, **options)

    return export


@pytest.mark.parametrize("family, variant", _cases())
def test_greedy_onnx_generation_equals_transformers_generate(compiled_tiny, family, variant, decoder_file):
    model = _decoder_model(compiled_tiny, family, variant)
    path = decoder_file(family, variant)
    graph = onnx_pkg.load(str(path)).graph
    layers = model.config.num_hidden_layers
    cache = [f"{layer}.{part}" for layer in range(layers) for part in ("key", "value")]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids",
                                             *(f"past_key_values.{c}" for c in cache)]  # fmt: skip
    assert [o.name for o in graph.output] == ["logits", *(f"present.{c}" for c in cache)]
    fused = [n for n in graph.node if n.domain == "com.microsoft" and n.op_type in ("MoE", "QMoE")]
    assert len(fused) == (0 if variant == "original" else len(moefx.export.fused_blocks(path)))
    # the eager reference of a quantized file computes with the same rounded expert weights
    reference = moefx.export.with_quantized_experts(model, example_inputs(family), 4) if "int4" in variant else model
    ids, mask = _prompt()
    generator = OnnxGenerator(path)
    expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    got = generator.generate(ids, NEW_TOKENS, attention_mask=mask)
    assert got.shape == (3, 9 + NEW_TOKENS) and torch.equal(got, expected)
    # stopping: a row that reaches the end-of-sequence token continues with padding, as in transformers
    eos = int(expected[1, 9 + 2])
    expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  eos_token_id=eos, pad_token_id=0)  # fmt: skip
    assert torch.equal(generator.generate(ids, NEW_TOKENS, attention_mask=mask, eos_token_id=eos, pad_token_id=0),
                       expected)  # fmt: skip


def test_without_a_mask_padding_tokens_mark_padding_as_in_transformers(compiled_tiny, decoder_file):
    model, path = compiled_tiny("mixtral", experts=0.5), decoder_file("mixtral", "default fused")
    ids, _ = _prompt()
    ids[0, :3] = model.generation_config.pad_token_id  # left padding, given without an attention mask
    expected = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(OnnxGenerator(path).generate(ids, NEW_TOKENS), expected)


def test_several_end_tokens_and_no_padding_token_as_in_transformers(compiled_tiny, decoder_file):
    model, path = compiled_tiny("mixtral", experts=0.5), decoder_file("mixtral", "default fused")
    ids, mask = _prompt()
    free = OnnxGenerator(path).generate(ids, NEW_TOKENS, attention_mask=mask, eos_token_id=[])  # never stops
    eos = [int(free[0, 9 + 1]), int(free[2, 9 + 4])]  # rows 0 and 2 end early
    pad = model.generation_config.pad_token_id
    model.generation_config.pad_token_id = None  # transformers then pads with the first end token
    try:
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  eos_token_id=eos)  # fmt: skip
    finally:
        model.generation_config.pad_token_id = pad
    generator = OnnxGenerator(path)
    generator.pad_token_id = None
    assert torch.equal(generator.generate(ids, NEW_TOKENS, attention_mask=mask, eos_token_id=eos), expected)


def test_the_steps_are_the_pieces_of_generate(decoder_file):
    generator = OnnxGenerator(decoder_file("mixtral", "default fused"))
    assert not generator.session.get_session_options().enable_mem_pattern  # planned per shape; steps change it
    ids, mask = _prompt()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = generator.step(ids, mask, positions, generator.empty_cache(3))
    assert logits.shape == (3, 9, 96) and all(v.shape[2] == 9 for v in cache.values())
    token = logits[:, -1:].argmax(dim=-1)
    logits, cache = generator.step(token, torch.cat([mask, torch.ones_like(token)], 1), positions[:, -1:] + 1, cache)
    assert logits.shape == (3, 1, 96) and all(v.shape[2] == 10 for v in cache.values())
    two = generator.generate(ids, 2, attention_mask=mask, eos_token_id=[])
    assert torch.equal(logits[:, -1].argmax(-1), two[:, -1])


def test_onnx_runtime_reads_the_key_cache_without_copying_it_into_a_transpose(decoder_file, tmp_path):
    """Eager attention's ``q @ k^T``: ONNX Runtime's optimizer folds the key's transpose into the MatMul."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(decoder_file("mixtral", "default fused")), options,
                                 providers=["CPUExecutionProvider"])  # fmt: skip
    graph = onnx_pkg.load(options.optimized_model_filepath, load_external_data=False).graph
    producer = {out: n for n in graph.node for out in n.output}

    def reads_the_key_cache(name: str) -> bool:  # directly or through views (and GQA's repeat of the heads)
        node = producer.get(name)
        return name.startswith("present.") and name.endswith(".key") or (
            node is not None and node.op_type in ("Reshape", "Unsqueeze", "Expand")
            and reads_the_key_cache(node.input[0]))  # fmt: skip

    scores = [n for n in graph.node if n.op_type == "FusedMatMul" and reads_the_key_cache(n.input[1])]
    assert len(scores) == 2  # one per layer, the key transposed inside the MatMul
    assert not [n for n in graph.node if n.op_type == "Transpose" and reads_the_key_cache(n.input[0])]


def test_a_one_row_example_exports_a_decoder_for_any_batch_and_warns_of_ignored_generation_settings(tmp_path):
    model = tiny_model("mixtral")
    model.generation_config.repetition_penalty = 1.05  # changes greedy tokens in transformers' generate
    path = moefx.export.onnx(model, tmp_path / "m.onnx", example_inputs("mixtral", batch=1), kv_cache=True)
    with pytest.warns(moefx.MoefxWarning, match="does not apply the model's generation settings.*repetition_penalty"):
        generator = OnnxGenerator(path)
    ids, mask = _prompt()
    assert generator.generate(ids, 2, attention_mask=mask).shape == (3, 11)  # three rows, from a one-row example


@pytest.mark.parametrize("family", ["switch", "hand_written"])  # encoder-decoder; no transformers cache
def test_kv_cache_export_refuses_a_model_that_is_not_a_cached_decoder(family, tmp_path):
    with pytest.raises(moefx.ConfigError, match="kv_cache=True exports a decoder-only causal LM.*not one") as error:
        moefx.export.onnx(tiny_model(family), tmp_path / "m.onnx", example_inputs(family), kv_cache=True)
    assert "\n" not in str(error.value) and list(tmp_path.iterdir()) == []


def test_the_generator_refuses_a_file_without_a_cache(tmp_path):
    ids = onnx_pkg.helper.make_tensor_value_info("input_ids", onnx_pkg.TensorProto.INT64, ["batch", "seq"])
    logits = onnx_pkg.helper.make_tensor_value_info("logits", onnx_pkg.TensorProto.INT64, ["batch", "seq"])
    graph = onnx_pkg.helper.make_graph([onnx_pkg.helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                                       [ids], [logits])  # fmt: skip
    path = tmp_path / "full_sequence.onnx"
    onnx_pkg.save(onnx_pkg.helper.make_model(graph, opset_imports=[onnx_pkg.helper.make_opsetid("", 17)]), path)
    with pytest.raises(moefx.ConfigError, match="takes no key/value cache: export it with .*kv_cache=True"):
        OnnxGenerator(path)
