"""Metrics against hand-checked cases and a brute-force surface distance on a real label volume."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fewsam_lib.bench.metrics import overlap, score, surface
from fewsam_lib.data.volumes import load_case


def test_overlap_hand_checked():
    gt = np.zeros((4, 4), bool)
    gt[0:2, 0:2] = True  # 4 px
    pred = np.zeros((4, 4), bool)
    pred[1:3, 1:3] = True  # 4 px, 1 shared
    iou, dice = overlap(gt, pred)
    assert iou == pytest.approx(1 / 7) and dice == pytest.approx(2 / 8)
    assert overlap(gt, gt) == (1.0, 1.0)


def test_empty_rules():
    empty = np.zeros((5, 5), bool)
    blob = np.zeros((5, 5), bool)
    blob[2, 2] = True
    both_empty = score(empty, empty, (1.0, 1.0))
    assert (both_empty.iou, both_empty.dice) == (1.0, 1.0)
    assert math.isnan(both_empty.assd_mm) and math.isnan(both_empty.hd95_mm)
    for gt, pred in ((blob, empty), (empty, blob)):
        one_empty = score(gt, pred, (1.0, 1.0))
        assert (one_empty.iou, one_empty.dice) == (0.0, 0.0)
        assert math.isnan(one_empty.assd_mm) and math.isnan(one_empty.hd95_mm)
    assert score(blob, empty, (1.0, 1.0)).gt_voxels == 1


def test_shifted_square_distances_in_mm():
    gt = np.zeros((20, 20), bool)
    gt[5:10, 5:10] = True
    pred = np.roll(gt, 3, axis=1)  # shifted 3 columns
    scores = score(gt, pred, (1.0, 2.0))  # columns are 2 mm apart
    assert scores.iou == pytest.approx(10 / 40)
    # Every surface voxel is within 3 columns (6 mm) of the other surface; the far edges are exactly 6 mm.
    assert scores.hd95_mm == pytest.approx(6.0)
    assert 0 < scores.assd_mm < 6.0
    assert score(gt, gt, (1.0, 2.0)).assd_mm == 0.0


def _brute_force(gt, pred, spacing):
    def points(mask):
        return np.argwhere(surface(mask)) * np.asarray(spacing)

    a, b = points(gt), points(pred)
    distances = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    a_to_b, b_to_a = distances.min(1), distances.min(0)
    assd = (a_to_b.sum() + b_to_a.sum()) / (a_to_b.size + b_to_a.size)
    return assd, max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))


def test_distances_match_brute_force_on_a_real_volume(hippocampus):
    volume = load_case(hippocampus, hippocampus.case_ids("test")[0], image=False)
    gt = volume.label == 1
    pred = np.roll(volume.label == 1, 1, axis=0) | (volume.label == 2)  # a plausible wrong prediction
    spacing = (1.0, 1.2, 0.8)  # anisotropic on purpose
    scores = score(gt, pred, spacing)
    assd, hd95 = _brute_force(gt, pred, spacing)
    assert scores.assd_mm == pytest.approx(assd, rel=1e-6)
    assert scores.hd95_mm == pytest.approx(hd95, rel=1e-6)


def test_shape_and_spacing_mismatch_are_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        score(np.zeros((2, 2)), np.zeros((2, 3)), (1, 1))
    with pytest.raises(ValueError, match="spacing"):
        score(np.zeros((2, 2)), np.zeros((2, 2)), (1, 1, 1))
