"""Streaming compression of sharded checkpoints, and the layer-wise driver it shares with compile(sequential=True)."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import moefx
from moefx.capture import max_output_diff
from moefx.export.checkpoint import transformers_block_state
from moefx.passes.detect import find_moe_blocks
from moefx.stream import compress_checkpoint, output_format
from moefx.zoo import example_inputs, tiny_model, tiny_transformers_model

DECODERS = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"]


def _decoders(default: set[str]) -> list:
    """DECODERS, those outside ``default`` marked slow (to keep the default run within its budget)."""
    return [pytest.param(f, marks=[] if f in default else [pytest.mark.slow]) for f in DECODERS]


def _calibration(family):
    batches = [example_inputs(family, batch=2, seq=8, seed=s) for s in range(3)]
    batches[0]["attention_mask"][0, :3] = 0  # left padding: left out of every statistic on both paths
    return batches


def _checkpoint(model, directory):
    model.save_pretrained(directory, max_shard_size="20KB")  # several shards, hub names and layouts
    assert len(set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    return directory


def _logits(model, family):
    with torch.no_grad():
        return model(**example_inputs(family, batch=2, seq=8, seed=9)).logits


@pytest.mark.parametrize("family", _decoders({"deepseek_v3"}))  # dense first layer, shared experts, groups
def test_streaming_a_sharded_checkpoint_equals_sequential_compile_in_memory(family, tmp_path):
    model = tiny_model(family)
    calib = _calibration(family)
    in_memory = moefx.compile(model, calib, experts=0.5, sequential=True)
    out = tmp_path / "out"
    report = compress_checkpoint(_checkpoint(model, tmp_path / "ckpt"), calib, out, experts=0.5, max_shard_bytes=2**14)
    streamed = moefx.load(out)
    assert max_output_diff(_logits(streamed, family), _logits(in_memory, family)) <= 1e-5
    assert [b.groups for b in report.blocks] == [b.groups for b in in_memory.moefx_report.blocks]
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]  # no scratch left beside the output
    blocks = tuple(f"{b.name}." for b in report.blocks)
    outside = {k: v for k, v in model.state_dict().items() if not k.startswith(blocks)}
    assert any(k.startswith("model.layers.0.mlp.") for k in outside) == (family == "deepseek_v3")  # dense layer 0
    assert all(torch.equal(streamed.state_dict()[k], v) for k, v in outside.items())  # passed through unchanged


@pytest.mark.parametrize("family", _decoders({"mixtral"}))
def test_a_pruned_router_streams_to_a_plain_transformers_checkpoint_equal_to_moefx_result(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    calib = _calibration(family)
    in_memory = moefx.compile(model, calib, experts=0.5, router="pruned", sequential=True)
    ckpt = _checkpoint(model, tmp_path / "ckpt")
    (ckpt / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    compress_checkpoint(ckpt, calib, out, experts=0.5, router="pruned", max_shard_bytes=2**14)
    if family == "deepseek_v3":  # its group-limited routing keeps the exact router: moefx's own format
        assert output_format(out) == "moefx" and not (out / "config.json").exists()
        streamed = moefx.load(out)
    else:
        assert output_format(out) == "transformers" and not (out / "moefx.json").exists()
        streamed = AutoModelForCausalLM.from_pretrained(out)
        assert all(not isinstance(m, torch.fx.GraphModule) for m in streamed.modules())
        assert streamed.config.to_dict() != model.config.to_dict()  # fewer experts
    assert max_output_diff(_logits(streamed, family), _logits(in_memory, family)) <= 1e-5
    assert (out / "tokenizer.json").read_text() == "{}"


def test_a_plain_block_that_does_not_compute_what_moefx_computed_is_not_written(tmp_path, monkeypatch):
    from moefx import stream

    def experts_out_of_order(plain, name, graph):
        state = transformers_block_state(plain, name, graph)
        key = next(k for k in state if k.endswith("experts.down_proj"))
        state[key] = state[key].roll(1, dims=0)  # each expert's output projection given to the next
        return state

    monkeypatch.setattr(stream, "transformers_block_state", experts_out_of_order)
    directory = _checkpoint(tiny_model("mixtral"), tmp_path / "ckpt")
    with pytest.raises(moefx.CheckpointError, match=r"plain transformers form of model\.layers\.0\.mlp differs"):
        compress_checkpoint(directory, _calibration("mixtral"), tmp_path / "out", experts=0.5, router="pruned")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="read-ahead needs posix_fadvise")
def test_loading_a_layer_reads_exactly_the_next_layers_tensors_ahead(tmp_path, monkeypatch):
    from safetensors import safe_open

    from moefx.stream import CheckpointModel

    directory = _checkpoint(tiny_model("mixtral"), tmp_path / "ckpt")
    source = CheckpointModel(directory)
    advised = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: advised.append(
        (os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice)))  # fmt: skip
    source.load_layer(0)
    ranges = []
    for path, offset, length, advice in advised:
        assert advice == os.POSIX_FADV_WILLNEED
        with open(path, "rb") as file:
            file.seek(offset)
            ranges.append(file.read(length))
    expected = []
    for name in source.layer_keys[1]:
        with safe_open(str(directory / source.weight_map[name]), framework="pt") as shard:
            expected.append(shard.get_tensor(name).numpy().tobytes())
    assert sorted(ranges) == sorted(expected)
    assert all(name.startswith("model.layers.1.") for name in source.layer_keys[1])


def test_plain_output_uses_the_hub_tensor_names(tmp_path):
    model = tiny_model("mixtral")
    out = tmp_path / "out"
    compress_checkpoint(_checkpoint(model, tmp_path / "ckpt"), _calibration("mixtral"), out, experts=0.5,
                        router="pruned")  # fmt: skip
    names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    hub = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())["weight_map"]
    kept = {n.replace(".experts.3.", ".experts.X.") for n in names if ".experts.3." in n}
    assert kept and kept <= {n.replace(".experts.3.", ".experts.X.") for n in hub}  # per-expert, as on the hub
    assert not any(".experts.4." in n for n in names)  # 4 of 8 experts kept


def test_layerwise_compression_calibrates_each_layer_on_the_compressed_layers_before_it():
    model, calib = tiny_model("mixtral"), _calibration("mixtral")
    sequential = moefx.compile(model, calib, experts=0.5, sequential=True)
    joint = moefx.compile(model, calib, experts=0.5)
    first, second = "model.layers.0.mlp", "model.layers.1.mlp"
    state = {k: v for k, v in sequential.state_dict().items()}
    joint_state = joint.state_dict()
    # the first layer sees the same inputs either way; the second sees the compressed first layer's outputs
    assert all(torch.allclose(v, joint_state[k], atol=1e-6) for k, v in state.items() if k.startswith(first))
    assert not all(torch.allclose(v, joint_state[k], atol=1e-6) for k, v in state.items() if k.startswith(second))
    assert [b.kept for b in sequential.moefx_report.blocks] == [4, 4]


def test_bfloat16_checkpoints_stream_to_bfloat16(tmp_path):
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    out = tmp_path / "out"
    compress_checkpoint(_checkpoint(model, tmp_path / "ckpt"), _calibration("qwen3_moe"), out, experts=0.5)
    loaded = moefx.load(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert _logits(loaded, "qwen3_moe").isfinite().all()


def _broken(tmp_path, damage):
    directory = _checkpoint(tiny_model("mixtral"), tmp_path / "ckpt")
    index = directory / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    damage(directory, index, weight_map)
    return directory


def _drop_shard(directory, index, weight_map):
    (directory / weight_map["model.layers.1.post_attention_layernorm.weight"]).unlink()


def _misplace_tensor(directory, index, weight_map):
    name = "model.layers.1.post_attention_layernorm.weight"
    others = sorted(set(weight_map.values()) - {weight_map[name]})
    weight_map[name] = others[0]
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _truncate_shard(directory, index, weight_map):
    path = directory / weight_map["model.layers.1.post_attention_layernorm.weight"]
    path.write_bytes(path.read_bytes()[:50])


def _drop_from_index(directory, index, weight_map):
    del weight_map["model.layers.1.post_attention_layernorm.weight"]
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop_shard, r"model-000\d\d-of-000\d\d\.safetensors is missing: the index names it"),
        (_misplace_tensor, r"lacks model\.layers\.1\.post_attention_layernorm\.weight, which .* places there"),
        (_truncate_shard, r"is corrupt or truncated"),
        (_drop_from_index, r"has no weight for model\.layers\.1\.post_attention_layernorm\.weight: .*incomplete"),
    ],
)
def test_a_broken_checkpoint_gets_one_line_naming_the_file(tmp_path, damage, message):
    directory = _broken(tmp_path, damage)
    with pytest.raises(moefx.CheckpointError, match=message) as error:
        compress_checkpoint(directory, _calibration("mixtral"), tmp_path / "out", experts=0.5)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_capture_runs_once_per_layer_structure_and_rereads_a_layer_it_does_not_fit(monkeypatch):
    from moefx import api

    model = tiny_model("mixtral")
    model.model.layers.append(copy.deepcopy(model.model.layers[1]))
    model.config.num_hidden_layers = 3
    model.model.layers[2].mlp.gate.top_k = 1  # same structure, another routing: the carried reading fails to verify
    captures = []
    monkeypatch.setattr(api, "find_moe_blocks", lambda m, x: captures.append(m) or find_moe_blocks(m, x))
    compressed = moefx.compile(model, _calibration("mixtral"), experts=0.5, sequential=True)
    assert len(captures) == 2  # layer 0, then layer 2 afresh; layer 1 reused layer 0's reading
    assert [b.name for b in compressed.moefx_report.blocks] == [f"model.layers.{i}.mlp" for i in range(3)]
    graphs = [compressed.get_submodule(f"model.layers.{i}.mlp").meta["moefx_block"] for i in range(3)]
    assert [g.top_k for g in graphs] == [2, 2, 1]


def test_layerwise_warnings_name_blocks_by_their_path_in_the_model():
    with pytest.warns(moefx.MoefxWarning) as caught:
        moefx.compile(tiny_model("deepseek_v3"), _calibration("deepseek_v3"), experts=0.5, router="pruned",
                      sequential=True)  # fmt: skip
    messages = [str(w.message) for w in caught if "router='pruned' is not possible" in str(w.message)]
    assert messages and all(m.startswith("model.layers.") for m in messages)


def test_layers_that_take_their_arguments_as_keywords_compress_layer_by_layer():
    # DeepSeek-V4's decoder layer takes the attention's arguments through **kwargs, and input_ids for its
    # hash-routed blocks (experts chosen by token id): the layer-wise driver passes both on
    model = tiny_transformers_model("deepseek_v4")
    calib = _calibration("deepseek_v4")
    in_memory = moefx.compile(model, calib, experts=0.5)
    layerwise = moefx.compile(model, calib, experts=0.5, sequential=True)
    assert [b.name for b in layerwise.moefx_report.blocks] == [b.name for b in in_memory.moefx_report.blocks]
    assert len(in_memory.moefx_report.blocks) == 2  # the hash-routed first layer's block too
    # the first layer sees the same inputs either way (the second sees the compressed first layer's outputs)
    first, joint = "model.layers.0.", in_memory.state_dict()
    assert all(torch.allclose(v, joint[k], atol=1e-6) for k, v in layerwise.state_dict().items() if k.startswith(first))
    same = moefx.compile(model, calib, experts=1.0, sequential=True)
    assert max_output_diff(_logits(same, "deepseek_v4"), _logits(model, "deepseek_v4")) <= 1e-5


def test_sequential_needs_a_decoder_stack_and_per_layer_options():
    from moefx.zoo import HandWrittenMoELM

    batches = [torch.randint(0, 64, (2, 8))]
    with pytest.raises(moefx.ConfigError, match="one stack of decoder layers"):
        moefx.compile(HandWrittenMoELM(layers=2), batches, sequential=True)
    with pytest.raises(moefx.ConfigError, match="adaptive allocation needs every layer"):
        moefx.compile(tiny_model("mixtral"), _calibration("mixtral"), sequential=True, adaptive=True)


@pytest.mark.parametrize("family, carried", [("zaya", "prev_router_hidden_states"), ("gemma4_text", "per_layer_input")])
def test_layers_that_take_more_than_their_hidden_states_from_the_model_are_refused_in_one_line(family, carried):
    # Zaya's router state comes from the layer before, Gemma 4's per-layer inputs from the model: run alone on
    # cached hidden states, a layer would compute something else
    with pytest.raises(moefx.ConfigError, match=f"also takes {carried}(, |, which)") as info:
        moefx.compile(tiny_transformers_model(family), _calibration(family), experts=0.5, sequential=True)
    assert "\n" not in str(info.value) and str(info.value).endswith("compile it with sequential=False")


# the peak is VmHWM, this process's own (ru_maxrss would carry over the parent's resident size at fork),
# reset between the two checkpoints by writing 5 to clear_refs
_PEAK_SCRIPT = """
import sys, torch
from moefx.stream import compress_checkpoint
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 256, (8, 32), generator=g)
batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(4)]
for checkpoint in sys.argv[1:]:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    compress_checkpoint(checkpoint, batches, checkpoint + ".out", experts=0.5, router="pruned")
    print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def _olmoe_checkpoint(layers, directory):
    """An OLMoE checkpoint of ``layers`` layers of ~100 MB each in float32 (well above noise); returns the
    float32 bytes of one layer, as compressed."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_experts=16,
        num_experts_per_tok=4,
        vocab_size=256,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=layers,
    )
    torch.manual_seed(0)
    model = OlmoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="20MB")
    return 4 * sum(p.numel() for p in model.model.layers[0].parameters())


def test_streaming_peak_memory_does_not_grow_with_depth(tmp_path):
    layer_bytes = _olmoe_checkpoint(2, tmp_path / "shallow")
    _olmoe_checkpoint(4, tmp_path / "deep")
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "shallow"), str(tmp_path / "deep")],
                          capture_output=True, text=True, check=True)  # fmt: skip
    shallow, deep = (int(line) for line in done.stdout.strip().splitlines()[-2:])
    assert deep - shallow < layer_bytes, (shallow, deep, layer_bytes)
