"""Compare choices for the defaults on every fixture's held-out tuning split, never on the benchmark's evaluation sets.

    python benchmarks/tuning.py [--out benchmarks] [--threads 2]

Writes ``tuning.md`` and its rows as ``tuning.json``. ``lm``: calibration windows from the tinyshakespeare
training split without its last 50,000 characters, scored on those characters (validation stays untouched).
``lm-fine``: calibration windows from SST-2's training sentences, scored on its tuning split, the first half of
test.tsv's sentences (its validation is the second half). ``cls``: calibration on SST-2 training sentences,
scored on dev.tsv (test.tsv stays untouched).

Each option the defaults depend on (selection, grouping, refit, per-layer budget, ridge, calibration size,
MC-SMoE's sparse score) is varied alone, the others at their defaults, and compressed at 50% and 25% experts without
fine-tuning. A choice is judged on all fixtures together: its quality retained (``ppl_full / ppl`` for the LMs,
``acc / acc_full`` for the classifier) averaged over fixtures and ratios. The default compressed with two other
draws of calibration data shows how much of a lead is chance: a smaller lead is a tie, which the default keeps.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

if __package__ in (None, ""):
    # run as `python benchmarks/tuning.py`: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import moefx  # noqa: E402
from benchmarks import data, models  # noqa: E402
from moefx.export.serving import atomic_output  # noqa: E402
from moefx.objective import LossFn  # noqa: E402

TUNING_CHARS = 50_000
RATIOS = (0.5, 0.25)
TIE = 5e-4  # mean retained differences below the table's precision
SAMPLE_OPTION = "calibration sample"  # its rows measure how much drawing other calibration data moves the mean


class Calibration(NamedTuple):
    """Calibration data: how many sequences, and which sample of them (0: the benchmark's own)."""

    sequences: int
    sample: int = 0


CALIB = Calibration(256)  # the benchmark's calibration, which every other choice uses
# (option, choice, compile options, calibration); each option's first choice is the default
CHOICES = [
    ("selection", "contribution (default)", {}, CALIB),
    ("selection", "reap", {"selection": "reap"}, CALIB),
    ("selection", "frequency", {"selection": "frequency"}, CALIB),
    ("selection", "error", {"selection": "error"}, CALIB),
    ("grouping", "router-logits (default)", {}, CALIB),
    ("grouping", "output-error", {"similarity": "output-error"}, CALIB),
    ("refit", "in+out (default)", {}, CALIB),
    ("refit", "units", {"refit": "units"}, CALIB),
    ("refit", "out", {"refit": "out"}, CALIB),
    ("refit", "none", {"refit": "none"}, CALIB),
    ("per-layer budget", "uniform (default)", {}, CALIB),
    ("per-layer budget", "adaptive (normalised scores)", {"adaptive": True}, CALIB),
    ("per-layer budget", "adaptive (error)", {"adaptive": True, "selection": "error"}, CALIB),
    ("ridge", "0.01 (default)", {}, CALIB),
    ("ridge", "0.001", {"ridge": 1e-3}, CALIB),
    ("ridge", "0.1", {"ridge": 1e-1}, CALIB),
    ("calibration sequences", "256 (default)", {}, CALIB),
    ("calibration sequences", "64", {}, Calibration(64)),
    ("calibration sequences", "1024", {}, Calibration(1024)),
    (SAMPLE_OPTION, "the benchmark's (default)", {}, CALIB),
    (SAMPLE_OPTION, "another", {}, Calibration(256, 1)),
    (SAMPLE_OPTION, "a third", {}, Calibration(256, 2)),
    ("mc-smoe sparse score", "activation (default)", {"method": "mc-smoe"}, CALIB),
    ("mc-smoe sparse score", "gradient", {"method": "mc-smoe", "sparse_score": "gradient"}, CALIB),
]


@dataclass
class TuningFixture:
    """A fixture, its calibration data of a given size and sample (with the loss the gradient score needs), and
    its score on the tuning split (``loss``, and ``accuracy`` for the classifier)."""

    name: str
    model: nn.Module
    calibration: Callable[[Calibration], tuple[list[dict[str, torch.Tensor]], LossFn | None]]
    score: Callable[[nn.Module], dict[str, float]]


def lm_fixture() -> TuningFixture:
    train, _ = data.shakespeare_splits(data.CharVocab.load(models.FIXTURES_DIR / "lm" / "vocab.json"))
    return _char_lm_fixture("lm", train[:-TUNING_CHARS], train[-TUNING_CHARS:])


def fine_lm_fixture() -> TuningFixture:
    train, tuning, _ = data.sst2_lm_splits(data.CharVocab.load(models.FIXTURES_DIR / "lm-fine" / "vocab.json"))
    return _char_lm_fixture("lm-fine", train, tuning)


def _char_lm_fixture(name: str, calib_ids: torch.Tensor, tuning_ids: torch.Tensor) -> TuningFixture:
    """The character LM fixture ``name``, calibrated on windows of ``calib_ids``, scored on ``tuning_ids``."""
    tuning = data.lm_eval_batches(tuning_ids)
    return TuningFixture(
        name,
        models.load_lm(models.FIXTURES_DIR / name),
        lambda calib: (data.lm_calibration(calib_ids, calib.sequences, seed=1234 + calib.sample), None),
        lambda m: {"loss": data.lm_validation_loss(m, tuning)},
    )


def cls_fixture() -> TuningFixture:
    fixture = models.FIXTURES_DIR / "cls"
    vocab = data.WordVocab.load(fixture / "vocab.json")
    train = data.read_sst2("train")
    dev = data.classification_batches(data.read_sst2("dev"), vocab)
    return TuningFixture(
        "cls",
        models.load_classifier(fixture),
        lambda calib: data.labelled_calibration(data.classification_batches(_sample(train, calib), vocab, 32, seed=7)),
        lambda m: {"loss": data.classification_loss(m, dev), "accuracy": data.classification_accuracy(m, dev)},
    )


def _sample(examples: list[Any], calib: Calibration) -> list[Any]:
    """The benchmark's calibration examples (the first ones) for sample 0, else a seeded random draw."""
    if calib.sample == 0:
        return examples[: calib.sequences]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(calib.sample))
    return [examples[i] for i in order[: calib.sequences].tolist()]


FIXTURES = (lm_fixture, fine_lm_fixture, cls_fixture)


def fixture_rows(fixture: TuningFixture) -> list[dict[str, Any]]:
    """The original's score, then one row per ratio and choice; a configuration shared by several choices (each
    option's default) is compressed once."""
    rows = [{"fixture": fixture.name, "option": "", "choice": "original", "experts": 1.0,
             **fixture.score(fixture.model)}]  # fmt: skip
    scores: dict[tuple, dict[str, float]] = {}
    for ratio in RATIOS:
        for option, choice, options, calibration in CHOICES:
            key = (ratio, calibration, tuple(sorted(options.items())))
            if key not in scores:
                calib, loss = fixture.calibration(calibration)
                scores[key] = fixture.score(moefx.compile(fixture.model, calib, experts=ratio, loss=loss, **options))
            rows.append({"fixture": fixture.name, "option": option, "choice": choice, "experts": ratio,
                         **scores[key]})  # fmt: skip
    return rows


def retained(row: dict[str, Any], original: dict[str, Any]) -> float:
    """Quality kept: ``ppl_full / ppl`` from losses, ``acc / acc_full`` where there is an accuracy."""
    if "accuracy" in row:
        return row["accuracy"] / original["accuracy"]
    return math.exp(original["loss"] - row["loss"])


def render(rows: list[dict[str, Any]], seconds: float) -> str:
    originals = {r["fixture"]: r for r in rows if r["choice"] == "original"}
    fixtures = list(originals)
    columns = [(f, ratio) for f in fixtures for ratio in RATIOS]
    lines = [
        "# Tuning splits",
        "",
        f"Generated by `python benchmarks/tuning.py` in {seconds / 60:.1f} min. Choices for the defaults are compared "
        "here, on data the benchmark never scores: lm loss (nats/char) on the last 50,000 characters of the "
        "training split (calibrated without them), lm-fine loss (nats/char) on the first half of SST-2 test.tsv's "
        "sentences, cls loss and accuracy on SST-2 dev.tsv. No fine-tuning. Each option is varied alone, the "
        "others at their defaults; each cell is the tuning score and, in brackets, the quality retained "
        "(ppl_full / ppl for the LMs, acc / acc_full for cls). A choice is judged by its mean retained over all "
        "fixtures and ratios.",
        "",
        "Originals: " + ", ".join(
            f"{f} loss {r['loss']:.4f}" + (f" accuracy {r['accuracy']:.4f}" if "accuracy" in r else "")
            for f, r in originals.items()
        ) + ".",
        "",
        "| option | choice | " + " | ".join(f"{f} {ratio:g}" for f, ratio in columns) + " | mean retained |",
        "|---|---|" + "---|" * (len(columns) + 1),
    ]  # fmt: skip
    means: dict[str, dict[str, float]] = {}
    for option, choice, _, _ in CHOICES:
        cells, kept = [], []
        for f, ratio in columns:
            row = next(r for r in rows if (r["fixture"], r["option"], r["choice"], r["experts"]) ==
                       (f, option, choice, ratio))  # fmt: skip
            kept.append(retained(row, originals[f]))
            score = f"{row['accuracy']:.4f}" if "accuracy" in row else f"{row['loss']:.4f}"
            cells.append(f"{score} ({kept[-1]:.3f})")
        means.setdefault(option, {})[choice] = statistics.fmean(kept)
        lines.append(f"| {option} | {choice} | " + " | ".join(cells) + f" | {means[option][choice]:.3f} |")
    samples = list(means.pop(SAMPLE_OPTION, {}).values())
    noise = max((abs(m - samples[0]) for m in samples), default=0.0)
    tie = max(TIE, noise)
    lines += ["", f"Drawing other calibration data of the same size moves the mean retained by up to {noise:.4f}. "
              "Best choice of each option on all fixtures together (mean retained; a lead smaller than that, or "
              f"than the table's precision, 0.0005, is a tie, which the default keeps: here below {tie:.4f}):",
              ""]  # fmt: skip
    for option, scores in means.items():
        default = next(iter(scores))
        best = max(scores, key=lambda c: (c == default or scores[c] - scores[default] >= tie, scores[c]))
        if best == default:
            lines.append(f"- {option}: the default, {default} ({scores[default]:.3f}).")
        else:
            # choices the best leads by less than the noise are as good: the cheapest of them is the one to take
            near = [c for c in scores if c not in (best, default) and scores[best] - scores[c] < tie]
            ties = [f"{c} ({scores[c]:.3f})" for c in near]
            also = f"; {', '.join(ties)} within the noise of it" if ties else ""
            lines.append(f"- {option}: {best} ({scores[best]:.3f}), {scores[best] - scores[default]:+.3f} over the "
                         f"default {default} ({scores[default]:.3f}){also}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="where tuning.md and tuning.json go (default: benchmarks/)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", moefx.MoefxWarning)
        rows = [row for fixture in FIXTURES for row in fixture_rows(fixture())]
    seconds = time.perf_counter() - start
    with atomic_output(args.out / "tuning.json") as target:
        target.write_text(json.dumps({"seconds": seconds, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    with atomic_output(args.out / "tuning.md") as target:
        target.write_text(render(rows, seconds), encoding="utf-8")
    print(f"wrote {args.out / 'tuning.md'} and tuning.json")


if __name__ == "__main__":
    main()
