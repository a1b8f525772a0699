"""ONNX Runtime latency of the ONNX forms of MoE blocks, measured in the same run.

    python benchmarks/onnx_forms.py [--out benchmarks] [--threads 2]

Exports each model four times with ``moefx.export.onnx``: the portable form (standard ONNX ops, each
expert's MatMul on its routed tokens), ``fused=True`` (one ``com.microsoft.MoE`` node per block) and
``expert_bits=8`` and ``4`` (one ``com.microsoft.QMoE`` node per block). Each file is timed in a fresh
process on the CPU provider (median of 10 runs after 2 warm-ups) at 1 x 128 and 16 x 128 tokens. Models:
the LM fixture (original; the default at 50%; M-SMoE with a pruned router at 50%) and one randomly
initialised OLMoE-1B-7B-shaped layer (64 experts, hidden 2048, width 1024, top-8; a 256-token vocabulary
so the experts dominate), original and the default at 25%, calibrated on random tokens. Writes
``onnx_forms.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import moefx  # noqa: E402
import moefx.export  # noqa: E402
from benchmarks import models  # noqa: E402
from benchmarks.scale import random_model  # noqa: E402
from moefx.demo import onnx_latency_ms  # noqa: E402

SHAPES = [(1, 128), (16, 128)]
FORMS = {"portable": {}, "fused": {"fused": True}, "fused int8": {"expert_bits": 8}, "fused int4": {"expert_bits": 4}}


def token_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def cases() -> list[tuple[str, str, torch.nn.Module, int]]:
    """(model, variant, module, vocabulary size)."""
    lm = models.load_lm(Path(__file__).resolve().parent / "fixtures" / "lm")
    olmoe = random_model("olmoe-1b-7b", 1, 256)
    result = []
    for name, model in (("lm fixture", lm), ("olmoe-shaped layer", olmoe)):
        vocab = model.config.vocab_size
        calib = [token_batch(vocab, 8, 128, seed) for seed in range(8 if name == "lm fixture" else 4)]
        variants = [("original", None)]
        if name == "lm fixture":
            pruned = {"experts": 0.5, "method": "m-smoe", "router": "pruned"}
            variants += [("default 50%", {"experts": 0.5}), ("m-smoe pruned router 50%", pruned)]
        else:
            variants += [("default 25%", {"experts": 0.25})]
        for label, options in variants:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compressed = model if options is None else moefx.compile(model, calib, **options)
            result.append((name, label, compressed, vocab))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probe", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:  # in a fresh process: one file's latencies
        path, vocab, threads, _ = args.probe
        print(json.dumps([onnx_latency_ms(path, token_batch(int(vocab), b, s), 10, int(threads)) for b, s in SHAPES]))
        return
    lines = [
        "# ONNX Runtime: the ONNX forms of MoE blocks",
        "",
        f"`python benchmarks/onnx_forms.py`, ONNX Runtime CPU provider, {args.threads} threads, median ms of 10 "
        "runs after 2 warm-ups, each file in a fresh process. The last two columns are each file's time over the "
        "portable file's (above 1: slower than portable).",
        "",
        "| model | variant | form | file MB | ms 1x128 | ms 16x128 | / portable 1x128 | / portable 16x128 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, label, model, vocab) in enumerate(cases()):
            timings = {}
            for form, options in FORMS.items():
                path = Path(tmp) / f"{i}-{form}.onnx"
                moefx.export.onnx(model, path, token_batch(vocab, 2, 16), **options)
                size = sum(f.stat().st_size for f in Path(tmp).glob(f"{path.name}*"))
                command = [sys.executable, __file__, "--probe", str(path), str(vocab), str(args.threads), "-"]
                timings[form] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                ratios = " | ".join(f"{t / p:.2f}" for t, p in zip(timings[form], timings["portable"], strict=True))
                lines.append(f"| {name} | {label} | {form} | {size / 1e6:.1f} | "
                             + " | ".join(f"{t:.1f}" for t in timings[form]) + f" | {ratios} |")  # fmt: skip
                print(lines[-1], flush=True)
                for produced in Path(tmp).glob(f"{path.name}*"):
                    produced.unlink()
    (args.out / "onnx_forms.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
