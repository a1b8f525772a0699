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

``lambda`` is ``ridge`` times the mean diagonal of the Gram matrix.
"""

from __future__ import annotations

import dataclasses

import torch

from moefx.experts import FFN

REFIT_MODES = ("none", "out", "in+out")
FLOAT32_MIN_RIDGE = 1e-3  # the smallest relative ridge whose solves run in float32


def _ridge_solve(gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor, ridge: float) -> torch.Tensor:
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
    solution = _ridge_solve(gram, cross, _with_bias_column(ffn.out_weight, ffn.out_bias), ridge)
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
    solution = dominant + _ridge_solve(total, cross, stacked(merged) - dominant, ridge)
    with_bias = merged.in_biases[0] is not None
    dtype = merged.in_weights[0].dtype
    in_weights, in_biases = [], []
    for part in solution.split([w.shape[0] for w in merged.in_weights]):
        in_weights.append((part[:, :-1] if with_bias else part).to(dtype))
        in_biases.append(part[:, -1].to(dtype) if with_bias else None)
    return dataclasses.replace(merged, in_weights=in_weights, in_biases=in_biases)
