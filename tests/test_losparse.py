import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moefx.losparse import LoSparseLinear, low_rank_factors, sparse_scores, stable_rank


def _module(out_f, in_f, rank, keep, axis, bias, seed=0, gram=None):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=gen)
    b = torch.randn(out_f, generator=gen) if bias else None
    u, v, residual = LoSparseLinear.decompose(weight, rank, gram)
    size = in_f if axis == "columns" else out_f
    kept = torch.randperm(size, generator=gen)[:keep]
    return weight, b, LoSparseLinear.from_parts(u, v, residual, kept, b, axis, torch.float32), (u, v, residual, kept)


@settings(max_examples=40, deadline=None)
@given(
    out_f=st.integers(1, 24), in_f=st.integers(1, 24), rank=st.integers(0, 24), keep=st.integers(0, 24),
    axis=st.sampled_from(["columns", "rows"]), bias=st.booleans(), seed=st.integers(0, 1000),
)  # fmt: skip
def test_losparse_linear_matches_its_dense_reference(out_f, in_f, rank, keep, axis, bias, seed):
    _, b, module, (u, v, residual, kept) = _module(out_f, in_f, rank, keep, axis, bias, seed)
    dense = u @ v
    kept = kept.sort().values
    if axis == "columns":
        dense[:, kept] += residual[:, kept]
    else:
        dense[kept] += residual[kept]
    x = torch.randn(5, 3, in_f)
    reference = torch.nn.functional.linear(x.double(), dense, None if b is None else b.double())
    assert torch.allclose(module(x).double(), reference, atol=1e-4, rtol=1e-4)
    assert torch.allclose(module.dense_weight().double(), dense, atol=1e-5)
    r, n_kept = module.rank, kept.numel()
    sparse = out_f * n_kept if axis == "columns" else n_kept * in_f
    assert module.num_parameters() == r * (out_f + in_f) + sparse + (out_f if bias else 0)
    assert module.flops_per_token() == 2 * (r * (out_f + in_f) + sparse)


def test_full_rank_with_everything_kept_is_exact():
    weight, b, module, _ = _module(12, 20, 12, 20, "columns", True)
    x = torch.randn(7, 20)
    assert torch.allclose(module(x), torch.nn.functional.linear(x, weight, b), atol=1e-5)


def test_activation_aware_svd_minimises_output_error():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 32, generator=gen)
    x = torch.randn(2000, 32, generator=gen) @ torch.diag(torch.logspace(-2, 1, 32))  # uneven feature scales
    gram = (x.T @ x / x.shape[0]).double()
    for rank in (4, 8, 16):
        plain = low_rank_factors(weight, rank)
        aware = low_rank_factors(weight, rank, gram)
        err = lambda uv: ((x.double() @ (weight.double() - uv[0] @ uv[1]).T) ** 2).mean()  # noqa: E731
        assert err(aware) < err(plain)


def test_sparse_scores_weight_columns_by_input_scale():
    residual = torch.ones(3, 4, dtype=torch.float64)
    gram = torch.diag(torch.tensor([1.0, 4.0, 0.0, 9.0], dtype=torch.float64))
    assert sparse_scores(residual, "columns", gram).tolist() == pytest.approx([3**0.5, 2 * 3**0.5, 0.0, 3 * 3**0.5])
    assert sparse_scores(residual, "rows", gram).tolist() == pytest.approx([14**0.5] * 3)
    assert sparse_scores(residual, "columns", None).tolist() == pytest.approx([3**0.5] * 4)


def test_stable_rank():
    assert stable_rank(torch.outer(torch.randn(6), torch.randn(5))) == pytest.approx(1.0)
    assert stable_rank(torch.eye(7)) == pytest.approx(7.0)
    assert stable_rank(torch.zeros(3, 3)) == 0.0
    w = torch.randn(20, 10)
    assert 1.0 <= stable_rank(w) <= 10.0


def test_unknown_axis_is_rejected():
    with pytest.raises(ValueError, match="axis"):
        LoSparseLinear(torch.zeros(2, 1), torch.zeros(1, 2), torch.zeros(2, 0), torch.zeros(0), axis="diagonal")
