"""Public drawing helpers shared by the notebooks' figures and the report."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

TASK_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def _oriented(array: np.ndarray, planar: bool) -> tuple[np.ndarray, str]:
    """A slice as drawn, with the ``origin`` to draw it with.

    A slice of a RAS+ volume is (first remaining axis, second remaining axis): the first runs
    horizontally, the second upwards. A 2D image (``planar``) is drawn as it is displayed: rows
    top to bottom, columns left to right.
    """
    return (array, "upper") if planar else (array.T, "lower")


def draw_labels(ax: plt.Axes, label_slice: np.ndarray, tasks: dict[int, str], planar: bool = False) -> None:
    """Each task's pixels of a label slice in its colour, half transparent."""
    label_slice, origin = _oriented(label_slice, planar)
    for colour, value in zip(TASK_COLOURS, tasks):
        mask = label_slice == value
        if mask.any():
            ax.imshow(
                np.ma.masked_where(~mask, mask),
                cmap=plt.matplotlib.colors.ListedColormap([colour]),
                alpha=0.45,
                interpolation="nearest",
                origin=origin,
            )


def draw_contour(ax: plt.Axes, mask: np.ndarray, planar: bool = False) -> None:
    """A dashed white outline of a mask (the ground truth under a prediction)."""
    mask, origin = _oriented(mask, planar)
    if mask.any():
        ax.contour(mask, levels=[0.5], colors=["white"], linewidths=1.0, linestyles="dashed", origin=origin)


def show_slice(ax: plt.Axes, grey: np.ndarray, title: str, planar: bool = False) -> None:
    """A grey slice (0-255) as the report shows every slice, titled, without axes."""
    grey, origin = _oriented(grey, planar)
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255, origin=origin, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def draw_point(ax: plt.Axes, column: float, row: float, planar: bool = False, **style) -> None:
    """A marker at pixel (``column``, ``row``) of a slice drawn by :func:`show_slice`."""
    ax.plot(*((column, row) if planar else (row, column)), **style)


def draw_box(ax: plt.Axes, box: np.ndarray, planar: bool = False, **style) -> None:
    """A box (x0, y0, x1, y1: columns and rows, pixel edges) on a slice drawn by :func:`show_slice`."""
    x0, y0, x1, y1 = box
    corner, width, height = ((x0, y0), x1 - x0, y1 - y0) if planar else ((y0, x0), y1 - y0, x1 - x0)
    ax.add_patch(plt.Rectangle(corner, width, height, fill=False, **style))
