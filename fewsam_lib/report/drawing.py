"""Public drawing helpers shared by the notebooks' figures and the report."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

TASK_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def draw_labels(ax: plt.Axes, label_slice: np.ndarray, tasks: dict[int, str]) -> None:
    """Each task's pixels of a (transposed) label slice in its colour, half transparent."""
    for colour, value in zip(TASK_COLOURS, tasks):
        mask = label_slice == value
        if mask.any():
            ax.imshow(
                np.ma.masked_where(~mask, mask),
                cmap=plt.matplotlib.colors.ListedColormap([colour]),
                alpha=0.45,
                interpolation="nearest",
                origin="lower",
            )


def draw_contour(ax: plt.Axes, mask: np.ndarray) -> None:
    """A dashed white outline of a mask (the ground truth under a prediction)."""
    if mask.any():
        ax.contour(mask, levels=[0.5], colors=["white"], linewidths=1.0, linestyles="dashed", origin="lower")


def show_slice(ax: plt.Axes, grey: np.ndarray, title: str) -> None:
    """A grey slice (0-255) as the report shows every slice, titled, without axes."""
    # A slice array is (first remaining axis, second remaining axis) of the RAS+ volume; the
    # display puts the first along the horizontal axis.
    ax.imshow(grey.T, cmap="gray", vmin=0, vmax=255, origin="lower", interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()
