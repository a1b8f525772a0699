"""LoSparse: compress merged experts into low-rank plus structured-sparse linears (MC-SMoE, Section 3.2).

:func:`plan_losparse` decomposes every linear of every expert of the given banks as ``W ~= U V + S``
(truncated SVD, or activation-aware SVD with the calibration input second moments) and scores each column
(or row) of the residual ``S`` by its contribution to the output. One threshold over all residuals of the
model keeps ``sparse_keep`` of their columns, so each matrix's keep ratio adapts. :class:`CompressExperts`
swaps a block's bank for the resulting :class:`~moefx.losparse.LoSparseExperts`.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from moefx.experts import FusedExperts, ModuleExperts
from moefx.losparse import LoSparseExperts, LoSparseFFN, LoSparseLinear, sparse_scores


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


def plan_losparse(
    banks: dict[str, FusedExperts | ModuleExperts],
    input_moments: dict[str, list[tuple[torch.Tensor | None, torch.Tensor | None]]],
    rank: int | float,
    sparse_keep: float,
    activation_aware: bool,
    axis: str,
) -> dict[str, list[LoSparseFFN]]:
    """LoSparse experts for every bank.

    ``input_moments[name][e]`` is ``(E[x x^T] of the token, E[h h^T] of the hidden activation)`` for expert
    ``e`` (either may be None). The residual columns (rows) kept are the top ``sparse_keep`` share of all
    residual columns (rows) of all banks together, by :func:`~moefx.losparse.sparse_scores`, except that no
    matrix keeps more than would make it larger than its dense form.
    """
    decomposed = []  # (bank name, expert, slot, u, v, residual, bias, scores)
    for name, bank in banks.items():
        for e in range(bank.num_experts):
            ffn = bank.ffn(e)
            token_moment, hidden_moment = input_moments.get(name, [(None, None)] * bank.num_experts)[e]
            linears = [(w, b, token_moment) for w, b in zip(ffn.in_weights, ffn.in_biases, strict=True)]
            linears.append((ffn.out_weight, ffn.out_bias, hidden_moment))
            for slot, (weight, bias, moment) in enumerate(linears):
                r = resolve_rank(rank, *weight.shape)
                u, v, residual = LoSparseLinear.decompose(weight, r, moment if activation_aware else None)
                scores = sparse_scores(residual, axis, moment)
                decomposed.append((name, e, slot, u, v, residual, bias, scores))
    all_scores = torch.cat([d[-1] for d in decomposed])
    budget = round(sparse_keep * all_scores.numel())
    keep = torch.zeros(all_scores.numel(), dtype=torch.bool)
    keep[torch.argsort(all_scores, descending=True, stable=True)[:budget]] = True
    result: dict[str, list[list[LoSparseLinear]]] = {n: [[] for _ in range(b.num_experts)] for n, b in banks.items()}
    offset = 0
    for name, e, _, u, v, residual, bias, scores in decomposed:
        kept = torch.nonzero(keep[offset : offset + scores.numel()]).flatten()
        offset += scores.numel()
        # never store more than the dense matrix: keep at most what the low-rank part leaves of its size
        out_features, in_features = residual.shape
        limit = (
            max(0, out_features * in_features - u.numel() - v.numel()) // residual.shape[0 if axis == "columns" else 1]
        )
        if len(kept) > limit:
            kept = kept[torch.argsort(scores[kept], descending=True, stable=True)[:limit]].sort().values
        dtype = banks[name].ffn(e).out_weight.dtype
        result[name][e].append(LoSparseLinear.from_parts(u, v, residual, kept, bias, axis, dtype))
    return {
        name: [LoSparseFFN(linears[:-1], linears[-1], parts_activation(banks[name])) for linears in per_expert]
        for name, per_expert in result.items()
    }


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
