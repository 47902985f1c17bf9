"""Matplotlib figures for TensorBoard and notebooks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt  # headless machines fall back to Agg by themselves; notebooks keep their backend

__all__ = [
    "pruning_curves_figure",
    "categories_figure",
    "layer_rankings_figure",
    "bits_heatmap_figure",
    "gradcam_figure",
]


def pruning_curves_figure(curves: Sequence[Any], baseline: float | None = None) -> Any:
    """Accuracy vs % parameters removed, one line per method (``PruningCurve`` objects), SAUCE in the legend."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for curve in curves:
        ax.plot(
            [100 * r for r in curve.removed],
            [100 * a for a in curve.accuracy],
            marker=".",
            label=f"{curve.method} (SAUCE {curve.sauce:.1f})",
        )
    if baseline is not None:
        ax.axhline(100 * baseline, color="grey", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def categories_figure(per_unit: Mapping[str, Mapping[str, int]]) -> Any:
    """Stacked bars: % critical / neutral / detrimental neurons per unit (output side first, like the analysis)."""
    names = list(per_unit)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(names) + 2), 4))
    bottom = [0.0] * len(names)
    colours = {"critical": "tab:green", "neutral": "tab:grey", "detrimental": "tab:red"}
    for cat, colour in colours.items():
        vals = []
        for n in names:
            total = sum(per_unit[n].values()) or 1
            vals.append(100 * per_unit[n].get(cat, 0) / total)
        ax.bar(range(len(names)), vals, bottom=bottom, color=colour, label=cat)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("neurons (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def layer_rankings_figure(
    layers: Sequence[str], scores: Mapping[str, Mapping[str, float]], pruned: Mapping[str, Sequence[str]]
) -> Any:
    """Side by side, per criterion: each layer's score as a share of that criterion's total; pruned layers hatched."""
    fig, axes = plt.subplots(1, len(scores), figsize=(4 + 3 * len(scores), max(3, 0.25 * len(layers) + 1)), sharey=True)
    axes = list(axes) if len(scores) > 1 else [axes]
    for ax, (name, values) in zip(axes, scores.items()):
        total = sum(values[n] for n in layers) or 1.0
        shares = [100 * values[n] / total for n in layers]
        bars = ax.barh(range(len(layers)), shares, color="tab:blue")
        for bar, n in zip(bars, layers):
            if n in pruned.get(name, ()):
                bar.set_color("tab:red")
        ax.set_title(f"{name} (red: pruned)", fontsize=9)
        ax.set_xlabel("share of total score (%)")
    axes[0].set_yticks(range(len(layers)))
    axes[0].set_yticklabels(layers, fontsize=7)
    axes[0].invert_yaxis()
    fig.tight_layout()
    return fig


def bits_heatmap_figure(bits: Mapping[str, Sequence[float]]) -> Any:
    """Bit depth per output channel (columns) of every quantized layer (rows); removed channels are blank."""
    import numpy as np

    names = list(bits)
    width = max((len(v) for v in bits.values()), default=1)
    grid = np.full((len(names), width), np.nan)
    for i, n in enumerate(names):
        grid[i, : len(bits[n])] = np.asarray(bits[n], dtype=float)
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.08 * width), 1 + 0.35 * len(names)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("output channel")
    fig.colorbar(image, ax=ax, label="bits")
    fig.tight_layout()
    return fig


def gradcam_figure(images: Any, maps: Any, labels: Sequence[int], max_items: int = 16) -> Any:
    """Preservation samples with their Grad-CAM map overlaid (first channel of each image)."""
    n = min(max_items, len(labels))
    cols = min(8, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k][0], cmap="gray")
        ax.imshow(maps[k], cmap="jet", alpha=0.45)
        ax.set_title(f"y={int(labels[k])}", fontsize=7)
    fig.tight_layout()
    return fig
