"""The nnU-Net baseline through nnunetv2 on real hippocampus volumes: export, budgets, a smoke run."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import HIPPOCAMPUS_MANIFEST, assert_predictions_reproduce_the_metrics

from fewsam_lib.bench.evaluate import evaluate
from fewsam_lib.bench.runs import IncompleteRun, load_run
from fewsam_lib.data.collection import draw_collection
from fewsam_lib.data.volumes import load_case, slice_table
from fewsam_lib.errors import FewsamError
from fewsam_lib.methods.base import PlannedRun
from fewsam_lib.methods.nnunet import (
    export_raw_dataset,
    full_budget,
    labelled_slice_counts,
    matched_budget,
    nnunet_log_curve,
    same_slices_budget,
)
from fewsam_lib.report.benchmark import method_label, schedule_searches


def run_nnunet(
    manifest,
    configuration: str = "2d",
    trainer: str = "nnUNetTrainer_fewsamSmoke",
    budget: str = "full",
    profile: str = "smoke",
    results_dir=None,
    device: str = "cpu",
):
    """One nnU-Net run through the shared loop, as `fewsam run nnunet --no-notebook` makes it."""
    run = PlannedRun("nnunet", str(manifest), "none", f"{configuration}-{trainer}", 0, profile, budget=budget)
    return evaluate(run, results_dir=results_dir, device=device, progress=False)


@pytest.fixture(scope="module")
def train_table(hippocampus):
    return slice_table(hippocampus, hippocampus.case_ids("train"))


def test_matched_budget_is_seeded_nested_and_never_uses_test_cases(hippocampus, train_table):
    budget = matched_budget(hippocampus, 40, seed=0, table=train_table)
    assert budget == matched_budget(hippocampus, 40, seed=0, table=train_table)
    assert budget.case_ids != matched_budget(hippocampus, 40, seed=1, table=train_table).case_ids
    assert set(budget.case_ids) <= set(hippocampus.case_ids("train"))
    counts = labelled_slice_counts(hippocampus, list(budget.case_ids), train_table)
    assert budget.labelled_slices == counts.sum() >= 40
    # Volumes are added in one seeded order until the budget is met: smaller budgets take a prefix.
    assert len(matched_budget(hippocampus, 1, seed=0, table=train_table).case_ids) == 1
    smaller = matched_budget(hippocampus, budget.labelled_slices - int(counts.max()), seed=0, table=train_table)
    assert set(smaller.case_ids) < set(budget.case_ids)
    full = full_budget(hippocampus, train_table)
    assert len(full.case_ids) == 208 and full.labelled_slices > 10 * budget.labelled_slices
    with pytest.raises(FewsamError, match="fewer than the budget"):
        matched_budget(hippocampus, full.labelled_slices + 1, seed=0, table=train_table)


def test_export_gives_a_dataset_that_nnunet_accepts(hippocampus, train_table, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    budget = matched_budget(hippocampus, 30, seed=0, table=train_table)
    folder = export_raw_dataset(hippocampus, budget, 501, raw_root=tmp_path)
    assert folder.name == "Dataset501_MsdHippocampusSlices30seed0"
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "anterior": 1, "posterior": 2}
    assert dataset["channel_names"] == {"0": "MRI"} and dataset["numTraining"] == len(budget.case_ids)
    assert dataset["fewsam_case_ids"] == list(budget.case_ids)
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in budget.case_ids]
    verify_dataset_integrity(str(folder), num_processes=1)  # nnunetv2's own check raises on any problem
    assert not list(tmp_path.glob(".*partial"))


def test_a_same_slices_export_labels_exactly_the_collections_slices_and_ignores_the_rest(
    hippocampus, train_table, tmp_path
):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    collection = draw_collection(hippocampus, 5, 0, train_table)
    budget = same_slices_budget(hippocampus, 5, seed=0, table=train_table)
    assert budget.name == f"sameslices{len(collection.slices)}seed0"
    assert budget.labelled_slices == len(collection.slices)
    assert set(budget.case_ids) == {support.case_id for support in collection.slices}
    folder = export_raw_dataset(hippocampus, budget, 504, raw_root=tmp_path)
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "anterior": 1, "posterior": 2, "ignore": 3}
    verify_dataset_integrity(str(folder), num_processes=1)
    axis = hippocampus.slice_axis
    for case_id in budget.case_ids:
        volume = load_case(hippocampus, case_id)
        exported = volume.read_on_canonical_grid(folder / "labelsTr" / f"{case_id}.nii.gz")
        kept = sorted(support.slice_index for support in collection.slices if support.case_id == case_id)
        assert (np.take(exported, kept, axis) == np.take(volume.label, kept, axis)).all()
        assert (np.delete(exported, kept, axis) == 3).all()


def test_export_refuses_test_cases_taken_ids_and_gapped_labels(hippocampus, train_table, tmp_path):
    budget = matched_budget(hippocampus, 5, seed=0, table=train_table)
    leaking = dataclasses.replace(budget, case_ids=(*budget.case_ids, hippocampus.case_ids("test")[0]))
    with pytest.raises(FewsamError, match="not in the training split"):
        export_raw_dataset(hippocampus, leaking, 502, raw_root=tmp_path)
    (tmp_path / "Dataset502_Other").mkdir()
    with pytest.raises(FewsamError, match="id 502 is taken"):
        export_raw_dataset(hippocampus, budget, 502, raw_root=tmp_path)
    gapped = dataclasses.replace(hippocampus, tasks={1: "anterior", 3: "posterior"})
    with pytest.raises(FewsamError, match="consecutive label values"):
        export_raw_dataset(gapped, budget, 503, raw_root=tmp_path)


def test_nnunet_smoke_run_is_a_complete_run_scored_by_our_metrics(nnunet_smoke_run, hippocampus):
    meta, metrics = load_run(nnunet_smoke_run)
    budget = meta["label_budget"]
    assert meta["method"] == "nnunet" and meta["variant"] == "2d-nnUNetTrainer_fewsamSmoke"
    assert meta["shots"] == budget["labelled_slices"] >= budget["requested_slices"]
    assert not set(budget["case_ids"]) & set(hippocampus.case_ids("test"))
    assert meta["nnunet_training"]["num_epochs"] in (1, "1")
    assert set(meta["timings_s"]) >= {"plan_and_preprocess", "train", "predict"}
    assert "Epoch 0" in (nnunet_smoke_run / "nnunet_training_log.txt").read_text()
    assert "--disable_tta" in (nnunet_smoke_run / "nnunet_commands.log").read_text()  # the smoke profile's choice
    notebook = json.loads((nnunet_smoke_run / "notebook.ipynb").read_text())
    assert any("parameters" in cell["metadata"].get("tags", []) for cell in notebook["cells"])
    assert_predictions_reproduce_the_metrics(nnunet_smoke_run)


def test_a_rerun_after_training_predicts_again_and_takes_the_training_time_from_nnunets_log(nnunet_smoke_run, tmp_path):
    first, _ = load_run(nnunet_smoke_run)
    assert len(first["nnunet_training"]["epoch_seconds"]) == int(first["nnunet_training"]["num_epochs"]) == 1
    folder = run_nnunet(
        HIPPOCAMPUS_MANIFEST,
        trainer="nnUNetTrainer_fewsamSmoke",
        budget="matched",
        profile="smoke",
        results_dir=tmp_path,
    )
    again, metrics = load_run(folder)
    assert "plan_and_preprocess" not in again["timings_s"]  # nothing of nnU-Net's work was redone
    assert again["timings_s"]["train"] == pytest.approx(sum(first["nnunet_training"]["epoch_seconds"]))
    assert again["nnunet_dataset"] == first["nnunet_dataset"] and set(metrics.level) == {"slice", "volume"}


def test_a_preprocessing_cut_short_is_redone_not_trusted(nnunet_smoke_run, nnunet_roots, tmp_path):
    preprocessed = nnunet_roots / "preprocessed" / load_run(nnunet_smoke_run)[0]["nnunet_dataset"]
    marker = preprocessed / ".fewsam_preprocessed_2d"
    assert marker.exists()
    # What a call killed inside nnUNetv2_plan_and_preprocess leaves: the folder, a case missing, no marker.
    marker.unlink()
    missing = sorted((preprocessed / "nnUNetPlans_2d").iterdir())[0]
    missing.unlink()
    folder = run_nnunet(
        HIPPOCAMPUS_MANIFEST,
        trainer="nnUNetTrainer_fewsamSmoke",
        budget="matched",
        profile="smoke",
        results_dir=tmp_path,
    )
    assert "plan_and_preprocess" in load_run(folder)[0]["timings_s"]
    assert missing.exists() and marker.exists()


def test_a_failed_nnunet_training_is_a_clear_error_and_leaves_the_run_incomplete(nnunet_smoke_run, tmp_path):
    with pytest.raises(FewsamError, match="nnUNetv2_train failed with exit code") as error:
        run_nnunet(
            str(HIPPOCAMPUS_MANIFEST),
            trainer="nnUNetTrainer_fewsam5epochs",
            budget="matched",
            profile="smoke",
            results_dir=tmp_path,
            device="tpu",
        )
    assert "-device must be either cpu, mps or cuda" in str(error.value)  # the end of nnU-Net's own output
    folder = next((tmp_path / "runs").glob("*/nnunet/*"))
    with pytest.raises(IncompleteRun):
        load_run(folder)


def test_nnunet_trains_and_predicts_on_the_same_slices_as_few_shot(nnunet_roots, hippocampus, tmp_path):
    folder = run_nnunet(str(HIPPOCAMPUS_MANIFEST), budget="same_slices", results_dir=tmp_path)
    meta, metrics = load_run(folder)
    collection = draw_collection(hippocampus, 5, 0)  # the smoke profile's few-shot collection
    budget = meta["label_budget"]
    assert meta["shots"] == budget["labelled_slices"] == len(collection.slices)
    # A matched budget may hold as many labelled slices: the folder names the budget.
    assert folder.name == f"none_2d-nnUNetTrainer_fewsamSmoke_sameslices{meta['shots']}_seed0_smoke"
    labelled = {
        case: sorted(s.slice_index for s in collection.slices if s.case_id == case) for case in budget["case_ids"]
    }
    assert budget["labelled"] == labelled
    assert method_label("nnunet", meta["variant"], meta["shots"], budget["name"]).startswith("nnU-Net same slices (")
    assert "Epoch 0" in (folder / "nnunet_training_log.txt").read_text()
    assert set(metrics.level) == {"slice", "volume"}
    assert_predictions_reproduce_the_metrics(folder)


def test_3d_fullres_is_selectable_and_runs_plan_train_predict_on_real_volumes(nnunet_smoke_run, hippocampus, tmp_path):
    folder = run_nnunet(
        str(HIPPOCAMPUS_MANIFEST),
        configuration="3d_fullres",
        trainer="nnUNetTrainer_fewsamSmoke",
        budget="matched",
        profile="smoke",
        results_dir=tmp_path,
    )
    meta, metrics = load_run(folder)
    assert meta["variant"] == "3d_fullres-nnUNetTrainer_fewsamSmoke"
    assert len(meta["nnunet_training"]["patch_size"]) == 3  # nnU-Net planned and trained a 3D network
    assert meta["nnunet_dataset"] == load_run(nnunet_smoke_run)[0]["nnunet_dataset"]  # same export, new plan
    assert set(metrics.level) == {"slice", "volume"}
    assert_predictions_reproduce_the_metrics(folder)


def test_every_profiles_trainer_is_found_and_an_unknown_one_is_refused_before_any_work(nnunet_roots, tmp_path):
    from fewsam_lib.bench.profiles import available_profiles, load_profile
    from fewsam_lib.methods.nnunet import check_trainer, nnunet_environment
    from fewsam_lib.paths import nnunet_roots as roots

    env = nnunet_environment(roots())
    profile_trainers = {
        run.variant.split("-", 1)[1]
        for profile in available_profiles()
        for run in load_profile(profile).runs()
        if run.method == "nnunet"
    }
    assert "nnUNetTrainer_fewsam5epochsBatch13" in profile_trainers  # cpu, CT full budget
    for trainer in profile_trainers:
        check_trainer(trainer, env)
    check_trainer("nnUNetTrainer_5epochs", env)  # one of nnunetv2's own
    exported = sorted((nnunet_roots / "raw").glob("*"))
    with pytest.raises(FewsamError, match="unknown nnU-Net trainer 'nnUNetTrainer_noSuchSchedule'"):
        run_nnunet(
            HIPPOCAMPUS_MANIFEST,
            trainer="nnUNetTrainer_noSuchSchedule",
            budget="matched",
            profile="smoke",
            results_dir=tmp_path / "results",
        )
    assert not (tmp_path / "results").exists() and sorted((nnunet_roots / "raw").glob("*")) == exported


def test_the_cpu_trainers_run_five_epochs_with_a_checkpoint_after_each_and_cap_the_planned_batch(smoke_plans):
    from fewsam_lib.methods.nnunet_trainers.fewsam_trainers import (
        nnUNetTrainer_fewsam5epochs,
        nnUNetTrainer_fewsam5epochsBatch13,
        nnUNetTrainer_fewsam5epochsBatch32,
    )

    plans, dataset_json = smoke_plans
    planned = plans["configurations"]["2d"]["batch_size"]
    assert planned < 13  # two hippocampus volumes
    for trainer_class in (
        nnUNetTrainer_fewsam5epochs,
        nnUNetTrainer_fewsam5epochsBatch32,
        nnUNetTrainer_fewsam5epochsBatch13,
    ):
        trainer = build_trainer(trainer_class, plans, dataset_json)
        assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.save_every) == (5, 250, 1)
        assert trainer.batch_size == planned  # a small plan is left as it is

    plans["configurations"]["2d"]["batch_size"] = 292  # nnU-Net's plan for all 208 training volumes
    assert build_trainer(nnUNetTrainer_fewsam5epochs, plans, dataset_json).batch_size == 292
    assert build_trainer(nnUNetTrainer_fewsam5epochsBatch32, plans, dataset_json).batch_size == 32
    assert build_trainer(nnUNetTrainer_fewsam5epochsBatch13, plans, dataset_json).batch_size == 13


def test_the_no_mirroring_trainer_keeps_the_five_epoch_schedule_and_mirrors_neither_in_training_nor_at_test(
    smoke_plans,
):
    from fewsam_lib.methods.nnunet_trainers.fewsam_trainers import (
        nnUNetTrainer_fewsam5epochs,
        nnUNetTrainer_fewsam5epochsBatch13NoMirroring,
        nnUNetTrainer_fewsam5epochsNoMirroring,
    )

    plans, dataset_json = smoke_plans
    mirrored = build_trainer(nnUNetTrainer_fewsam5epochs, plans, dataset_json)
    assert mirrored.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] == (0, 1)
    assert mirrored.inference_allowed_mirroring_axes == (0, 1)
    trainer = build_trainer(nnUNetTrainer_fewsam5epochsNoMirroring, plans, dataset_json)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.save_every) == (5, 250, 1)
    assert trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] is None
    assert trainer.inference_allowed_mirroring_axes is None  # saved in the checkpoint: no mirroring at test
    spine = build_trainer(nnUNetTrainer_fewsam5epochsBatch13NoMirroring, plans, dataset_json)
    assert (spine.num_epochs, spine.save_every, spine.inference_allowed_mirroring_axes) == (5, 1, None)
    assert spine.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] is None


def test_a_checkpoint_write_cut_short_leaves_the_last_checkpoint_in_place(smoke_plans, tmp_path, monkeypatch):
    import torch

    from fewsam_lib.methods.nnunet_trainers.fewsam_trainers import nnUNetTrainer_fewsam5epochs

    plans, dataset_json = smoke_plans
    trainer = build_trainer(nnUNetTrainer_fewsam5epochs, plans, dataset_json)
    trainer.initialize()
    checkpoint = tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(checkpoint))
    written = checkpoint.read_bytes()
    assert torch.load(checkpoint, weights_only=False)["trainer_name"] == "nnUNetTrainer_fewsam5epochs"

    def dies_while_writing(obj, target, *args, **kwargs):
        Path(target).write_bytes(written[:100])
        raise OSError("killed while writing")

    monkeypatch.setattr(torch, "save", dies_while_writing)
    with pytest.raises(OSError, match="killed while writing"):
        trainer.save_checkpoint(str(checkpoint))
    assert checkpoint.read_bytes() == written


@pytest.fixture
def smoke_plans(nnunet_smoke_run, nnunet_roots) -> tuple[dict, dict]:
    """The smoke run's nnU-Net plans and dataset.json, read afresh for each test (tests edit them)."""
    folder = nnunet_roots / "preprocessed" / load_run(nnunet_smoke_run)[0]["nnunet_dataset"]
    return json.loads((folder / "nnUNetPlans.json").read_text()), json.loads((folder / "dataset.json").read_text())


def build_trainer(trainer_class, plans: dict, dataset_json: dict):
    """A trainer as nnUNetv2_train builds it, with the batch set as initialize() sets it."""
    import torch

    # nnUNetv2_train adds continue_training to the plans; the trainer pops it
    trainer = trainer_class({**plans, "continue_training": False}, "2d", 0, dataset_json, torch.device("cpu"))
    trainer._set_batch_size_and_oversample()
    return trainer


def test_the_bf16_trainer_runs_its_forward_passes_in_bf16_and_keeps_fp32_weights_and_outputs(smoke_plans):
    import torch

    from fewsam_lib.methods.nnunet_trainers.fewsam_trainers import nnUNetTrainer_fewsam5epochsBatch32Bf16

    plans, dataset_json = smoke_plans
    trainer = build_trainer(nnUNetTrainer_fewsam5epochsBatch32Bf16, plans, dataset_json)
    assert (trainer.num_epochs, trainer.save_every) == (5, 1)  # the fp32 trainer's schedule
    trainer.initialize()
    convolution = next(m for m in trainer.network.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    convolution.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    patch = plans["configurations"]["2d"]["patch_size"]
    outputs = trainer.network(torch.randn(2, 1, *patch))
    assert seen == [torch.bfloat16]
    assert all(output.dtype == torch.float32 for output in outputs)  # nnU-Net's losses see fp32
    assert all(
        value.dtype == torch.float32 for value in trainer.network.state_dict().values() if value.is_floating_point()
    )


def _schedule_profile(tmp_path, evaluate_on: str = "validation") -> Path:
    """The ``schedule`` profile made smoke-sized: the bf16 smoke trainer on a matched budget."""
    import yaml

    raw = {
        "name": f"smoke-schedule-{evaluate_on}",
        "description": "nnU-Net validating on carved validation cases, smoke-sized",
        "evaluate_on": evaluate_on,
        "validation": {"fraction": 0.2, "seed": 0},
        "test_cases": 1,
        "test_slices": 12,
        "datasets": [str(HIPPOCAMPUS_MANIFEST)],
        "fewshot": {"backbones": ["mobile_sam"], "variants": ["centred"], "shots": [5], "seeds": [0]},
        "nnunet": {
            "configurations": ["2d"],
            "trainers": ["nnUNetTrainer_fewsamSmokeBf16"],
            "budgets": ["matched"],
            "disable_tta": True,
            "validation_curve": True,
        },
    }
    if evaluate_on == "test":
        raw.pop("validation")
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_bf16_trainer_validates_on_carved_cases_records_its_curve_and_its_checkpoint_predicts(
    nnunet_roots, hippocampus, tmp_path
):
    """The schedule search's mechanics: fold 0 of a split whose validation part is the carved
    validation cases (never a test case), the EMA pseudo-Dice curve in the run folder, bf16 forward
    passes, and a checkpoint that predicts."""
    profile = _schedule_profile(tmp_path)
    folder = run_nnunet(
        str(HIPPOCAMPUS_MANIFEST),
        trainer="nnUNetTrainer_fewsamSmokeBf16",
        budget="matched",
        profile=str(profile),
        results_dir=tmp_path / "results",
    )
    meta, metrics = load_run(folder)
    assert "forward passes under bf16 autocast" in (folder / "nnunet_training_log.txt").read_text()
    assert meta["parameters"]["fold"] == "0"
    assert re.fullmatch(r"Dataset\d{3}_MsdHippocampusValidationSlices\d+seed0Curve", meta["nnunet_dataset"])
    validation = hippocampus.validation_view(0.2, 0).case_ids("test")
    exported = json.loads((nnunet_roots / "raw" / meta["nnunet_dataset"] / "dataset.json").read_text())
    assert exported["fewsam_validation_case_ids"] == list(validation)
    split = json.loads((nnunet_roots / "preprocessed" / meta["nnunet_dataset"] / "splits_final.json").read_text())
    assert split == [{"train": meta["label_budget"]["case_ids"], "val": list(validation)}]
    assert not set(validation) & set(hippocampus.case_ids("test")) and not set(validation) & set(split[0]["train"])
    curve = nnunet_log_curve(folder)  # nnU-Net's pseudo-Dice, here on the validation cases
    assert list(curve.epoch) == [0] and 0 <= curve.ema_pseudo_dice[0] <= 1 and curve.train_loss.notna().all()
    assert meta["nnunet_training"]["plateau_epoch"] is None  # one epoch cannot show a plateau
    assert set(metrics.level) == {"slice", "volume"} and meta["status"] == "complete"
    assert_predictions_reproduce_the_metrics(folder)
    with pytest.raises(FewsamError, match="validation_curve needs evaluate_on: validation"):
        run_nnunet(str(HIPPOCAMPUS_MANIFEST), budget="matched", profile=str(_schedule_profile(tmp_path, "test")))


def test_the_plateau_is_the_fewest_epochs_after_which_the_last_fifth_gained_under_a_hundredth():
    from fewsam_lib.methods.nnunet import plateau_epoch

    rising = [min(0.05 * epoch, 0.8) for epoch in range(40)]  # +0.05 an epoch until 0.8 after 17 epochs
    # after 22 epochs the last 5 (ceil of 20%) gained nothing; after 21 they reach back to 16 epochs' 0.75
    assert plateau_epoch(rising) == 22
    assert plateau_epoch([0.1 * epoch for epoch in range(30)]) is None  # still rising
    assert plateau_epoch([0.5] * 9) is None  # too few epochs to judge
    assert plateau_epoch([0.5] * 10) == 10


def test_a_resumed_training_s_logs_make_one_curve_in_time_order(tmp_path):
    """nnU-Net continues an interrupted training (--c) in a new log named by an unpadded date: the run
    folder gets every log, oldest first, and an epoch begun again counts once, as finished."""
    import os

    from fewsam_lib.methods.nnunet import copy_training_record

    def epoch(number: int, dice: tuple[float, float] | None, seconds: float | None) -> str:
        lines = [f"2026-12-05 09:00:00.000000: Epoch {number} ", "2026-12-05 09:00:01.000000: train_loss -0.5 "]
        if dice is not None:
            lines.append(f"2026-12-05 09:00:02.000000: Pseudo dice [np.float32({dice[0]}), np.float32({dice[1]})] ")
        if seconds is not None:
            lines.append(f"2026-12-05 09:00:03.000000: Epoch time: {seconds} s ")
        return "\n".join(lines) + "\n"

    fold, run = tmp_path / "fold_0", tmp_path / "run"
    fold.mkdir(), run.mkdir()
    older, newer = fold / "training_log_2026_12_5_09_00_00.txt", fold / "training_log_2026_12_15_01_00_00.txt"
    older.write_text(epoch(0, (0.6, 0.8), 10.0) + epoch(1, None, None))  # epoch 1 cut short
    newer.write_text(epoch(1, (0.7, 0.9), 11.0) + epoch(2, (0.8, 1.0), 12.0))
    os.utime(older, (1_000, 1_000))
    os.utime(newer, (2_000, 2_000))
    record = copy_training_record(fold, run)
    curve = nnunet_log_curve(run)
    assert list(curve.epoch) == [0, 1, 2] and np.allclose(curve.pseudo_dice, [0.7, 0.8, 0.9])
    assert np.allclose(curve.ema_pseudo_dice, [0.7, 0.71, 0.729])
    assert record["epoch_seconds"] == [10.0, 11.0, 12.0]


def test_the_search_trainer_ends_nnunets_training_once_its_curve_has_plateaued(monkeypatch, tmp_path):
    """After each epoch the search trainer applies the plateau rule to nnU-Net's own moving average;
    once it holds, training ends through nnU-Net's own end of training (its final checkpoint)."""
    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from fewsam_lib.methods.nnunet_trainers import fewsam_trainers as trainers

    search = trainers.nnUNetTrainer_fewsamPlateauSearchBf16
    ended = []
    monkeypatch.setattr(nnUNetTrainer, "on_epoch_end", lambda self: None)
    monkeypatch.setattr(nnUNetTrainer, "on_train_end", lambda self: ended.append(True))
    trainer = object.__new__(search)
    trainer.print_to_log_file = lambda *args: None
    trainer.logger = MetaLogger(str(tmp_path), False)  # nnU-Net's own, as the trainer gets it
    for epoch in range(10):
        trainer.logger.log("ema_fg_dice", 0.1 * epoch, epoch)
    trainer.on_epoch_end()  # still rising: nothing happens
    for epoch in range(10, 14):
        trainer.logger.log("ema_fg_dice", 0.9, epoch)
    with pytest.raises(trainers._SearchEnded):  # 14 epochs: the last 3 gained nothing
        trainer.on_epoch_end()

    def epochs_until_plateau(self):
        self.on_epoch_end()

    monkeypatch.setattr(nnUNetTrainer, "run_training", epochs_until_plateau)
    trainer.run_training()
    assert ended == [True]


@pytest.mark.parametrize(
    "name, hours, mirroring",
    [
        ("nnUNetTrainer_fewsamPlateauSearchBatch13", 2.5, True),
        ("nnUNetTrainer_fewsamPlateauSearchBatch13NoMirroring", 2.5, False),
    ],
)
def test_the_fp32_search_trainers_also_end_before_an_epoch_would_pass_their_time_limit(
    monkeypatch, tmp_path, name, hours, mirroring
):
    """Without a plateau, the CT search ends once one more epoch of the mean length so far would take
    the summed epoch times (nnU-Net's own timestamps, which survive a resume) past 2.5 hours; so
    does the search of the X-rays and the spine, without mirroring."""
    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
        nnUNetTrainerNoMirroring,
    )

    from fewsam_lib.methods.nnunet_trainers import fewsam_trainers as trainers

    search = getattr(trainers, name)
    assert (
        search.training_hours == hours and search.max_batch_size == 13 and not issubclass(search, trainers._Bf16OnCpu)
    )
    assert issubclass(search, nnUNetTrainerNoMirroring) is not mirroring
    minutes = hours * 60 / 15  # 15 epochs of these fill the limit exactly
    monkeypatch.setattr(nnUNetTrainer, "on_epoch_end", lambda self: None)
    trainer = object.__new__(search)
    trainer.print_to_log_file = lambda *args: None
    trainer.logger = MetaLogger(str(tmp_path), False)

    def epoch(index: int, minutes: float) -> None:
        start = 1_000_000.0 + index * 3600
        trainer.logger.log("epoch_start_timestamps", start, index)
        trainer.logger.log("epoch_end_timestamps", start + minutes * 60, index)
        trainer.logger.log("ema_fg_dice", 0.05 * index, index)  # still rising: never a plateau

    for index in range(14):
        epoch(index, minutes)
    trainer.on_epoch_end()  # one more epoch of the mean length ends exactly at the limit
    epoch(14, minutes * 1.05)
    with pytest.raises(trainers._SearchEnded):  # now one more would pass it
        trainer.on_epoch_end()


def test_the_committed_xray_search_found_no_plateau_and_the_report_says_so():
    """The X-ray search validated on whole carved patients and ended at its time limit; its own log's
    curve never meets the plateau rule, and the schedule table's words come from that record."""
    from fewsam_lib.data.manifest import load_manifest
    from fewsam_lib.methods.nnunet import plateau_epoch

    folder = next(Path("results/runs/chest_xray/nnunet").glob("*PlateauSearchBatch13NoMirroring_*_schedule"))
    meta, _ = load_run(folder)
    training = meta["nnunet_training"]
    assert meta["parameters"]["fold"] == "0" and meta["data"]["evaluated_split"] == "validation"
    assert training["plateau_epoch"] is None is plateau_epoch(nnunet_log_curve(folder).ema_pseudo_dice.tolist())
    epochs = len(training["epoch_seconds"])
    assert sum(training["epoch_seconds"]) <= 2.5 * 3600 < sum(training["epoch_seconds"]) * (epochs + 1) / epochs
    assert schedule_searches("results")["chest_xray"] == f"no plateau in {epochs} epochs (2.5 h)"
    manifest = load_manifest(meta["parameters"]["manifest"])
    trained = {manifest.case(case).patient for case in manifest.validation_view(0.2, 0).case_ids("train")}
    assert not trained & {manifest.case(case).patient for case in meta["parameters"]["test_cases"]}


def test_the_hippocampus_cpu_schedule_is_where_the_committed_search_plateaued():
    """The chosen trainer's epochs are the plateau the committed schedule search recorded, and that
    plateau follows from the curve in its own log."""
    from fewsam_lib.methods.nnunet import plateau_epoch
    from fewsam_lib.methods.nnunet_trainers import fewsam_trainers as trainers

    runs = Path("results/runs/msd_hippocampus/nnunet")
    folder = next(runs.glob("*_2d-nnUNetTrainer_fewsamPlateauSearchBf16_*_schedule"))
    meta, _ = load_run(folder)
    assert meta["parameters"]["fold"] == "0" and meta["data"]["evaluated_split"] == "validation"
    plateau = meta["nnunet_training"]["plateau_epoch"]
    assert plateau == plateau_epoch(nnunet_log_curve(folder).ema_pseudo_dice.tolist()) == 30
    chosen = trainers.nnUNetTrainer_fewsamCpuPlateau30
    assert chosen.schedule == {"num_epochs": plateau, "save_every": 1} and chosen.max_batch_size == 32
    assert chosen.only_where_native
    assert schedule_searches("results")["msd_hippocampus"] == "plateau after 30 epochs"  # the report's words


@pytest.mark.parametrize("native", [True, False])
def test_the_cpu_schedule_runs_bf16_only_where_the_cpu_computes_it(native, smoke_plans, monkeypatch):
    """Emulated bf16 is many times slower than fp32: the cpu trainer falls back to fp32 there, and
    its log says which precision ran (the report's schedule table reads it)."""
    import torch

    from fewsam_lib import hardware
    from fewsam_lib.methods.nnunet import BF16_LOG_LINE
    from fewsam_lib.methods.nnunet_trainers.fewsam_trainers import nnUNetTrainer_fewsamCpuPlateau30

    monkeypatch.setattr(hardware, "native_bf16", lambda: native)
    plans, dataset_json = smoke_plans
    trainer = build_trainer(nnUNetTrainer_fewsamCpuPlateau30, plans, dataset_json)
    logged = []
    trainer.print_to_log_file = lambda *args, **kwargs: logged.append(" ".join(map(str, args)))
    trainer.initialize()
    convolution = next(m for m in trainer.network.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    convolution.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    trainer.network(torch.randn(2, 1, *plans["configurations"]["2d"]["patch_size"]))
    assert seen == [torch.bfloat16 if native else torch.float32]
    assert any(BF16_LOG_LINE in line for line in logged) == native
