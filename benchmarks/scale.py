"""Compress real models' shapes, streamed from sharded bf16 checkpoints: time per stage and layer, peak memory.

    python benchmarks/scale.py [--models olmoe-1b-7b ...] [--layers 2 16] [--refit MODE] [--out benchmarks] [--work DIR]

By default every shape runs at its depths in ``SHAPES``: OLMoE-1B-7B at 2 layers and at its full 16,
Qwen3-30B-A3B at 2 layers and Mixtral-8x7B at 1 (a Mixtral layer is 1.4B parameters).

For each shape it writes a synthetic checkpoint with random bf16 weights (``save_pretrained``'s layout: hub
tensor names, shards of at most 2 GB, ``config.json`` and a character vocabulary), then compresses it with
the CLI, ``moefx compress --sequential`` at 50% experts with a pruned router, calibrated on 64 sequences
of 128 characters of tinyshakespeare (with ``--refit MODE`` where given), in a fresh process whose peak
resident memory is measured. Writing a
plain transformers checkpoint checks, block by block, that transformers' module with the written weights
computes what moefx's compressed block computes (:mod:`moefx.stream`); the benchmark then loads the output
with plain transformers in another fresh process and runs it (class, parameter count, finite logits).

Writes ``scale.md`` and ``scale.json`` to ``--out``. Checkpoints go to ``--work`` (default: a temporary
directory) and are removed after each run; the full-depth OLMoE-1B-7B shape needs about 14 GB of disk for
the input and 7 GB for the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import data  # noqa: E402
from moefx.config import REFITS  # noqa: E402
from moefx.stream import ShardWriter  # noqa: E402

# real models' shapes (their config.json's sizes); depth is chosen per run
SHAPES: dict[str, dict[str, Any]] = {
    "olmoe-1b-7b": {
        "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64,
        "num_experts_per_tok": 8, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 50304,
        "max_position_embeddings": 4096, "full_depth": 16, "depths": [2, 16],
    },
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768, "intermediate_size": 6144,
        "num_experts": 128, "num_experts_per_tok": 8, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 4096, "norm_topk_prob": True,
        "full_depth": 48, "depths": [2],
    },
    "mixtral-8x7b": {
        "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8,
        "num_experts_per_tok": 2, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "max_position_embeddings": 4096, "full_depth": 32, "depths": [1],
    },
}  # fmt: skip
SEQUENCES, SEQ_LEN, EXPERTS = 64, 128, 0.5
# the stages that run the calibration tokens through the model (each with its observers, if any)
FORWARD_STAGES = ("first layer inputs", "calibration", "second calibration pass", "propagation")


def random_model(name: str, layers: int, vocab_size: int) -> torch.nn.Module:
    """``name``'s shape at ``layers`` decoder layers, with random float32 weights (normal, std 0.02) and a
    ``vocab_size``-token vocabulary (small, so that the experts dominate a serving measurement)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {k: v for k, v in SHAPES[name].items() if k not in ("full_depth", "depths", "vocab_size")}
    config = AutoConfig.for_model(
        **sizes, vocab_size=vocab_size, num_hidden_layers=layers, tie_word_embeddings=False,
        eos_token_id=None, pad_token_id=None, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return model


def shape_config(name: str, layers: int) -> Any:
    from transformers import AutoConfig

    sizes = {k: v for k, v in SHAPES[name].items() if k not in ("full_depth", "depths")}
    return AutoConfig.for_model(**sizes, num_hidden_layers=layers, dtype=torch.bfloat16, tie_word_embeddings=False)


def write_checkpoint(config: Any, directory: Path, seed: int = 0, max_shard_bytes: int = 2 * 2**30) -> int:
    """A checkpoint of ``config``'s model with random bf16 weights under the hub's tensor names; its bytes.

    Weights are drawn one tensor at a time (normal, std 0.02; norms one, biases zero), so writing needs
    about one shard of memory whatever the model's size.
    """
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    names = revert_weight_conversion(skeleton, skeleton.state_dict())  # the hub's names and layouts, on meta
    directory.mkdir(parents=True)
    writer, g = ShardWriter(directory, max_shard_bytes), torch.Generator().manual_seed(seed)
    for name, meta in names.items():
        tensor = torch.empty(meta.shape, dtype=torch.bfloat16)
        if meta.dim() == 1:
            tensor.fill_(1.0 if "norm" in name else 0.0)
        else:
            tensor.normal_(0.0, 0.02, generator=g)
        writer.add({name: tensor})
    writer.close()
    config.save_pretrained(directory)
    data.CharVocab.build(data.shakespeare_text()).save(directory / "vocab.json")
    return writer.total_bytes


# `python -m moefx ...` that prints its own peak resident memory (VmHWM) at exit; the child's ru_maxrss would
# include this process's resident size when it forked
_PEAK_REPORTING_CLI = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print('peak resident bytes', next(int(line.split()[1]) * 1024 for line in "
    "open('/proc/self/status') if line.startswith('VmHWM')), flush=True))\n"
    "sys.argv[0] = 'moefx'\n"
    "runpy.run_module('moefx', run_name='__main__')\n"
)


def compress_with_cli(checkpoint: Path, out: Path, refit: str | None = None) -> dict[str, Any]:
    """Run ``moefx compress --sequential`` (with ``--refit refit`` where given) on ``checkpoint`` in a fresh
    process: its wall time, peak RSS, per-layer times as printed, and the report's stage times."""
    command = [sys.executable, "-c", _PEAK_REPORTING_CLI, "compress", str(checkpoint), "--calib",
               str(data.data_file("tinyshakespeare", "input.txt")), "--out", str(out), "--experts", str(EXPERTS),
               "--router", "pruned", "--sequential", "--num-calib-seqs", str(SEQUENCES), "--seq-len", str(SEQ_LEN),
               "--no-progress", *(["--refit", refit] if refit else [])]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds, output = time.perf_counter() - start, done.stdout
    if done.returncode != 0:
        raise RuntimeError(f"moefx compress failed:\n{output[-3000:]}")
    peak = int(re.search(r"peak resident bytes (\d+)", output).group(1))
    layers = [float(m.group(1)) for m in re.finditer(r"layer \d+/\d+ done in ([\d.]+) s", output)]
    stages = json.loads((out / "report.json").read_text())["seconds"]
    return {"seconds": seconds, "peak_rss_bytes": peak, "layer_seconds": layers, "stages": stages,
            "format_line": next(line for line in output.splitlines() if line.startswith("wrote "))}  # fmt: skip


def loads_with_transformers(out: Path) -> dict[str, Any]:
    """Load the output with plain transformers in a fresh process; its class, expert count and parameters."""
    script = (
        "import json, sys, torch; from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
        "ids = torch.arange(64)[None] % 60\n"
        "with torch.no_grad(): logits = m(input_ids=ids).logits\n"
        "print(json.dumps({'class': type(m).__name__, 'parameters': sum(p.numel() for p in m.parameters()),"
        " 'finite_logits': bool(logits.isfinite().all())}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(name: str, layers: int, work: Path, refit: str | None = None) -> dict[str, Any]:
    """Write the checkpoint, compress it with the CLI, check the output loads; one row of results."""
    checkpoint, out = work / f"{name}-{layers}", work / f"{name}-{layers}-out"
    shutil.rmtree(checkpoint, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    config = shape_config(name, layers)
    bytes_in = write_checkpoint(config, checkpoint)
    try:
        result = compress_with_cli(checkpoint, out, refit)
        bytes_out = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        loaded = loads_with_transformers(out) if "transformers checkpoint" in result["format_line"] else None
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    stages = result["stages"]
    forward = sum(stages.get(s, 0.0) for s in FORWARD_STAGES)
    other = result["seconds"] - forward
    return {"model": name, "layers": layers, "refit": refit or "default", "bytes_in": bytes_in,
            "bytes_out": bytes_out, **result, "forward_seconds": forward, "other_seconds": other,
            "transformers_load": loaded}  # fmt: skip


def alignment_seconds(name: str, seed: int = 0) -> dict[str, Any]:
    """Time weight-matching alignment of two random experts at ``name``'s width: the float32 product that
    scores every pair of hidden units (``I x I`` from ``3H`` features: ``6 I^2 H`` FLOPs) and the exact
    linear assignment (scipy's ``linear_sum_assignment``, ``O(I^3)`` at worst) on it."""
    from scipy.optimize import linear_sum_assignment

    from moefx.experts import FFN
    from moefx.passes.merge import unit_features

    sizes = SHAPES[name]
    hidden, width = sizes["hidden_size"], sizes.get("moe_intermediate_size", sizes["intermediate_size"])
    g = torch.Generator().manual_seed(seed)

    def expert() -> FFN:  # gate and up [I, H], down [H, I]
        return FFN([torch.randn(width, hidden, generator=g) for _ in range(2)], [None, None],
                   torch.randn(hidden, width, generator=g), None)  # fmt: skip

    reference, other = expert(), expert()
    start = time.perf_counter()
    cost = unit_features(reference) @ unit_features(other).T
    scored = time.perf_counter()
    linear_sum_assignment(cost.double().numpy(), maximize=True)
    return {"model": name, "width": width, "hidden": hidden, "product_seconds": scored - start,
            "assignment_seconds": time.perf_counter() - scored}  # fmt: skip


def write_markdown(rows: list[dict[str, Any]], alignments: list[dict[str, Any]], path: Path) -> None:
    gb = 1e9
    lines = [
        "# Streaming compression at real models' shapes",
        "",
        f"`python benchmarks/scale.py` on {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
        f"cores, torch {torch.__version__}. Synthetic checkpoints with random bf16 weights, compressed by "
        f"`moefx compress --sequential --router pruned --experts {EXPERTS}` (with `--refit` where the refit "
        f"column names one) calibrated on {SEQUENCES} sequences x {SEQ_LEN} characters of tinyshakespeare, in a "
        "fresh process. Forward passes are the stages "
        f"{', '.join(FORWARD_STAGES)} (calibration passes include their statistics); the rest is reading and "
        "writing layers, capture and detection, planning, merging and rewriting. A plain transformers output "
        "is written only once each block's transformers module, holding the weights as written, computes what "
        "moefx's compressed block computes (max abs diff <= 1e-5 in float32, checked while writing); the last "
        "column is that output loaded and run by plain transformers in another process.",
        "",
        "| model shape | layers | refit | bytes in | bytes out | total s | s per layer (mean, max) | forward s | "
        "other s (share) | peak RSS | plain transformers load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_layer = r["layer_seconds"]
        loaded = r["transformers_load"]
        loaded_text = "-" if loaded is None else f"{loaded['class']}, {loaded['parameters'] / 1e9:.2f} B params"
        lines.append(
            f"| {r['model']} | {r['layers']} | {r.get('refit', 'default')} | {r['bytes_in'] / gb:.2f} GB | "
            f"{r['bytes_out'] / gb:.2f} GB | "
            f"{r['seconds']:.0f} | {sum(per_layer) / len(per_layer):.1f}, {max(per_layer):.1f} | "
            f"{r['forward_seconds']:.0f} | {r['other_seconds']:.0f} ({r['other_seconds'] / r['seconds']:.0%}) | "
            f"{r['peak_rss_bytes'] / gb:.2f} GB | {loaded_text} |"
        )
    lines += ["", "Seconds per stage (summed over layers):", ""]
    stages = sorted({s for r in rows for s in r["stages"]})
    lines += ["| model shape | layers | " + " | ".join(stages) + " |", "|---|---|" + "---|" * len(stages)]
    for r in rows:
        cells = " | ".join(f"{r['stages'].get(s, 0.0):.1f}" for s in stages)
        lines.append(f"| {r['model']} | {r['layers']} | {cells} |")
    lines += ["", "Seconds per layer:", ""]
    for r in rows:
        lines.append(f"- {r['model']}, {r['layers']} layers: " + ", ".join(f"{s:.1f}" for s in r["layer_seconds"]))
    lines += [
        "",
        "Aligning one expert to another at each shape's width (random float32 experts, as merging does it: a "
        "float32 product scores every pair of hidden units from their gate, up and down weights, `6 I^2 H` "
        "FLOPs, then scipy's exact linear assignment, `O(I^3)` at worst, on that `I x I` matrix):",
        "",
        "| model shape | width I | hidden H | product s | assignment s |",
        "|---|---|---|---|---|",
    ]
    for a in alignments:
        lines.append(f"| {a['model']} | {a['width']} | {a['hidden']} | {a['product_seconds']:.1f} | "
                     f"{a['assignment_seconds']:.1f} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--layers", nargs="+", type=int, default=None,
                        help="depths to run (0: the model's own; default: each shape's depths in SHAPES)")  # fmt: skip
    parser.add_argument("--refit", choices=REFITS, default=None, help="the CLI's --refit (default: the method's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--work", type=Path, default=None, help="where checkpoints are written (default: temporary)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="moefx-scale-"))
    alignments = [alignment_seconds(name) for name in args.models]
    rows = []
    for name in args.models:
        for layers in args.layers or SHAPES[name]["depths"]:
            rows.append(run(name, layers or SHAPES[name]["full_depth"], work, args.refit))
            print(json.dumps(rows[-1]), flush=True)
            (args.out / "scale.json").write_text(json.dumps({"runs": rows, "alignment": alignments}, indent=1) + "\n")
            write_markdown(rows, alignments, args.out / "scale.md")


if __name__ == "__main__":
    main()
