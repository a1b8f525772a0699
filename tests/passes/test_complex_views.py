"""ComplexViewsAsReal: data-movement ops on complex tensors rewritten on their real pairs."""

from __future__ import annotations

import onnxruntime
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager

from moefx.passes.complex_views import ComplexViewsAsReal

aten = torch.ops.aten
MOVES = {aten.unsqueeze.default, aten.select.int, aten.expand.default, aten.index_select.default}


class ComplexRotation(nn.Module):
    """Rotates pairs of ``x`` by position-dependent angles, moving the complex factors with each op the pass
    rewrites (``dims``: where to unsqueeze and which axis to select from)."""

    def __init__(self, unsqueeze_dim: int, select_dim: int) -> None:
        super().__init__()
        self.unsqueeze_dim, self.select_dim = unsqueeze_dim, select_dim
        self.register_buffer("inv_freq", 1.0 / (10.0 ** torch.arange(3.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, seq, 6)
        batch, seq = x.shape[:2]
        angles = torch.arange(seq, dtype=torch.float32)[:, None] * self.inv_freq  # (seq, 3)
        rotation = torch.polar(torch.ones_like(angles), angles)
        stacked = torch.stack([rotation, rotation.conj()])  # (2, seq, 3)
        picked = stacked.select(0, 0) if self.select_dim == 0 else stacked.select(-3, 0)
        picked = picked.unsqueeze(self.unsqueeze_dim)  # a size-1 axis at 0 or 1 (or -3, -2)
        picked = picked.reshape(1, seq, 3).expand(batch, seq, 3)
        picked = picked.index_select(-1, torch.tensor([2, 1, 0]))
        pairs = torch.view_as_complex(x.float().reshape(batch, seq, 3, 2))
        return torch.view_as_real(pairs * picked).flatten(2)


def _rewritten(module: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.export.export(module, (x,), dynamic_shapes=({0: batch, 1: seq},), strict=False)
    assert PassManager([ComplexViewsAsReal()])(program.graph_module).modified
    return program


@settings(max_examples=8, deadline=None)
@given(unsqueeze_dim=st.sampled_from([0, 1, -2, -3]), select_dim=st.sampled_from([0, -3]), seed=st.integers(0, 99))
def test_the_rewrite_keeps_the_function_and_leaves_no_complex_move(unsqueeze_dim, select_dim, seed):
    module = ComplexRotation(unsqueeze_dim, select_dim)
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(seed))
    program = _rewritten(module, x)
    nodes = list(program.graph.nodes)
    assert not [n for n in nodes if n.target in MOVES and n.args[0].meta["val"].is_complex()]
    assert sum(n.target is aten.view_as_real.default for n in nodes) >= len(MOVES) + 1  # each move, and the end
    other = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(seed + 1))
    for sample in (x, other):
        torch.testing.assert_close(program.module()(sample), module(sample), rtol=0, atol=1e-6)


def test_the_rewritten_program_exports_to_onnx_and_matches_eager(tmp_path):
    module, x = ComplexRotation(1, 0), torch.randn(2, 5, 6)
    onnx_program = torch.onnx.export(_rewritten(module, x), dynamo=True, verbose=False)
    onnx_program.save(str(tmp_path / "rotation.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "rotation.onnx"), providers=["CPUExecutionProvider"])
    other = torch.randn(3, 7, 6)
    (got,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), module(other), rtol=0, atol=1e-5)


def test_a_graph_without_complex_moves_is_unchanged():
    program = torch.export.export(nn.Linear(4, 4), (torch.randn(2, 4),), strict=False)
    code = program.graph_module.code
    assert not PassManager([ComplexViewsAsReal()])(program.graph_module).modified
    assert program.graph_module.code == code
