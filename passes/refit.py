"""Refit: re-solve merged experts in closed form so they reproduce their members (beyond the paper).

Frequency-weighted averaging keeps only part of what a group's experts computed. After merging, moefx
re-fits each merged expert by ridge least squares on calibration statistics:

* output projection (:func:`least_squares_output`): on the tokens the original router sends to a member
  ``m`` of group ``g`` with weight ``w``, the merged expert's hidden activation ``h`` should map to the
  member's original output ``y``. The ridge pulls towards the merged projection ``D0`` rather than zero,
  so that with few tokens the refit stays close to plain merging:
  ``D = (sum w y h^T + lambda D0) (sum w h h^T + lambda I)^-1`` (a bias column is solved along when the
  experts have output biases). The sums are ``H x I`` and ``I x I`` per group, so memory does
  not grow with the number of tokens (collected by :class:`~moefx.passes.observe.ObservedExperts`);
* input projections (:func:`least_squares_inputs`, optional): the merged pre-activations should match each
  aligned member's, weighted by routing weight: ``W = (sum_m W_m C_m) (sum_m C_m)^-1`` with ``C_m`` the
  member's routing-weighted input second moment (RegMean-style, a least-squares step on the pre-activation),
  with the same pull towards the averaged input projections.
* hidden units (:func:`least_squares_units`, the default): the merged expert's width of hidden units is
  chosen afresh from a pool of its own units and its members' (the dominant's and the next most weighted,
  up to :data:`~moefx.passes.merge.UNIT_CANDIDATE_MEMBERS`), by greedy forward selection on the
  output least-squares fit (:func:`select_units`), and the output projection is solved over the chosen
  units. A member's unit is a feature the merged expert can keep exactly instead of averaging it with
  others'; where the merged units alone fit no worse, they are kept (the ``in+out`` result).

``lambda`` is ``ridge`` times the mean diagonal of the Gram matrix.
"""

from __future__ import annotations

import dataclasses

import torch

from moefx.experts import FFN

FLOAT32_MIN_RIDGE = 1e-3  # the smallest relative ridge whose solves run in float32
SELECTION_STEPS = 32  # unit selection updates its factorisation of the whole pool this many times
SHORTLIST = 4  # each step picks its units one at a time from this many times as many best-scoring ones
SKETCH_ROWS = 512  # selection scores units against a random projection of wider outputs to this many rows


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_X sum w ||X h - y||^2 + lambda ||X - prior||^2 = (cross + lambda prior)(gram + lambda I)^-1``.

    The damped Gram matrix is symmetric positive definite, so one Cholesky factorisation solves it (a third
    of LU's cost). Damping bounds its condition number by about ``n / ridge``; from ``ridge`` 1e-3 up the
    solve runs in float32 (its objective is within 1e-6 of float64's, see the tests) at about half float64's
    time, below it in float64, and an undamped singular system (``ridge=0``) gets the least-norm solution."""
    dtype = torch.float32 if ridge >= FLOAT32_MIN_RIDGE else torch.float64
    system = gram.to(dtype, copy=True)
    damping = ridge * system.diagonal().mean().clamp(min=1e-12)
    system.diagonal().add_(damping)
    rhs = cross.to(dtype).T + damping * prior.to(dtype).T
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor).T
    return torch.linalg.lstsq(system.double(), rhs.double()).solution.T


def _with_bias_column(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[weight | bias]``: the matrix the solves fit against inputs with a constant-1 column appended."""
    weight = weight.detach()
    return weight if bias is None else torch.cat([weight, bias.detach()[:, None]], dim=1)


def least_squares_output(ffn: FFN, gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> FFN:
    """``ffn`` with its output projection (and bias) re-solved from ``gram = sum w h h^T`` and
    ``cross = sum w y h^T`` (both with a trailing constant-1 column when ``ffn`` has an output bias)."""
    if float(gram.diagonal().sum()) <= 0.0:  # no calibration token reached this group: keep the average
        return ffn
    return _with_output(ffn, ridge_solve(gram, cross, _with_bias_column(ffn.out_weight, ffn.out_bias), ridge))


def _with_output(ffn: FFN, solution: torch.Tensor) -> FFN:
    """``ffn`` with its output projection (and bias, the last column when it has one) set to ``solution``."""
    dtype = ffn.out_weight.dtype
    if ffn.out_bias is not None:
        return dataclasses.replace(ffn, out_weight=solution[:, :-1].to(dtype), out_bias=solution[:, -1].to(dtype))
    return dataclasses.replace(ffn, out_weight=solution.to(dtype))


def least_squares_inputs(merged: FFN, aligned: list[FFN], grams: list[torch.Tensor], ridge: float = 1e-2) -> FFN:
    """``merged`` with each input projection set to the least-squares fit of the aligned members'
    pre-activations: ``W = (sum_m W_m C_m)(sum_m C_m)^-1``. ``grams[m]`` is member m's routing-weighted
    input second moment, ``[H, H]``, or ``[H+1, H+1]`` with the constant-1 column when there are biases.

    The input projections (gate and up) share the Gram matrix, so they are solved together, with one
    factorisation."""
    total = sum(grams[1:], grams[0].clone())
    if float(total.diagonal().sum()) <= 0.0:
        return merged

    def stacked(ffn: FFN) -> torch.Tensor:  # [K*I, H(+1)]: every input projection, bias column appended
        return torch.cat([_with_bias_column(w, b) for w, b in zip(ffn.in_weights, ffn.in_biases, strict=True)])

    # rebased on the dominant member (aligned members' rows match its rows), so that its product is not
    # needed: W = W_0 + (sum_{m>0} (W_m - W_0) C_m + lambda (prior - W_0)) (sum_m C_m + lambda I)^-1.
    # The products, the costliest part, are in the statistics' precision (float32 for a calibrated model's)
    dominant = stacked(aligned[0]).to(total.dtype)
    cross = torch.zeros_like(dominant)
    for member, gram in zip(aligned[1:], grams[1:], strict=True):
        cross += (stacked(member).to(total.dtype) - dominant) @ gram
    solution = dominant + ridge_solve(total, cross, stacked(merged) - dominant, ridge)
    with_bias = merged.in_biases[0] is not None
    dtype = merged.in_weights[0].dtype
    in_weights, in_biases = [], []
    for part in solution.split([w.shape[0] for w in merged.in_weights]):
        in_weights.append((part[:, :-1] if with_bias else part).to(dtype))
        in_biases.append(part[:, -1].to(dtype) if with_bias else None)
    return dataclasses.replace(merged, in_weights=in_weights, in_biases=in_biases)


class _PartialCholesky:
    """Forward selection state for the ridge fit of ``target [P, n]`` from ``n`` features with Gram matrix
    ``gram + damping I``: ``rows`` are the chosen features' rows of the pivoted Cholesky factor over all
    features, ``residual`` the target's part not yet explained, ``variance`` each feature's Gram diagonal
    not yet explained. A feature's gain (the fall in squared error from adding it) is
    ``|residual_j|^2 / variance_j``."""

    def __init__(self, gram: torch.Tensor, target: torch.Tensor, damping: float) -> None:
        self.gram, self.damping = gram, damping
        self.rows = target.new_zeros(0, gram.shape[0])
        self.residual = target.clone()
        self.variance = gram.diagonal().double() + damping
        self.floor = 1e-9 * float(self.variance.max())

    def gains(self) -> torch.Tensor:
        return self._gains(self.residual, self.variance)

    def _gains(self, residual: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        """Each feature's gain, ``-inf`` where its unexplained variance is gone (it adds nothing)."""
        scores = residual.square().sum(dim=0) / variance.clamp(min=self.floor)
        return scores.masked_fill(variance <= self.floor, float("-inf"))

    def add(self, picks: list[int]) -> None:
        """Add the features ``picks`` (one blocked update of the factor, the residual and the variances)."""
        rows = self.gram[picks].double()  # read row by row: the pool's Gram matrix stays in float32
        rows[range(len(picks)), picks] += self.damping
        rows -= self.rows[:, picks].T @ self.rows
        block = torch.linalg.cholesky(rows[:, picks])
        rows = torch.linalg.solve_triangular(block, rows, upper=False)
        explained = torch.linalg.solve_triangular(block, self.residual[:, picks].T, upper=False)
        self.residual -= explained.T @ rows
        self.variance -= rows.square().sum(dim=0)
        self.variance[picks] = 0.0
        self.rows = torch.cat([self.rows, rows])

    def greedy(self, shortlist: list[int], count: int) -> list[int]:
        """``count`` of ``shortlist`` chosen one at a time, each the best given those before it (exact,
        on the shortlist's own small system)."""
        columns = self.rows[:, shortlist]
        gram = self.gram[shortlist][:, shortlist].double() - columns.T @ columns
        gram.diagonal().add_(self.damping)
        residual, variance = self.residual[:, shortlist].clone(), gram.diagonal().clone()
        picks: list[int] = []
        for _ in range(count):
            gains = self._gains(residual, variance)
            gains[picks] = float("-inf")
            best = int(gains.argmax())
            if not torch.isfinite(gains[best]):
                break
            picks.append(best)
            direction = gram[best] / variance[best].sqrt()
            residual -= torch.outer(residual[:, best] / variance[best].sqrt(), direction)
            gram -= torch.outer(direction, direction)
            variance = gram.diagonal().clone()
        return [shortlist[p] for p in picks]


def select_units(
    gram: torch.Tensor, cross: torch.Tensor, count: int, ridge: float, forced: list[int] | None = None
) -> list[int]:
    """``count`` features of ``gram [n, n]`` (``sum w h h^T``) whose ridge fit of the targets in
    ``cross [H, n]`` (``sum w y h^T``) leaves the least squared error, by blocked greedy forward selection,
    besides the ``forced`` ones (a bias column), which are chosen first. Returns the chosen features, sorted.

    Each of :data:`SELECTION_STEPS` steps scores every feature by its gain given those chosen so far,
    picks the step's share of features one at a time from the :data:`SHORTLIST` times as many best, and
    updates the factorisation of the whole pool once. Outputs wider than :data:`SKETCH_ROWS` are scored
    on a fixed random projection of them (which keeps every gain in expectation)."""
    forced = list(forced or [])
    target = cross.double()
    if target.shape[0] > SKETCH_ROWS:
        generator = torch.Generator().manual_seed(0)
        projection = torch.randn(SKETCH_ROWS, target.shape[0], generator=generator, dtype=torch.float64)
        target = projection @ target / SKETCH_ROWS**0.5
    damping = max(ridge, 1e-8) * float(gram.diagonal().double().mean().clamp(min=1e-12))
    state = _PartialCholesky(gram, target, damping)
    if forced:
        state.add(forced)
    chosen = list(forced)
    step = max(1, -(-count // SELECTION_STEPS))
    while len(chosen) < count + len(forced):
        gains = state.gains()
        gains[chosen] = float("-inf")
        want = min(step, count + len(forced) - len(chosen))
        best = gains.topk(min(SHORTLIST * want, len(gains))).indices
        shortlist = best[torch.isfinite(gains[best])].tolist()
        picks = state.greedy(shortlist, want)
        if not picks:  # the chosen features explain every other one: the rest add nothing, take them in order
            taken = set(chosen)
            chosen += [i for i in range(len(gains)) if i not in taken][:want]
            continue
        state.add(picks)
        chosen += picks
    return sorted(chosen)


def _fit_error(gram: torch.Tensor, cross: torch.Tensor, solution: torch.Tensor) -> float:
    """``sum w |X h - y|^2`` up to the constant ``sum w |y|^2``: ``tr(X G X^T) - 2 tr(X C^T)``."""
    solution = solution.double()
    return float(((solution @ gram.double()) * solution).sum() - 2 * (solution * cross.double()).sum())


def least_squares_units(
    merged: FFN, members: list[FFN], coefficients: list[float], gram: torch.Tensor, cross: torch.Tensor, ridge: float
) -> FFN:
    """The merged expert rebuilt from a choice of hidden units: ``merged``'s width of units chosen among
    the pool of ``merged``'s and ``members``' units (in that order) by :func:`select_units`, its output
    projection solved over them. ``gram [n, n]`` and ``cross [H, n]`` are the pool's
    :func:`least_squares_output` statistics (``n`` counts the pool's units, and a constant-1 column when the
    experts have output biases). The ridge pulls each unit's output column towards its own, scaled by
    its member's merge ``coefficients``. Where the merged units alone fit no worse, the result is
    :func:`least_squares_output` of ``merged``."""
    if float(gram.diagonal().sum()) <= 0.0:
        return merged
    pool = FFN.concatenated([merged, *members])
    scales = torch.repeat_interleave(
        torch.tensor([1.0, *coefficients]), torch.tensor([f.hidden_units for f in (merged, *members)])
    )
    prior = _with_bias_column(pool.out_weight.float() * scales, merged.out_bias)
    width, units = merged.hidden_units, pool.hidden_units
    bias = [units] if merged.out_bias is not None else []

    def fitted(chosen: list[int]) -> tuple[torch.Tensor, float]:
        system, target = gram[chosen][:, chosen], cross[:, chosen]
        solution = ridge_solve(system, target, prior[:, chosen], ridge)
        return solution, _fit_error(system, target, solution)

    chosen = select_units(gram, cross, width, ridge, bias)
    solution, error = fitted(chosen)
    own = list(range(width)) + bias
    own_solution, own_error = fitted(own)
    if own_error <= error:
        chosen, solution = own, own_solution
    return _with_output(pool.units(torch.tensor(chosen[:width])), solution)
