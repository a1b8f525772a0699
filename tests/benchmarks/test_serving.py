"""benchmarks/serving.py's probe and profile on a tiny OLMoE with the serving benchmark's vocabulary."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import moefx
import moefx.export
from benchmarks import serving


@pytest.fixture(scope="module")
def decoder_files(tmp_path_factory) -> dict[tuple[str, str], str]:
    """kv-cache files of a tiny OLMoE (16 experts, top-4) and of the default at 25%, by (variant, form)."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        hidden_size=64, intermediate_size=32, num_experts=16, num_experts_per_tok=4, num_attention_heads=4,
        num_key_value_heads=4, num_hidden_layers=2, vocab_size=serving.VOCAB, max_position_embeddings=1024,
        eos_token_id=None, pad_token_id=None, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    original = OlmoeForCausalLM(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", moefx.MoefxWarning)
        default = moefx.compile(original, [serving.tokens(4, 32, seed) for seed in range(2)], experts=0.25)
    work = tmp_path_factory.mktemp("serving")
    files = {}
    for (variant, form), model in {("original", "fused"): original, ("original", "int4"): original,
                                   ("default 25%", "fused"): default}.items():  # fmt: skip
        path = work / f"{variant.replace(' ', '').replace('%', '')}-{form}.onnx"
        files[variant, form] = str(moefx.export.onnx(model, path, serving.tokens(2, 8), kv_cache=True,
                                                     **serving.FORMS[form]))  # fmt: skip
    return files


def test_the_profile_puts_every_node_in_its_run_and_finds_the_fused_expert_nodes(decoder_files, tmp_path):
    generator = moefx.export.OnnxGenerator(decoder_files["original", "fused"], 1, str(tmp_path / "profile"))
    serving.first_step(generator, 1, 16)()
    serving.first_step(generator, 3, 16)()
    profile = generator.session.end_profiling()
    runs = serving.op_ms(profile)
    assert len(runs) == 2
    events = json.loads(Path(profile).read_text(encoding="utf-8"))
    kernels = [e["dur"] / 1e3 for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    assert sum(sum(run.values()) for run in runs) == pytest.approx(sum(kernels))  # every node, once
    for run in runs:
        assert run["MoE"] > 0 and sum(run.values()) > run["MoE"]
    assert "QMoE" in serving.where_time_goes(decoder_files["original", "int4"], 1)["decode"]


def test_the_probe_measures_every_step_and_the_page_reads_the_profile(decoder_files, tmp_path):
    rows = []
    for (variant, form), path in decoder_files.items():
        result = serving.probe(path, 1)
        assert result["prefill_ms"] > 0 and result["throughput_tok_s"] > 0 and result["decode_tok_s"] > 0
        assert set(result["op_ms"]) == {"prefill", "throughput", "decode"}
        assert all(serving.expert_ms(result, phase) > 0 for phase in result["op_ms"])
        rows.append({"model": "tiny", "layers": 2, "variant": variant, "form": form,
                     "file_bytes": moefx.export.file_bytes(path), **result})  # fmt: skip
    serving.write_markdown(rows, 1, tmp_path / "serving.md")
    page = (tmp_path / "serving.md").read_text()
    assert "## Where the time goes" in page
    assert "- tiny: default 25% fused at 1x128: expert nodes" in page
    assert "- tiny: original int4 decode step: QMoE" in page
