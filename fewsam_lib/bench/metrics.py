"""Overlap and surface metrics, with the empty-case rules in one place for every method.

Rules (per binary mask pair, 2D slice or 3D volume):

- ground truth and prediction both empty: IoU = Dice = 1 (correctly "nothing here"); ASSD and
  HD95 undefined (NaN).
- exactly one of them empty: IoU = Dice = 0; ASSD and HD95 undefined (NaN) — there is no surface
  to measure against, and a made-up penalty distance would mix two scales in one mean.
- both non-empty: IoU, Dice; ASSD and HD95 in mm from the voxel spacing.

Surfaces are the mask voxels with a face-neighbour outside the mask; distances are Euclidean
distance transforms (scipy) in mm. HD95 is the larger of the two directed 95th percentiles
(as in MONAI and DeepMind's surface-distance). Rows keep ``gt_voxels`` and ``pred_voxels`` so any
table can filter the empty cases.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Scores:
    iou: float
    dice: float
    assd_mm: float
    hd95_mm: float
    gt_voxels: int
    pred_voxels: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def overlap(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """IoU and Dice of two boolean masks of the same shape (both empty -> 1, 1)."""
    gt, pred = gt.astype(bool, copy=False), pred.astype(bool, copy=False)
    intersection = int(np.logical_and(gt, pred).sum())
    total = int(gt.sum()) + int(pred.sum())
    if total == 0:
        return 1.0, 1.0
    union = total - intersection
    return intersection / union, 2.0 * intersection / total


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` that touch the outside through a face (the mask border counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``a`` to the surface of ``b``, and vice versa."""
    surface_a, surface_b = surface(a), surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)
    return to_b[surface_a], to_a[surface_b]


def score(gt: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...]) -> Scores:
    """All metrics of one binary prediction against its ground truth."""
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    if len(spacing) != gt.ndim:
        raise ValueError(f"spacing {spacing} does not match a {gt.ndim}D mask")
    gt, pred = gt.astype(bool), pred.astype(bool)
    iou, dice = overlap(gt, pred)
    assd = hd95 = math.nan
    if gt.any() and pred.any():
        gt_to_pred, pred_to_gt = surface_distances(gt, pred, spacing)
        assd = float((gt_to_pred.sum() + pred_to_gt.sum()) / (gt_to_pred.size + pred_to_gt.size))
        hd95 = float(max(np.percentile(gt_to_pred, 95), np.percentile(pred_to_gt, 95)))
    return Scores(iou, dice, assd, hd95, int(gt.sum()), int(pred.sum()))
