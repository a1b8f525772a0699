"""Export-time replacements for transformers' recurrences written as Python loops over positions.

A loop over the sequence unrolls in a trace, fixing the sequence length. While exporting, such a loop is
replaced by the same recurrence through torch's ``scan`` operator, which ``torch.export`` keeps as one node
of any length and ``torch.onnx`` writes as an ONNX ``Scan``. Eager runs (the parity reference) keep
transformers' own code.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch._higher_order_ops.scan import scan


def selective_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    **_: object,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1's selective scan (``hidden_states``, ``dt``, ``z``: [batch, inner, seq]; ``A``: [inner, state];
    ``B``, ``C``: [batch, state, seq]): the state ``h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_t`` from zero,
    read out as ``y_t = h_t C_t``, plus ``D x_t``, gated by ``silu(z_t)``."""
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(A[None, :, None, :] * dt[..., None])  # [batch, inner, seq, state]
    inflow = dt[..., None] * B.transpose(1, 2)[:, None].float() * hidden_states[..., None].float()

    def step(state: torch.Tensor, position: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        decay_t, inflow_t, readout_t = position
        state = decay_t * state + inflow_t
        return state, (state * readout_t[:, None, :]).sum(-1)

    start = inflow.new_zeros(inflow.shape[0], inflow.shape[1], inflow.shape[3])  # a contiguous carry
    last, outputs = scan(step, start, (decay.movedim(2, 0), inflow.movedim(2, 0), C.permute(2, 0, 1)))
    output = outputs.movedim(0, -1)  # [batch, inner, seq]
    if D is not None:
        output = output + hidden_states * D[None, :, None]
    if z is not None:
        output = output * F.silu(z)
    return (output, last) if return_last_state else output


# (module, function) -> its scanned replacement
RECURRENCES = {("transformers.models.jamba.modeling_jamba", "mamba_selective_scan"): selective_scan}


@contextlib.contextmanager
def scanned_recurrences() -> Iterator[None]:
    """Within the block, every function of :data:`RECURRENCES` is its scanned replacement."""
    replaced = []
    try:
        for (module_name, name), replacement in RECURRENCES.items():
            module = importlib.import_module(module_name)
            replaced.append((module, name, getattr(module, name)))
            setattr(module, name, replacement)
        yield
    finally:
        for module, name, original in replaced:
            setattr(module, name, original)
