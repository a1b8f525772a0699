"""Export-time recurrences: the scanned selective scan equals transformers' loop, and exports at any length."""

from __future__ import annotations

import torch
import transformers.models.jamba.modeling_jamba as jamba
from hypothesis import given, settings
from hypothesis import strategies as st

from moefx.export.recurrences import scanned_recurrences, selective_scan


def _scan_inputs(batch: int, inner: int, state: int, seq: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, inner, seq, generator=g),
        dt=torch.randn(batch, inner, seq, generator=g),
        A=-torch.rand(inner, state, generator=g) * 2,
        B=torch.randn(batch, state, seq, generator=g),
        C=torch.randn(batch, state, seq, generator=g),
        D=torch.randn(inner, generator=g),
        z=torch.randn(batch, inner, seq, generator=g),
        delta_bias=torch.randn(inner, generator=g),
        delta_softplus=True,
    )


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 3), inner=st.integers(1, 6), state=st.integers(1, 5), seq=st.integers(1, 9),
       seed=st.integers(0, 999), last=st.booleans())  # fmt: skip
def test_the_scanned_selective_scan_equals_transformers_loop(batch, inner, state, seq, seed, last):
    inputs = _scan_inputs(batch, inner, state, seq, seed)
    expected = jamba.mamba_selective_scan(**inputs, return_last_state=last)
    got = selective_scan(**inputs, return_last_state=last)
    for a, b in zip(got if last else (got,), expected if last else (expected,), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_replacement_holds_only_within_the_block():
    original = jamba.mamba_selective_scan
    with scanned_recurrences():
        assert jamba.mamba_selective_scan is selective_scan
    assert jamba.mamba_selective_scan is original


def test_an_exported_scan_runs_at_another_length():
    inputs = _scan_inputs(2, 4, 3, 6, seed=0)
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}

    class Scan(torch.nn.Module):
        def forward(self, hidden_states, dt, A, B, C, D, z, delta_bias):
            return selective_scan(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus=True)

    seq = torch.export.Dim("seq")
    shapes = {k: ({2: seq} if v.ndim == 3 else None) for k, v in tensors.items()}
    program = torch.export.export(Scan(), (), tensors, dynamic_shapes=shapes, strict=False).module()
    longer = {k: v for k, v in _scan_inputs(2, 4, 3, 11, seed=1).items() if isinstance(v, torch.Tensor)}
    torch.testing.assert_close(program(**longer), jamba.mamba_selective_scan(**longer, delta_softplus=True),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
