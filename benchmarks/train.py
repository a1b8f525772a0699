"""Train a benchmark fixture reproducibly from a seed.

    python benchmarks/train.py lm|lm-fine|cls [--seed 0] [--minutes N] [--steps N] [--out DIR] [--threads 2]

``lm``: the Mixtral character LM on tinyshakespeare (validation: the last 10% of the text).
``lm-fine``: the fine-grained Qwen3-MoE character LM on SST-2's training sentences as running text (validation:
the second half of test.tsv's sentences; the first half is its tuning split).
``cls``: the Switch encoder classifier on SST-2 (model selection on dev.tsv, final accuracy on test.tsv).

Training uses AdamW, linear warmup then cosine decay over ``--steps``, gradient clipping and the Switch
load-balancing auxiliary loss on every MoE layer at the config's ``router_aux_loss_coef`` (``lm-fine``: Qwen3's
0.001, so its routing stays as uneven as real models'), plus the router z-loss for the Switch model. It validates
periodically, stops when validation has not improved for ``patience`` evaluations, at ``--steps``, or when
``--minutes`` run out, and keeps the best weights. A run is deterministic for a given seed, step limit and
thread count on a given machine, unless the time budget cuts it short. Next to the weights it writes
``train_log.json`` (curve, final metrics, per-layer expert frequencies on validation data) and it prints
each MoE layer's routing spread (expert usage, and how peaked each token's router distribution is).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

if __package__ in (None, ""):
    # run as `python benchmarks/train.py`: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.data import (  # noqa: E402
    CharVocab,
    DataNotFoundError,
    LabeledBatch,
    WordVocab,
    classification_accuracy,
    classification_batches,
    classification_loss,
    lm_eval_batches,
    lm_train_batches,
    lm_validation_loss,
    read_sst2,
    shakespeare_splits,
    shakespeare_text,
    sst2_char_vocab,
    sst2_lm_splits,
)
from benchmarks.models import (  # noqa: E402
    FIXTURES_DIR,
    MAX_FIXTURE_BYTES,
    build_classifier,
    build_fine_lm,
    build_lm,
    fixture_bytes,
    save_classifier,
    save_lm,
)
from moefx.objective import next_token_loss  # noqa: E402

THREADS = 2
LM_SEQ_LEN = 128
LM_CHECK_BATCHES = 2


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one fixture; ``steps`` is both the step limit and the LR schedule's length."""

    steps: int
    minutes: float
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float
    clip: float
    eval_every: int
    patience: int


_LM = TrainConfig(
    steps=5000,
    minutes=20.0,
    batch_size=32,
    lr=2e-3,
    warmup=200,
    weight_decay=0.1,
    clip=1.0,
    eval_every=250,
    patience=4,
)
DEFAULTS = {
    "lm": _LM,
    # a step takes twice lm's time (64 experts): a shorter schedule keeps it within 30 minutes on 2 cores
    "lm-fine": replace(_LM, steps=2800, minutes=29.0),
    "cls": TrainConfig(
        steps=6000,
        minutes=10.0,
        batch_size=64,
        lr=1e-3,
        warmup=300,
        weight_decay=0.01,
        clip=1.0,
        eval_every=300,
        patience=5,
    ),
}

# (router logits of each MoE layer, flattened to [tokens, experts]; bool mask of the real tokens)
RouterOutputs = tuple[Sequence[torch.Tensor], torch.Tensor]


def load_balancing_loss(router_logits: Sequence[torch.Tensor], mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss ``E * sum_e f_e * P_e`` averaged over MoE layers, where ``f_e`` is the
    fraction of top-k assignments given to expert ``e`` and ``P_e`` its mean router probability over real
    tokens. It is 1 for perfectly balanced routing; per layer so that no single layer may collapse."""
    losses = []
    for logits in router_logits:
        probs = logits[mask].float().softmax(dim=-1)
        num_experts = probs.shape[-1]
        assigned = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(dim=1).float()
        losses.append(num_experts * (assigned.mean(dim=0) / top_k * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The router z-loss (ST-MoE): mean squared log-partition of the router logits over real tokens and layers."""
    return torch.stack([torch.logsumexp(logits[mask].float(), dim=-1).pow(2).mean() for logits in router_logits]).mean()


@torch.no_grad()
def routing_statistics(outputs: Iterable[RouterOutputs], top_k: int) -> list[dict[str, Any]]:
    """Per MoE layer, over the real tokens: ``frequency``, the fraction of top-k assignments each expert receives,
    and the spread of the routing: usage ``min``/``max``/``entropy`` (nats) of ``frequency``, and per token the mean
    router ``token_entropy`` and ``top_k_mass`` (probability of the chosen experts). Balanced usage has a usage
    entropy near ``ln E``; routers that tell tokens apart have a token entropy well below ``ln E`` and a top-k
    mass well above ``k / E``, which is what uniform routers give."""
    sums: list[dict[str, Any]] = []
    for router_logits, mask in outputs:
        for layer, logits in enumerate(router_logits):
            probs = logits[mask].float().softmax(dim=-1)
            top = probs.topk(top_k, dim=-1)
            part = {
                "counts": torch.bincount(top.indices.reshape(-1), minlength=probs.shape[-1]).double(),
                "token_entropy": -(probs * probs.clamp_min(1e-12).log()).sum().item(),
                "top_k_mass": top.values.sum().item(),
                "tokens": probs.shape[0],
            }
            if layer == len(sums):
                sums.append(part)
            else:
                sums[layer] = {key: sums[layer][key] + value for key, value in part.items()}
    stats = []
    for layer in sums:
        frequency = layer["counts"] / layer["counts"].sum()
        used = frequency[frequency > 0]
        num_experts = len(frequency)
        stats.append(
            {
                "frequency": frequency.tolist(),
                "min": frequency.min().item(),
                "max": frequency.max().item(),
                "entropy": -(used * used.log()).sum().item(),
                "uniform_entropy": math.log(num_experts),
                "unused_experts": int((frequency == 0).sum().item()),
                "token_entropy": layer["token_entropy"] / layer["tokens"],
                "top_k_mass": layer["top_k_mass"] / layer["tokens"],
                "uniform_top_k_mass": top_k / num_experts,
            }
        )
    return stats


def moe_layer_names(model: nn.Module) -> list[str]:
    """Names of the model's MoE blocks, in forward order."""
    moe_types = (MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock, SwitchTransformersSparseMLP)
    return [name for name, module in model.named_modules() if isinstance(module, moe_types)]


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # no weight decay on norm scales and biases
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to 0.1 at ``cfg.steps``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class FitResult:
    """How :func:`fit` went: steps run, the best validation point, why it stopped, seconds and the curve."""

    steps: int
    best_step: int
    best_metric: float
    stop_reason: str
    seconds: float
    curve: list[dict[str, float]]


def fit(
    model: nn.Module,
    cfg: TrainConfig,
    train_step: Callable[[], dict[str, torch.Tensor]],
    validate: Callable[[], float],
    metric: str,
    higher_is_better: bool,
) -> FitResult:
    """Optimise ``train_step()["loss"]``, validate every ``cfg.eval_every`` steps, stop on plateau, step limit or
    time budget, and leave the best validated weights in ``model``."""
    optimizer = _optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    start = time.perf_counter()
    sign = 1.0 if higher_is_better else -1.0
    best_metric, best_step, best_state = -math.inf * sign, 0, copy.deepcopy(model.state_dict())
    curve: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    stop_reason, step, stale = "steps", 0, 0
    model.train()
    while step < cfg.steps:
        parts = train_step()
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        schedule.step()
        step += 1
        for key, value in {**parts, "grad_norm": grad_norm}.items():
            sums[key] = sums.get(key, 0.0) + value.item()
        out_of_time = time.perf_counter() - start > cfg.minutes * 60
        if step % cfg.eval_every and step < cfg.steps and not out_of_time:
            continue
        value = validate()
        count = step - (curve[-1]["step"] if curve else 0)
        point = {"step": step, **{k: v / count for k, v in sums.items()}, metric: value}
        point |= {"lr": schedule.get_last_lr()[0], "seconds": round(time.perf_counter() - start, 1)}
        curve.append(point)
        sums = {}
        improved = sign * (value - best_metric) > 0
        if improved:
            best_metric, best_step, best_state, stale = value, step, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items()), flush=True)
        if out_of_time:
            stop_reason = "time budget"
            break
        if stale >= cfg.patience:
            stop_reason = f"plateau ({cfg.patience} evaluations without improvement)"
            break
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(step, best_step, best_metric, stop_reason, time.perf_counter() - start, curve)


def _report_routing(model: nn.Module, stats: list[dict[str, Any]]) -> tuple[dict, dict]:
    """Print each MoE layer's routing spread; returns ``(frequency per layer, spread per layer)`` for the log."""
    names = moe_layer_names(model)
    print("routing on validation data (usage: share of top-k assignments per expert; token: router distribution):")
    for name, s in zip(names, stats, strict=True):
        print(
            f"  {name}: usage min {s['min']:.4f} max {s['max']:.4f} entropy {s['entropy']:.3f} "
            f"(uniform {s['uniform_entropy']:.3f}) unused {s['unused_experts']}; token entropy "
            f"{s['token_entropy']:.3f}, top-k mass {s['top_k_mass']:.3f} (uniform {s['uniform_top_k_mass']:.3f})"
        )
    frequencies = {name: s["frequency"] for name, s in zip(names, stats, strict=True)}
    spread = {name: {k: v for k, v in s.items() if k != "frequency"} for name, s in zip(names, stats, strict=True)}
    return frequencies, spread


def _shakespeare() -> tuple[CharVocab, torch.Tensor, torch.Tensor]:
    vocab = CharVocab.build(shakespeare_text())
    return vocab, *shakespeare_splits(vocab)


def _sst2_text() -> tuple[CharVocab, torch.Tensor, torch.Tensor]:
    vocab = sst2_char_vocab()
    train_ids, _, val_ids = sst2_lm_splits(vocab)
    return vocab, train_ids, val_ids


# per LM task: (its model builder, its text as (vocabulary, training ids, validation ids))
LM_TASKS: dict[str, tuple[Callable[[int], nn.Module], Callable[[], tuple[CharVocab, torch.Tensor, torch.Tensor]]]] = {
    "lm": (build_lm, _shakespeare),
    "lm-fine": (build_fine_lm, _sst2_text),
}


def train_lm(task: str, seed: int, cfg: TrainConfig, out_dir: Path) -> dict:
    """Train, save and describe the LM fixture ``task`` (see :data:`LM_TASKS`); returns the training log."""
    build, text = LM_TASKS[task]
    vocab, train_ids, val_ids = text()
    val_batches = lm_eval_batches(val_ids, LM_SEQ_LEN)
    stream = lm_train_batches(train_ids, LM_SEQ_LEN, cfg.batch_size, seed)
    torch.manual_seed(seed)
    model = build(len(vocab))
    aux_coef, top_k = model.config.router_aux_loss_coef, model.config.num_experts_per_tok

    def train_step() -> dict[str, torch.Tensor]:
        batch = next(stream)
        out = model(**batch, output_router_logits=True)
        ce = next_token_loss(out.logits, batch["input_ids"], batch["attention_mask"])
        aux = load_balancing_loss(out.router_logits, batch["attention_mask"].reshape(-1).bool(), top_k)
        return {"loss": ce + aux_coef * aux, "train_ce": ce.detach(), "aux": aux.detach()}

    result = fit(model, cfg, train_step, lambda: lm_validation_loss(model, val_batches), "val_loss", False)

    def router_outputs() -> Iterator[RouterOutputs]:
        for batch in val_batches:
            yield model(**batch, output_router_logits=True).router_logits, batch["attention_mask"].reshape(-1).bool()

    frequencies, spread = _report_routing(model, routing_statistics(router_outputs(), top_k))
    save_lm(model, out_dir)
    vocab.save(out_dir / "vocab.json")
    final = {
        "val_loss": lm_validation_loss(model, val_batches),
        "val_tokens": sum(b["input_ids"].numel() for b in val_batches),
    }
    check = {
        "what": f"lm_validation_loss on lm_eval_batches(val_ids, {LM_SEQ_LEN}, 32)[:{LM_CHECK_BATCHES}]",
        "val_loss": lm_validation_loss(model, val_batches[:LM_CHECK_BATCHES]),
    }
    print(f"final validation loss {final['val_loss']:.4f} nats/char", flush=True)
    return _log(task, seed, cfg, model, result, final, check, frequencies, spread, out_dir)


def train_cls(task: str, seed: int, cfg: TrainConfig, out_dir: Path) -> dict:
    """Train, save and describe the classifier fixture; returns the training log."""
    train, dev, test = read_sst2("train"), read_sst2("dev"), read_sst2("test")
    vocab = WordVocab.build(sentence for sentence, _ in train)
    dev_batches = classification_batches(dev, vocab)
    test_batches = classification_batches(test, vocab)
    torch.manual_seed(seed)
    model = build_classifier(len(vocab))
    config = model.encoder.config
    aux_coef, z_coef = config.router_aux_loss_coef, config.router_z_loss_coef

    def epochs() -> Iterator[LabeledBatch]:
        epoch = 0
        while True:
            yield from classification_batches(train, vocab, cfg.batch_size, seed=seed * 1000 + epoch)
            epoch += 1

    stream = epochs()

    def train_step() -> dict[str, torch.Tensor]:
        inputs, labels = next(stream)
        logits, router_logits = model.forward_with_router_logits(**inputs)
        flat = [r.reshape(-1, r.shape[-1]) for r in router_logits]
        mask = inputs["attention_mask"].reshape(-1).bool()
        ce = F.cross_entropy(logits, labels)
        aux, z = load_balancing_loss(flat, mask, top_k=1), router_z_loss(flat, mask)
        loss = ce + aux_coef * aux + z_coef * z
        return {"loss": loss, "train_ce": ce.detach(), "aux": aux.detach(), "z": z.detach()}

    result = fit(model, cfg, train_step, lambda: classification_accuracy(model, dev_batches), "dev_accuracy", True)

    def router_outputs() -> Iterator[RouterOutputs]:
        for inputs, _ in dev_batches:
            _, router_logits = model.forward_with_router_logits(**inputs)
            yield [r.reshape(-1, r.shape[-1]) for r in router_logits], inputs["attention_mask"].reshape(-1).bool()

    frequencies, spread = _report_routing(model, routing_statistics(router_outputs(), top_k=1))
    save_classifier(model, out_dir)
    vocab.save(out_dir / "vocab.json")
    final = {
        "dev_accuracy": classification_accuracy(model, dev_batches),
        "test_accuracy": classification_accuracy(model, test_batches),
        "test_loss": classification_loss(model, test_batches),
        "test_examples": len(test),
    }
    check = {
        "what": "classification_accuracy and classification_loss on classification_batches(read_sst2('test'), vocab)",
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
    }
    print(f"final dev accuracy {final['dev_accuracy']:.4f}, test accuracy {final['test_accuracy']:.4f}", flush=True)
    return _log(task, seed, cfg, model, result, final, check, frequencies, spread, out_dir)


def _log(
    task: str,
    seed: int,
    cfg: TrainConfig,
    model: nn.Module,
    result: FitResult,
    final: dict,
    check: dict,
    frequencies: dict,
    spread: dict,
    out_dir: Path,
) -> dict:
    size = fixture_bytes(out_dir)
    if size > MAX_FIXTURE_BYTES:
        raise RuntimeError(f"{out_dir / 'model.safetensors'} is {size} bytes, over the {MAX_FIXTURE_BYTES} limit")
    log = {
        "task": task,
        "command": (
            f"python benchmarks/train.py {task} --seed {seed} --steps {cfg.steps} --minutes {cfg.minutes:g} "
            f"--threads {torch.get_num_threads()}"
        ),
        "seed": seed,
        "config": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": result.steps,
        "best_step": result.best_step,
        "stop_reason": result.stop_reason,
        "wall_seconds": round(result.seconds, 1),
        "curve": result.curve,
        "final": final,
        "check": check,
        "expert_frequency": frequencies,
        "router_spread": spread,
        "fixture_bytes": size,
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out_dir} ({size / 2**20:.1f} MiB of weights) after {result.steps} steps: {result.stop_reason}")
    return log


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a moefx benchmark fixture.")
    parser.add_argument(
        "task", choices=sorted(DEFAULTS), help="lm: Mixtral char LM; lm-fine: Qwen3-MoE char LM; cls: Switch classifier"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, help="wall-clock budget (default: 20 lm, 29 lm-fine, 10 cls)")
    parser.add_argument(
        "--steps", type=int, help="step limit and LR schedule length (default: 5000 lm, 2800 lm-fine, 6000 cls)"
    )
    parser.add_argument("--out", type=Path, help="output directory (default: benchmarks/fixtures/<task>)")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads (results depend on it)")
    args = parser.parse_args(argv)
    cfg = DEFAULTS[args.task]
    cfg = replace(cfg, minutes=args.minutes or cfg.minutes, steps=args.steps or cfg.steps)
    torch.set_num_threads(args.threads)
    try:
        train = train_lm if args.task in LM_TASKS else train_cls
        train(args.task, args.seed, cfg, args.out or FIXTURES_DIR / args.task)
    except DataNotFoundError as error:
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
