"""Measure moefx on the checked-in fixtures: quality per byte against the baselines, serving speed, compile cost.

    python benchmarks/run.py [--quick] [--out benchmarks] [--threads 2]

Writes ``results.md``, ``results.json`` and ``quality_vs_memory.png`` to ``--out``. Every method runs
without fine-tuning on the same calibration data (the paper's 256 sequences: 128-character windows of the
tinyshakespeare training split for ``lm``, of SST-2's training sentences as running text for ``lm-fine``, SST-2
training sentences for ``cls``) and is scored on held-out data (``lm``: the whole validation split, ``lm-fine``: the
second half of test.tsv's sentences, ``cls``: test.tsv). ``--quick`` calibrates on 64 sequences, scores the LMs on
256 validation windows, serves only ``lm`` and skips the ablations and the switch-base-shaped compile cost.

Quantized experts: the original and the default, exported with 8- and 4-bit experts (ONNX Runtime's QMoE),
their quality (on the eager model with the file's rounded weights) against float32 experts, and file bytes.

Serving: each model is exported to ONNX (the portable form, the export's default) and run by ONNX Runtime on
the CPU in a fresh process per model (so peak resident memory is the session's own), batch 1 x 128 and
16 x 128 tokens, median latency; eager PyTorch latency alongside. Ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

if __package__ in (None, ""):
    # run as `python benchmarks/run.py`: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import moefx  # noqa: E402
from benchmarks import data, models  # noqa: E402
from moefx.demo import median_ms, onnx_latency_ms  # noqa: E402
from moefx.export.serving import atomic_output  # noqa: E402
from moefx.objective import LossFn  # noqa: E402

DEFAULT = "merge-refit"
BASELINES = ("m-smoe", "prune-frequency", "average", "hc-smoe", "reap")
# (section, label, options): the methods, then the ablations that justify the default's choices
METHOD_ROWS = [
    ("method", f"{DEFAULT} (default)", {}),
    ("method", "m-smoe", {"method": "m-smoe"}),
    ("method", "m-smoe, pruned router", {"method": "m-smoe", "router": "pruned"}),
    ("method", "mc-smoe", {"method": "mc-smoe"}),
    ("method", "prune-frequency", {"method": "prune-frequency"}),
    ("method", "average", {"method": "average"}),
    ("method", "hc-smoe", {"method": "hc-smoe"}),
    ("method", "reap", {"method": "reap"}),
]
ABLATION_ROWS = [
    ("merge-refit ablation", "refit none (merge only)", {"refit": "none"}),
    ("merge-refit ablation", "refit out only", {"refit": "out"}),
    ("merge-refit ablation", "selection frequency (the paper)", {"selection": "frequency"}),
    ("merge-refit ablation", "selection REAP saliency", {"selection": "reap"}),
    ("merge-refit ablation", "layer-wise (sequential) calibration", {"sequential": True}),
    ("merge-refit ablation", "no alignment", {"align": False}),
    ("merge-refit ablation", "adaptive per-layer count", {"adaptive": True}),
    ("merge-refit ablation", "expert-output similarity", {"similarity": "expert-output"}),
    ("merge-refit ablation", "pruned router", {"router": "pruned"}),
    ("m-smoe ablation (paper)", "m-smoe, no alignment", {"method": "m-smoe", "align": False}),
    ("m-smoe ablation (paper)", "m-smoe, uniform count", {"method": "m-smoe", "adaptive": False}),
    (
        "m-smoe ablation (paper)",
        "m-smoe, expert-output similarity",
        {"method": "m-smoe", "similarity": "expert-output"},
    ),
    ("mc-smoe ablation", "mc-smoe, plain SVD", {"method": "mc-smoe", "svd": "plain"}),
    ("mc-smoe ablation", "mc-smoe, sparse rows (authors' code)", {"method": "mc-smoe", "sparse_axis": "rows"}),
    ("mc-smoe ablation", "mc-smoe, gradient sparse score", {"method": "mc-smoe", "sparse_score": "gradient"}),
]
# the compressed models also measured in ONNX Runtime, by label
SERVED = (f"{DEFAULT} (default)", "m-smoe, pruned router", "mc-smoe")
SERVING_SHAPES = ((1, 128), (16, 128))


@dataclass(frozen=True)
class Settings:
    ratios: tuple[float, ...] = (0.5, 0.25)
    fixtures: tuple[str, ...] = ("lm", "lm-fine", "cls")
    calib_sequences: int = 256
    lm_eval_windows: int | None = None  # None: the whole validation split
    ablations: bool = True
    serving_repeats: int = 20
    serving_fixtures: tuple[str, ...] = ("lm", "cls")
    compile_cost_model: bool = True
    expert_bits: tuple[int, ...] = (8, 4)  # QMoE expert weights measured on the original and the default
    threads: int = 2
    labels: tuple[str, ...] | None = None  # only these rows (by label); None: all


QUICK = Settings(
    calib_sequences=64,
    lm_eval_windows=256,
    ablations=False,
    serving_repeats=5,
    serving_fixtures=("lm",),
    compile_cost_model=False,
    expert_bits=(4,),
)


@dataclass
class Task:
    """A fixture with its calibration data and its evaluation."""

    name: str
    model: nn.Module
    calib: list[dict[str, torch.Tensor]]
    evaluate: Callable[[nn.Module], dict[str, float]]
    metric: str  # the quality number of evaluate's result
    retained: Callable[[dict[str, float], dict[str, float]], float]  # (compressed, full) -> quality retained
    vocab_size: int
    example: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: LossFn | None = None  # for sparse_score="gradient" where the model has no loss of its own
    # ``training(count)``: that many batches of the training split, with their task loss where the model has none
    training: Callable[[int], tuple[list[dict[str, torch.Tensor]], LossFn | None]] | None = None


def lm_task(settings: Settings) -> Task:
    vocab = data.CharVocab.load(models.FIXTURES_DIR / "lm" / "vocab.json")
    return _char_lm_task("lm", settings, *data.shakespeare_splits(vocab))


def fine_lm_task(settings: Settings) -> Task:
    vocab = data.CharVocab.load(models.FIXTURES_DIR / "lm-fine" / "vocab.json")
    train, _, val = data.sst2_lm_splits(vocab)
    return _char_lm_task("lm-fine", settings, train, val)


def _char_lm_task(name: str, settings: Settings, train: torch.Tensor, val: torch.Tensor) -> Task:
    """A character LM fixture calibrated on windows of ``train`` and scored on ``val``."""
    model = models.load_lm(models.FIXTURES_DIR / name)
    calib = data.lm_calibration(train, settings.calib_sequences)
    batches = data.lm_eval_batches(val)
    if settings.lm_eval_windows is not None:
        batches = batches[: settings.lm_eval_windows // 32]

    def evaluate(m: nn.Module) -> dict[str, float]:
        loss = data.lm_validation_loss(m, batches)
        return {"val_loss": loss, "val_ppl": float(torch.tensor(loss).exp())}

    def training(count: int) -> tuple[list[dict[str, torch.Tensor]], None]:
        return list(itertools.islice(data.lm_train_batches(train, 128, 32, seed=99), count)), None

    return Task(
        name, model, calib, evaluate, "val_loss",
        retained=lambda got, full: full["val_ppl"] / got["val_ppl"],
        vocab_size=model.config.vocab_size, example=calib[0], training=training,
    )  # fmt: skip


def cls_task(settings: Settings) -> Task:
    fixture = models.FIXTURES_DIR / "cls"
    model = models.load_classifier(fixture)
    vocab = data.WordVocab.load(fixture / "vocab.json")
    train = data.read_sst2("train")
    calib, loss = data.labelled_calibration(
        data.classification_batches(train[: settings.calib_sequences], vocab, 32, seed=7)
    )
    test = data.classification_batches(data.read_sst2("test"), vocab)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"test_acc": data.classification_accuracy(m, test), "test_loss": data.classification_loss(m, test)}

    return Task(
        "cls", model, calib, evaluate, "test_acc",
        retained=lambda got, full: got["test_acc"] / full["test_acc"],
        vocab_size=len(vocab), example=calib[0],
        loss=loss,
        training=lambda n: data.labelled_calibration(data.classification_batches(train, vocab, 32, seed=99)[:n]),
    )  # fmt: skip


TASKS = {"lm": lm_task, "lm-fine": fine_lm_task, "cls": cls_task}
# per fixture: (its quality metric, the second number shown beside it)
METRICS = {"lm": ("val_loss", "val_ppl"), "lm-fine": ("val_loss", "val_ppl"), "cls": ("test_acc", "test_loss")}


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _checkpoint_bytes(model: nn.Module, example: dict[str, torch.Tensor]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        target = moefx.save(model, Path(tmp) / "ckpt", example)
        return sum(f.stat().st_size for f in target.rglob("*") if f.is_file())


def quality_rows(task: Task, settings: Settings, keep: dict[tuple[str, float], nn.Module]) -> list[dict]:
    """One row per (ratio, method or ablation); the models named in :data:`SERVED` go to ``keep``."""
    full = task.evaluate(task.model)
    original_expert_params = None
    rows = [{"fixture": task.name, "section": "full model", "label": "original", "experts": 1.0, **full,
             "retained": 1.0, "params": _params(task.model)}]  # fmt: skip
    plan = [row for row in METHOD_ROWS + (ABLATION_ROWS if settings.ablations else [])
            if settings.labels is None or row[1] in settings.labels]  # fmt: skip
    if task.name == "cls":  # layer-wise (sequential) compression is for decoder-only LMs
        plan = [row for row in plan if not row[2].get("sequential")]
    for ratio, (section, label, options) in itertools.product(settings.ratios, plan):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", moefx.MoefxWarning)
            compressed = moefx.compile(task.model, task.calib, experts=ratio, loss=task.loss, **options)
        seconds = time.perf_counter() - start
        report = compressed.moefx_report
        original_expert_params = report.expert_params_before
        scores = task.evaluate(compressed)
        rows.append({
            "fixture": task.name, "section": section, "label": label, "experts": ratio, "options": options, **scores,
            "retained": task.retained(scores, full),
            "expert_params": report.expert_params_after,
            "expert_params_retained": report.expert_params_after / report.expert_params_before,
            "params": _params(compressed),
            "checkpoint_bytes": _checkpoint_bytes(compressed, task.example),
            "flops_retained": report.flops_after / report.flops_before,
            "compile_s": seconds, "stages_s": report.seconds,
        })  # fmt: skip
        print(f"{task.name} {ratio} {label}: {task.metric} {scores[task.metric]:.4f} "
              f"retained {rows[-1]['retained']:.3f} ({seconds:.0f} s)", flush=True)  # fmt: skip
        if label in SERVED:
            keep[(label, ratio)] = compressed
    rows[0]["expert_params"] = original_expert_params
    rows[0]["expert_params_retained"] = 1.0
    rows[0]["checkpoint_bytes"] = models.fixture_bytes(models.FIXTURES_DIR / task.name)
    return rows


def probe_onnx(path: str, vocab_size: int, batch: int, seq: int, repeats: int, threads: int) -> dict[str, float]:
    """Run in a fresh process: median ONNX Runtime latency (ms) and the process's peak resident memory (MiB)."""
    ids = torch.randint(4, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    latency = onnx_latency_ms(path, feed, repeats, threads, warmup=3)
    return {
        "latency_ms": latency,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _eager_latency_ms(model: nn.Module, vocab_size: int, batch: int, seq: int, repeats: int) -> float:
    ids = torch.randint(4, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        return median_ms(lambda: model(**inputs), repeats, warmup=3)


def serving_rows(task: Task, settings: Settings, compressed: dict[tuple[str, float], nn.Module]) -> list[dict]:
    """ONNX Runtime and eager latency, ONNX file size and session peak memory of the original and ``compressed``."""
    served = [("original", 1.0, task.model)] + [(label, r, m) for (label, r), m in compressed.items()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, ratio, model in served:
            path = Path(tmp) / f"{len(rows)}.onnx"
            moefx.export.onnx(model, path, task.example)
            size = sum(f.stat().st_size for f in Path(tmp).glob(f"{path.name}*"))
            graph = onnx.load(str(path), load_external_data=False).graph
            row = {"fixture": task.name, "label": label, "experts": ratio, "onnx_bytes": size,
                   "fused_moe_nodes": sum(n.op_type == "MoE" for n in graph.node)}  # fmt: skip
            for batch, seq in SERVING_SHAPES:
                command = [sys.executable, __file__, "--probe", str(path), str(task.vocab_size), str(batch), str(seq),
                           str(settings.serving_repeats), str(settings.threads)]  # fmt: skip
                result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                row[f"ort_ms_{batch}x{seq}"] = result["latency_ms"]
                row[f"ort_peak_rss_mib_{batch}x{seq}"] = result["peak_rss_mib"]
                row[f"eager_ms_{batch}x{seq}"] = _eager_latency_ms(model, task.vocab_size, batch, seq,
                                                                    settings.serving_repeats)  # fmt: skip
            rows.append(row)
            times = ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k.startswith(("ort_ms", "eager_ms")))
            print(f"{task.name} serving {label} {ratio}: {times}", flush=True)
    for row in rows:  # throughput relative to the original in the same runtime, same run
        for batch, seq in SERVING_SHAPES:
            for runtime in ("ort", "eager"):
                key = f"{runtime}_ms_{batch}x{seq}"
                row[f"{runtime}_speedup_{batch}x{seq}"] = rows[0][key] / row[key]
    return rows


def switch_base_shaped(layers: int) -> nn.Module:
    """A randomly initialised Switch encoder with switch-base-32's MoE layer shape (d_model 768, d_ff 3072,
    32 experts, top-1) and ``layers`` layers, all of them MoE."""
    from transformers import SwitchTransformersConfig, SwitchTransformersEncoderModel

    torch.manual_seed(0)
    config = SwitchTransformersConfig(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_heads=12, num_layers=layers, num_experts=32,
        num_sparse_encoder_layers=layers, num_decoder_layers=0, num_sparse_decoder_layers=0, expert_capacity=4096,
        is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    model = SwitchTransformersEncoderModel(config).eval()
    with torch.no_grad():  # spread the routing over the experts (as after training) rather than one-hot
        for name, p in model.named_parameters():
            if name.endswith("router.classifier.weight"):
                p.normal_(0.0, 768**-0.5)
    return model


def probe_compile_cost(layers: int, sequences: int, method: str) -> dict[str, Any]:
    """Run in a fresh process: compile time per stage and peak memory on :func:`switch_base_shaped`."""
    model = switch_base_shaped(layers)
    gen = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 32128, (8, 128), generator=gen),
              "attention_mask": torch.ones(8, 128, dtype=torch.long)} for _ in range(sequences // 8)]  # fmt: skip
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", moefx.MoefxWarning)
        compressed = moefx.compile(model, calib, experts=0.5, method=method, inplace=True)
    return {"method": method, "layers": layers, "sequences": sequences, "total_s": time.perf_counter() - start,
            "stages_s": compressed.moefx_report.seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def compile_cost(settings: Settings, quality: list[dict]) -> dict[str, Any]:
    """Time per stage of the default method on the fixtures (from the quality runs) and on a switch-base-shaped
    model, measured on two MoE layers and extrapolated linearly to switch-base-32's twelve."""
    timed = (f"{DEFAULT} (default)", "mc-smoe")
    keys = ("fixture", "experts", "label", "compile_s", "stages_s")
    fixtures = [{k: r[k] for k in keys} for r in quality if r["section"] == "method" and r["label"] in timed]
    shaped = []
    if settings.compile_cost_model:
        for method in (DEFAULT, "m-smoe"):
            command = [sys.executable, __file__, "--compile-probe", "2", "64", method]
            shaped.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
            print(f"switch-base-shaped compile ({method}): {shaped[-1]['total_s']:.0f} s", flush=True)
    return {"fixtures": fixtures, "switch_base_shaped": shaped}


def environment(settings: Settings) -> dict[str, Any]:
    import onnxruntime
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "threads": settings.threads}  # fmt: skip


def quantized_rows(task: Task, settings: Settings, compressed: dict[tuple[str, float], nn.Module]) -> list[dict]:
    """Quality and ONNX file bytes of the original and the default with ``settings.expert_bits`` experts (QMoE), 4-bit
    ones also on int8 activations, each against the same model with float32 experts. Quality is measured on the
    eager model with the rounded weights (and activations) the file computes with, which the export's parity
    check ties to ONNX Runtime's output."""
    forms = [(bits, False) for bits in settings.expert_bits] + [(4, True)] * (4 in settings.expert_bits)
    served = [("original", 1.0, task.model)]
    served += [(label, r, m) for (label, r), m in compressed.items() if label.startswith(DEFAULT)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, ratio, model in served if settings.expert_bits else []:
            float_scores = task.evaluate(model)
            for bits, int8_activations in forms:
                path = moefx.export.onnx(model, Path(tmp) / f"{len(rows)}.onnx", task.example, expert_bits=bits,
                                         int8_activations=int8_activations)  # fmt: skip
                size = sum(f.stat().st_size for f in Path(tmp).glob(f"{path.name}*"))
                quantized = moefx.export.with_quantized_experts(model, task.example, bits, int8_activations)
                scores = task.evaluate(quantized)
                rows.append({"fixture": task.name, "label": label, "experts": ratio, "bits": bits,
                             "int8_activations": int8_activations, **scores, "float": float_scores,
                             "onnx_bytes": size})  # fmt: skip
                print(
                    f"{task.name} {label} {ratio} int{bits}{' a8' if int8_activations else ''}: {task.metric} "
                    f"{scores[task.metric]:.4f} (float32 experts {float_scores[task.metric]:.4f})",
                    flush=True,
                )
    return rows


def run(settings: Settings, out_dir: Path) -> dict[str, Any]:
    """Run the benchmark with ``settings`` and write ``results.json``, ``results.md`` and the plot to ``out_dir``."""
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    results: dict[str, Any] = {"settings": asdict(settings), "environment": environment(settings),
                               "quality": [], "serving": [], "quantized": []}  # fmt: skip
    for name in settings.fixtures:
        task = TASKS[name](settings)
        served: dict[tuple[str, float], nn.Module] = {}
        results["quality"] += quality_rows(task, settings, served)
        if name in settings.serving_fixtures:
            results["serving"] += serving_rows(task, settings, served)
        results["quantized"] += quantized_rows(task, settings, served)
    results["compile_cost"] = compile_cost(settings, results["quality"])
    results["wall_s"] = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / "results.json") as target:
        target.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    plot_quality_vs_memory(results, out_dir / "quality_vs_memory.png")
    with atomic_output(out_dir / "results.md") as target:
        target.write_text(render_markdown(results), encoding="utf-8")
    return results


def plot_quality_vs_memory(results: dict[str, Any], path: Path) -> None:
    """Quality retained against expert parameters retained, one panel per fixture, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixtures = list(dict.fromkeys(r["fixture"] for r in results["quality"]))
    figure, axes = plt.subplots(1, len(fixtures), figsize=(6 * len(fixtures), 4.5), squeeze=False)
    for ax, fixture in zip(axes[0], fixtures, strict=True):
        rows = [r for r in results["quality"] if r["fixture"] == fixture and r["section"] == "method"]
        for label in dict.fromkeys(r["label"] for r in rows):
            points = sorted((r["expert_params_retained"], r["retained"]) for r in rows if r["label"] == label)
            x, y = zip(*points, strict=True)
            ax.plot(x, y, marker="o", linewidth=2.5 if label.startswith(DEFAULT) else 1.2, label=label)
        ax.set_title(f"{fixture}: quality retained vs expert parameters (no fine-tuning)")
        ax.set_xlabel("expert parameters retained")
        perplexity = METRICS[fixture][1] == "val_ppl"
        ax.set_ylabel("quality retained" + (" (ppl_full / ppl)" if perplexity else " (acc / acc_full)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    with atomic_output(path) as target:
        figure.savefig(target, dpi=110)
    plt.close(figure)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def render_markdown(results: dict[str, Any]) -> str:
    s, env = results["settings"], results["environment"]
    lines = [
        "# moefx benchmark results",
        "",
        f"Generated by `python benchmarks/run.py{' --quick' if s['calib_sequences'] < 256 else ''}` in "
        f"{results['wall_s'] / 60:.1f} min on {s['threads']} CPU threads (torch {env['torch']}, transformers "
        f"{env['transformers']}, onnxruntime {env['onnxruntime']}). No method is fine-tuned. Calibration: "
        f"{s['calib_sequences']} sequences for every method. `lm`: the Mixtral character LM fixture on "
        "tinyshakespeare, validation loss (nats/char) on "
        + ("the whole validation split" if s["lm_eval_windows"] is None else f"{s['lm_eval_windows']} windows")
        + "; `lm-fine`: the fine-grained Qwen3-MoE character LM fixture (64 experts, top-8) on SST-2's sentences "
        "as running text, validation loss on the second half of test.tsv's sentences; for both, quality retained "
        "= ppl_full / ppl. `cls`: the Switch classifier fixture on SST-2 test.tsv; "
        "quality retained = acc / acc_full. Sizes: expert parameters kept (of the MoE layers), all parameters, "
        "and the bytes of the saved checkpoint (`moefx.save`, float32).",
        "",
    ]
    for fixture in dict.fromkeys(r["fixture"] for r in results["quality"]):
        rows = [r for r in results["quality"] if r["fixture"] == fixture]
        metric, second = METRICS[fixture]
        lines += [f"## Quality vs memory: {fixture}", "",
                  f"| experts | section | method | {metric} | {second} | quality retained | expert params "
                  "retained | FLOPs/token retained | params | checkpoint MiB | compile s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            lines.append(
                f"| {r['experts']:g} | {r['section']} | {r['label']} | {r[metric]:.4f} | {r[second]:.4f} | "
                f"{r['retained']:.3f} | {r['expert_params_retained']:.3f} | {r.get('flops_retained', 1.0):.3f} | "
                f"{r['params']:,} | {_mib(r['checkpoint_bytes'])} | {r.get('compile_s', 0.0):.1f} |"
            )
        lines.append("")
        for ratio in s["ratios"]:
            best = headline(results, fixture, ratio)
            lines.append(
                f"- {ratio:g} experts: default {best['default']:.4f} ({best['default_retained']:.3f} retained) vs best "
                f"baseline {best['baseline_label']} {best['baseline']:.4f} ({best['baseline_retained']:.3f} retained)."
            )
        lines.append("")
    lines += ["![quality vs memory](quality_vs_memory.png)", ""]
    if results["serving"]:
        lines += ["## Serving: ONNX Runtime (CPU) and eager PyTorch", "",
                  f"Median of {s['serving_repeats']} runs after 3 warm-ups; ONNX Runtime with {s['threads']} intra-op "
                  "threads, one fresh process per model (peak RSS is that process's, imports included); speedup = "
                  "original latency / latency, in the same runtime and run. Fused = `com.microsoft.MoE` nodes.", "",
                  "| fixture | model | experts | ONNX MiB | fused | ORT ms 1x128 | ORT ms 16x128 | ORT speedup 1x128 | "
                  "ORT speedup 16x128 | ORT peak RSS MiB 16x128 | eager ms 1x128 | eager ms 16x128 | "
                  "eager speedup 16x128 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["serving"]:
            lines.append(
                f"| {r['fixture']} | {r['label']} | {r['experts']:g} | {_mib(r['onnx_bytes'])} | "
                f"{r['fused_moe_nodes']} | "
                f"{r['ort_ms_1x128']:.2f} | {r['ort_ms_16x128']:.2f} | {r['ort_speedup_1x128']:.2f} | "
                f"{r['ort_speedup_16x128']:.2f} | {r['ort_peak_rss_mib_16x128']:.0f} | {r['eager_ms_1x128']:.2f} | "
                f"{r['eager_ms_16x128']:.2f} | {r['eager_speedup_16x128']:.2f} |"
            )
        lines.append("")
    if results["quantized"]:
        lines += ["## Quantized experts: ONNX Runtime's QMoE", "",
                  "`moefx.export.onnx(..., expert_bits=8 | 4)`: symmetric 8-bit (a scale per row) or 4-bit (a scale "
                  "per 32 input columns) expert weights. Quality is that of the eager model with the file's rounded "
                  "expert weights (`moefx.export.with_quantized_experts`; the export's parity check ties ONNX "
                  "Runtime's output to it), against the same model with float32 experts. `4, int8 activations` "
                  "rows are exported with `int8_activations=True`: ONNX Runtime's kernel also rounds each expert "
                  "matrix's input to int8 per 32 columns, and the eager model rounds them alike. ONNX MiB is the "
                  "whole file.", "",
                  "| fixture | model | experts | expert bits | metric | float32 experts | quantized | change | "
                  "ONNX MiB |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["quantized"]:
            metric = METRICS[r["fixture"]][0]
            lines.append(
                f"| {r['fixture']} | {r['label']} | {r['experts']:g} | {r['bits']}"
                f"{', int8 activations' if r['int8_activations'] else ''} | {metric} | "
                f"{r['float'][metric]:.4f} | {r[metric]:.4f} | {r[metric] - r['float'][metric]:+.4f} | "
                f"{_mib(r['onnx_bytes'])} |"
            )
        lines.append("")
    cost = results["compile_cost"]
    lines += [
        "## Compile cost",
        "",
        "| model | method | experts | total s | time per stage (s) |",
        "|---|---|---|---|---|",
    ]
    for r in cost["fixtures"]:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items())
        lines.append(f"| {r['fixture']} fixture | {r['label']} | {r['experts']:g} | {r['compile_s']:.1f} | {stages} |")
    for r in cost["switch_base_shaped"]:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items())
        lines.append(
            f"| switch-base-32-shaped, {r['layers']} MoE layers, {r['sequences']} x 128 tokens | {r['method']} | "
            f"0.5 | {r['total_s']:.1f} | {stages}; peak RSS {r['peak_rss_mib']:.0f} MiB |"
        )
    for r in cost["switch_base_shaped"]:
        per_layer = r["total_s"] / r["layers"]
        lines.append(
            f"\nExtrapolated to switch-base-32's 12 MoE layers ({r['method']}): about {12 * per_layer / 60:.0f} min "
            f"({per_layer:.0f} s per layer, linear in layers; calibration also grows with data)."
        )
    return "\n".join(lines) + "\n"


def headline(results: dict[str, Any], fixture: str, ratio: float) -> dict[str, Any]:
    """The default method's quality and the best baseline's, at ``ratio`` experts."""
    rows = {r["label"]: r for r in results["quality"]
            if r["fixture"] == fixture and r["experts"] == ratio and r["section"] == "method"}  # fmt: skip
    metric = METRICS[fixture][0]
    default = rows[f"{DEFAULT} (default)"]
    baselines = [rows[b] for b in BASELINES if b in rows]
    best = max(baselines, key=lambda r: r["retained"])
    return {"default": default[metric], "default_retained": default["retained"], "baseline_label": best["label"],
            "baseline": best[metric], "baseline_retained": best["retained"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calibration sequences, no ablations (default: off)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="where results.md, results.json and the plot go (default: benchmarks/)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default: 2)")
    parser.add_argument("--probe", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--compile-probe", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        path, vocab, batch, seq, repeats, threads = args.probe
        print(json.dumps(probe_onnx(path, int(vocab), int(batch), int(seq), int(repeats), int(threads))))
        return
    torch.set_num_threads(args.threads)
    if args.compile_probe:
        layers, sequences, method = args.compile_probe
        print(json.dumps(probe_compile_cost(int(layers), int(sequences), method)))
        return
    settings = replace(QUICK if args.quick else Settings(), threads=args.threads)
    run(settings, args.out)
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
