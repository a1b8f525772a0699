"""Compression methods, one object each: the defaults it gives the options left unset, the statistics it
needs from calibration, and its planning (how a block's experts join the kept ones, and their weights).

:data:`METHODS` maps each name ``CompressionConfig(method=...)`` accepts to its object; the pipeline asks the
object, never the name. Planning per block (:func:`moefx.passes.merge.plan_compression`) then runs the
steps every method shares: scores and per-layer budgets, the method's groups and coefficients, alignment
and merging, and the refit the options ask for.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage

from moefx.errors import MoefxWarning
from moefx.experts import FFN
from moefx.passes.observe import BlockStats, CalibrationNeeds

if TYPE_CHECKING:
    from moefx.config import CompressionConfig


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of ``features`` (zero rows are similar to nothing)."""
    f = features.double()
    norms = f.norm(dim=1).clamp(min=1e-12)
    return (f @ f.T) / (norms[:, None] * norms[None, :])


def expert_similarity(kind: str, stats: BlockStats, router_weight: torch.Tensor, ffns: list[FFN]) -> torch.Tensor:
    """``[E, E]`` similarity between experts by ``kind`` (see :class:`moefx.CompressionConfig`)."""
    if kind == "router-logits":
        diag = stats.logit_gram.diagonal().clamp(min=1e-12).sqrt()
        return stats.logit_gram / (diag[:, None] * diag[None, :])
    if kind == "router-weight":
        return cosine_similarity_matrix(router_weight.detach())
    if kind == "expert-weight":
        return cosine_similarity_matrix(
            torch.stack([torch.cat([t.detach().flatten().float() for t in f.tensors() if t is not None]) for f in ffns])
        )
    if kind == "expert-output":
        return cosine_similarity_matrix(stats.mean_outputs)
    if kind == "output-error":  # [e, d]: the error of d standing in for e, lowest most similar
        return -stats.substitution_errors
    raise ValueError(f"no similarity matrix for {kind!r}")


def group_by_similarity(
    dominants: list[int], num_experts: int, similarity: torch.Tensor | None, rng: np.random.Generator
) -> list[list[int]]:
    """Each non-dominant expert joins the most similar dominant (a random one when ``similarity`` is None)."""
    groups = [[d] for d in dominants]
    for e in range(num_experts):
        if e in dominants:
            continue
        if similarity is None:
            g = int(rng.integers(len(dominants)))
        else:
            g = int(torch.argmax(similarity[e, dominants]))
        groups[g].append(e)
    return groups


def cluster_hierarchically(features: torch.Tensor, num_clusters: int, frequency: torch.Tensor) -> list[list[int]]:
    """HC-SMoE's grouping: average-linkage clustering of ``features`` rows (Euclidean), most used member first."""
    num_experts = features.shape[0]
    if num_clusters >= num_experts:
        return [[e] for e in range(num_experts)]
    labels = cut_tree(linkage(features.double().numpy(), method="average", metric="euclidean"), num_clusters)[:, 0]
    groups = [[int(e) for e in np.flatnonzero(labels == c)] for c in range(num_clusters)]
    return [sorted(g, key=lambda e: (-float(frequency[e]), e)) for g in groups]


def merge_coefficients(groups: list[list[int]], frequency: torch.Tensor, uniform: bool) -> list[list[float]]:
    """Frequency-weighted (or uniform) coefficients per group; a group never activated is averaged uniformly."""
    result = []
    for g in groups:
        f = frequency[g].double()
        if uniform or float(f.sum()) <= 0.0:
            result.append([1.0 / len(g)] * len(g))
        else:
            result.append((f / f.sum()).tolist())
    return result


@dataclass
class BlockEvidence:
    """What planning knows of one block: its calibration statistics, its router weight and its experts."""

    stats: BlockStats
    router_weight: torch.Tensor | None  # None for a block routed outside itself
    ffns: list[FFN]


class Method:
    """M-SMoE's planning (Li et al., ICLR 2024, Section 3.1), which the merging methods share: every expert
    not kept joins the kept (dominant) expert it is most similar to, and a group is merged as its members'
    frequency-weighted average after aligning them to the dominant expert."""

    name: ClassVar[str]
    # what the method does where an option is unset (None): selection, refit, align, adaptive
    defaults: ClassVar[dict[str, Any]]
    prunes: ClassVar[bool] = False  # drops the experts not kept (rather than merging them)
    compresses_experts: ClassVar[bool] = False  # LoSparse (low-rank plus sparse) merged linears afterwards

    def needs(self, config: CompressionConfig) -> CalibrationNeeds:
        """The optional statistics the first calibration pass must collect for ``config``."""
        return CalibrationNeeds(
            all_token_outputs=config.similarity == "expert-output" and not self.prunes,
            router_input_moments=config.router == "pruned" and not self.prunes,
            weighted_input_moments=config.refits_inputs,
            substitution_errors=config.resolved("selection") == "error"
            or (config.similarity == "output-error" and not self.prunes),
        )

    def groups(
        self, dominants: list[int], block: BlockEvidence, config: CompressionConfig, rng: np.random.Generator
    ) -> list[list[int]]:
        """A block's groups, dominant (kept) expert first, from its statistics and experts."""
        kind = config.similarity
        if len(dominants) == len(block.ffns):  # every expert kept: nothing to group
            return [[d] for d in sorted(dominants)]
        if kind.startswith("router-") and block.router_weight is None:
            warnings.warn(
                f"experts chosen by a router outside their block (left as it is) are grouped by expert-weight "
                f"similarity: {kind} needs that router",
                MoefxWarning,
                stacklevel=2,
            )
            kind = "expert-weight"
        similarity = None if kind == "random" else expert_similarity(kind, block.stats, block.router_weight, block.ffns)
        return group_by_similarity(sorted(dominants), len(block.ffns), similarity, rng)

    def coefficients(self, groups: list[list[int]], frequency: torch.Tensor) -> list[list[float]]:
        """Each group's merging weights."""
        return merge_coefficients(groups, frequency, uniform=False)


class MergeRefit(Method):
    """moefx's default: M-SMoE's groups around the experts of largest contribution (routing frequency times
    REAP saliency: an expert's total routed output), merged, then every merged expert re-solved in closed
    form to reproduce its members (:mod:`moefx.passes.refit`)."""

    name = "merge-refit"
    defaults = {"selection": "contribution", "refit": "in+out", "align": True, "adaptive": False}


class MSMoE(Method):
    """The paper's M-SMoE: frequency-dominant experts, adaptive per-layer counts, no refit."""

    name = "m-smoe"
    defaults = {"selection": "frequency", "refit": "none", "align": True, "adaptive": True}


class MCSMoE(MSMoE):
    """The paper's MC-SMoE: M-SMoE, then each merged linear compressed to low-rank plus sparse parts."""

    name = "mc-smoe"
    compresses_experts = True


class Average(MSMoE):
    """Baseline: M-SMoE's groups merged uniformly."""

    name = "average"

    def coefficients(self, groups: list[list[int]], frequency: torch.Tensor) -> list[list[float]]:
        return merge_coefficients(groups, frequency, uniform=True)


class HCSMoE(Method):
    """Baseline (HC-SMoE): experts clustered hierarchically on their mean outputs over every calibration
    token, frequency-weighted merging without alignment."""

    name = "hc-smoe"
    defaults = {"selection": "frequency", "refit": "none", "align": False, "adaptive": False}

    def needs(self, config: CompressionConfig) -> CalibrationNeeds:
        return dataclasses.replace(super().needs(config), all_token_outputs=True)

    def groups(
        self, dominants: list[int], block: BlockEvidence, config: CompressionConfig, rng: np.random.Generator
    ) -> list[list[int]]:
        return cluster_hierarchically(block.stats.mean_outputs, len(dominants), block.stats.frequency)


class PruneFrequency(Method):
    """Baseline: keep the most used experts as they are, drop the rest (the router is pruned)."""

    name = "prune-frequency"
    defaults = {"selection": "frequency", "refit": "none", "align": False, "adaptive": False}
    prunes = True

    def groups(
        self, dominants: list[int], block: BlockEvidence, config: CompressionConfig, rng: np.random.Generator
    ) -> list[list[int]]:
        return [[d] for d in sorted(dominants)]


class REAP(PruneFrequency):
    """Baseline (REAP): keep the experts of largest mean routing weight times output norm, drop the rest."""

    name = "reap"
    defaults = {"selection": "reap", "refit": "none", "align": False, "adaptive": False}


METHODS: dict[str, Method] = {m.name: m for m in (MergeRefit(), MSMoE(), MCSMoE(), PruneFrequency(), Average(),
                                                   HCSMoE(), REAP())}  # fmt: skip
