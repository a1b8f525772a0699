"""Render a :class:`~moefx.api.CompressionReport` as markdown and PNG plots.

:func:`write_report` writes ``report.md`` and the plots: the layers x experts activation frequency
(MC-SMoE Figure 3), the grouping per layer (which original experts became which kept expert, Figures
A6-A13) and, for ``method="mc-smoe"``, the share of each merged expert's parameters LoSparse kept (Figure 5).
Everything is drawn from the report alone, so ``moefx report`` can re-render a saved ``report.json``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedLocator, MaxNLocator

from moefx.api import BlockReport, CompressionReport
from moefx.export.serving import atomic_output

MARKDOWN = "report.md"
ANNOTATE_LIMIT = 32  # experts per layer up to which the grouping plot writes each cell's group
DPI = 120


def element_size(dtype: str) -> int:
    """Bytes per element of a torch dtype given by name (``"float32"`` -> 4)."""
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def expert_bytes(block: BlockReport) -> tuple[int, int]:
    """The block's expert weights in bytes, before and after compression."""
    size = element_size(block.dtype)
    return block.expert_params_before * size, block.expert_params_after * size


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _change(after: float, before: float) -> str:
    """The relative change from ``before`` to ``after``."""
    return f"{after / before - 1:+.1%}" if before else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def settings(report: CompressionReport) -> str:
    """One line with the compression options (progress and in-place left out: they change no result)."""
    options = {k: v for k, v in report.to_dict()["config"].items() if k not in ("progress", "inplace")}
    return "Options: " + ", ".join(f"`{k}={v}`" for k, v in options.items())


def summary(report: CompressionReport) -> str:
    """The before/after totals (experts, expert parameters and bytes, FLOPs, the quality check) as a table."""
    blocks = report.blocks
    if not blocks:
        return "No MoE block was compressed."
    before_bytes = sum(expert_bytes(b)[0] for b in blocks)
    after_bytes = sum(expert_bytes(b)[1] for b in blocks)
    experts = sum(b.num_experts for b in blocks), sum(b.kept for b in blocks)
    rows = [
        ["MoE layers", len(blocks), f"{sum(b.kept < b.num_experts for b in blocks)} compressed", ""],
        ["experts", experts[0], experts[1], _change(experts[1], experts[0])],
        ["expert parameters", _si(report.expert_params_before, ""), _si(report.expert_params_after, ""),
         _change(report.expert_params_after, report.expert_params_before)],
        ["expert bytes", _si(before_bytes, "B"), _si(after_bytes, "B"), _change(after_bytes, before_bytes)],
        ["MoE FLOPs per token", _si(report.flops_before, "FLOP"), _si(report.flops_after, "FLOP"),
         _change(report.flops_after, report.flops_before)],
    ]  # fmt: skip
    q = report.quality
    if q is not None:
        rows.append([f"quality: {q.metric}", f"{q.before:.4f}", f"{q.after:.4f}", f"{q.after - q.before:+.4f}"])
    return _table(["", "before", "after", "change"], rows)


def _layers(report: CompressionReport) -> str:
    rows = []
    for i, b in enumerate(report.blocks):
        before, after = expert_bytes(b)
        row = [
            i,
            f"`{b.name}`",
            f"{b.kept} / {b.num_experts}",
            b.router,
            f"{_mean(b.stable_rank_before):.1f} → {_mean(b.stable_rank_after):.1f}" if b.stable_rank_before else "-",
            f"{_si(before, 'B')} → {_si(after, 'B')}",
            f"{_si(b.flops_before, 'FLOP')} → {_si(b.flops_after, 'FLOP')}",
        ]
        if report.config.method_object.compresses_experts:
            row.append(f"{_mean([f for e in b.remaining for f in e]):.1%}" if b.remaining else "-")
        rows.append(row)
    header = ["#", "block", "experts kept / total", "router", "mean stable rank", "expert bytes", "FLOPs per token"]
    if report.config.method_object.compresses_experts:
        header.append("LoSparse kept")
    return _table(header, rows)


def _groups(block: BlockReport) -> str:
    """The block's kept experts with their members (dominant first, bold) and activation frequencies."""
    freq = block.frequency
    if block.router == "unchanged":
        return "Unchanged. Frequencies: " + ", ".join(f"{e}: {f:.3f}" for e, f in enumerate(freq))

    def member(e: int, dominant: bool) -> str:
        text = f"{e} ({freq[e]:.3f})"
        return f"**{text}**" if dominant else text

    rows = [[g, ", ".join(member(e, i == 0) for i, e in enumerate(group))] for g, group in enumerate(block.groups)]
    kept = {e for group in block.groups for e in group}
    dropped = [member(e, False) for e in range(block.num_experts) if e not in kept]
    text = _table(["kept expert", "original experts (frequency), dominant first"], rows)
    return text + (f"\n\nDropped: {', '.join(dropped)}" if dropped else "")


def _stages(report: CompressionReport) -> str:
    total = sum(report.seconds.values())
    rows = [[stage, f"{s:.2f}", f"{s / total:.1%}" if total else "-"] for stage, s in report.seconds.items()]
    return _table(["stage", "seconds", "share"], [*rows, ["total", f"{total:.2f}", ""]])


def _overview(report: CompressionReport) -> list[str]:
    parts = [settings(report), "## Summary", summary(report)]
    return parts + (["## Per layer", _layers(report)] if report.blocks else [])


def overview(report: CompressionReport) -> str:
    """The options, the before/after summary and the per-layer table, as markdown (no groups, no plots)."""
    return "\n\n".join(_overview(report)) + "\n"


def markdown(report: CompressionReport, plots: Sequence[tuple[str, str]] = ()) -> str:
    """The whole report as markdown; ``plots`` are ``(title, file name)`` pairs to embed."""
    parts = ["# moefx compression report", *_overview(report)]
    if report.blocks:
        parts += ["## Groups", "Frequency: the fraction of calibration tokens that chose the expert among their top-k."]
        for i, b in enumerate(report.blocks):
            parts += [f"### {i}: `{b.name}` ({b.kept} of {b.num_experts} experts kept)", _groups(b)]
    parts += ["## Time per stage", _stages(report)]
    if plots:
        parts += ["## Plots", *(f"![{title}]({name})" for title, name in plots)]
    return "\n\n".join(parts) + "\n"


def _grid(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Ragged rows as a float matrix padded with NaN (drawn blank)."""
    width = max((len(r) for r in rows), default=0)
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        grid[i, : len(r)] = r
    return grid


def _figure(columns: int, rows: int, panels: int = 1) -> Figure:
    width = min(16.0, 2.5 + panels * (1.0 + 0.32 * columns))
    return Figure(figsize=(width, min(12.0, 1.8 + 0.4 * rows)), layout="constrained")


def _label_axes(ax: Axes, xlabel: str, columns: int, rows: int) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("MoE layer")
    # every index up to a readable count, else matplotlib's own integer ticks
    ax.xaxis.set_major_locator(FixedLocator(range(columns)) if columns <= ANNOTATE_LIMIT else MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(FixedLocator(range(rows)) if rows <= ANNOTATE_LIMIT else MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)


def frequency_figure(report: CompressionReport) -> Figure | None:
    """Layers x experts: the fraction of calibration tokens routed to each expert (MC-SMoE Figure 3)."""
    if not report.blocks:
        return None
    grid = _grid([b.frequency for b in report.blocks])
    fig = _figure(grid.shape[1], grid.shape[0])
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="activation frequency")
    _label_axes(ax, "expert", *grid.shape[::-1])
    ax.set_title("Activation frequency on the calibration data")
    return fig


def groups_figure(report: CompressionReport) -> Figure | None:
    """Layers x original experts coloured by the kept expert each merged into (dominant experts outlined,
    dropped ones grey)."""
    if not report.blocks:
        return None
    rows = []
    for b in report.blocks:
        row = [np.nan] * b.num_experts
        for g, group in enumerate(b.groups):
            for e in group:
                row[e] = g
        rows.append(row)
    grid = _grid(rows)
    most = max(b.kept for b in report.blocks)
    colors = ListedColormap([_palette(g) for g in range(most)]).with_extremes(bad="lightgrey")
    fig = _figure(grid.shape[1], grid.shape[0])
    ax = fig.add_subplot()
    ax.imshow(np.ma.masked_invalid(grid), cmap=colors, vmin=-0.5, vmax=most - 0.5, aspect="auto",
              interpolation="nearest")  # fmt: skip
    for i, b in enumerate(report.blocks):
        for g, group in enumerate(b.groups):
            ax.add_patch(Rectangle((group[0] - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
            if grid.shape[1] <= ANNOTATE_LIMIT:
                for e in group:
                    ax.text(e, i, str(g), ha="center", va="center", fontsize=7)
    _label_axes(ax, "original expert", *grid.shape[::-1])
    ax.set_title("Grouping: kept expert per original expert (outlined: dominant, grey: dropped)")
    return fig


def _palette(g: int) -> tuple[float, float, float]:
    """Distinct light colours (tab20's, then golden-angle hues) so black group numbers stay readable."""
    if g < 20:
        return colormaps["tab20"](g)[:3]
    return colormaps["hsv"]((g * 0.618) % 1.0)[:3]


def remaining_figure(report: CompressionReport) -> Figure | None:
    """Per matrix kind, layers x kept experts: the fraction of parameters LoSparse kept (MC-SMoE Figure 5);
    None when no block was LoSparse-compressed."""
    compressed = [b.remaining for b in report.blocks if b.remaining]
    if not compressed:
        return None
    matrices = len(compressed[0][0])
    names = ["gate", "up", "down"] if matrices == 3 else [*(f"in {i}" for i in range(matrices - 1)), "out"]
    width = max(b.kept for b in report.blocks)
    top = max(1.0, max(f for r in compressed for e in r for f in e))  # a fraction, unless LoSparse stored more
    fig = _figure(width, len(report.blocks), panels=matrices)
    axes = fig.subplots(1, matrices, squeeze=False)[0]
    for m, ax in enumerate(axes):
        grid = _grid([[e[m] for e in b.remaining] for b in report.blocks])
        image = ax.imshow(grid, cmap="magma", vmin=0.0, vmax=top, aspect="auto", interpolation="nearest")
        if width <= ANNOTATE_LIMIT // 2:
            for (i, e), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(e, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if value < 0.6 * top else "black")  # fmt: skip
        _label_axes(ax, "merged expert", width, len(report.blocks))
        ax.set_title(f"{names[m]} projection", fontsize=9)
    fig.colorbar(image, ax=list(axes), label="fraction of parameters kept")
    fig.suptitle("MC-SMoE: parameters remaining after low-rank plus sparse compression")
    return fig


PLOTS = (
    ("activation frequency", "frequency.png", frequency_figure),
    ("grouping", "groups.png", groups_figure),
    ("remaining parameters", "remaining.png", remaining_figure),
)


def write_report(report: CompressionReport, out_dir: str | os.PathLike) -> Path:
    """Write ``report.md`` and the PNG plots into ``out_dir`` (created if needed); returns the markdown's path.

    The files appear together once all are rendered (nothing is left half-written on failure).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / MARKDOWN) as target:
        written = []
        for title, name, draw in PLOTS:
            fig = draw(report)
            if fig is not None:
                fig.savefig(target.parent / name, dpi=DPI)
                written.append((title, name))
        target.write_text(markdown(report, written), encoding="utf-8")
    return out_dir / MARKDOWN
