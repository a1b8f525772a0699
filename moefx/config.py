"""Compression configuration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moefx.errors import ConfigError
from moefx.methods import METHODS, Method

METHOD_NAMES = tuple(METHODS)
ROUTER_MODES = ("exact", "pruned")
SIMILARITIES = ("router-logits", "router-weight", "expert-weight", "expert-output", "output-error", "random")
SVD_MODES = ("activation-aware", "plain")
SELECTIONS = ("frequency", "reap", "contribution", "error")
REFITS = ("none", "out", "in+out", "units")
SPARSE_AXES = ("columns", "rows")
SPARSE_SCORES = ("activation", "gradient")


@dataclass
class CompressionConfig:
    """What to compress and how.

    * ``experts``: experts kept, on average over the merged layers: a float in (0, 1] is a fraction of each
      layer's experts, an int an average count. Each layer keeps at least its ``top_k``.
    * ``method``: ``"merge-refit"`` (M-SMoE's grouping and merging, then a closed-form refit of every merged
      expert, see ``refit``), ``"m-smoe"`` (the paper: frequency-dominant experts, routing-similarity grouping,
      permutation alignment, frequency-weighted merging), ``"mc-smoe"`` (M-SMoE, then each merged expert's
      linears compressed to low-rank plus structured-sparse parts, see ``rank``) or a baseline:
      ``"prune-frequency"`` (keep the most used experts), ``"average"`` (M-SMoE's groups merged
      uniformly), ``"hc-smoe"`` (hierarchical clustering on mean expert outputs, frequency-weighted
      merging), ``"reap"`` (keep the experts with the largest mean routing-weight times output norm).
    * ``router``: ``"exact"`` keeps the original router and maps each chosen expert to its group;
      ``"pruned"`` shrinks the router to one output per group, fitted by least squares (falls back to exact,
      with a warning, where the routing cannot be pruned soundly). Pruning methods always prune the router.
    * ``adaptive``: allocate kept experts across layers by globally ranked, per-layer normalised scores
      (the paper); ``False`` keeps the same count in every layer. ``None`` is the method's own choice.
    * ``align``: permutation-align group members to their dominant expert before merging; ``None`` (the
      default) does what each method's paper does: M-SMoE, MC-SMoE and average align, HC-SMoE does not.
    * ``similarity``: how non-dominant experts choose their group (M-SMoE and average):
      ``"router-logits"`` (the paper), ``"router-weight"``, ``"expert-weight"``, ``"expert-output"``,
      ``"output-error"`` (the dominant expert whose outputs on the expert's routed tokens are closest to its
      own, see ``selection="error"``) or ``"random"``.
    * ``skip_layers``: MoE blocks left unchanged, by index among the model's MoE blocks or by name
      (the paper leaves the first one: ``skip_layers=[0]``).
    * ``selection``: how experts are ranked for keeping: ``"frequency"`` (the paper), ``"reap"`` (mean
      routing weight times output norm over routed tokens) or ``"contribution"`` (frequency times REAP's
      saliency: the expert's total routed output) or ``"error"`` (merging methods: the set whose kept experts
      reproduce the others' outputs best on their routed tokens, searched from the scores' choices; with
      ``adaptive``, each further expert goes to the layer where it lowers that error most; see
      :mod:`moefx.selection`). ``None`` is the method's own choice.
    * ``refit`` (merging methods): after merging, re-solve each merged expert in closed form to reproduce
      its members' outputs on the calibration tokens: ``"out"`` (the output projection), ``"in+out"`` (also
      the input projections, by least squares on the members' pre-activations), ``"units"`` (``"in+out"``,
      then the merged expert's hidden units chosen again among its own and its members' by how well they
      fit the members' outputs, the output projection solved over them; see
      :func:`moefx.passes.refit.least_squares_units`; its statistics span the merged expert's units and
      up to eight members', so a group of m members costs up to ``(1 + m)^2`` times ``"in+out"``'s Gram
      matrix in memory and time) or ``"none"``; ``ridge`` is the relative ridge of those solves.
      ``sequential`` calibrates block by block, each seeing the blocks before it already compressed (as
      GPTQ does).
    * ``rank``, ``sparse_keep``, ``svd``, ``sparse_axis`` (``method="mc-smoe"``): each merged linear becomes
      ``U V + S`` with ``U V`` of rank ``rank`` (an int, the paper's 32, or a fraction of ``min(out, in)``)
      from an ``"activation-aware"`` SVD (whitened by the calibration input second moment) or a
      ``"plain"`` one, and ``S`` the residual with ``sparse_keep`` of its ``"columns"`` (input features,
      the paper) or ``"rows"`` (output units, the authors' code) kept, by one threshold over the model on
      a score per column (row): ``sparse_score="activation"`` (its norm times its input's calibration RMS)
      or ``"gradient"`` (the paper's ``sum |s * dL/ds|`` of the model's loss on the calibration batches: a
      causal LM's next-token loss, a loss the model computes from batch ``labels``, or ``compile(loss=)``).
    * ``stable_ranks``: record every expert's stable rank before and after merging in the report (an
      eigensolve per matrix: minutes on a full-size layer, so off unless asked for).
    * ``seed``: for the random similarity and anything else random.
    * ``inplace``: compress the given model itself instead of a copy (saves memory; the input is consumed).
    * ``progress``: show progress bars.
    """

    experts: float | int = 0.5
    method: str = "merge-refit"
    router: str = "exact"
    adaptive: bool | None = None
    align: bool | None = None
    similarity: str = "router-logits"
    skip_layers: list[int | str] = field(default_factory=list)
    selection: str | None = None
    refit: str | None = None
    ridge: float = 1e-2
    sequential: bool = False
    rank: int | float = 32
    sparse_keep: float = 0.1
    svd: str = "activation-aware"
    sparse_axis: str = "columns"
    sparse_score: str = "activation"
    stable_ranks: bool = False
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
            ("method", self.method, METHOD_NAMES),
            ("router", self.router, ROUTER_MODES),
            ("similarity", self.similarity, SIMILARITIES),
            ("svd", self.svd, SVD_MODES),
            ("selection", self.resolved("selection"), SELECTIONS),
            ("refit", self.resolved("refit"), REFITS),
            ("sparse_axis", self.sparse_axis, SPARSE_AXES),
            ("sparse_score", self.sparse_score, SPARSE_SCORES),
        ):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}: choose one of {', '.join(allowed)}")
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0 or (isinstance(r, float) and r > 1):
            raise ConfigError(f"rank={r!r} is out of range: give a positive integer or a fraction in (0, 1]")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or self.ridge < 0:
            raise ConfigError(f"ridge={self.ridge!r} is out of range: give a non-negative number")
        if self.method_object.prunes and self.resolved("selection") == "error":
            raise ConfigError(f"selection='error' chooses the experts that stand in for merged ones, not for "
                              f"method={self.method!r}, which drops them: use a score")  # fmt: skip
        if self.method_object.prunes and self.refits:
            raise ConfigError(f"refit applies to merged experts, not to method={self.method!r}: leave refit unset")
        if isinstance(self.sparse_keep, bool) or not 0.0 <= self.sparse_keep <= 1.0:
            raise ConfigError(f"sparse_keep={self.sparse_keep!r} is out of range: give a fraction in [0, 1]")
        if not isinstance(self.skip_layers, (list, tuple)):
            raise ConfigError("skip_layers must be a list of MoE block indices or names")

    def resolved(self, name: str) -> Any:
        """The option's value, or the method's default for it when it is unset (None)."""
        value = getattr(self, name)
        known = self.method in METHODS  # resolved() runs before validate() has checked the name
        return METHODS[self.method].defaults[name] if value is None and known else value

    @property
    def refits(self) -> bool:
        """Whether merged experts are refit on the calibration data at all."""
        return self.resolved("refit") != "none"

    @property
    def refits_units(self) -> bool:
        """Whether merged experts' hidden units are chosen among their members' (``"units"``)."""
        return self.resolved("refit") == "units"

    @property
    def refits_inputs(self) -> bool:
        """Whether merged input projections are fitted by least squares (``"in+out"`` and ``"units"``)."""
        return self.resolved("refit") in ("in+out", "units")

    @property
    def method_object(self) -> Method:
        """The object of ``method`` (:mod:`moefx.methods`): its defaults, statistics and planning."""
        return METHODS[self.method]

    @classmethod
    def from_arguments(cls, config: CompressionConfig | None, overrides: dict[str, Any]) -> CompressionConfig:
        """``config`` (or the defaults) with ``overrides`` applied, validated."""
        base = dataclasses.asdict(config) if config is not None else {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]!r}: valid options are {', '.join(sorted(names))}")
        return cls(**{**base, **overrides})
