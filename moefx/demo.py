"""``moefx demo``: compress the repository's LM fixture end to end and compare it with the original.

The fixture (``benchmarks/fixtures/lm``) is a small ``MixtralForCausalLM`` trained on tinyshakespeare
characters. The demo calibrates on training windows, compresses, exports the original and each compressed
model to ONNX, runs them in ONNX Runtime and measures validation loss and latency. It needs a clone of the
repository (the fixture and the ``benchmarks`` helpers) and the benchmark data (``$MOEFX_DATA`` or
``<repo>/../shared/data``).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from moefx.api import compile
from moefx.config import CompressionConfig
from moefx.errors import MoefxError, first_line
from moefx.export.onnx import cpu_session, file_bytes, onnx
from moefx.report import expert_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT / "benchmarks" / "fixtures" / "lm"
FIXTURE_FILES = ("config.json", "model.safetensors", "vocab.json")
CALIB_BATCH = 8  # sequences per calibration batch
VAL_BATCH = 32


@dataclass
class DemoRow:
    """One model's line of the before/after table (bytes are weights: parameters times element size)."""

    name: str
    experts: int
    expert_bytes: int
    total_bytes: int
    onnx_bytes: int
    val_loss: float
    latency_ms: float


def benchmark_modules() -> tuple[ModuleType, ModuleType]:
    """``benchmarks.data`` and ``benchmarks.models`` of this repository (not an installed package)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        import benchmarks.data
        import benchmarks.models
    except ImportError as exc:
        raise MoefxError(f"this needs the benchmarks package of a moefx repository clone ({first_line(exc)})") from None
    return benchmarks.data, benchmarks.models


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def onnx_latency_ms(
    path: Path | str, feed: dict[str, torch.Tensor], runs: int, threads: int | None = None, warmup: int = 2
) -> float:
    """Median wall time (ms) of an ONNX Runtime run on ``feed`` after ``warmup`` runs, on ``threads`` intra-op
    threads (default: as many as torch uses)."""
    session = cpu_session(path, threads or torch.get_num_threads())
    names = {i.name for i in session.get_inputs()}
    arrays = {k: v.numpy() for k, v in feed.items() if k in names}
    return median_ms(lambda: session.run(None, arrays), runs, warmup)


def median_ms(call: Callable[[], Any], runs: int, warmup: int) -> float:
    """Median wall time (ms) of ``call()`` over ``runs`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_demo(
    methods: list[str],
    experts: float | int = 0.5,
    router: str = "exact",
    num_calib_seqs: int = 64,
    num_val_seqs: int = 32,
    seq_len: int = 128,
    runs: int = 10,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> list[DemoRow]:
    """Compress the LM fixture with each of ``methods`` (at least one) and measure it beside the original.

    Returns one row per model, the original first. The counts must be positive.
    """
    configs = [CompressionConfig(experts=experts, method=m, router=router, progress=progress) for m in methods]
    missing = [name for name in FIXTURE_FILES if not (FIXTURE / name).is_file()]
    if missing:
        raise MoefxError(
            f"the demo needs the LM fixture of a moefx repository clone: {FIXTURE / missing[0]} is missing"
        )
    data, models = benchmark_modules()
    vocab = data.CharVocab.load(FIXTURE / "vocab.json")
    try:
        train, val = data.shakespeare_splits(vocab)
    except data.DataNotFoundError as exc:
        raise MoefxError(str(exc)) from None
    model = models.load_lm(FIXTURE)
    if seq_len > model.config.max_position_embeddings:
        raise MoefxError(f"--seq-len {seq_len} exceeds the fixture's {model.config.max_position_embeddings} positions")
    if max(num_val_seqs, 2) * seq_len > len(val):
        raise MoefxError(f"the validation split holds only {len(val) // seq_len} sequences of {seq_len} characters")
    windows = next(data.lm_train_batches(train, seq_len, num_calib_seqs, seed=0))
    calib = [{k: v[i : i + CALIB_BATCH] for k, v in windows.items()} for i in range(0, num_calib_seqs, CALIB_BATCH)]
    val_batches = data.lm_eval_batches(val[: num_val_seqs * seq_len], seq_len, VAL_BATCH)
    # export with two rows so that the batch axis stays dynamic; time one sequence, as a request is served
    example = data.lm_batch(val[: 2 * seq_len].view(2, seq_len))
    feed = data.lm_batch(val[:seq_len].view(1, seq_len))
    log(
        f"LM fixture: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"calibration: {num_calib_seqs} training sequences, validation: {num_val_seqs} sequences "
        f"of {seq_len} characters"
    )
    compressed = []
    for config in configs:
        start = time.perf_counter()
        compressed.append((config.method, compile(model, calib, config)))
        seconds = time.perf_counter() - start
        log(f"compressed with {config.method} (experts={experts}, router={router}) in {seconds:.1f} s")
    before = compressed[0][1].moefx_report  # every report's "before" describes the original
    rows = []
    with tempfile.TemporaryDirectory(prefix="moefx-demo-") as scratch:
        for name, candidate, after in [("original", model, False), *((m, c, True) for m, c in compressed)]:
            start = time.perf_counter()
            path = onnx(candidate, Path(scratch) / f"{name}.onnx", example)
            log(f"exported {name} to ONNX in {time.perf_counter() - start:.1f} s")
            blocks = (candidate.moefx_report if after else before).blocks
            rows.append(
                DemoRow(
                    name=name,
                    experts=sum(b.kept if after else b.num_experts for b in blocks),
                    expert_bytes=sum(expert_bytes(b)[int(after)] for b in blocks),
                    total_bytes=_weight_bytes(candidate),
                    onnx_bytes=file_bytes(path),
                    val_loss=data.lm_validation_loss(candidate, val_batches),
                    latency_ms=onnx_latency_ms(path, feed, runs),
                )
            )
    return rows


def table(rows: list[DemoRow]) -> str:
    """The before/after table, one model per line."""
    header = ["model", "experts", "expert MB", "weights MB", "ONNX file MB", "val loss (nats/char)", "ONNX ms"]
    cells = [
        [r.name, str(r.experts), *(f"{n / 1e6:.2f}" for n in (r.expert_bytes, r.total_bytes, r.onnx_bytes)),
         f"{r.val_loss:.4f}", f"{r.latency_ms:.2f}"]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]

    def line(values: list[str]) -> str:  # the name left-aligned, numbers right-aligned
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)])
