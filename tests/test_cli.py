"""The ``moefx`` command line: compress, export, report and demo, and its error convention (exit 2, one line)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import moefx
from moefx import cli
from moefx.export.checkpoint import checkpoint_inputs
from moefx.zoo import VOCAB, tiny_model

CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # one character per token id of the tiny models
assert len(CHARS) == VOCAB
FAST = ["--num-calib-seqs", "8", "--seq-len", "32", "--batch-size", "4", "--no-progress"]


def _checkpoint(directory: Path, family: str) -> Path:
    """A tiny transformers checkpoint with a character vocabulary, as the benchmark fixtures have."""
    tiny_model(family).save_pretrained(directory)
    (directory / "vocab.json").write_text(json.dumps({"type": "char", "chars": CHARS}))
    return directory


def _tokenizer_checkpoint(directory: Path, offset: int = 0) -> Path:
    """A tiny Mixtral checkpoint with a transformers tokenizer (one token per character, ids shifted by ``offset``)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    _checkpoint(directory, "mixtral")
    (directory / "vocab.json").unlink()
    bpe = models.BPE(vocab={c: i + offset for i, c in enumerate(CHARS)}, merges=[])  # no merges: characters
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(bpe)).save_pretrained(directory)
    return directory


def _text(seed: int = 0, length: int = 4000) -> str:
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list(CHARS), length))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    (root / "calib.txt").write_text(_text(0))
    (root / "eval.jsonl").write_text("\n".join(json.dumps({"text": _text(s, 400)}) for s in range(1, 6)) + "\n")
    return {
        "root": root,
        "model": _checkpoint(root / "mixtral", "mixtral"),
        "calib": root / "calib.txt",
        "eval": root / "eval.jsonl",
    }


@pytest.fixture(scope="module")
def compressed(files) -> Path:
    """The directory ``moefx compress`` wrote for the tiny Mixtral (shared: do not modify)."""
    out = files["root"] / "out"
    argv = ["compress", str(files["model"]), "--calib", str(files["calib"]), "--out", str(out), "--experts", "0.5",
            "--router", "pruned", "--eval", str(files["eval"]), "--num-eval-seqs", "4", *FAST]  # fmt: skip
    assert cli.main(argv) == 0
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moefx: error: ")
    return lines[0]


def test_compress_writes_checkpoint_report_and_plots(compressed):
    names = {p.name for p in compressed.iterdir()}
    assert {"model.safetensors", "moefx.json", "report.json", "report.md", "frequency.png", "groups.png"} <= names
    assert "remaining.png" not in names  # only MC-SMoE has a remaining-parameter map
    for png in ("frequency.png", "groups.png"):
        assert (compressed / png).read_bytes().startswith(b"\x89PNG")
    report = moefx.export.load_report(compressed)
    assert [b.kept for b in report.blocks] == [4, 4]  # half of 8 experts in both layers
    assert report.quality is not None and report.quality.metric.endswith("eval.jsonl")
    text = (compressed / "report.md").read_text()
    assert "| 4 / 8 |" in text and "quality: next-token loss" in text


def test_compressed_checkpoint_loads_and_matches_its_report(compressed):
    model = moefx.load(compressed)
    assert model.moefx_report == moefx.export.load_report(compressed)
    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert [e.num_experts for e in experts] == [4, 4]


def test_quality_check_measures_the_models_it_names(compressed, files):
    """The reported losses are those of the original and the saved compressed model on the eval text."""
    report = moefx.export.load_report(compressed)
    texts = [json.loads(line)["text"] for line in files["eval"].read_text().splitlines()]
    ids = torch.tensor([CHARS.index(c) for c in "\n\n".join(texts)])
    windows = ids[: len(ids) // 32 * 32].view(-1, 32)
    picked = windows[torch.linspace(0, len(windows) - 1, 4).round().long()]

    def loss(model):
        with torch.no_grad():
            logits = model(input_ids=picked, attention_mask=torch.ones_like(picked)).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), picked[:, 1:].flatten()).item()

    assert report.quality.before == pytest.approx(loss(tiny_model("mixtral")), rel=1e-5)
    assert report.quality.after == pytest.approx(loss(moefx.load(compressed)), rel=1e-5)


@pytest.mark.parametrize("form", [[], pytest.param(["--fused"], marks=pytest.mark.slow), ["--expert-bits", "8"]])
def test_export_onnx_runs_in_onnxruntime(compressed, tmp_path, capsys, form):
    path = tmp_path / "compressed.onnx"
    argv = ["export", str(compressed), "--format", "onnx", "--path", str(path), "--no-verify"]
    assert cli.main(argv + form) == 0
    out = capsys.readouterr().out
    assert str(path) in out
    assert f"{2 if form else 0} of 2 MoE blocks fused into com.microsoft.MoE" in out
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("QMoE" in ops) == ("--expert-bits" in form) and ("MoE" in ops) == ("--fused" in form)
    if "--expert-bits" in form:
        return  # its parity with the quantized eager model is tested in tests/export
    inputs = checkpoint_inputs(compressed)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    (logits,) = session.run(None, {k: v.numpy() for k, v in inputs.items() if k in names})
    with torch.no_grad():
        expected = moefx.load(compressed)(**inputs).logits
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)


@pytest.mark.slow  # its decoding is tested on every family in tests/export; this is the CLI's plumbing
def test_export_kv_cache_writes_a_decoder_that_generates_what_the_checkpoint_generates(compressed, tmp_path):
    path = tmp_path / "decoder.onnx"
    assert cli.main(["export", str(compressed), "--format", "onnx", "--path", str(path), "--kv-cache"]) == 0
    prompt = checkpoint_inputs(compressed)["input_ids"]
    expected = moefx.load(compressed).generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(moefx.export.OnnxGenerator(path).generate(prompt, 8), expected)


def test_fused_applies_to_onnx_only(compressed, tmp_path, capsys):
    assert cli.main(["export", str(compressed), "--format", "pt2", "--path", str(tmp_path / "m.pt2"), "--fused"]) == 2
    expected = "--fused, --expert-bits, --int8-activations, --width-splits and --kv-cache apply to --format onnx only"
    assert expected in _one_error_line(capsys)


def test_width_splits_set_how_many_node_experts_each_expert_becomes(compressed, tmp_path):
    k = {}
    for splits in (1, 2):
        path = tmp_path / f"split{splits}.onnx"
        argv = ["export", str(compressed), "--format", "onnx", "--path", str(path), "--fused", "--no-verify"]
        assert cli.main([*argv, "--width-splits", str(splits)]) == 0
        (node, *_) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MoE"]
        k[splits] = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "k")
    assert k[2] == 2 * k[1]  # every routed token takes both halves of its experts


@pytest.mark.parametrize("form", [[], ["--expert-bits", "4"]], ids=["portable", "quantized"])
def test_width_splits_apply_to_fused_float_experts_only(compressed, tmp_path, capsys, form):
    argv = ["export", str(compressed), "--format", "onnx", "--path", str(tmp_path / "m.onnx"), "--width-splits", "2"]
    assert cli.main(argv + form) == 2
    assert "--width-splits cuts the float experts of fused nodes: pass it with --fused" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite(compressed, tmp_path, capsys):
    path = tmp_path / "existing.onnx"
    path.write_text("keep me")
    assert cli.main(["export", str(compressed), "--format", "onnx", "--path", str(path)]) == 2
    assert "already exists" in _one_error_line(capsys)
    assert path.read_text() == "keep me"


def test_report_rerenders_from_report_json(compressed, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "report.json").write_bytes((compressed / "report.json").read_bytes())
    assert cli.main(["report", str(copy)]) == 0
    assert {p.name for p in copy.iterdir()} == {"report.json", "report.md", "frequency.png", "groups.png"}
    assert (copy / "report.md").read_text() == (compressed / "report.md").read_text()
    out = capsys.readouterr().out
    assert "## Summary" in out and "`model.layers.1.mlp`" in out


def test_compress_reads_jsonl_calibration_with_mc_smoe(files, tmp_path, capsys):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": _text(s, 120)}) for s in range(3)) + "\n\n")
    out = tmp_path / "mc"
    argv = ["compress", str(files["model"]), "--calib", str(calib), "--out", str(out), "--method", "mc-smoe",
            "--rank", "4", "--experts", "4", "--adaptive", *FAST, "--num-calib-seqs", "100"]  # fmt: skip
    assert cli.main(argv) == 0
    # three records of 120 characters and the blank lines between them: 364 characters, 11 sequences of 32
    assert (
        capsys.readouterr().err.strip()
        == f"moefx: warning: {calib} holds only 11 sequences of 32 tokens; using them all"
    )
    report = moefx.export.load_report(out)
    assert report.config.method == "mc-smoe" and report.config.rank == 4 and report.config.experts == 4
    assert (out / "remaining.png").is_file()
    assert all(b.remaining for b in report.blocks if b.kept < b.num_experts)


def test_compress_tokenises_with_the_models_own_tokenizer(files, compressed, tmp_path):
    """The same characters through a transformers tokenizer give the same calibration, hence the same groups."""
    model = _tokenizer_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    argv = ["compress", str(model), "--calib", str(files["calib"]), "--out", str(out), "--experts", "0.5",
            "--router", "pruned", *FAST]  # fmt: skip
    assert cli.main(argv) == 0
    expected = moefx.export.load_report(compressed).blocks
    got = moefx.export.load_report(out).blocks
    assert [b.groups for b in got] == [b.groups for b in expected]
    assert [b.frequency for b in got] == [b.frequency for b in expected]


def _compress_args(files, out: Path, **changes: str) -> list[str]:
    options = {"model": str(files["model"]), "--calib": str(files["calib"]), "--out": str(out)} | changes
    extra = [item for key, value in options.items() if key.startswith("--") for item in (key, value)]
    return ["compress", options["model"], *extra, *FAST]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing model", "does not exist"),
        ("missing calibration", "cannot read"),
        ("binary calibration", "cannot read"),
        ("jsonl without text", 'expected a JSON object with a "text" field'),
        ("short calibration", "fewer than --seq-len"),
        ("experts 1.5", "out of range"),
        ("experts 0", "out of range"),
        ("experts not a number", "expected a number"),
        ("unknown method", "invalid choice"),
        ("zero sequence length", "expected a positive integer, not '0'"),
        ("dense model", "no MoE block found"),
        ("not a checkpoint", "no config.json"),
        ("no tokenizer", "no tokenizer"),
        ("tokens beyond the vocabulary", "the model has 96 embeddings"),
        ("character outside the vocabulary", "the character 'é'"),
        ("encoder-decoder model", "not a causal language model"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(case, message, files, tmp_path, capsys):
    out = tmp_path / "out"
    calib = tmp_path / "calib.jsonl"
    changes = {}
    if case == "missing model":
        changes["model"] = str(tmp_path / "nowhere")
    elif case == "missing calibration":
        changes["--calib"] = str(tmp_path / "missing.txt")
    elif case == "binary calibration":
        calib = tmp_path / "calib.txt"
        calib.write_bytes(b"\xff\xfe\x00 not utf-8")
        changes["--calib"] = str(calib)
    elif case == "jsonl without text":
        calib.write_text('{"content": "hello"}\n')
        changes["--calib"] = str(calib)
    elif case == "short calibration":
        (tmp_path / "short.txt").write_text("too short")
        changes["--calib"] = str(tmp_path / "short.txt")
    elif case.startswith("experts"):
        changes["--experts"] = {"experts 1.5": "1.5", "experts 0": "0", "experts not a number": "half"}[case]
    elif case == "unknown method":
        changes["--method"] = "magic"
    elif case == "zero sequence length":
        changes["--seq-len"] = "0"
    elif case == "dense model":
        changes["model"] = str(_checkpoint(tmp_path / "dense", "dense"))
    elif case == "not a checkpoint":
        (tmp_path / "empty").mkdir()
        changes["model"] = str(tmp_path / "empty")
    elif case == "no tokenizer":
        model = _checkpoint(tmp_path / "bare", "mixtral")
        (model / "vocab.json").unlink()
        changes["model"] = str(model)
    elif case == "character outside the vocabulary":
        (tmp_path / "accent.txt").write_text(_text() + "café")
        changes["--calib"] = str(tmp_path / "accent.txt")
    elif case == "encoder-decoder model":
        changes["model"] = str(_checkpoint(tmp_path / "switch", "switch"))
    elif case == "tokens beyond the vocabulary":
        changes["model"] = str(_tokenizer_checkpoint(tmp_path / "shifted", offset=50))
    before = set(tmp_path.iterdir())
    capsys.readouterr()  # what building the inputs printed (a slow save_pretrained shows a progress bar)
    assert cli.main(_compress_args(files, out, **changes)) == 2
    assert message in _one_error_line(capsys)
    assert set(tmp_path.iterdir()) == before  # neither OUT_DIR nor a staging directory is left


def test_existing_output_directory_is_left_alone(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert cli.main(_compress_args(files, out)) == 2
    assert "already exists" in _one_error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_a_failure_after_compression_leaves_no_output(files, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("moefx.report.write_report", broken)
    assert cli.main(_compress_args(files, tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moefx: internal error: RuntimeError: disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_console_entry_point_exit_code_and_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "moefx", "export", str(tmp_path / "missing"), "--format", "onnx"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"moefx: error: no checkpoint at {tmp_path / 'missing'}: the directory does not exist"
    ]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


@pytest.mark.parametrize("command", ["compress", "export", "report", "demo"])
def test_help_states_every_options_default(command):
    parser = _subcommands()[command]
    options = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS and a.dest != "help"]
    assert options
    for action in options:
        assert "(default:" in action.help or "(required)" in action.help, action.option_strings
    assert "--help" in parser.format_help()


def test_demo_reports_missing_data_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MOEFX_DATA", str(tmp_path))
    assert cli.main(["demo", "--no-progress"]) == 2
    assert "MOEFX_DATA" in _one_error_line(capsys)


def test_demo_reports_a_missing_fixture_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("moefx.demo.FIXTURE", tmp_path / "lm")
    assert cli.main(["demo", "--no-progress"]) == 2
    assert "LM fixture" in _one_error_line(capsys)


@pytest.mark.slow
def test_demo_compresses_the_lm_fixture_end_to_end(capsys):
    """The whole demo at a reduced size (about half a minute: ONNX export dominates)."""
    from moefx.demo import FIXTURE, benchmark_modules

    if not (benchmark_modules()[0].data_dir() / "tinyshakespeare").is_dir() or not FIXTURE.is_dir():
        pytest.skip("the demo needs the LM fixture and the tinyshakespeare data")
    threads = torch.get_num_threads()
    assert cli.main(["demo", "--num-calib-seqs", "16", "--num-val-seqs", "4", "--runs", "2", "--no-progress"]) == 0
    assert torch.get_num_threads() == threads  # the demo's single thread is not left behind
    lines = capsys.readouterr().out.splitlines()
    original = next(line.split() for line in lines if line.startswith("original "))
    method = moefx.CompressionConfig().method
    compressed = next(line.split() for line in lines if line.startswith(f"{method} "))
    assert (original[1], compressed[1]) == ("64", "32")  # experts=0.5 of 4 layers x 16
    assert float(compressed[2]) == pytest.approx(float(original[2]) / 2, rel=1e-3)  # expert MB halved


def test_sequential_compress_streams_the_checkpoint_layer_by_layer(files, capsys):
    out = files["root"] / "streamed"
    assert cli.main([*_compress_args(files, out), "--sequential"]) == 0
    printed = capsys.readouterr().out
    assert "layer 1/2 done in" in printed and "layer 2/2 done in" in printed
    assert (out / "model.safetensors.index.json").is_file() and (out / "report.md").is_file()
    assert "a moefx checkpoint in shards" in printed
    model = moefx.load(out)
    assert [b.kept for b in model.moefx_report.blocks] == [4, 4]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for shard in sorted(directory.glob("*.safetensors")) for k, v in load_file(shard).items()}


def test_torchrun_with_two_gloo_processes_writes_what_one_process_writes(files):
    options = ["--sequential", "--router", "pruned", "--batch-size", "2"]  # 4 batches: 2 per process
    one, two = files["root"] / "one-process", files["root"] / "two-processes"
    assert cli.main([*_compress_args(files, one), *options]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, "-m", "moefx", *_compress_args(files, two), *options],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("layer 1/2 done in") == 1  # rank 0 alone reports and writes
    expected, written = _weights(one), _weights(two)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert tensor.dtype == written[name].dtype == torch.float32
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_torchrun_needs_the_layer_wise_path_and_a_batch_per_process(files, capsys, monkeypatch):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    one_batch = [*_compress_args(files, files["root"] / "one-batch"), "--sequential", "--num-calib-seqs", "4"]
    done = subprocess.run([*torchrun, "-m", "moefx", *one_batch], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "moefx: error: 1 calibration batches cannot be shared by 2 processes" in done.stderr
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    assert cli.main(_compress_args(files, files["root"] / "in-memory")) == 2
    assert "under torchrun, moefx compress runs layer by layer: add --sequential" in _one_error_line(capsys)


def test_sequential_compress_with_a_pruned_router_writes_a_transformers_checkpoint(files, capsys):
    from transformers import AutoModelForCausalLM

    out = files["root"] / "plain"
    assert cli.main([*_compress_args(files, out), "--sequential", "--router", "pruned"]) == 0
    assert "a plain transformers checkpoint in shards" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == 4 and (out / "report.md").is_file()
    assert (out / "vocab.json").read_text() == (files["model"] / "vocab.json").read_text()  # came along
