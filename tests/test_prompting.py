"""Prompt sampling on real ground-truth masks, SAM geometry, and a papermill smoke run."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import HIPPOCAMPUS_MANIFEST, assert_predictions_reproduce_the_metrics, results_dir_of
from scipy import ndimage

from fewsam_lib.bench.metrics import overlap
from fewsam_lib.bench.runs import IncompleteRun, RunSpec, collect_metrics, load_run, summarize
from fewsam_lib.data.volumes import load_case, take_slice
from fewsam_lib.errors import FewsamError
from fewsam_lib.methods.prompting import (
    JITTER,
    PROMPT_VARIANTS,
    bounding_box,
    get_variant,
    innermost_point,
    make_prompt,
    prompt_rng,
)
from fewsam_lib.methods.sam_decoding import resolve_overlaps


@pytest.fixture(scope="module")
def real_masks(hippocampus):
    """(case, slice, label, mask) for every labelled task on every slice of two test cases."""
    masks = []
    for case_id in hippocampus.case_ids("test")[:2]:
        label = load_case(hippocampus, case_id, image=False).label
        for index in range(label.shape[2]):
            for value in (1, 2):
                mask = take_slice(label, 2, index) == value
                if mask.any():
                    masks.append((case_id, index, value, mask))
    assert len(masks) > 40
    return masks


def _inside(mask, points):
    return all(mask[int(y), int(x)] for x, y in points)


@pytest.mark.parametrize("name", ["point1", "point3", "point5", "point1_neg1", "box_point"])
def test_positive_points_lie_inside_and_negatives_outside(name, real_masks):
    variant = get_variant(name)
    for case_id, index, value, mask in real_masks:
        prompt = make_prompt(mask, variant, prompt_rng(0, case_id, index, value))
        positives, negatives = prompt.points[prompt.labels == 1], prompt.points[prompt.labels == 0]
        assert len(positives) == variant.positive_points and len(negatives) == variant.negative_points
        assert _inside(mask, positives)
        assert not any(mask[int(y), int(x)] for x, y in negatives)
        assert np.all((prompt.points % 1) == 0.5)  # pixel centres


def test_first_point_is_the_innermost(real_masks):
    for _, _, _, mask in real_masks[:20]:
        row, col = innermost_point(mask)
        distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        assert distance[row, col] == distance.max()
        prompt = make_prompt(mask, get_variant("point3"), np.random.default_rng(0))
        assert tuple(prompt.points[0]) == (col + 0.5, row + 0.5)


def test_sampling_is_seeded(real_masks):
    case_id, index, value, mask = max(real_masks, key=lambda m: m[3].sum())
    variant = get_variant("point5")
    first = make_prompt(mask, variant, prompt_rng(0, case_id, index, value)).points
    again = make_prompt(mask, variant, prompt_rng(0, case_id, index, value)).points
    other = make_prompt(mask, variant, prompt_rng(1, case_id, index, value)).points
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_boxes_contain_the_mask_and_jitter_is_bounded(real_masks):
    for case_id, index, value, mask in real_masks:
        box = bounding_box(mask)
        rows, cols = np.nonzero(mask)
        assert (box[0], box[1]) == (cols.min(), rows.min()) and (box[2], box[3]) == (cols.max() + 1, rows.max() + 1)
        jittered = make_prompt(mask, get_variant("box_jitter"), prompt_rng(3, case_id, index, value)).box
        size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
        assert np.all(np.abs(jittered - box) <= JITTER * size + 1e-9)
        assert jittered[2] > jittered[0] and jittered[3] > jittered[1]


def test_every_variant_has_an_oracle_twin():
    base = [name for name in PROMPT_VARIANTS if not name.endswith("_oracle")]
    assert {"point1", "point3", "point5", "point1_neg1", "box", "box_jitter", "box_point"} == set(base)
    for name in base:
        assert PROMPT_VARIANTS[f"{name}_oracle"].mask_selection == "oracle"
    assert get_variant("point1").multimask and not get_variant("point3").multimask
    assert not get_variant("box").multimask and get_variant("box_oracle").multimask
    with pytest.raises(FewsamError, match="unknown prompt variant"):
        get_variant("lasso")


def test_sam_receives_pixel_centres_of_the_resized_slice(mobile_sam):
    """A point at slice pixel (r, c) must reach SAM at the centre of its upsampled block."""
    captured = {}
    encoder = mobile_sam.model.prompt_encoder
    original = encoder._embed_points

    def spy(points, labels, pad):
        captured["points"] = points.clone()
        return original(points, labels, pad)

    from fewsam_lib.methods.prompting import predict_masks

    mask = np.zeros((35, 51), bool)
    mask[10:15, 20:30] = True
    prompt = make_prompt(mask, get_variant("point1"), np.random.default_rng(0))
    encoder._embed_points = spy
    try:
        logits, _ = predict_masks(
            mobile_sam.model, torch.zeros(256, 64, 64), mask.shape, [prompt], get_variant("point1")
        )
    finally:
        encoder._embed_points = original
    assert logits.shape == (1, 35, 51)
    scale = np.array([1024 / 51, 703 / 35])  # the slice is resized to 703 x 1024 (SAM rounds per axis)
    # SAM adds 0.5 itself, so what it embeds is the continuous position times the scale.
    np.testing.assert_allclose(captured["points"][0, 0].numpy() + 0.5, prompt.points[0] * scale, rtol=1e-5)


def test_resolve_overlaps_highest_logit_wins():
    logits = np.array([[[2.0, -1.0, 0.5]], [[1.0, 3.0, -0.2]]])
    np.testing.assert_array_equal(resolve_overlaps(logits, [1, 2]), [[1, 2, 1]])
    np.testing.assert_array_equal(resolve_overlaps(-np.ones((2, 1, 2)), [1, 2]), [[0, 0]])


@pytest.fixture
def smoke_run(prompting_smoke_run):
    return results_dir_of(prompting_smoke_run), prompting_smoke_run


def test_smoke_notebook_writes_a_complete_run(smoke_run, hippocampus):
    results, folder = smoke_run
    meta, metrics = load_run(folder)
    spec = RunSpec("msd_hippocampus", "sam_prompting", "box", "mobile_sam", 0, "smoke", encoder_path="openvino-fp32")
    assert folder == spec.folder(results) and folder.name.endswith("_smoke_openvino-fp32")
    assert (folder / "notebook.ipynb").exists()
    notebook = json.loads((folder / "notebook.ipynb").read_text())
    assert any("parameters" in cell["metadata"].get("tags", []) for cell in notebook["cells"])
    assert meta["backbone_checkpoint"]["sha256"] == "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
    assert meta["data"]["manifest_sha256"] == hippocampus.sha256
    assert meta["cache"]["misses"] + meta["cache"]["hits"] > 0
    assert set(metrics.level) == {"slice", "volume"} and set(metrics.task) == {"anterior", "posterior"}
    assert (metrics.slice_selection == "gt_slices").all() and (metrics.profile == "smoke").all()


def test_predictions_reload_and_reproduce_the_recorded_metrics(prompting_smoke_run, hippocampus):
    assert_predictions_reproduce_the_metrics(prompting_smoke_run)


def test_box_prompt_beats_a_random_mask_control(smoke_run, hippocampus):
    """Random masks of the right size at random places: what Dice chance alone gives."""
    _, folder = smoke_run
    _, metrics = load_run(folder)
    slices = metrics[metrics.level == "slice"]
    rng = np.random.default_rng(0)
    control = []
    for row in slices.itertuples():
        label = take_slice(load_case(hippocampus, row.case_id, image=False).label, 2, row.slice_index)
        gt = label == hippocampus.label_of(row.task)
        random_mask = np.zeros(gt.size, bool)
        random_mask[rng.choice(gt.size, size=int(gt.sum()), replace=False)] = True
        control.append(overlap(gt, random_mask.reshape(gt.shape))[1])
    assert slices.dice.mean() > 0.6
    assert slices.dice.mean() > np.mean(control) + 0.4


def test_summarize_aggregates_and_skips_incomplete_runs(smoke_run):
    results, folder = smoke_run
    summary = summarize(results)
    dice = summary[(summary.metric == "dice") & (summary.level == "slice") & (summary.task == "posterior")]
    assert len(dice) == 1
    row = dice.iloc[0]
    _, metrics = load_run(folder)
    expected = metrics[(metrics.level == "slice") & (metrics.task == "posterior")].dice
    assert row["mean"] == pytest.approx(expected.mean()) and row["n"] == len(expected)
    assert row["ci95_low"] <= row["mean"] <= row["ci95_high"]
    assert (results / "tables" / "summary.csv").exists() and "posterior" in (
        results / "tables" / "summary.md"
    ).read_text()

    broken = folder.parent / "mobile_sam_point1_seed0_smoke"
    broken.mkdir()
    (broken / "run.json").write_text(json.dumps({"status": "running"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(collect_metrics(results)) == len(metrics)
    assert any("incomplete" in str(w.message) for w in caught)
    with pytest.raises(IncompleteRun, match="mobile_sam_point1_seed0_smoke"):
        summarize(results, strict=True)


def test_a_failed_run_stays_marked_running(smoke_run, monkeypatch):
    from fewsam_lib.bench.evaluate import evaluate
    from fewsam_lib.methods import PlannedRun, prompting

    results, _ = smoke_run

    def broken(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(prompting, "predict_masks", broken)
    with pytest.raises(RuntimeError, match="decoder exploded"):
        evaluate(
            PlannedRun("sam_prompting", str(HIPPOCAMPUS_MANIFEST), "mobile_sam", "point3", 0, "smoke"),
            results_dir=results,
            progress=False,
        )
    folder = RunSpec(
        "msd_hippocampus", "sam_prompting", "point3", "mobile_sam", 0, "smoke", None, "openvino-fp32"
    ).folder(results)
    assert json.loads((folder / "run.json").read_text())["status"] == "running"
    with pytest.raises(IncompleteRun, match="not complete"):
        load_run(folder)


def test_run_command_rejects_an_unknown_variant(capsys):
    from fewsam_lib.cli import main

    assert (
        main(
            [
                "run",
                "prompting",
                str(HIPPOCAMPUS_MANIFEST),
                "--backbone",
                "mobile_sam",
                "--variant",
                "lasso",
                "--no-notebook",
            ]
        )
        == 2
    )
    assert "unknown prompt variant 'lasso'" in capsys.readouterr().err
