"""Hand-written MoEs in three plain-PyTorch idioms pass the family matrix's checks.

The idioms: a loop over expert modules that gathers each expert's tokens and adds its output back with
``index_add_`` (moefx.zoo's hand-written model); every expert run on every token by batched ``einsum`` over
stacked ``[E, ...]`` weights, combined by the routing weights scattered into a dense ``[.., E]`` matrix;
and tokens sorted by expert and split by Python counts (DeepSeek's reference ``moe_infer``), a forward no
tracer can capture, which moefx reads from the module's structure and verifies.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moefx
import moefx.export
from moefx.capture import max_output_diff
from moefx.zoo import HandWrittenExpert, HandWrittenMoE, HandWrittenMoELM, example_inputs, renormalised_top_k


class StackedEinsumMoE(nn.Module):
    """Every expert on every token by ``einsum`` over stacked weights, weighted by the dense routing matrix."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(num_experts, intermediate, hidden) * hidden**-0.5)
        self.w_out = nn.Parameter(torch.randn(num_experts, hidden, intermediate) * intermediate**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        weights, index = renormalised_top_k(logits, self.top_k)
        dense = torch.zeros_like(logits).scatter(-1, index, weights)
        hidden = F.gelu(torch.einsum("bsh,eih->bsei", x, self.w_in))
        return torch.einsum("bseh,bse->bsh", torch.einsum("bsei,ehi->bseh", hidden, self.w_out), dense)


class SortedDispatchMoE(HandWrittenMoE):
    """The same router and experts, but tokens sorted by expert, split by Python counts, each expert run on its
    contiguous rows."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, temperature: float = 1.0) -> None:
        super().__init__(hidden, intermediate, num_experts, top_k)
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, index = renormalised_top_k(self.router(x) / self.temperature, self.top_k)
        order = index.reshape(-1).argsort()
        token = order // self.top_k
        counts = torch.bincount(index.reshape(-1), minlength=len(self.experts)).tolist()
        rows = [expert(chunk) for expert, chunk in zip(self.experts, x[token].split(counts), strict=True)]
        weighted = torch.cat(rows) * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, weighted).reshape(shape)


class SortedDispatchWithSharedExpert(SortedDispatchMoE):
    """The sorted dispatch plus a shared expert, which its structure alone does not say how it joins."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int) -> None:
        super().__init__(hidden, intermediate, num_experts, top_k)
        self.shared = HandWrittenExpert(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.shared(x)


IDIOMS = {"index_add loop": HandWrittenMoE, "stacked einsum": StackedEinsumMoE, "sorted dispatch": SortedDispatchMoE}


def _model(moe: type[nn.Module], **options) -> HandWrittenMoELM:
    torch.manual_seed(0)
    model = HandWrittenMoELM()
    hidden, layers = model.embed.embedding_dim, len(model.moes)
    model.moes = nn.ModuleList(moe(hidden, 48, 8, 2, **options) for _ in range(layers))
    return model.eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": example_inputs("hand_written", seed=s)["input_ids"]} for s in range(2)]


@pytest.mark.parametrize("idiom", IDIOMS)
def test_each_idiom_is_detected_compiled_and_exported(idiom, tmp_path):
    model, batches = _model(IDIOMS[idiom]), _batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", moefx.MoefxWarning)
        same = moefx.compile(model, batches, experts=1.0)
        half = moefx.compile(model, batches, experts=0.5)
    assert [b.name for b in same.moefx_report.blocks] == ["moes.0", "moes.1"]
    with torch.no_grad():
        assert max_output_diff(same(**batches[0]), model(**batches[0])) <= 1e-5
        assert torch.isfinite(half(**batches[0])).all()
    assert [(b.num_experts, b.kept) for b in half.moefx_report.blocks] == [(8, 4), (8, 4)]
    assert moefx.export.onnx(half, tmp_path / "m.onnx", batches[0]).is_file()  # parity is checked inside


def test_a_module_read_from_its_structure_is_reported_where_no_reading_reproduces_it():
    model = _model(SortedDispatchMoE, temperature=2.0)  # a routing temperature: no reading moefx tries
    with pytest.raises(moefx.DetectionError, match=r"^moes\.0 looks like an MoE block, but .* does not reproduce"):
        moefx.compile(model, _batches(), experts=0.5)


def test_an_opaque_module_with_more_than_a_router_and_experts_is_not_read():
    with pytest.raises(moefx.DetectionError, match=r"^no MoE block found in HandWrittenMoELM"):
        moefx.compile(_model(SortedDispatchWithSharedExpert), _batches(), experts=0.5)
