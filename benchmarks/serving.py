"""Serving on real models' MoE shapes: ONNX Runtime on the CPU, original against compressed, in one run.

    python benchmarks/serving.py [--models olmoe-1b-7b qwen3-30b-a3b] [--layers 2] [--threads 2] [--out benchmarks]

Each model has the decoder layers of a real model's shape (``benchmarks/scale.py``'s ``SHAPES``: experts,
hidden size, expert width, top-k, attention heads) and random weights (normal, std 0.02), with a 256-token
vocabulary so that the layers, not the embeddings, are what is measured. The compressed variants are
calibrated on random tokens (speed does not depend on what was learnt). Every variant is exported with
``moefx.export.onnx(..., kv_cache=True)`` in the form named (``fused``: one ``com.microsoft.MoE`` node
per MoE block, each expert cut into two of the node's experts (``width_splits=2``, the default);
``fused unsplit``: one node expert per expert (``width_splits=1``); ``int8``/``int4``:
``com.microsoft.QMoE``, ``int4 a8`` on int8 activations (``int8_activations=True``); ``portable``:
standard ONNX, for MC-SMoE's LoSparse experts), passing the export's parity check, then measured in a
fresh process with the given number of ONNX Runtime threads:

- prefill: median latency of the first step (empty cache) on 1 x 128 tokens;
- throughput: tokens per second of that step on 16 x 128 tokens;
- decode: tokens per second at batch 1 after a 512-token prompt (median step of 32);
- session memory once loaded: the process's peak resident memory over creating the session, less its
  resident memory before the session, against the file's bytes (its weights);
- session memory at batch 1: the same peak once the prefill and the decode above have run too;
- session memory with 16 x 128: the same peak once the throughput step has run too (its activations);
- where the time goes: ONNX Runtime's profiler, in a second session of the same probe, gives each node's
  time in one run of each step (prefill after a warm-up run, throughput, and the mean of 8 decode steps),
  summed by operator type.

Writes ``serving.md`` and ``serving.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import moefx  # noqa: E402
import moefx.export  # noqa: E402
from benchmarks.onnx_forms import token_batch  # noqa: E402
from benchmarks.scale import random_model  # noqa: E402
from moefx.demo import median_ms  # noqa: E402

VOCAB = 256
PREFILL, THROUGHPUT, PROMPT, DECODE_STEPS, PROFILED_DECODE_STEPS = (1, 128), (16, 128), 512, 32, 8
EXPERT_OPS = ("MoE", "QMoE")  # the fused forms' expert nodes
FORMS = {
    "portable": {}, "fused": {"fused": True}, "fused unsplit": {"fused": True, "width_splits": 1},
    "int8": {"expert_bits": 8}, "int4": {"expert_bits": 4}, "int4 a8": {"expert_bits": 4, "int8_activations": True},
}  # fmt: skip
INT4_FORMS = ("int4", "int4 a8")
# (label, compile options or None for the original, the forms it is exported in)
VARIANTS = [
    ("original", None, ("fused", "fused unsplit", "portable", *INT4_FORMS)),
    ("default 50%", {"experts": 0.5}, ("fused", "portable")),
    ("default 25%", {"experts": 0.25}, ("fused", "fused unsplit", "portable", "int8", *INT4_FORMS)),
    ("mc-smoe 25%", {"experts": 0.25, "method": "mc-smoe"}, ("portable",)),
]


def tokens(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return token_batch(VOCAB, batch, seq, seed)


def _resident_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def first_step(generator: moefx.export.OnnxGenerator, batch: int, seq: int) -> Callable[[], Any]:
    """The first step (empty cache) on ``batch`` x ``seq`` tokens, as a call."""
    ids = tokens(batch, seq)["input_ids"]
    mask, positions = torch.ones_like(ids), torch.arange(seq).expand(batch, -1)
    return lambda: generator.step(ids, mask, positions, generator.empty_cache(batch))


def decode_seconds(generator: moefx.export.OnnxGenerator, steps: int) -> list[float]:
    """Seconds of each of ``steps`` greedy steps at batch 1 after a ``PROMPT``-token prompt."""
    ids = tokens(1, PROMPT, seed=1)["input_ids"]
    mask, positions = torch.ones_like(ids), torch.arange(PROMPT)[None]
    logits, cache = generator.step(ids, mask, positions, generator.empty_cache(1))
    seconds = []
    for _ in range(steps):
        token = logits[:, -1:].argmax(dim=-1)
        mask, positions = torch.cat([mask, torch.ones_like(token)], dim=1), positions[:, -1:] + 1
        start = time.perf_counter()
        logits, cache = generator.step(token, mask, positions, cache)
        seconds.append(time.perf_counter() - start)
    return seconds


def op_ms(profile: str | Path) -> list[dict[str, float]]:
    """Milliseconds of node time by operator type in each run of an ONNX Runtime profile, in run order."""
    events = json.loads(Path(profile).read_text(encoding="utf-8"))
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run"
    )
    starts = [start for start, _ in runs]
    times = [collections.Counter() for _ in runs]
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):  # not the fences around it
            run = bisect.bisect_right(starts, e["ts"]) - 1
            if run >= 0 and e["ts"] <= runs[run][1]:
                times[run][e["args"]["op_name"]] += e["dur"] / 1e3
    return [dict(t) for t in times]


def where_time_goes(path: str, threads: int) -> dict[str, dict[str, float]]:
    """ONNX Runtime's node times (ms by operator type) in one run of each measured step: ``prefill`` (after a
    warm-up run), ``throughput`` and ``decode`` (the mean of ``PROFILED_DECODE_STEPS`` steps)."""
    with tempfile.TemporaryDirectory() as scratch:
        generator = moefx.export.OnnxGenerator(path, threads, profile_prefix=str(Path(scratch) / "profile"))
        prefill = first_step(generator, *PREFILL)
        prefill()
        prefill()
        first_step(generator, *THROUGHPUT)()
        decode_seconds(generator, PROFILED_DECODE_STEPS)
        runs = op_ms(generator.session.end_profiling())
    decode = runs[4:]  # after the warm-up, prefill, throughput and prompt runs
    ops = {op for run in decode for op in run}
    return {"prefill": runs[1], "throughput": runs[2],
            "decode": {op: sum(run.get(op, 0.0) for run in decode) / len(decode) for op in ops}}  # fmt: skip


def probe(path: str, threads: int) -> dict[str, Any]:
    """Run in a fresh process: prefill, throughput, decode and session memory of one kv-cache file, then
    where the time goes (a profiled session, after the memory is read)."""
    before = _resident_bytes("VmRSS")
    generator = moefx.export.OnnxGenerator(path, threads=threads)
    load_bytes = _resident_bytes("VmHWM") - before
    prefill_ms = median_ms(first_step(generator, *PREFILL), 10, 2)
    decode_s = decode_seconds(generator, DECODE_STEPS)
    batch_one_bytes = _resident_bytes("VmHWM") - before
    throughput_ms = median_ms(first_step(generator, *THROUGHPUT), 3, 2)
    session_bytes = _resident_bytes("VmHWM") - before
    del generator
    return {"prefill_ms": prefill_ms, "throughput_tok_s": 1e3 * THROUGHPUT[0] * THROUGHPUT[1] / throughput_ms,
            "decode_tok_s": 1.0 / statistics.median(decode_s), "load_bytes": load_bytes,
            "batch_one_bytes": batch_one_bytes,
            "session_bytes": session_bytes, "op_ms": where_time_goes(path, threads)}  # fmt: skip


def measure(name: str, layers: int, threads: int, work: Path) -> list[dict[str, Any]]:
    """Every variant and form of ``name``'s model: one row each."""
    model = random_model(name, layers, VOCAB)
    calib = [tokens(8, 128, seed) for seed in range(4)]
    rows = []
    for label, options, forms in VARIANTS:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            variant = model if options is None else moefx.compile(model, calib, **options)
        compile_s = time.perf_counter() - start
        for form in forms:
            path = work / f"{name}-{label}-{form}.onnx".replace(" ", "_").replace("%", "")
            start = time.perf_counter()
            moefx.export.onnx(variant, path, tokens(2, 16), kv_cache=True, **FORMS[form])
            export_s = time.perf_counter() - start
            file_bytes = moefx.export.file_bytes(path)
            command = [sys.executable, __file__, "--probe", str(path), str(threads)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            rows.append({"model": name, "layers": layers, "variant": label, "form": form, "compile_s": compile_s,
                         "export_s": export_s, "file_bytes": file_bytes, **result})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            for f in work.glob(f"{path.name}*"):
                f.unlink()
        del variant
    return rows


def write_markdown(rows: list[dict[str, Any]], threads: int, path: Path) -> None:
    lines = [
        "# Serving on real models' MoE shapes (ONNX Runtime, CPU)",
        "",
        f"`python benchmarks/serving.py` on {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
        f"cores, ONNX Runtime with {threads} threads, torch {torch.__version__}. Random weights, a {VOCAB}-token "
        "vocabulary, each file a kv-cache decoder (`kv_cache=True`) measured in a fresh process. Prefill: median "
        f"ms of the first step on {PREFILL[0]}x{PREFILL[1]} tokens; throughput: tokens/s of that step on "
        f"{THROUGHPUT[0]}x{THROUGHPUT[1]}; decode: tokens/s at batch 1 after a {PROMPT}-token prompt (median of "
        f"{DECODE_STEPS} steps); session memory: the probe's peak resident bytes less those before the session, "
        f"over the file's bytes (weights beyond 64 MiB in a `.data` file, which ONNX Runtime memory-maps), once "
        f"the session is created, at batch 1 (prefill and decode too) and once the {THROUGHPUT[0]}x{THROUGHPUT[1]} "
        "step has run too. "
        "Speedups are against the original in the fused form, measured in the same run.",
        "",
        "| model | variant | form | file GB | prefill ms 1x128 | speedup | tok/s 16x128 | speedup | decode tok/s | "
        f"speedup | memory / file, loaded | memory / file, batch 1 | memory / file, with "
        f"{THROUGHPUT[0]}x{THROUGHPUT[1]} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["variant"] == "original" and b["form"] == "fused")
        lines.append(
            f"| {r['model']}, {r['layers']} layers | {r['variant']} | {r['form']} | {r['file_bytes'] / 1e9:.2f} | "
            f"{r['prefill_ms']:.1f} | {base['prefill_ms'] / r['prefill_ms']:.2f} | {r['throughput_tok_s']:.0f} | "
            f"{r['throughput_tok_s'] / base['throughput_tok_s']:.2f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s'] / base['decode_tok_s']:.2f} | {r['load_bytes'] / r['file_bytes']:.2f} | "
            f"{r['batch_one_bytes'] / r['file_bytes']:.2f} | "
            f"{r['session_bytes'] / r['file_bytes']:.2f} |"
        )
    lines += ["", "Targets (issue 14), from the rows above:", ""]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        lines += [f"- {model}: {line}" for line in target_lines([r for r in rows if r["model"] == model])]
    lines += [
        "",
        "## Where the time goes",
        "",
        "ONNX Runtime's profiler, in a second session of each probe: node time (ms) of one run of each step, "
        f"the prefill after a warm-up run and the decode step the mean of {PROFILED_DECODE_STEPS}, with the three "
        "operator types that take most of it. Node times add up to less than the step's wall time (feeding "
        "inputs, copying outputs and the runtime's own scheduling are not nodes).",
        "",
        f"| model | variant | form | prefill {PREFILL[0]}x{PREFILL[1]} | {THROUGHPUT[0]}x{THROUGHPUT[1]} | "
        "decode step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(largest_ops(r["op_ms"][phase]) for phase in ("prefill", "throughput", "decode"))
        lines.append(f"| {r['model']}, {r['layers']} layers | {r['variant']} | {r['form']} | {cells} |")
    lines += ["", "From the profile:", ""]
    for model in models:
        lines += [f"- {model}: {line}" for line in profile_lines([r for r in rows if r["model"] == model])]
    lines += ["", WHY]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def find_row(rows: list[dict[str, Any]], variant: str, form: str) -> dict[str, Any] | None:
    """The row of ``variant`` in ``form`` among one model's rows, or None."""
    return next((r for r in rows if r["variant"] == variant and r["form"] == form), None)


def largest_ops(ms: dict[str, float], count: int = 3) -> str:
    """``total: op ms, ...`` for the ``count`` operator types that take most of a run's node time."""
    largest = sorted(ms.items(), key=lambda item: -item[1])[:count]
    return f"{sum(ms.values()):.1f}: " + ", ".join(f"{op} {t:.1f}" for op, t in largest)


def expert_ms(row: dict[str, Any], phase: str) -> float:
    """Node time of the fused expert nodes (``MoE``/``QMoE``) in one run of ``phase``."""
    return sum(row["op_ms"][phase].get(op, 0.0) for op in EXPERT_OPS)


def profile_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What one model's profile says about the targets: expert-node time of the fused default 25% and of
    int4 experts against the original's float32 expert nodes, and the time of the nodes around them."""

    def other_ms(r: dict[str, Any], phase: str) -> float:
        return sum(r["op_ms"][phase].values()) - expert_ms(r, phase)

    base = find_row(rows, "original", "fused")
    if base is None:
        return []
    lines = []
    if (fused := find_row(rows, "default 25%", "fused")) is not None:
        for phase, shape in (("prefill", PREFILL), ("throughput", THROUGHPUT)):
            lines.append(
                f"default 25% fused at {shape[0]}x{shape[1]}: expert nodes {expert_ms(fused, phase):.1f} ms against "
                f"the original's {expert_ms(base, phase):.1f} ({expert_ms(fused, phase) / expert_ms(base, phase):.2f}x "
                f"the time for a quarter of the expert weights); other nodes {other_ms(fused, phase):.1f} ms "
                f"against {other_ms(base, phase):.1f}"
            )
    for variant in ("original", "default 25%"):
        split, unsplit = find_row(rows, variant, "fused"), find_row(rows, variant, "fused unsplit")
        if split is not None and unsplit is not None:
            lines.append(
                f"{variant} at {PREFILL[0]}x{PREFILL[1]}: expert nodes {expert_ms(split, 'prefill'):.1f} ms with two "
                f"node experts per expert (fused) against {expert_ms(unsplit, 'prefill'):.1f} with one (fused unsplit)"
            )
    if (portable := find_row(rows, "default 25%", "portable")) is not None and fused is not None:
        for phase, shape in (("prefill", PREFILL), ("throughput", THROUGHPUT)):
            lines.append(
                f"default 25% at {shape[0]}x{shape[1]}: {sum(portable['op_ms'][phase].values()):.1f} ms of nodes in "
                f"the portable form against {sum(fused['op_ms'][phase].values()):.1f} in the fused one"
            )
    for variant, form in ((v, f) for v in ("original", "default 25%") for f in INT4_FORMS):
        if (r := find_row(rows, variant, form)) is not None:
            lines.append(
                f"{variant} {form} decode step: QMoE {expert_ms(r, 'decode'):.2f} ms against the original's float32 "
                f"MoE {expert_ms(base, 'decode'):.2f} ({expert_ms(r, 'decode') / expert_ms(base, 'decode'):.2f}x the "
                f"time for an eighth of the bytes{' of a quarter of the experts' if variant != 'original' else ''}); "
                f"other nodes {other_ms(r, 'decode'):.2f} ms against {other_ms(base, 'decode'):.2f}"
            )
    if (r := find_row(rows, "original", "int4")) is not None:
        step = sum(base["op_ms"]["decode"].values())
        lines.append(
            f"decode bound: with the other nodes as they are, expert nodes taking no time at all would make a decode "
            f"step {step / other_ms(r, 'decode'):.2f}x faster than the original's float32 one; 2x needs them at "
            f"{step / 2 - other_ms(r, 'decode'):.2f} ms or less"
        )
    return lines


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each target of issue 14 against one model's rows: the figure, the target, met or by how much missed."""

    base = find_row(rows, "original", "fused")
    checks = []
    for form in ("fused", "portable"):
        if (r := find_row(rows, "default 25%", form)) is not None:
            checks.append((f"default 25% ({form}) prefill 1x128 speedup", base["prefill_ms"] / r["prefill_ms"], 1.5))
            checks.append((f"default 25% ({form}) 16x128 speedup", r["throughput_tok_s"] / base["throughput_tok_s"],
                           1.0))  # fmt: skip
    if (r := find_row(rows, "mc-smoe 25%", "portable")) is not None:
        checks.append(("mc-smoe 25% (portable; LoSparse cannot be fused) 16x128 speedup",
                       r["throughput_tok_s"] / base["throughput_tok_s"], 1.2))  # fmt: skip
    for variant, form in ((v, f) for v in ("original", "default 25%") for f in INT4_FORMS):
        if (r := find_row(rows, variant, form)) is not None:
            checks.append((f"{variant} {form} decode tok/s over the original's float32", r["decode_tok_s"] /
                           base["decode_tok_s"], 2.0))  # fmt: skip
    lines = [f"{name}: {value:.2f} (target >= {target:g}): " + ("met" if value >= target else
             f"missed by {1 - value / target:.0%}") for name, value, target in checks]  # fmt: skip
    for key, when in (("batch_one_bytes", "at batch 1"), ("session_bytes", f"with {THROUGHPUT[0]}x{THROUGHPUT[1]}")):
        worst = max(rows, key=lambda r: r[key] / r["file_bytes"])
        ratio = worst[key] / worst["file_bytes"]
        lines.append(f"largest session memory / file {when}: {ratio:.2f} ({worst['variant']}, {worst['form']}; "
                     "target <= 1.2): " + ("met" if ratio <= 1.2 else f"missed by {ratio / 1.2 - 1:.0%}"))  # fmt: skip
    return lines


WHY = (
    "Where a target is missed, why, from the profile lines above and ONNX Runtime 1.32's source (its CPU `MoE` "
    "and `QMoE` kernels in `contrib_ops/cpu/moe`, read, not profiled):\n\n"
    "- **Fused default.** Behind the exact router a token's k chosen experts fall into at most k groups. The "
    "router input gives the groups a token does not use a logit of -1e4, whose weight is exactly 0, and the CPU "
    "kernel skips a pick of weight 0, so the node computes each group a token uses once. Its work therefore "
    "follows the (token, group) pairs, not the weights: with a quarter of the experts left as groups, a token's k"
    " experts still fall into several groups, and each such pair costs a whole expert's rows, so the expert "
    "nodes' time falls much less than their weights do (the profile lines above). The kernel also gives each of "
    "its threads a contiguous range of the node's experts, and a merged group takes all its members' tokens, so "
    "with one node expert per group one thread can get most of a step's work; the `fused` files therefore cut "
    "each expert's hidden units into two node experts that every routed token takes together (`width_splits=2`),"
    " one per thread, and the `fused unsplit` rows show what that changes. At 1x128 each group also gets only a "
    "few dozen rows, and the portable form's prepacked MatMuls on both threads run them faster than the node, "
    "whose kernel runs each expert's GEMM on one thread and packs its weights on every call. Nodes outside the "
    "experts also vary from probe to"
    " probe on this VM: around the experts the default's graph is the original's plus a few small routing ops "
    "that feed the node, so most of any gap between their 'other nodes' times in the profile lines is noise.\n"
    "- **int4 decode.** `int4` rows run the 4-bit QMoE node on float32 activations, so the file computes what "
    "the eager model on the quantized weights computes. `int4 a8` rows are exported with "
    "`int8_activations=True`: the kernel rounds each expert matrix's input to int8 per 32 columns and multiplies "
    "in integers (`accuracy_level=4`), and the export checks the file against eager rounding the activations "
    "alike. Where a decode target is missed even so, the decode bound line gives the most any expert-node "
    "speedup could give, from the time of the nodes around the experts.\n\n"
    "Session memory. Weights beyond 64 MiB go to a data file, which ONNX Runtime memory-maps (from a single file "
    "it parses a second copy while loading). At batch 1 the fused float files stay within 1.2x. The portable "
    "forms hold ONNX Runtime's prepacked copy of each MatMul weight beside the mapped pages it was packed from. "
    "The QMoE kernels repack their expert weights into a layout of their own when the session is created, which "
    "for 4-bit weights on int8 activations is larger than the file (the loaded column). The small files (int8, "
    "int4, MC-SMoE) also carry the 512-token prompt's activations and the runtime's own memory, which do not "
    "shrink with the weights. With the 16 x 128 step the peak holds that step's activations, a few hundred MB "
    "whatever the file, so the smaller the file the larger the ratio. moefx's sessions run without ONNX Runtime's"
    " memory patterns (`enable_mem_pattern=False`): a pattern is planned per input shape, a generator's shapes "
    "change at every step, and with patterns on the 16 x 128 step peaked higher and ran slower."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=("olmoe-1b-7b", "qwen3-30b-a3b"),
                        default=["olmoe-1b-7b", "qwen3-30b-a3b"])  # fmt: skip
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only write serving.md again from a serving.json this script wrote")  # fmt: skip
    parser.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe[0], int(args.probe[1]))))
        return
    if args.render is not None:
        saved = json.loads(args.render.read_text(encoding="utf-8"))
        write_markdown(saved["rows"], saved["threads"], args.out / "serving.md")
        return
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            rows += measure(name, args.layers, args.threads, Path(work))
    saved = {"threads": args.threads, "rows": rows}
    (args.out / "serving.json").write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
    write_markdown(rows, args.threads, args.out / "serving.md")


if __name__ == "__main__":
    main()
