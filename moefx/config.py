"""Compression configuration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moefx.errors import ConfigError

METHODS = ("m-smoe", "prune-frequency", "average", "hc-smoe", "reap")
ROUTER_MODES = ("exact", "pruned")
SIMILARITIES = ("router-logits", "router-weight", "expert-weight", "expert-output", "random")


@dataclass
class CompressionConfig:
    """What to compress and how.

    * ``experts``: experts kept, on average over the merged layers: a float in (0, 1] is a fraction of each
      layer's experts, an int an average count. Each layer keeps at least its ``top_k``.
    * ``method``: ``"m-smoe"`` (the paper: frequency-dominant experts, routing-similarity grouping,
      permutation alignment, frequency-weighted merging) or a baseline: ``"prune-frequency"`` (keep the
      most used experts), ``"average"`` (M-SMoE's groups merged uniformly), ``"hc-smoe"`` (hierarchical
      clustering on mean expert outputs, frequency-weighted merging), ``"reap"`` (keep the experts with
      the largest mean routing-weight times output norm).
    * ``router``: ``"exact"`` keeps the original router and maps each chosen expert to its group;
      ``"pruned"`` shrinks the router to one output per group, fitted by least squares (falls back to exact,
      with a warning, where the routing cannot be pruned soundly). Pruning methods always prune the router.
    * ``adaptive``: allocate kept experts across layers by globally ranked, per-layer normalised scores
      (the paper); ``False`` keeps the same count in every layer.
    * ``align``: permutation-align group members to their dominant expert before merging; ``None`` (the
      default) does what each method's paper does: M-SMoE and average align, HC-SMoE does not.
    * ``similarity``: how non-dominant experts choose their group (M-SMoE and average):
      ``"router-logits"`` (the paper), ``"router-weight"``, ``"expert-weight"``, ``"expert-output"``, ``"random"``.
    * ``skip_layers``: MoE blocks left unchanged, by index among the model's MoE blocks or by name
      (the paper leaves the first one: ``skip_layers=[0]``).
    * ``seed``: for the random similarity and anything else random.
    * ``inplace``: compress the given model itself instead of a copy (saves memory; the input is consumed).
    * ``progress``: show progress bars.
    """

    experts: float | int = 0.5
    method: str = "m-smoe"
    router: str = "exact"
    adaptive: bool = True
    align: bool | None = None
    similarity: str = "router-logits"
    skip_layers: list[int | str] = field(default_factory=list)
    seed: int = 0
    inplace: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        e = self.experts
        if isinstance(e, bool) or not isinstance(e, (int, float)):
            raise ConfigError(f"experts must be a fraction in (0, 1] or a count, not {e!r}")
        if isinstance(e, float) and not 0.0 < e <= 1.0:
            raise ConfigError(f"experts={e} is out of range: give a fraction in (0, 1] or an integer count")
        if isinstance(e, int) and e < 1:
            raise ConfigError(f"experts={e} is out of range: keep at least one expert per layer")
        for name, value, allowed in (
            ("method", self.method, METHODS),
            ("router", self.router, ROUTER_MODES),
            ("similarity", self.similarity, SIMILARITIES),
        ):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}: choose one of {', '.join(allowed)}")
        if not isinstance(self.skip_layers, (list, tuple)):
            raise ConfigError("skip_layers must be a list of MoE block indices or names")

    @property
    def prunes(self) -> bool:
        """Whether the method drops experts (rather than merging them)."""
        return self.method in ("prune-frequency", "reap")

    @classmethod
    def from_arguments(cls, config: CompressionConfig | None, overrides: dict[str, Any]) -> CompressionConfig:
        """``config`` (or the defaults) with ``overrides`` applied, validated."""
        base = dataclasses.asdict(config) if config is not None else {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]!r}: valid options are {', '.join(sorted(names))}")
        return cls(**{**base, **overrides})
