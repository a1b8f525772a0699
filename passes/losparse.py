"""LoSparse: compress merged experts into low-rank plus structured-sparse linears (MC-SMoE, Section 3.2).

:func:`decompose_experts` decomposes every linear of every expert of the given banks as ``W ~= U V + S``
(truncated SVD, or activation-aware SVD with the calibration input second moments). :class:`CompressExperts`
swaps a block's bank for the resulting :class:`~moefx.losparse.LoSparseExperts`. Each column (or row) of
every residual ``S`` is then scored, by its contribution to the output (as decomposed) or by the
paper's first-order sensitivity to a loss (:func:`sensitivity_scores`), and one threshold over all residuals
of the model keeps ``sparse_keep`` of them (:func:`residual_keep`), so each matrix's keep ratio adapts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from moefx.experts import FusedExperts, ModuleExperts
from moefx.losparse import LoSparseExperts, LoSparseFFN, LoSparseLinear, sparse_scores, top_slices


def resolve_rank(rank: int | float, out_features: int, in_features: int) -> int:
    """An absolute rank from ``rank`` (an int, or a fraction of ``min(out, in)``).

    An integer rank is capped where ``U V`` would hold as many numbers as the dense matrix (beyond that a
    factorisation saves nothing); a fraction of 1.0 is full rank, exact by construction.
    """
    full = min(out_features, in_features)
    if isinstance(rank, float):
        return min(full, max(1, round(rank * full)))
    return min(rank, full, out_features * in_features // (out_features + in_features))


class PartsActivation(nn.Module):
    """A fused bank's activation, fed the separate outputs of its input matrices (gate, up)."""

    def __init__(self, act: nn.Module, layout: str | None) -> None:
        super().__init__()
        self.act, self.layout = act, layout

    def forward(self, *parts: torch.Tensor) -> torch.Tensor:
        if self.layout == "concat":
            h = torch.cat(parts, dim=-1)
        elif self.layout == "interleaved":
            h = torch.stack(parts, dim=-1).flatten(-2)
        else:
            h = parts[0]
        return self.act(h)


def parts_activation(bank: FusedExperts | ModuleExperts) -> nn.Module:
    """The bank's activation as a function of its input linears' separate outputs."""
    return PartsActivation(bank.act, bank.layout) if isinstance(bank, FusedExperts) else bank.act


def decompose_experts(
    banks: dict[str, FusedExperts | ModuleExperts],
    input_moments: dict[str, list[tuple[torch.Tensor | None, torch.Tensor | None]]],
    rank: int | float,
    activation_aware: bool,
    axis: str,
) -> tuple[dict[str, list[LoSparseFFN]], list[torch.Tensor]]:
    """LoSparse experts for every bank, each linear ``U V + S`` with every column (row) of ``S`` still kept,
    and the activation-based score of every slice (:func:`~moefx.losparse.sparse_scores`), one tensor per
    linear in :func:`losparse_linears` order.

    ``input_moments[name][e]`` is ``(E[x x^T] of the token, E[h h^T] of the hidden activation)`` for expert
    ``e`` (either may be None). :func:`residual_keep` then chooses which slices of ``S`` stay.
    """
    result: dict[str, list[LoSparseFFN]] = {}
    scores = []
    for name, bank in banks.items():
        moments = input_moments.get(name, [(None, None)] * bank.num_experts)
        result[name] = []
        for e in range(bank.num_experts):
            ffn = bank.ffn(e)
            token_moment, hidden_moment = moments[e]
            linears = [(w, b, token_moment) for w, b in zip(ffn.in_weights, ffn.in_biases, strict=True)]
            linears.append((ffn.out_weight, ffn.out_bias, hidden_moment))
            built = []
            for weight, bias, moment in linears:
                u, v, residual = LoSparseLinear.decompose(
                    weight, resolve_rank(rank, *weight.shape), moment if activation_aware else None
                )
                every = torch.arange(residual.shape[1] if axis == "columns" else residual.shape[0])
                built.append(LoSparseLinear.from_parts(u, v, residual, every, bias, axis, weight.dtype))
                scores.append(sparse_scores(residual, axis, moment))
            result[name].append(LoSparseFFN.like(ffn, built, parts_activation(bank)))
    return result, scores


def losparse_linears(experts: dict[str, list[LoSparseFFN]]) -> list[LoSparseLinear]:
    """Every LoSparse linear of ``experts``, in a fixed order (bank, expert, input projections, output)."""
    return [m for per_bank in experts.values() for ffn in per_bank for m in (*ffn.in_linears, ffn.out_linear)]


def sensitivity_scores(
    model: nn.Module, linears: list[LoSparseLinear], losses: Iterable[torch.Tensor]
) -> list[torch.Tensor]:
    """The paper's first-order importance of each kept slice: ``sum |s * dL/ds|`` over its entries and over
    the losses (MC-SMoE Sec. 3.2, after LoSparse).

    ``losses`` is evaluated lazily, one batch's loss at a time, while only the residuals take gradients
    (the model's other parameters are frozen meanwhile and restored after), in eval mode.
    """
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    was_training = model.training
    scores = [torch.zeros(m.index.numel(), dtype=torch.float64) for m in linears]
    try:
        for p in params:
            p.requires_grad_(False)
        for m in linears:
            m.sparse.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            for loss in losses:
                grads = torch.autograd.grad(loss, [m.sparse for m in linears], allow_unused=True)
                for score, m, grad in zip(scores, linears, grads, strict=True):
                    if grad is not None:
                        score += m.sensitivity(grad).double().cpu()
    finally:
        for p, flag in zip(params, trainable, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return scores


def residual_keep(linears: list[LoSparseLinear], scores: list[torch.Tensor], sparse_keep: float) -> list[torch.Tensor]:
    """For each linear, the positions among its kept slices that stay: the top ``sparse_keep`` share of all
    slices of all linears together by ``scores``, except that no matrix keeps more than would make it
    larger than its dense form (at most what the low-rank part leaves of its size)."""
    chosen = top_slices(scores, round(sparse_keep * sum(score.numel() for score in scores)))
    result = []
    for m, score, mask in zip(linears, scores, chosen, strict=True):
        kept = torch.nonzero(mask).flatten()
        slice_size = m.out_features if m.axis == "columns" else m.in_features
        limit = max(0, m.out_features * m.in_features - m.u.numel() - m.v.numel()) // slice_size
        if len(kept) > limit:
            kept = kept[torch.argsort(score[kept], descending=True, stable=True)[:limit]].sort().values
        result.append(kept)
    return result


class CompressExperts(PassBase):
    """Replace a canonical block's expert bank with LoSparse experts.

    Matches: the ``experts`` call_module. Rewrites: the ``experts`` module becomes a
    :class:`~moefx.losparse.LoSparseExperts` of the given experts, computing the same interface; no node,
    router or shared expert changes.
    """

    def __init__(self, experts: list[LoSparseFFN]) -> None:
        super().__init__()
        self.experts = experts

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if graph_module.get_submodule("experts").num_experts != len(self.experts):
            raise ValueError("CompressExperts needs one LoSparse expert per expert of the bank")
        graph_module.experts = LoSparseExperts(self.experts)
        return PassResult(graph_module, True)
