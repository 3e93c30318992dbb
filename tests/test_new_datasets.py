"""The smoke runs on the chest X-rays (2D images) and the lumbar spine MRI, through the notebooks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_predictions_reproduce_the_metrics

from fewsam_lib.bench.profiles import load_profile
from fewsam_lib.bench.runs import load_run
from fewsam_lib.errors import FewsamError
from fewsam_lib.methods.base import PlannedRun, RunContext
from fewsam_lib.methods.within_volume import WITHIN_VOLUME


def test_every_method_runs_on_both_new_datasets_and_its_predictions_reproduce(new_dataset_smoke_runs):
    for (xray, spine), method in zip(zip(*new_dataset_smoke_runs), ("sam_prompting", "fewshot", "nnunet")):
        for folder, dataset, tasks in (
            (xray, "chest_xray", {"LeftLung", "RightLung", "Cardiomediastinum", "Airways"}),
            (spine, "spine_vb3", {"L1", "L2", "L3", "L4", "L5"}),
        ):
            meta, metrics = load_run(folder)
            assert (meta["method"], meta["dataset"], meta["status"]) == (method, dataset, "complete")
            assert set(metrics.task) == tasks
            assert_predictions_reproduce_the_metrics(folder)


def test_a_chest_xray_is_scored_as_one_image(new_dataset_smoke_runs):
    sam = new_dataset_smoke_runs[0][0]
    meta, metrics = load_run(sam)
    slices, volumes = metrics[metrics.level == "slice"], metrics[metrics.level == "volume"]
    assert set(slices.slice_index) == {0} and len(slices) == len(volumes) == 4
    # The image is its own volume: the same overlap and the same in-plane surface distances.
    for column in ("iou", "dice", "assd_mm", "hd95_mm"):
        assert np.allclose(slices[column].to_numpy(), volumes[column].to_numpy(), equal_nan=True), column
    # A box around each lung is enough for SAM to find most of it.
    lungs = slices[slices.task.isin(["LeftLung", "RightLung"])]
    assert (lungs.iou > 0.6).all(), lungs[["task", "iou"]]


def test_nnunet_on_the_chest_xrays_plans_for_the_profiles_target_spacing(new_dataset_smoke_runs):
    meta, _ = load_run(new_dataset_smoke_runs[0][2])
    assert meta["parameters"]["target_spacing"] == [999, 4, 4]
    commands = (new_dataset_smoke_runs[0][2] / "nnunet_commands.log").read_text()
    assert "-overwrite_target_spacing 999 4 4" in commands and "-p nnUNetPlans_spacing999x4x4" in commands
    planned = meta["nnunet_training"]
    assert planned["spacing"] == [4.0, 4.0] and max(planned["patch_size"]) <= 320


def test_the_within_volume_track_refuses_a_dataset_of_2d_images(chest_xray):
    profile = load_profile("smoke").for_dataset(chest_xray.path)
    run = PlannedRun("within_volume", str(chest_xray.path), "none", "nearest_slice", 0, "smoke", 4, "every_kth")
    with pytest.raises(FewsamError, match="2D images has one slice per case"):
        WITHIN_VOLUME.start(RunContext(run, chest_xray, profile, progress=False))


def test_fewsam_segment_labels_a_users_radiograph_from_one_labelled_one(chest_xray, tmp_path):
    import nibabel as nib

    from fewsam_lib.cli import main

    support, query = chest_xray.case("ARDSSevere"), chest_xray.case("2966893D-5DDF-4B68-9E2B-4979D5956C8E")
    labels = ",".join(f"{value}={name}" for value, name in chest_xray.tasks.items())
    out = tmp_path / "segmented.nii.gz"
    arguments = ["segment", "--support", str(support.image), "--support-labels", str(support.label)]
    arguments += ["--query", str(query.image), "--out", str(out), "--labels", labels]
    # A short schedule: the default variant trains its decoder 200 steps and its location head 600.
    assert main([*arguments, "--steps", "20", "--head-steps", "150"]) == 0
    predicted = np.asarray(nib.load(str(out)).dataobj)
    truth = np.asarray(nib.load(str(query.label)).dataobj)
    assert predicted.shape == truth.shape and predicted.ndim == 2  # a 2D image in, a 2D label map out
    for value in (1, 2):  # both lungs, from one labelled radiograph of another patient
        dice = (
            2 * ((predicted == value) & (truth == value)).sum() / ((predicted == value).sum() + (truth == value).sum())
        )
        assert dice > 0.7, (value, dice)
