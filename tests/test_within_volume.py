"""The within-volume track: labelled-slice selection, the blind copy, each method, smoke runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_predictions_reproduce_the_metrics

from fewsam_lib.bench.metrics import overlap
from fewsam_lib.bench.profiles import load_profile
from fewsam_lib.bench.runs import load_run
from fewsam_lib.data.volumes import load_case, task_voxels_per_slice
from fewsam_lib.errors import FewsamError
from fewsam_lib.methods import within_volume
from fewsam_lib.methods.base import PlannedRun, RunContext
from fewsam_lib.methods.within_volume import (
    BUDGET,
    WITHIN_VOLUME,
    SparseLabels,
    TrackInputs,
    get_within_volume_variant,
    grown_box,
    labelled_slice_indices,
)


@pytest.fixture(scope="module")
def test_volume(hippocampus):
    return load_case(hippocampus, hippocampus.case_ids("test")[0])


@pytest.mark.parametrize("step", [4, 8, 16])
def test_every_kth_slice_of_the_tasks_extent_is_labelled_from_a_seeded_start(hippocampus, test_volume, step):
    axis = hippocampus.slice_axis
    counts = task_voxels_per_slice(test_volume.label, axis, hippocampus.tasks)
    holding = counts.index[(counts > 0).any(axis=1)]
    first, last = int(holding.min()), int(holding.max())
    starts = set()
    for seed in range(12):
        indices = labelled_slice_indices(test_volume.label, axis, hippocampus.tasks, step, seed, test_volume.case_id)
        assert indices == labelled_slice_indices(
            test_volume.label, axis, hippocampus.tasks, step, seed, test_volume.case_id
        )  # seeded
        assert first <= indices[0] < first + step and indices[-1] <= last < indices[-1] + step
        assert np.all(np.diff(indices) == step)
        starts.add(indices[0])
    assert len(starts) > 1  # the seed moves the first labelled slice


def test_a_step_below_one_is_refused(hippocampus, test_volume):
    with pytest.raises(FewsamError, match="at least 1"):
        labelled_slice_indices(test_volume.label, 2, hippocampus.tasks, 0, 0, test_volume.case_id)


def _inputs(label: np.ndarray, labelled: list[int], step: int, axis: int = 0) -> TrackInputs:
    support = SparseLabels(axis, step, {i: np.take(label, i, axis=axis) for i in labelled})
    return TrackInputs(None, support, {1: "a", 2: "b"}, 0, None, None, False)


class _Shape:
    def __init__(self, shape):
        self.shape = shape


def _hand_made(depth: int = 17, size: int = 24) -> np.ndarray:
    """Discs growing along axis 0 (label 1) and a square on the first slices (label 2)."""
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((depth, size, size), dtype=np.uint8)
    for index in range(depth):
        label[index][(yy - 12) ** 2 + (xx - 12) ** 2 <= (2 + index * 0.5) ** 2] = 1
    label[:5, 1:4, 1:4] = 2
    return label


def _segment(name: str, label: np.ndarray, labelled: list[int], step: int) -> np.ndarray:
    inputs = _inputs(label, labelled, step)
    inputs.volume = _Shape(label.shape)
    return get_within_volume_variant(name).segment(inputs)


def test_nearest_slice_copies_the_nearest_labelled_slice_and_the_lower_one_on_a_tie():
    label = _hand_made()
    predicted = _segment("nearest_slice", label, [2, 6, 10], step=4)
    for index, source in {1: 2, 3: 2, 4: 2, 5: 6, 8: 6, 9: 10, 11: 10, 12: 10}.items():
        assert np.array_equal(predicted[index], label[source]), index
    assert np.array_equal(predicted[0], label[2])  # within half a step before the first labelled slice
    assert not predicted[13:].any()  # more than half a step beyond the last one


def test_copying_next_to_labelled_slices_reaches_only_so_far_and_takes_the_lower_slice_on_a_tie():
    labelled = {2: np.full((3, 3), 1, np.uint8), 4: np.full((3, 3), 2, np.uint8)}
    predicted = np.full((3, 8, 3), 7, np.uint8)  # slice axis 1
    copied = within_volume.copy_near_labelled(predicted, 1, labelled, 1)
    assert [int(copied[0, i, 0]) for i in range(8)] == [7, 1, 1, 1, 2, 2, 7, 7]  # slice 3: a tie, the lower wins
    assert [int(v) for v in within_volume.copy_near_labelled(predicted, 1, labelled, 0)[0, :, 0]] == [
        7,
        7,
        1,
        7,
        2,
        7,
        7,
        7,
    ]
    only = within_volume.copy_near_labelled(predicted, 1, labelled, 1, only=[5])
    assert [int(v) for v in only[0, :, 0]] == [7, 7, 1, 7, 2, 2, 7, 7]
    assert (predicted == 7).all()  # the input is left as it was


def test_interpolation_keeps_a_labelled_slice_and_puts_a_shape_between_two():
    label = _hand_made()
    predicted = _segment("interpolation", label, [0, 8, 16], step=8)
    for index in (0, 8, 16):
        assert np.array_equal(predicted[index] == 1, label[index] == 1)
    small, large, middle = (predicted[i] == 1 for i in (0, 8, 4))
    assert small.sum() < middle.sum() < large.sum()
    assert not (small & ~middle).any() and not (middle & ~large).any()  # nested discs stay nested
    # The square ends between slices 0 and 8: copied half a step beyond its only labelled slice.
    assert (predicted[4] == 2).sum() == 9 and not (predicted[5] == 2).any()


REPEATED_INTERPOLATION = """
import numpy as np
from fewsam_lib.methods.within_volume import SparseLabels, TrackInputs, get_within_volume_variant

class Shape:
    def __init__(self, shape):
        self.shape = shape

rng = np.random.default_rng(0)
for _ in range(60):
    depth, height, width = (int(n) for n in rng.integers(9, 40, 3))
    label = np.zeros((depth, height, width), np.uint8)
    for index in range(0, depth, 4):
        for value in (1, 2):
            y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
            label[index, y : y + rng.integers(1, 8), x : x + rng.integers(1, 8)] = value
    inputs = TrackInputs(None, SparseLabels(0, 4, {i: label[i] for i in range(0, depth, 4)}), {1: "a", 2: "b"},
                         0, None, None, False)
    inputs.volume = Shape(label.shape)
    get_within_volume_variant("interpolation").segment(inputs)
print("interpolated")
"""


def test_repeated_interpolation_leaves_the_process_intact():
    # ITK's interpolator, multithreaded, corrupted the heap within a few dozen calls: the process
    # aborted (in malloc, or at exit), which took a whole test session down with it.
    done = subprocess.run([sys.executable, "-c", REPEATED_INTERPOLATION], capture_output=True, text=True)
    assert done.returncode == 0 and "interpolated" in done.stdout, done.stderr[-2000:]


def test_a_grown_box_holds_the_mask_with_a_margin_and_stays_on_the_slice():
    mask = np.zeros((20, 20), dtype=bool)
    mask[0:5, 8:18] = True
    x0, y0, x1, y1 = grown_box(mask)
    assert (x0, y0) == (7, 0) and (x1, y1) == (19, 6)


def _blind_prediction(hippocampus, variant: str, label: np.ndarray, test_volume):
    from dataclasses import replace

    profile = load_profile("smoke").for_dataset(hippocampus.path)
    run = PlannedRun("within_volume", str(hippocampus.path), "mobile_sam", variant, 0, "smoke", 4, BUDGET)
    context = RunContext(run, hippocampus, profile, progress=False)
    extent = profile.scored_slices(hippocampus, test_volume)
    return WITHIN_VOLUME.start(context).predict_case(replace(test_volume, label=label), extent)


@pytest.mark.parametrize("variant", ["nearest_slice", "interpolation", "sam_box_propagated", "fewshot_centred"])
def test_no_scored_slice_ground_truth_reaches_a_method(hippocampus, test_volume, variant, monkeypatch):
    true = _blind_prediction(hippocampus, variant, test_volume.label, test_volume)
    assert true.withheld_slices and not set(true.withheld_slices) & set(true.scored_slices)
    assert np.moveaxis(true.labels, hippocampus.slice_axis, 0)[true.scored_slices].any()
    # Which slices get labelled is the protocol's choice (from the tasks' extent), not the method's:
    # it stays fixed while every scored slice's ground truth turns to noise.
    monkeypatch.setattr(within_volume, "labelled_slice_indices", lambda *args: true.withheld_slices)
    scrambled = test_volume.label.copy()
    moved = np.moveaxis(scrambled, hippocampus.slice_axis, 0)
    rng = np.random.default_rng(0)
    for index in true.scored_slices:
        moved[index] = rng.integers(0, 3, moved[index].shape)
    changed = _blind_prediction(hippocampus, variant, scrambled, test_volume)
    assert np.array_equal(changed.labels, true.labels)


def test_smoke_runs_score_only_unlabelled_slices_and_reproduce(within_volume_smoke_runs):
    names = set()
    for folder in within_volume_smoke_runs:
        meta, metrics = load_run(folder)
        names.add((meta["dataset"], meta["variant"].split("-")[0]))
        assert meta["budget"] == BUDGET and meta["shots"] == 4
        for case_id, withheld in meta["withheld_slices"].items():
            rows = metrics[(metrics.case_id == case_id) & (metrics.level == "slice")]
            assert len(rows) and not set(rows.slice_index.astype(int)) & set(withheld)
        assert set(metrics.slice_selection) == {"unlabelled_slices"}
        # Every method finds every task from the slab's labelled slices (a collapse detector); CT's
        # spinal cord covers a few pixels, so its overlap is low even when it is found.
        per_task = metrics[metrics.level == "slice"].groupby("task")
        assert per_task.pred_voxels.sum().min() > 0 and per_task.iou.mean().min() > 0.1, folder.name
        assert per_task.iou.mean().mean() > 0.4, folder.name
        notebook = json.loads((folder / "notebook.ipynb").read_text())
        assert any(output for cell in notebook["cells"] for output in cell.get("outputs", []))
        assert_predictions_reproduce_the_metrics(folder)
    assert names == {
        ("msd_hippocampus", "nearest_slice"),
        ("msd_hippocampus", "interpolation"),
        ("msd_hippocampus", "sam_box_propagated"),
        ("msd_hippocampus", "fewshot_located_context_box"),
        ("openkbp_hn_ct", "interpolation"),
        ("spine_vb3", "interpolation"),
    }


def test_a_run_without_a_step_or_a_backbone_it_needs_is_refused():
    with pytest.raises(FewsamError, match="--step"):
        WITHIN_VOLUME.check_request(PlannedRun("within_volume", "m.yaml", "none", "nearest_slice", 0, "smoke"))
    with pytest.raises(FewsamError, match="--backbone"):
        WITHIN_VOLUME.check_request(
            PlannedRun("within_volume", "m.yaml", "none", "sam_box_propagated", 0, "smoke", 8, BUDGET)
        )
    with pytest.raises(FewsamError, match="unknown within-volume method"):
        WITHIN_VOLUME.check_request(PlannedRun("within_volume", "m.yaml", "none", "copy", 0, "smoke", 8, BUDGET))


def test_the_report_says_plainly_where_few_shot_does_not_beat_copying_or_interpolation():
    import pandas as pd

    from fewsam_lib.report.benchmark import within_volume_markdown, within_volume_verdicts

    rows = []
    cells = ((8, 0.80, 0.70, 0.75), (16, 0.60, 0.65, 0.62), (4, 0.9, 0.1, 0.1))
    for k, few, copy, interpolated in cells:
        for variant, value in (
            ("fewshot_located_context_box", few),
            ("nearest_slice", copy),
            ("interpolation", interpolated),
        ):
            rows.append(
                dict(
                    dataset="d",
                    task="t",
                    label=variant,
                    variant=variant,
                    backbone="b",
                    k=k,
                    slice_dice=value,
                    volume_dice=value,
                    n_slices=10,
                )
            )
    table = pd.DataFrame(rows)
    assert within_volume_verdicts(table) == [
        "d · t · k=8: fewshot_located_context_box (b) 0.800 beats interpolation 0.750",
        "d · t · k=16: fewshot_located_context_box (b) 0.600 does not beat nearest_slice 0.650",
    ]
    # equal as printed is a tie, not a win, whatever the fourth decimal says
    tied = table.assign(slice_dice=table.slice_dice.where(table.k != 8, [0.8212, 0.70, 0.8208] * len(cells)))
    assert within_volume_verdicts(tied)[0] == (
        "d · t · k=8: fewshot_located_context_box (b) 0.821 is level with (does not beat) interpolation 0.821"
    )
    markdown = within_volume_markdown(table)
    assert "does not beat" in markdown
    header = next(line for line in markdown.splitlines() if "k=" in line)
    assert header.index("k=4") < header.index("k=8") < header.index("k=16")  # numeric, not first-seen, order
    # a method the profile runs at fewer k shows a dash where it has no run, not "nan"
    partial = within_volume_markdown(table[~((table.variant == "nearest_slice") & (table.k == 4))])
    copy_row = next(line for line in partial.splitlines() if line.startswith("| t ") and "nearest_slice" in line)
    assert "—" in copy_row and "nan" not in partial
    assert within_volume_verdicts(table[~table.variant.str.startswith("fewshot")]) == [
        "d · t · k=8: no few-shot run to compare yet",
        "d · t · k=16: no few-shot run to compare yet",
    ]


@pytest.fixture(scope="module")
def adapted_run(hippocampus, test_volume):
    """``fewshot_adapted`` made cheap (a 1-shot collection, short schedules), prepared on the real
    training cases, and its run ready to segment the first hippocampus test volume."""
    from dataclasses import replace

    base = within_volume.get_fewshot_variant("located_augmented_head_weighted").with_schedule(steps=5)
    cheap = within_volume.FewShotAdapted(replace(base, locator=replace(base.locator, steps=60)), shots=1, head_steps=10)
    profile = load_profile("smoke").for_dataset(hippocampus.path)
    run = PlannedRun("within_volume", str(hippocampus.path), "mobile_sam", cheap.name, 0, "smoke", 4, BUDGET)
    method_run = WITHIN_VOLUME.start(RunContext(run, hippocampus, profile, progress=False))
    prepared = cheap.prepared(hippocampus, 0, method_run.cache, False)
    method_run.variant = prepared.variant
    return method_run, prepared, profile.scored_slices(hippocampus, test_volume)


def test_the_adapted_model_learns_its_collection_from_training_cases_and_keeps_its_head(
    hippocampus, test_volume, adapted_run
):
    method_run, prepared, extent = adapted_run
    collection = {entry["case_id"] for entry in prepared.record["collection"]["slices"]}
    assert collection and collection <= set(hippocampus.case_ids("train"))
    assert set(prepared.files) == {"fewshot_model.pt", "training_curve.csv"} and prepared.seconds > 0
    head = {key: value.clone() for key, value in prepared.variant.model.locator.head.state_dict().items()}
    prediction = method_run.predict_case(test_volume, extent)
    # the head is fine-tuned per volume on a copy: the collection's stays as trained
    after = prepared.variant.model.locator.head.state_dict()
    assert all(torch.equal(head[key], after[key]) for key in head)
    axis, labelled = hippocampus.slice_axis, prediction.withheld_slices
    predicted, truth = np.moveaxis(prediction.labels, axis, 0), np.moveaxis(test_volume.label, axis, 0)
    next_to_labelled = [i for i in prediction.scored_slices if min(abs(i - j) for j in labelled) == 1]
    farther = [i for i in prediction.scored_slices if min(abs(i - j) for j in labelled) > 1 and truth[i].any()]
    assert next_to_labelled and farther
    nearest = SparseLabels(axis, 4, {j: truth[j] for j in labelled}).nearest
    assert all(np.array_equal(predicted[i], truth[nearest(i)]) for i in next_to_labelled)
    # farther slices are the model's own: the anatomy found, not copied
    dice = [overlap(truth[i] > 0, predicted[i] > 0)[1] for i in farther]
    assert np.mean(dice) > 0.5, dice
    assert not all(np.array_equal(predicted[i], truth[nearest(i)]) for i in farther)


def test_no_scored_slice_ground_truth_reaches_the_adapted_model(hippocampus, test_volume, adapted_run):
    method_run, _, extent = adapted_run
    true = method_run.predict_case(test_volume, extent)
    scrambled = test_volume.label.copy()
    moved = np.moveaxis(scrambled, hippocampus.slice_axis, 0)
    rng = np.random.default_rng(0)
    for index in true.scored_slices:
        moved[index] = rng.integers(0, 3, moved[index].shape)
    from dataclasses import replace

    changed = method_run.predict_case(replace(test_volume, label=scrambled), extent)
    assert np.array_equal(changed.labels, true.labels)


def test_label_persistence_is_the_overlap_of_consecutive_labelled_masks():
    label = np.zeros((9, 6, 6), np.uint8)
    label[0, :2], label[4, :2], label[8, 1:3] = 1, 1, 1  # 12 pixels each; 0 and 4 equal, 4 and 8 half shared
    support = _inputs(label, [0, 4, 8], step=4).support
    assert within_volume.label_persistence(support, 1) == pytest.approx((2 * 12 + 2 * 6) / (4 * 12))
    assert within_volume.label_persistence(support, 2) is None  # on no labelled slice


def test_the_neighbour_prior_mixes_the_bracketing_masks_by_distance_and_copies_beyond_the_ends():
    label = np.zeros((17, 4, 4), np.uint8)
    label[4, :, :2] = 1
    label[12, :, 2:] = 1
    support = _inputs(label, [4, 12], step=8).support
    prior, distance = within_volume.neighbour_prior(support, 1, 6)  # a quarter of the way from 4 to 12
    assert distance == 2
    assert np.allclose(prior[:, :2], 0.75) and np.allclose(prior[:, 2:], 0.25)
    prior, distance = within_volume.neighbour_prior(support, 1, 15)
    assert distance == 3 and np.array_equal(prior, label[12].astype(np.float32))
    prior, distance = within_volume.neighbour_prior(support, 1, 4)
    assert distance == 0 and np.array_equal(prior, label[4].astype(np.float32))


def test_the_blend_follows_the_labelled_neighbours_or_the_model_by_their_measured_quality():
    label = np.zeros((9, 8, 8), np.uint8)
    label[:, 2:6, 2:6] = 1  # a task that never changes: its labelled masks persist perfectly
    support = _inputs(label, [0, 8], step=8).support
    span = range(1, 8)
    model_says = np.zeros((len(span), 2, 8, 8), np.float32)
    model_says[:, 0, :2, :2] = 0.9  # the model puts task 1 elsewhere, and sees no task 2
    followed = within_volume.blend_with_neighbours(model_says, span, support, [1, 2], {1: 0.2, 2: None}, 2.0)
    assert all(np.array_equal(followed[i], label[1 + i]) for i in range(len(span)))
    changing = label.copy()
    changing[8] = 0
    changing[8, 6:, 6:] = 1  # the labelled masks share nothing: persistence 0, the model decides
    support = _inputs(changing, [0, 8], step=8).support
    trusted = within_volume.blend_with_neighbours(model_says, span, support, [1, 2], {1: 0.8, 2: None}, 2.0)
    assert all(np.array_equal(trusted[i] == 1, model_says[i, 0] > 0.5) for i in range(len(span)))


def test_the_blended_model_sees_no_scored_slice_and_keeps_the_anatomy(hippocampus, test_volume, adapted_run):
    import copy
    from dataclasses import fields, replace

    method_run, prepared, extent = adapted_run
    adapted = prepared.variant
    kept = {f.name: getattr(adapted, f.name) for f in fields(adapted) if f.name != "copy_distance"}
    blended_run = copy.copy(method_run)  # the same prepared run, segmenting with the blended variant
    blended_run.variant = within_volume.FewShotNeighbourBlend(**kept)
    true = blended_run.predict_case(test_volume, extent)
    axis = hippocampus.slice_axis
    predicted, truth = np.moveaxis(true.labels, axis, 0), np.moveaxis(test_volume.label, axis, 0)
    holding = [i for i in true.scored_slices if truth[i].any()]
    assert np.mean([overlap(truth[i] > 0, predicted[i] > 0)[1] for i in holding]) > 0.5
    scrambled = test_volume.label.copy()
    moved = np.moveaxis(scrambled, axis, 0)
    rng = np.random.default_rng(0)
    for index in true.scored_slices:
        moved[index] = rng.integers(0, 3, moved[index].shape)
    assert np.array_equal(blended_run.predict_case(replace(test_volume, label=scrambled), extent).labels, true.labels)


def test_the_prior_weight_is_a_share_of_the_two_qualities_and_a_hard_choice_at_large_sharpness():
    assert within_volume.prior_weight(0.6, 0.3, 1.0) == pytest.approx(2 / 3)
    assert within_volume.prior_weight(0.6, 0.3, 2.0) == pytest.approx(0.8)
    assert within_volume.prior_weight(0.5, 0.5, 2.0) == within_volume.prior_weight(0.0, 0.0, 2.0) == 0.5
    assert within_volume.prior_weight(0.0, 0.4, 2.0) == 0.0 and within_volume.prior_weight(0.4, 0.0, 2.0) == 1.0
    assert (
        within_volume.prior_weight(0.2, 0.3, 1e4) == 0.0 and within_volume.prior_weight(0.3, 0.2, 1e4) == 1.0
    )  # no overflow
