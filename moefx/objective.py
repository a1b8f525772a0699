"""The task loss of a model on a batch, for the passes and the recovery that need one.

A batch's loss is, in order: the caller's ``loss(output, batch)``; the output's own ``.loss`` (a
transformers model computes it when the batch has ``labels``); or, for a decoder-only language model, the
next-token cross-entropy of its logits over the batch's unmasked ``input_ids``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moefx.errors import MoefxError

LossFn = Callable[[Any, Any], torch.Tensor]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output (a tensor, an output with ``.logits``, or a tuple's first tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise MoefxError(f"expected a model that returns logits, not a {type(output).__name__}")


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder-only generator (its logits at position t predict ``input_ids[t + 1]``)."""
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    return callable(can_generate) and bool(can_generate()) and not getattr(config, "is_encoder_decoder", False)


def next_token_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy (nats) of predicting each next token whose position the attention mask marks as real,
    reduced by ``reduction`` as in ``F.cross_entropy``."""
    targets = input_ids[:, 1:]
    predicted = logits[:, :-1]
    if attention_mask is not None:
        keep = attention_mask[:, 1:].bool()
        predicted, targets = predicted[keep], targets[keep]
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]).float(), targets.reshape(-1), reduction=reduction)


@torch.no_grad()
def mean_next_token_loss(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy (nats) over every real predicted token of ``batches`` (keyword batches
    with ``input_ids`` and optionally ``attention_mask``), in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            losses = next_token_loss(
                logits_of(model(**batch)), batch["input_ids"], batch.get("attention_mask"), reduction="none"
            )
            total += float(losses.sum())
            count += losses.numel()
    finally:
        model.train(was_training)
    return total / count


def task_loss(model: nn.Module, output: Any, batch: Any, loss: LossFn | None = None) -> torch.Tensor | None:
    """The loss of ``output`` (``model``'s on ``batch``) by the rule above, or None where there is none."""
    if loss is not None:
        return loss(output, batch)
    own = getattr(output, "loss", None)
    if isinstance(own, torch.Tensor):
        return own
    if is_causal_lm(model) and isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return next_token_loss(logits_of(output), batch["input_ids"], batch.get("attention_mask"))
    return None


NO_LOSS = (
    "sparse_score='gradient' needs a loss: calibrate a causal LM, give batches with labels, "
    "or pass loss=fn(output, batch); or use sparse_score='activation'"
)


def loss_available(model: nn.Module, batch: Any, loss: LossFn | None = None) -> bool:
    """Whether :func:`task_loss` will find a loss for ``model`` on batches like ``batch`` (checked before running)."""
    return loss is not None or is_causal_lm(model) or (isinstance(batch, Mapping) and "labels" in batch)
