"""Recovery: fine-tune a compressed model by knowledge distillation from the original (MC-SMoE, Sec. 4).

The loss is ``task_loss + alpha * T^2 * KL(teacher || student)`` on temperature-``T`` softmaxes of the
logits (the paper uses alpha 0.2, T 2), over the tokens the attention mask marks as real. With
``sparse_keep`` the LoSparse residuals are pruned further while training, by the cubic schedule of the
paper's Appendix A1.4 (from LoSparse): the kept share falls from its current value to ``sparse_keep``
between ``prune_start`` and ``prune_end`` (fractions of ``steps``), each time keeping the slices with the
largest moving average of ``|s * dL/ds|`` over the whole model. Masked slices are dropped at the end.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from moefx.capture import call_model
from moefx.errors import CalibrationError, ConfigError
from moefx.losparse import LoSparseLinear, top_slices
from moefx.objective import LossFn, logits_of
from moefx.objective import task_loss as loss_of


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` of temperature-softened distributions, averaged over real tokens."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(dim=-1)
    if mask is not None and mask.shape == per_token.shape:
        per_token = per_token[mask.bool()]
    return temperature**2 * per_token.mean()


def cubic_keep(step: int, steps: int, start: float, end: float, initial: float, final: float) -> float:
    """The kept share at ``step``: ``final + (initial - final) * (1 - progress)^3`` between ``start`` and ``end``."""
    begin, finish = round(start * steps), round(end * steps)
    if step <= begin:
        return initial
    if step >= finish:
        return final
    progress = (step - begin) / max(finish - begin, 1)
    return final + (initial - final) * (1.0 - progress) ** 3


def recover(
    student: nn.Module,
    teacher: nn.Module,
    loader: Iterable[Any],
    steps: int = 100,
    lr: float = 1e-4,
    alpha: float = 0.2,
    temperature: float = 2.0,
    task_loss: LossFn | None = None,
    sparse_keep: float | None = None,
    prune_start: float = 0.1,
    prune_end: float = 0.7,
    importance_decay: float = 0.85,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[float]:
    """Fine-tune ``student`` in place against ``teacher`` for ``steps`` batches of ``loader`` (cycled).

    The task loss is ``task_loss(student_output, batch)`` if given, else the output's own ``.loss`` (a
    transformers model computes it when the batch has ``labels``), else a causal LM's next-token loss, else
    zero (pure distillation); see :mod:`moefx.objective`. Runs on
    ``device`` (default: CUDA when available). Returns the loss of every step.
    """
    if steps < 1 or not 0.0 <= alpha or temperature <= 0:
        raise ConfigError("recover needs steps >= 1, alpha >= 0 and temperature > 0")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches = list(loader)
    if not batches:
        raise CalibrationError("the recovery loader yielded no batches")
    student.to(device).train()
    teacher.to(device).eval()
    every_losparse = [m for m in student.modules() if isinstance(m, LoSparseLinear)]
    losparse = [m for m in every_losparse if m.has_sparse]
    if sparse_keep is not None:
        if not 0.0 <= sparse_keep <= 1.0:
            raise ConfigError(f"sparse_keep={sparse_keep} is out of range: give a fraction in [0, 1]")
        if not every_losparse:
            raise ConfigError("sparse_keep needs a student with LoSparse experts (compile with method='mc-smoe')")
        total = sum(m.in_features if m.axis == "columns" else m.out_features for m in every_losparse)
        initial = sum(m.index.numel() for m in losparse) / total
        for m in losparse:
            m.mask = torch.ones(m.index.numel(), device=device)
        importance = [torch.zeros(m.index.numel(), device=device) for m in losparse]
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    history = []
    iterator = itertools.islice(itertools.cycle(batches), steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=steps, desc="recovery", unit="step")
    for step, batch in enumerate(iterator, start=1):
        batch = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), batch)
        with torch.no_grad():
            teacher_logits = logits_of(call_model(teacher, batch))
        output = call_model(student, batch)
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        loss = alpha * distillation_loss(logits_of(output), teacher_logits, temperature, mask)
        task = loss_of(student, output, batch, task_loss)
        if task is not None:
            loss = loss + task
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        if sparse_keep is not None:
            _update_masks(losparse, importance, importance_decay,
                          cubic_keep(step, steps, prune_start, prune_end, initial, sparse_keep), total)  # fmt: skip
        optimizer.step()
        history.append(float(loss.detach()))
    for m in losparse:
        m.compact()
    student.eval()
    return history


@torch.no_grad()
def _update_masks(
    layers: list[LoSparseLinear], importance: list[torch.Tensor], decay: float, keep: float, total: int
) -> None:
    """Refresh each slice's moving importance ``|s * grad s|`` and keep the globally best ``keep`` share."""
    for m, score in zip(layers, importance, strict=True):
        if m.sparse.grad is not None:
            score.mul_(decay).add_((1 - decay) * m.sensitivity(m.sparse.grad))
    for m, chosen in zip(layers, top_slices(importance, round(keep * total)), strict=True):
        m.mask.copy_(chosen)
