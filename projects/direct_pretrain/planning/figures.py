"""The data against the model: box sizes at each phase's training scale, with the anchor sizes
and the strides of the feature maps they sit on."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_box_sizes"]


def plot_box_sizes(
    sides: np.ndarray,
    scales: dict[str, float],
    anchors: list[float],
    strides: list[int],
    recall: dict[str, float],
    path: str | Path,
) -> None:
    """Histograms of the box side (px, log scale) at each phase's scale; anchor sizes as solid
    lines, feature-map strides as dashed ones; the anchor recall of each phase in its label."""
    fig, ax = plt.subplots(figsize=(7, 4))
    positive = sides[sides > 0]
    if len(positive):
        low = max(0.5, float(positive.min() * min(scales.values(), default=1.0)) / 1.5)
        high = float(positive.max() * max(scales.values(), default=1.0)) * 1.5
        high = max(high, max(anchors, default=high) * 1.5)
        bins = np.geomspace(low, high, 40)
        for phase, scale in scales.items():
            label = f"{phase} (x{scale:.2f})"
            if phase in recall:
                label += f": {100 * recall[phase]:.0f}% matched by an anchor"
            ax.hist(positive * scale, bins=bins, alpha=0.5, label=label)
    for i, size in enumerate(anchors):
        ax.axvline(size, color="k", lw=1, label="anchor sizes" if i == 0 else None)
    for i, stride in enumerate(strides):
        ax.axvline(stride, color="gray", ls="--", lw=1, label="strides" if i == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("box side sqrt(w*h) in the training input (px)")
    ax.set_ylabel("boxes")
    ax.set_title("Box sizes at each phase's training scale")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
