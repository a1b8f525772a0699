import json
import subprocess
import sys

import pytest
import torch

import moefx
import moefx.export
from moefx.capture import max_output_diff
from moefx.zoo import example_inputs, tiny_model, tiny_transformers_model


def _same_outputs(a, b, family):
    inputs = example_inputs(family, batch=3, seq=9, seed=7)
    with torch.no_grad():
        return max_output_diff(a(**inputs), b(**inputs))


@pytest.mark.parametrize(
    "family, options",
    [
        ("mixtral", {"experts": 0.5}),
        ("qwen2_moe", {"experts": 0.25, "router": "pruned"}),
        ("gpt_oss", {"experts": 0.5, "method": "mc-smoe", "rank": 4}),
        ("deepseek_v3", {"experts": 0.5, "method": "reap"}),
        ("switch", {"experts": 0.5, "method": "mc-smoe", "rank": 4, "sparse_axis": "rows"}),
    ],
)
def test_save_load_round_trip(compiled_tiny, family, options, tmp_path):
    compressed = compiled_tiny(family, **options)
    directory = moefx.save(compressed, tmp_path / "ckpt", example_inputs(family))
    assert sorted(p.name for p in directory.iterdir()) == ["model.safetensors", "moefx.json", "report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no scratch left behind
    loaded = moefx.load(directory)
    assert type(loaded) is type(compressed)
    assert _same_outputs(compressed, loaded, family) <= 1e-5  # MKL threads vary with load
    size = sum(p.numel() for p in loaded.parameters())
    assert size == sum(p.numel() for p in compressed.parameters())
    description = json.loads((directory / "moefx.json").read_text())
    assert set(description["blocks"]) == {b.name for b in compressed.moefx_report.blocks}


def test_the_checkpoint_is_smaller_than_the_original(compiled_tiny, tmp_path):
    original = tiny_model("mixtral")
    original.save_pretrained(tmp_path / "original")
    moefx.save(compiled_tiny("mixtral", experts=0.25, router="pruned"), tmp_path / "small", example_inputs("mixtral"))
    big = (tmp_path / "original" / "model.safetensors").stat().st_size
    small = (tmp_path / "small" / "model.safetensors").stat().st_size
    experts = sum(p.numel() for n, p in original.named_parameters() if "experts" in n) * 4
    assert big - small >= 0.7 * experts


def test_a_non_transformers_model_loads_into_its_architecture(compiled_tiny, tmp_path):
    compressed = compiled_tiny("hand_written", experts=0.5, method="mc-smoe", rank=4)
    moefx.save(compressed, tmp_path / "ckpt", example_inputs("hand_written"))
    with pytest.raises(moefx.CheckpointError, match="pass model="):
        moefx.load(tmp_path / "ckpt")
    loaded = moefx.load(tmp_path / "ckpt", model=tiny_model("hand_written", seed=5))
    assert _same_outputs(compressed, loaded, "hand_written") <= 1e-5


LOAD_WITHOUT_MOEFX = """
import sys, json, torch
class NoMoefx:
    def find_spec(self, name, path=None, target=None):
        if name == "moefx" or name.startswith("moefx."):
            raise ImportError("moefx is not installed here")
sys.meta_path.insert(0, NoMoefx())
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    print(json.dumps(model(input_ids=ids).logits.tolist()))
assert not any(m == "moefx" or m.startswith("moefx.") for m in sys.modules)
"""


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_uniform_pruned_checkpoint_loads_with_plain_transformers(compiled_tiny, family, tmp_path):
    compressed = compiled_tiny(family, experts=0.5, router="pruned", adaptive=False)
    moefx.export.save_pretrained(compressed, tmp_path / "hf", example_inputs(family))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert 4 in config.values() and config.get("num_local_experts", config.get("num_experts")) == 4
    ids = example_inputs(family, batch=2, seq=7, seed=3)["input_ids"]
    run = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_MOEFX, str(tmp_path / "hf"), json.dumps(ids.tolist())],
                         capture_output=True, text=True, check=True)  # fmt: skip
    logits = torch.tensor(json.loads(run.stdout))
    with torch.no_grad():
        assert torch.allclose(logits, compressed(input_ids=ids).logits, atol=1e-5)


def test_dbrx_checkpoint_keeps_its_2d_expert_layout_and_nested_expert_count(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_transformers_model("dbrx")
    batches = [example_inputs("dbrx", seed=s) for s in range(2)]
    compressed = moefx.compile(model, batches, experts=0.5, router="pruned")
    moefx.export.save_pretrained(compressed, tmp_path / "hf", batches[0])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert plain.config.ffn_config.moe_num_experts == 4
    assert plain.transformer.blocks[0].ffn.experts.mlp.w1.shape == (4 * 48, 32)
    with torch.no_grad():
        assert max_output_diff(plain(**batches[0]).logits, compressed(**batches[0]).logits) <= 1e-5


def test_identity_experts_keep_their_router_rows_through_both_checkpoints(tmp_path):
    # LongCat-Flash: REAP keeps 4 of 8 experts; the pruned router keeps its 2 identity experts' rows after them
    from transformers import AutoModelForCausalLM

    model = tiny_transformers_model("longcat_flash")
    batches = [example_inputs("longcat_flash", seed=s) for s in range(2)]
    compressed = moefx.compile(model, batches, experts=0.5, method="reap", router="pruned")
    moefx.save(compressed, tmp_path / "moefx", batches[0])
    moefx.export.save_pretrained(compressed, tmp_path / "hf", batches[0])
    loaded = moefx.load(tmp_path / "moefx", tiny_transformers_model("longcat_flash"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (plain.config.n_routed_experts, plain.config.zero_expert_num) == (4, 2)
    assert plain.model.layers[0].mlp.router.classifier.weight.shape == (6, 32)
    with torch.no_grad():
        expected = compressed(**batches[0]).logits
        assert max_output_diff(loaded(**batches[0]).logits, expected) <= 1e-5
        assert max_output_diff(plain(**batches[0]).logits, expected) <= 1e-5


def test_experts_routed_outside_their_block_round_trip_and_reach_transformers_only_unmerged(tmp_path):
    # Gemma 4: the router module beside the experts is left as it is, so merged experts cannot be a plain model
    model = tiny_transformers_model("gemma4_text")
    batches = [example_inputs("gemma4_text", seed=s) for s in range(2)]
    with pytest.warns(moefx.MoefxWarning, match="chosen by a router outside the block"):  # a pruned router
        half = moefx.compile(model, batches, experts=0.5, method="prune-frequency")
    moefx.save(half, tmp_path / "moefx", batches[0])
    with pytest.raises(moefx.MoefxError, match=r"^model.layers.0.experts's experts are chosen by a router outside it"):
        moefx.export.to_transformers(half, batches[0])
    plain = moefx.export.to_transformers(moefx.compile(model, batches, experts=1.0), batches[0])
    with torch.no_grad():
        assert max_output_diff(moefx.load(tmp_path / "moefx")(**batches[0]).logits, half(**batches[0]).logits) <= 1e-6
        assert max_output_diff(plain(**batches[0]).logits, model(**batches[0]).logits) <= 1e-5


def test_save_pretrained_refuses_what_transformers_cannot_hold(compiled_tiny, tmp_path):
    with pytest.raises(moefx.MoefxError, match="exact router"):
        moefx.export.save_pretrained(compiled_tiny("mixtral", experts=0.5), tmp_path / "a", example_inputs("mixtral"))
    with pytest.raises(moefx.MoefxError, match="LoSparse"):
        moefx.export.save_pretrained(
            compiled_tiny("mixtral", experts=0.5, method="mc-smoe", rank=4), tmp_path / "b", example_inputs("mixtral")
        )
    assert not list(tmp_path.iterdir())


@pytest.fixture
def saved(compiled_tiny, tmp_path):
    return moefx.save(compiled_tiny("olmoe", experts=0.5), tmp_path / "ckpt", example_inputs("olmoe"))


def test_truncated_weights_give_a_clear_error(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(moefx.CheckpointError, match="corrupt or truncated") as info:
        moefx.load(saved)
    assert "\n" not in str(info.value)


def test_corrupt_description_gives_a_clear_error(saved):
    (saved / "moefx.json").write_text("{not json")
    with pytest.raises(moefx.CheckpointError, match="moefx.json is corrupt"):
        moefx.load(saved)


def test_missing_data_file_gives_a_clear_error(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(moefx.CheckpointError, match="model.safetensors is missing"):
        moefx.load(saved)


def test_wrong_path_gives_a_clear_error(tmp_path):
    with pytest.raises(moefx.CheckpointError, match="does not exist"):
        moefx.load(tmp_path / "nowhere")


def test_save_refuses_to_overwrite_and_needs_a_compressed_model(compiled_tiny, saved, tmp_path):
    with pytest.raises(moefx.CheckpointError, match="already exists"):
        moefx.save(compiled_tiny("olmoe", experts=0.5), saved, example_inputs("olmoe"))
    with pytest.raises(moefx.CheckpointError, match="compressed by moefx"):
        moefx.save(tiny_model("olmoe"), tmp_path / "plain", example_inputs("olmoe"))


def test_a_failed_save_leaves_nothing_behind(compiled_tiny, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(moefx.export.checkpoint, "save_model", broken)
    with pytest.raises(OSError):
        moefx.save(compiled_tiny("olmoe", experts=0.5), tmp_path / "ckpt", example_inputs("olmoe"))
    assert not list(tmp_path.iterdir())


def test_a_failed_parity_check_raises_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(moefx.export.serving, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(moefx.MoefxError, match=r"differs from eager on new input shapes: logits\[") as info:
        moefx.export.pt2(tiny_model("olmoe"), tmp_path / "m.pt2", example_inputs("olmoe"))
    assert "verify=False" in str(info.value)
    assert not list(tmp_path.iterdir())
    moefx.export.pt2(tiny_model("olmoe"), tmp_path / "m.pt2", example_inputs("olmoe"), verify=False)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]


def test_exporting_into_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(moefx.CheckpointError, match="does not exist"):
        moefx.export.onnx(tiny_model("olmoe"), tmp_path / "no" / "m.onnx", example_inputs("olmoe"))
