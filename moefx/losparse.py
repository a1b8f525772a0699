"""LoSparse: a linear layer stored as low-rank plus structured-sparse parts, ``W ~= U V + S``.

MC-SMoE (Section 3.2) compresses each merged expert's weight this way, after LoSparse (Li et al., 2023):
``U V`` is a rank-r factorisation and ``S = W - U V`` is the residual with whole columns (input features) or
rows (output units) pruned. :class:`LoSparseLinear` stores only ``U``, ``V`` and the kept slices of ``S``
with their indices, and computes ``U (V x) + S_kept x[kept]`` without materialising ``W``; its
:meth:`~LoSparseLinear.num_parameters` is its real size. :class:`LoSparseExperts` is an expert bank whose
experts are FFNs of LoSparse linears.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moefx.experts import FFN, dispatch, rms_normed

SPARSE_AXES = ("columns", "rows")


def stable_rank(weight: torch.Tensor) -> float:
    """``sum(sigma_i^2) / max(sigma_i^2)`` (MC-SMoE Eq. 3): how many directions carry the matrix's energy."""
    w = weight.detach().double()
    if w.numel() == 0:
        return 0.0
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T  # its eigenvalues are sigma_i^2: cheaper than an SVD
    with single_threaded():
        top = torch.linalg.eigvalsh(gram)[-1]
    return float(gram.trace() / top) if top > 0 else 0.0


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed torch CPU kernels on one thread.

    A symmetric eigensolver (tridiagonalisation) synchronises its OpenMP threads thousands of times; when
    another process holds a core, every barrier waits for a descheduled thread. On 2 cores shared with two
    busy processes ``eigvalsh`` of a 512 x 512 Gram matrix took 1.74 s on 2 threads and 0.013 s on one
    (0.010 s on 2 threads when the cores are free).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def low_rank_factors(
    weight: torch.Tensor, rank: int, input_gram: torch.Tensor | None = None, damping: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U [out, r]`` and ``V [r, in]`` with ``U V`` the best rank-r approximation of ``weight``.

    Plain (``input_gram`` None): truncated SVD, minimising ``||W - U V||_F``. Activation-aware: with the
    input second moment ``C = E[x x^T]`` (damped by ``damping`` times its mean diagonal), minimise the
    output error ``||(W - U V) C^{1/2}||_F`` by an SVD of ``W L`` where ``C = L L^T``.
    """
    w = weight.detach().double()
    rank = max(0, min(rank, *w.shape))
    if input_gram is None:
        p, sigma, qt = torch.linalg.svd(w, full_matrices=False)
        root = sigma[:rank].sqrt()
        return p[:, :rank] * root, root[:, None] * qt[:rank]
    c = input_gram.double()
    c = c + damping * c.diagonal().mean().clamp(min=1e-12) * torch.eye(c.shape[0], dtype=c.dtype)
    lower = torch.linalg.cholesky(c)
    p, sigma, qt = torch.linalg.svd(w @ lower, full_matrices=False)
    root = sigma[:rank].sqrt()
    # V = sqrt(S) Q^T L^{-1}: solve V L = sqrt(S) Q^T (left=False solves X A = B)
    v = torch.linalg.solve_triangular(lower, root[:, None] * qt[:rank], upper=False, left=False)
    return p[:, :rank] * root, v


def sparse_scores(residual: torch.Tensor, axis: str, input_gram: torch.Tensor | None) -> torch.Tensor:
    """Importance of each column (or row) of the residual ``S``: its contribution to the output's energy.

    Column j: ``||S[:, j]|| * rms(x_j)``; row i: ``sqrt(sum_j S_ij^2 E[x_j^2])``. Without input statistics
    every input feature counts as unit RMS.
    """
    s = residual.detach().double()
    second = torch.ones(s.shape[1], dtype=s.dtype) if input_gram is None else input_gram.double().diagonal()
    second = second.clamp(min=0.0)
    if axis == "columns":
        return s.norm(dim=0) * second.sqrt()
    return ((s**2) * second[None, :]).sum(dim=1).sqrt()


def top_slices(scores: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """One boolean mask per score tensor marking the ``count`` highest scores of all of them together."""
    flat = torch.cat(scores)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.argsort(flat, descending=True, stable=True)[:count]] = True
    return list(chosen.split([s.numel() for s in scores]))


class LoSparseLinear(nn.Module):
    """``y = U (V x) + S_kept x[kept] + b`` (columns) or ``y = U (V x) + b`` with ``y[kept] += S_kept x`` (rows)."""

    def __init__(
        self,
        u: torch.Tensor,
        v: torch.Tensor,
        sparse: torch.Tensor,
        index: torch.Tensor,
        bias: torch.Tensor | None = None,
        axis: str = "columns",
    ) -> None:
        super().__init__()
        if axis not in SPARSE_AXES:
            raise ValueError(f"axis must be one of {SPARSE_AXES}, not {axis!r}")
        self.out_features, self.in_features = u.shape[0], v.shape[1]
        self.axis = axis
        self.u = nn.Parameter(u.detach().clone())
        self.v = nn.Parameter(v.detach().clone())
        self.sparse = nn.Parameter(sparse.detach().clone())
        self.register_buffer("index", index.detach().clone().long())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.has_sparse = index.numel() > 0
        self.register_buffer("mask", None)  # set during gradual pruning (see moefx.recover), then compacted

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(F.linear(x, self.v), self.u, self.bias)
        if not self.has_sparse:
            return y
        sparse = self.sparse if self.mask is None else self.sparse * self.slice_shape(self.mask)
        if self.axis == "columns":
            return y + F.linear(x.index_select(-1, self.index), sparse)
        return y.index_add(-1, self.index, F.linear(x, sparse))

    def slice_shape(self, per_slice: torch.Tensor) -> torch.Tensor:
        """A per-kept-column (or row) vector shaped to broadcast over ``sparse``."""
        return per_slice[None, :] if self.axis == "columns" else per_slice[:, None]

    def slice_scores(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` (shaped like ``sparse``) over each kept column (or row)."""
        return tensor.sum(dim=0) if self.axis == "columns" else tensor.sum(dim=1)

    def sensitivity(self, grad: torch.Tensor) -> torch.Tensor:
        """The first-order importance of each kept slice for ``grad = dL/dS``: ``sum |s * dL/ds|`` over it."""
        return self.slice_scores((self.sparse.detach() * grad).abs())

    @torch.no_grad()
    def keep_slices(self, positions: torch.Tensor) -> None:
        """Keep only the kept slices at ``positions`` (indices into ``index``), dropping the rest for good."""
        self.mask = torch.zeros(self.index.numel(), device=self.sparse.device)
        self.mask[positions] = 1.0
        self.compact()

    @torch.no_grad()
    def compact(self) -> None:
        """Drop the slices that ``mask`` switched off, for good."""
        if self.mask is None:
            return
        keep = self.mask.bool()
        self.sparse = nn.Parameter(self.sparse[:, keep] if self.axis == "columns" else self.sparse[keep])
        self.index = self.index[keep]
        self.mask = None
        self.has_sparse = self.index.numel() > 0

    def num_parameters(self) -> int:
        """Stored weights: ``U``, ``V``, the kept part of ``S`` and the bias (the index is not a weight)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Multiply-accumulates per input row, counted as 2 FLOPs each."""
        macs = self.rank * (self.in_features + self.out_features) + self.sparse.numel()
        return 2 * macs

    def dense_weight(self) -> torch.Tensor:
        """``U V + S`` as a dense ``[out, in]`` matrix (for analysis; the forward never builds it)."""
        w = self.u @ self.v
        if self.has_sparse:
            if self.axis == "columns":
                w = w.index_add(1, self.index, self.sparse)
            else:
                w = w.index_add(0, self.index, self.sparse)
        return w

    @staticmethod
    def decompose(
        weight: torch.Tensor, rank: int, input_gram: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, V, S)`` with ``S = W - U V`` dense, before any pruning (float64)."""
        u, v = low_rank_factors(weight, rank, input_gram)
        return u, v, weight.detach().double() - u @ v

    @classmethod
    def from_parts(
        cls,
        u: torch.Tensor,
        v: torch.Tensor,
        residual: torch.Tensor,
        keep: torch.Tensor,
        bias: torch.Tensor | None,
        axis: str,
        dtype: torch.dtype,
    ) -> LoSparseLinear:
        """A LoSparse linear keeping the ``keep`` columns (or rows) of ``residual``."""
        keep = keep.sort().values
        sparse = residual[:, keep] if axis == "columns" else residual[keep]
        return cls(u.to(dtype), v.to(dtype), sparse.to(dtype), keep, None if bias is None else bias.to(dtype), axis)

    def extra_repr(self) -> str:
        kept = self.index.numel()
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, sparse {self.axis} kept={kept}"


class LoSparseFFN(nn.Module):
    """An FFN expert of LoSparse linears: ``out(act(in_0(x), [in_1(x)]))``, through the expert's own RMSNorm
    where it has one (``out_norm``, see :class:`~moefx.experts.FFN`)."""

    def __init__(
        self,
        in_linears: list[nn.Module],
        out_linear: nn.Module,
        act: nn.Module,
        out_norm: torch.Tensor | None = None,
        norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        self.in_linears = nn.ModuleList(in_linears)
        self.out_linear = out_linear
        self.act = act
        self.out_norm = None if out_norm is None else nn.Parameter(out_norm.detach().clone())
        self.norm_eps = norm_eps

    @classmethod
    def like(cls, ffn: FFN, built: list[nn.Module], act: nn.Module) -> LoSparseFFN:
        """The LoSparse expert of ``ffn`` whose linears (input projections, then output) are ``built``."""
        return cls(built[:-1], built[-1], act, ffn.out_norm, ffn.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normed(self.out_linear(self.act(*[linear(x) for linear in self.in_linears])), self.out_norm,
                          self.norm_eps)  # fmt: skip


class LoSparseExperts(nn.Module):
    """An expert bank of :class:`LoSparseFFN` experts (the same interface as the dense banks)."""

    def __init__(self, experts: list[LoSparseFFN]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts[e](x)

    def forward(self, tokens: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return dispatch(self.expert_forward, self.num_experts, tokens, index, weights)

    def expert_flops(self, e: int) -> int:
        """FLOPs (2 per multiply-accumulate) of expert ``e`` for one token, matmuls only."""
        expert = self.experts[e]
        return sum(m.flops_per_token() for m in (*expert.in_linears, expert.out_linear))

    def ffn(self, e: int) -> FFN:
        """Expert ``e`` as dense weights (materialised, for analysis)."""
        expert = self.experts[e]
        ins, out = list(expert.in_linears), expert.out_linear
        dense_ins = [m.dense_weight() for m in ins]
        return FFN(dense_ins, [m.bias for m in ins], out.dense_weight(), out.bias, expert.out_norm, expert.norm_eps)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
