"""Error-driven selection: which experts a block keeps, and how many each layer keeps, by the error of the
compressed block's output rather than by a score per expert.

Calibration collects ``errors[e, d]`` (:class:`moefx.passes.observe.ObservedExperts`' substitution errors):
the summed squared error of the block's output, ``w^2 ||y_d(x) - y_e(x)||^2`` over the tokens ``x`` routed
to expert ``e`` with weight ``w``, when expert ``d`` computes in ``e``'s place. A merged block sends each
expert's tokens to its group's expert, so the error of keeping the set ``K`` is modelled as
``sum over e not in K of min over d in K of errors[e, d]`` (:func:`substitution_cost`): each dropped expert
is stood in for by the kept expert that reproduces it best. (It counts each routed token-expert pair apart,
ignoring the cross terms between two experts of one token, so that the sums stay ``E x E``.)

Choosing ``K`` is then a k-medoids problem. :func:`select_by_error` starts from the best of the score-based
choices and a greedy addition, and swaps one kept expert for one dropped expert while that lowers the cost
(PAM's swap step), so its result is never worse than any of its starts. :func:`error_gains` gives each
layer's marginal error of one more expert, for the budget allocation across layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _without_self(errors: torch.Tensor) -> torch.Tensor:
    """The error matrix in float64 with a zero diagonal: an expert kept reproduces itself."""
    costs = errors.double().clone()
    costs.fill_diagonal_(0.0)
    return costs


def _cost(costs: torch.Tensor, kept: Sequence[int]) -> float:
    return float(costs[:, list(kept)].min(dim=1).values.sum())


def substitution_cost(errors: torch.Tensor, kept: Sequence[int]) -> float:
    """The modelled output error of keeping ``kept``: each other expert stood in for by its best kept one."""
    if not kept:
        raise ValueError("a block keeps at least one expert")
    return _cost(_without_self(errors), kept)


def greedy_additions(errors: torch.Tensor) -> tuple[list[int], list[float]]:
    """Experts in the order greedy addition keeps them (each the one that lowers the cost most), and the cost
    after each: ``costs[c]`` is the cost of keeping the first ``c + 1``."""
    costs = _without_self(errors)
    num_experts = costs.shape[0]
    nearest = torch.full((num_experts,), float("inf"), dtype=torch.float64)
    order, totals = [], []
    available = torch.ones(num_experts, dtype=torch.bool)
    for _ in range(num_experts):
        candidate_totals = torch.minimum(nearest[:, None], costs).sum(dim=0)
        candidate_totals[~available] = float("inf")
        best = int(torch.argmin(candidate_totals))
        order.append(best)
        totals.append(float(candidate_totals[best]))
        available[best] = False
        nearest = torch.minimum(nearest, costs[:, best])
    return order, totals


def error_gains(errors: torch.Tensor) -> list[float]:
    """``gains[c]``: how much keeping a ``(c + 1)``-th expert lowers the block's cost (greedy addition's);
    infinite for the first, without which the block computes nothing."""
    _, totals = greedy_additions(errors)
    return [float("inf")] + [before - after for before, after in zip(totals, totals[1:], strict=False)]


def _swap_step(costs: torch.Tensor, kept: list[int]) -> tuple[float, int, int] | None:
    """The best swap of one kept expert for one dropped expert: (cost after, position in ``kept``, new expert)."""
    num_experts = costs.shape[0]
    dropped = [e for e in range(num_experts) if e not in kept]
    if not dropped:
        return None
    kept_costs = costs[:, kept]  # [E, k]
    two = kept_costs.topk(min(2, len(kept)), dim=1, largest=False)
    nearest, nearest_at = two.values[:, 0], two.indices[:, 0]
    second = two.values[:, 1] if len(kept) > 1 else torch.full_like(nearest, float("inf"))
    # without_kept[i, e]: expert e's best stand-in once kept[i] is gone
    positions = torch.arange(len(kept))[:, None]
    without_kept = torch.where(nearest_at[None, :] == positions, second[None, :], nearest[None, :])  # [k, E]
    totals = torch.minimum(without_kept[:, :, None], costs[:, dropped][None, :, :]).sum(dim=1)  # [k, D]
    flat = int(torch.argmin(totals))
    position, new = divmod(flat, len(dropped))
    return float(totals.flatten()[flat]), position, dropped[new]


def select_by_error(errors: torch.Tensor, count: int, starts: Sequence[Sequence[int]] = ()) -> list[int]:
    """The ``count`` experts to keep: the lowest-cost of ``starts`` (each cut to ``count``) and greedy
    addition's choice, improved by single swaps while one lowers the cost. Sorted by expert index."""
    costs = _without_self(errors)
    order, _ = greedy_additions(errors)
    candidates = [list(s[:count]) for s in starts] + [order[:count]]
    kept = min(candidates, key=lambda k: _cost(costs, k))  # costs already has its zero diagonal
    current = _cost(costs, kept)
    tolerance = 1e-12 * max(float(costs.sum()), 1e-300)
    while (step := _swap_step(costs, kept)) is not None and step[0] < current - tolerance:
        current, position, new = step
        kept[position] = new
    return sorted(kept)
