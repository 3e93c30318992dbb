"""``fewsam reproduce``: the smoke profile's whole matrix, resumable, with the summary and figures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import results_dir_of

from fewsam_lib.bench.profiles import _profile_from, load_profile
from fewsam_lib.bench.reproduce import reproduce, write_makefile
from fewsam_lib.bench.runs import IncompleteRun, summarize, verify_run
from fewsam_lib.cli import main
from fewsam_lib.data.volumes import grey_slices, load_case, take_slice
from fewsam_lib.errors import FewsamError
from fewsam_lib.report.benchmark import (
    REPORT_TABLES,
    _compared,
    headline_sentences,
    label_efficiency_figure,
    main_table,
    nnunet_schedule_table,
    readable_log_ticks,
    replace_block,
    representative_slices,
    run_index,
    write_report,
    zoom_window,
)
from fewsam_lib.report.figures import nnunet_log_curve


def test_reproduce_skips_complete_runs_and_writes_overview_summary_and_figures(
    prompting_smoke_run,
    fewshot_smoke_run,
    nnunet_smoke_run,
    ct_smoke_runs,
    new_dataset_smoke_runs,
    within_volume_smoke_runs,
    tmp_path,
):
    results = tmp_path / "results"
    per_dataset = [[prompting_smoke_run, fewshot_smoke_run, nnunet_smoke_run], ct_smoke_runs, *new_dataset_smoke_runs]
    folders = []
    in_matrix_order = [runs[method] for method in range(3) for runs in per_dataset] + within_volume_smoke_runs
    for run_folder in in_matrix_order:
        target = results / run_folder.relative_to(results_dir_of(run_folder))
        shutil.copytree(run_folder, target)
        folders.append(target)
    assert [(run.method, run.manifest) for run in load_profile("smoke").runs()] == [
        (method, f"data_manifests/{dataset}.yaml")
        for method in ("sam_prompting", "fewshot", "nnunet")
        for dataset in ("msd_hippocampus", "openkbp_hn_ct", "chest_xray", "spine_vb3")
    ] + [("within_volume", "data_manifests/msd_hippocampus.yaml")] * 4 + [
        ("within_volume", "data_manifests/openkbp_hn_ct.yaml"),
        ("within_volume", "data_manifests/spine_vb3.yaml"),
    ]
    stamps = [(folder / "run.json").stat().st_mtime_ns for folder in folders]

    assert reproduce("smoke", results, dry_run=True) == [(folder, "complete") for folder in folders]
    assert reproduce("smoke", results) == [(folder, "complete") for folder in folders]

    assert [(folder / "run.json").stat().st_mtime_ns for folder in folders] == stamps  # nothing recomputed

    # make reproduce: one file target per run; complete runs are up to date, a missing one is planned.
    makefile = write_makefile("smoke", tmp_path / "runs-smoke.mk", results)
    assert subprocess.run(["make", "-q", "-f", str(makefile), "runs"]).returncode == 0
    (folders[5] / ".complete").unlink()  # few-shot on CT
    planned = subprocess.run(["make", "-n", "-f", str(makefile), "runs"], capture_output=True, text=True).stdout
    assert planned.count("fewsam run") == 1 and "fewsam run fewshot" in planned and "--shots 1" in planned
    assert "openkbp_hn_ct.yaml" in planned
    write_makefile("smoke", makefile, results)  # a complete run.json gets its stamp back
    assert subprocess.run(["make", "-q", "-f", str(makefile), "runs"]).returncode == 0
    # The report target: made once after the runs, then up to date until a run changes.
    # (FEWSAM=true: Make's bookkeeping is under test here; the report itself is checked below.)
    report = ["make", "-f", str(makefile), "FEWSAM=true", "report"]
    assert subprocess.run(["make", "-q", *report[1:]]).returncode == 1
    made = subprocess.run(report, capture_output=True, text=True, check=True).stdout
    assert "true report --profile smoke --results" in made
    assert subprocess.run(["make", "-q", *report[1:]]).returncode == 0
    assert "Nothing to be done" in subprocess.run(report, capture_output=True, text=True).stdout
    report_rule = next(line for line in makefile.read_text().splitlines() if "report-smoke.done:" in line)
    assert {"fewsam_lib/profiles/smoke.yaml", "fewsam_lib/report/benchmark.py", "notebooks/90_report.ipynb"} <= set(
        report_rule.split()
    )  # the report is remade when its code changes
    made_at = makefile.with_name("report-smoke.done").stat().st_mtime_ns
    os.utime(folders[0] / ".complete", ns=(made_at + 10**9, made_at + 10**9))  # a run redone a second later
    assert subprocess.run(["make", "-q", *report[1:]]).returncode == 1
    for dataset in ("msd_hippocampus", "openkbp_hn_ct", "chest_xray", "spine_vb3"):
        assert "slices_with_task" in (results / "datasets" / dataset / "00_dataset_overview.ipynb").read_text()
    assert set(pd.read_csv(results / "tables" / "summary.csv").method) == {
        "sam_prompting",
        "fewshot",
        "nnunet",
        "within_volume",
    }
    assert (results / "figures" / "prompting_iou.png").exists()

    # The report: every table and figure, from the run folders alone.
    assert "main_table.md" in (results / "report" / "smoke" / "90_report.ipynb").read_text()
    for name in REPORT_TABLES:
        assert (results / "tables" / name).stat().st_size > 0
    for name in (
        "label_efficiency.png",
        "qualitative_msd_hippocampus.png",
        "qualitative_openkbp_hn_ct.png",
        "qualitative_chest_xray.png",
        "qualitative_spine_vb3.png",
        "within_volume.png",
    ):
        assert (results / "figures" / name).exists()
    table = pd.read_csv(results / "tables" / "main_table.csv")
    assert set(table.level) == {"slice", "volume"}
    assert not table.label.str.contains("nearest|interpolation|own slices").any()  # the track is kept apart
    track = pd.read_csv(results / "tables" / "within_volume.csv")
    assert set(zip(track.dataset, track.variant.str.split("-").str[0])) == {
        ("msd_hippocampus", "nearest_slice"),
        ("msd_hippocampus", "interpolation"),
        ("msd_hippocampus", "sam_box_propagated"),
        ("msd_hippocampus", "fewshot_located_context_box"),
        ("openkbp_hn_ct", "interpolation"),
        ("spine_vb3", "interpolation"),
    }
    assert set(track.k) == {4} and track.slice_dice.between(0, 1).all()
    assert set(table[table.dataset == "openkbp_hn_ct"].task) == {
        "Brainstem",
        "SpinalCord",
        "Mandible",
        "LeftParotid",
        "RightParotid",
    }
    summary = pd.read_csv(results / "tables" / "summary.csv")
    few = summary[(summary.method == "fewshot") & (summary.metric == "iou") & (summary.level == "slice")]
    anterior = table[(table.task == "anterior") & (table.level == "slice") & table.label.str.startswith("few-shot")]
    assert anterior.iou_mean.iloc[0] == pytest.approx(few[few.task == "anterior"]["mean"].iloc[0], abs=1e-4)
    headline = (results / "tables" / "headline.md").read_text()
    # The smoke profile has no run of the default variant: its headline names the one it shows.
    assert "msd_hippocampus · anterior · mobile_sam: few-shot `centred-" in headline
    assert "` (5 shots, 1 seed) IoU" in headline
    assert "; SAM box " in headline and "; nnU-Net matched budget (" in headline
    costs = pd.read_csv(results / "tables" / "cost_table.csv")
    trained = costs[costs.label.str.startswith(("few-shot", "nnU-Net"))]
    assert costs["nnU-Net plan + preprocess"].notna().any() and trained["decoder / nnU-Net training"].notna().all()
    shown_costs = (results / "tables" / "cost_table.md").read_text()
    assert "—" in shown_costs and "nan" not in shown_costs  # a step a run did not have is a dash, not "nan"


def test_report_refuses_an_incomplete_run(prompting_smoke_run, tmp_path):
    results = tmp_path / "results"
    folder = results / prompting_smoke_run.relative_to(results_dir_of(prompting_smoke_run))
    shutil.copytree(prompting_smoke_run, folder)
    run = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**run, "status": "running"}))
    with pytest.raises(IncompleteRun, match=str(folder)):
        write_report(results, "smoke")
    with pytest.raises(FewsamError, match="no complete runs of profile cpu"):
        run_index(tmp_path / "empty", "cpu")


def test_verify_catches_an_edited_number_a_dropped_row_a_changed_prediction_and_a_missing_one(
    prompting_smoke_run, tmp_path, capsys
):
    import nibabel as nib
    import numpy as np

    folder = tmp_path / prompting_smoke_run.name
    shutil.copytree(prompting_smoke_run, folder)
    assert verify_run(folder) == []
    recorded = (folder / "metrics.csv").read_text()
    metrics = pd.read_csv(folder / "metrics.csv")
    metrics.loc[metrics.level == "slice", "iou"] = metrics.loc[metrics.level == "slice", "iou"].shift(1, fill_value=0.5)
    metrics.to_csv(folder / "metrics.csv", index=False)
    problems = verify_run(folder)
    assert problems and all("iou recorded" in problem for problem in problems)
    assert main(["verify", str(folder), "--quiet"]) == 1 and "iou recorded" in capsys.readouterr().err

    (folder / "metrics.csv").write_text(recorded)
    metrics = pd.read_csv(folder / "metrics.csv", dtype={"case_id": str})
    dropped = metrics[metrics.level == "slice"].index[0]
    metrics.drop(index=[dropped]).to_csv(folder / "metrics.csv", index=False)
    assert verify_run(folder) == [
        f"{folder}: {metrics.case_id[dropped]} {metrics.task[dropped]} slice slice "
        f"{int(metrics.slice_index[dropped])}: not recorded"
    ]

    (folder / "metrics.csv").write_text(recorded)
    prediction_file = next((folder / "predictions").glob("*.nii.gz"))
    image = nib.load(prediction_file)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, dtype=np.uint8), image.affine, image.header), prediction_file)
    assert any("pred_voxels recorded" in problem for problem in verify_run(folder))
    prediction_file.unlink()
    assert verify_run(folder) == [
        f"{folder}: no saved prediction for {prediction_file.name[:-7]} ({prediction_file.name})"
    ]


def test_readme_blocks_are_replaced_between_their_markers():
    text = "a\n<!-- report:main_table -->\nold\n<!-- /report:main_table -->\nb\n"
    assert (
        replace_block(text, "main_table", "new\n")
        == "a\n<!-- report:main_table -->\nnew\n<!-- /report:main_table -->\nb\n"
    )
    with pytest.raises(FewsamError, match="report:headline"):
        replace_block(text, "headline", "x")


def test_label_efficiency_ticks_that_would_overlap_are_dropped():
    assert readable_log_ticks({42, 2, 10, 40, 5304}) == [2, 10, 40, 5304]  # the hippocampus cpu panel
    assert readable_log_ticks(set()) == []


def test_qualitative_slices_run_from_worst_to_best_even_beside_a_run_that_is_wrong_everywhere():
    committed = Path(__file__).resolve().parents[1] / "results" / "runs" / "openkbp_hn_ct"
    box = pd.read_csv(committed / "sam_prompting" / "lite_medsam_box_seed0_cpu" / "metrics.csv")
    box = box[box.level == "slice"]
    wrong_everywhere = box.assign(method="fewshot", iou=0.0)  # what few-shot does on CT (committed runs)
    assert representative_slices(wrong_everywhere).iou.nunique() == 1  # alone, every pick is a tie
    chosen = representative_slices(pd.concat([wrong_everywhere, box]))
    assert len(chosen) == 3 and chosen.iou.is_monotonic_increasing and chosen.iou.nunique() == 3


def test_the_qualitative_window_zooms_into_a_ct_slice_and_keeps_every_label(openkbp):
    volume = load_case(openkbp, "pt_201")
    counts = (np.moveaxis(volume.label, openkbp.slice_axis, 0) > 0).sum(axis=(1, 2))
    for index in (int(np.argmax(counts)), int(np.flatnonzero(counts)[0])):  # the most and the least labelled
        truth = take_slice(volume.label, openkbp.slice_axis, index)
        grey = grey_slices(openkbp, volume, [index])[0]
        rows, columns = zoom_window(grey, [truth])
        assert _every_label_inside(truth, rows, columns)
        assert (rows.stop - rows.start) * (columns.stop - columns.start) < truth.size / 2


def test_the_qualitative_window_keeps_its_size_where_a_ct_slice_holds_only_a_scrap_of_body(openkbp):
    volume = load_case(openkbp, "pt_203")  # slice 30: 37 pixels of CT around ten of spinal cord
    truth = take_slice(volume.label, openkbp.slice_axis, 30)
    grey = grey_slices(openkbp, volume, [30])[0]
    assert 0 < (grey > 0).sum() < 100 and truth.any()
    rows, columns = zoom_window(grey, [truth], min_side=48)
    assert rows.stop - rows.start == columns.stop - columns.start == 48
    assert _every_label_inside(truth, rows, columns)


def _every_label_inside(truth: np.ndarray, rows: slice, columns: slice) -> bool:
    shown = np.zeros(truth.shape, bool)
    shown[rows, columns] = True
    return not truth[~shown].any()


def test_label_efficiency_legend_names_each_nnunet_budget_once_across_datasets(tmp_path):
    committed = Path(__file__).resolve().parents[1] / "results"
    matched = [
        folder
        for folder in sorted((committed / "runs").glob("*/nnunet/*_cpu"))
        if json.loads((folder / "run.json").read_text()).get("label_budget", {}).get("name", "").startswith("slices")
    ]
    committed_datasets = {"chest_xray", "msd_hippocampus", "openkbp_hn_ct", "spine_vb3"}
    assert {folder.parts[-3] for folder in matched} == committed_datasets
    for folder in matched:
        shutil.copytree(folder, tmp_path / folder.relative_to(committed))
    figure = label_efficiency_figure(summarize(tmp_path), run_index(tmp_path))
    assert [text.get_text() for text in figure.legends[0].texts] == ["nnU-Net matched budget (2d)"]
    ticks = {tick.get_text() for ax in figure.axes for tick in ax.get_xticklabels()}
    assert {"42", "54", "127", "158"} <= ticks  # the slice counts moved from the legend to each point's tick


def test_two_budgets_of_one_slice_count_stay_apart(tmp_path):
    # Of 2D images, a matched and a same-slices budget both hold one labelled slice per image.
    committed = Path(__file__).resolve().parents[1] / "results"
    runs = sorted((committed / "runs" / "chest_xray" / "nnunet").glob("*NoMirroring_*54_seed0_cpu"))
    assert len(runs) == 2  # committed: matched (shots54) and same_slices (sameslices54)
    for folder in runs:
        shutil.copytree(folder, tmp_path / folder.relative_to(committed))
    summary = summarize(tmp_path)
    iou = summary.query("level == 'slice' and metric == 'iou' and task == 'Airways'")
    expected = {
        ("same_slices" if "sameslices" in folder.name else "matched"): pd.read_csv(folder / "metrics.csv")
        .query("level == 'slice' and task == 'Airways'")
        .iou.mean()
        for folder in runs
    }
    assert dict(zip(iou.label_budget, iou["mean"])) == pytest.approx(expected)
    assert expected["matched"] != pytest.approx(expected["same_slices"])  # pooled, the rows would agree
    labels = main_table(summary).label
    assert {"nnU-Net matched budget (54 slices, 2d)", "nnU-Net same slices (54 slices, 2d)"} <= set(labels)


def test_headline_calls_equal_printed_scores_level_rather_than_below():
    assert _compared(0.0, 0.0004) == "level with"  # both print as 0.000
    assert _compared(0.4164, 0.4156) == "level with" and _compared(0.417, 0.416) == "0.001 IoU above"
    committed = Path(__file__).resolve().parents[1] / "results"
    summary = pd.read_csv(committed / "tables" / "summary.csv")
    sentences = headline_sentences(summary[summary.profile == "cpu"])
    brainstem = next(s for s in sentences if s.startswith("openkbp_hn_ct · Brainstem · mobile_sam"))
    assert "few-shot `located_augmented_head_weighted` (20 shots" in brainstem  # the default variant's row
    assert brainstem in (committed / "tables" / "headline.md").read_text()  # as the report wrote it
    assert not any("0.000 IoU" in sentence for sentence in sentences)


def test_reproduce_dry_run_lists_a_missing_run_as_planned(openkbp, tmp_path):
    outcome = reproduce("smoke", tmp_path, dry_run=True)
    assert [state for _, state in outcome] == ["planned"] * len(load_profile("smoke").runs())
    assert len({folder for folder, _ in outcome}) == len(outcome)  # no two runs share a folder
    assert not (tmp_path / "runs").exists()


def test_a_summary_row_does_not_move_when_other_runs_are_added(prompting_smoke_run, tmp_path):
    results = tmp_path / "results"
    only = results / prompting_smoke_run.relative_to(results_dir_of(prompting_smoke_run))
    shutil.copytree(prompting_smoke_run, only)
    alone = summarize(results)
    other = only.with_name(only.name.replace("_box_", "_abc_"))
    shutil.copytree(only, other)
    metrics = pd.read_csv(other / "metrics.csv")
    metrics.assign(variant="abc").to_csv(other / "metrics.csv", index=False)  # a second run, sorted before "box"
    together = summarize(results)
    assert len(together) == 2 * len(alone)
    columns = ["mean", "std", "n", "ci95_low", "ci95_high"]
    kept = together[together.variant == "box"].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept[columns], alone[columns].reset_index(drop=True))


def test_optional_backbones_join_the_matrix_only_when_their_checkpoint_is_present(tmp_path, monkeypatch):
    full = load_profile("full")
    monkeypatch.delenv("FEWSAM_SAM_VIT_B_CHECKPOINT", raising=False)
    monkeypatch.setenv("FEWSAM_WEIGHTS", str(tmp_path / "no-weights"))
    assert full.backbones("fewshot") == ["mobile_sam", "lite_medsam"]
    checkpoint = tmp_path / "sam_vit_b_01ec64.pth"
    checkpoint.write_bytes(b"user-supplied")
    monkeypatch.setenv("FEWSAM_SAM_VIT_B_CHECKPOINT", str(checkpoint))
    assert full.backbones("fewshot") == ["mobile_sam", "lite_medsam", "sam_vit_b"]
    assert {run.backbone for run in full.runs() if run.method == "sam_prompting"} == {
        "mobile_sam",
        "lite_medsam",
        "sam_vit_b",
    }
    cpu_runs = load_profile("cpu").runs()
    assert {run.manifest for run in cpu_runs} == {
        "data_manifests/msd_hippocampus.yaml",
        "data_manifests/openkbp_hn_ct.yaml",
        "data_manifests/chest_xray.yaml",
        "data_manifests/spine_vb3.yaml",
    }

    # The new datasets join method by method: an override with empty lists plans none of the others yet.
    def planned(dataset: str, method: str) -> list:
        return [run for run in cpu_runs if run.manifest.endswith(f"{dataset}.yaml") and run.method == method]

    assert {run.method for run in cpu_runs if run.manifest.endswith("chest_xray.yaml")} == {
        "sam_prompting",
        "fewshot",
        "nnunet",
    }
    assert [(run.variant, run.budget) for run in planned("chest_xray", "nnunet")] == [
        ("2d-nnUNetTrainer_fewsam5epochsNoMirroring", "full"),
        ("2d-nnUNetTrainer_fewsam5epochsNoMirroring", "matched"),
        ("2d-nnUNetTrainer_fewsam5epochsNoMirroring", "same_slices"),
    ]
    assert [(run.backbone, run.variant, run.shots, run.seed) for run in planned("chest_xray", "fewshot")] == [
        ("mobile_sam", "centred", 1, 0),
        ("mobile_sam", "centred", 1, 1),
        ("mobile_sam", "centred", 1, 2),
        ("mobile_sam", "centred", 5, 0),
        ("mobile_sam", "centred", 5, 1),
        ("mobile_sam", "centred", 5, 2),
        ("mobile_sam", "centred", 20, 0),
        ("mobile_sam", "centred", 20, 1),
        ("mobile_sam", "centred", 20, 2),
        ("mobile_sam", "located_augmented_head_weighted", 1, 0),
        ("mobile_sam", "located_augmented_head_weighted", 1, 1),
        ("mobile_sam", "located_augmented_head_weighted", 1, 2),
        ("mobile_sam", "located_augmented_head_weighted", 5, 0),
        ("mobile_sam", "located_augmented_head_weighted", 5, 1),
        ("mobile_sam", "located_augmented_head_weighted", 5, 2),
        ("mobile_sam", "located_augmented_head_weighted", 20, 0),
        ("mobile_sam", "located_augmented_head_weighted", 20, 1),
        ("mobile_sam", "located_augmented_head_weighted", 20, 2),
    ]
    assert {run.method for run in cpu_runs if run.manifest.endswith("spine_vb3.yaml")} == {
        "sam_prompting",
        "fewshot",
        "nnunet",
        "within_volume",
    }
    assert [(run.backbone, run.variant, run.shots, run.seed) for run in planned("spine_vb3", "fewshot")] == [
        ("mobile_sam", "centred", 1, 0),
        ("mobile_sam", "centred", 1, 1),
        ("mobile_sam", "centred", 1, 2),
        ("mobile_sam", "centred", 5, 0),
        ("mobile_sam", "centred", 5, 1),
        ("mobile_sam", "centred", 5, 2),
        ("mobile_sam", "centred", 20, 0),
        ("mobile_sam", "centred", 20, 1),
        ("mobile_sam", "centred", 20, 2),
        ("mobile_sam", "located_augmented_head_weighted", 1, 0),
        ("mobile_sam", "located_augmented_head_weighted", 1, 1),
        ("mobile_sam", "located_augmented_head_weighted", 1, 2),
        ("mobile_sam", "located_augmented_head_weighted", 5, 0),
        ("mobile_sam", "located_augmented_head_weighted", 5, 1),
        ("mobile_sam", "located_augmented_head_weighted", 5, 2),
        ("mobile_sam", "located_augmented_head_weighted", 20, 0),
        ("mobile_sam", "located_augmented_head_weighted", 20, 1),
        ("mobile_sam", "located_augmented_head_weighted", 20, 2),
    ]
    assert {run.backbone for run in planned("spine_vb3", "sam_prompting")} == {"mobile_sam", "lite_medsam"}
    within_volume = {(run.variant, run.shots) for run in planned("spine_vb3", "within_volume")}
    baselines = ("nearest_slice", "interpolation", "sam_box_propagated")
    few_shot = ("fewshot_adapted_located_augmented_head_weighted", "fewshot_blended_located_augmented_head_weighted")
    assert within_volume == {(variant, k) for variant in (*baselines, *few_shot) for k in (4, 8, 16)}
    # the model trained on each volume's own slices: on the hippocampus and CT at every k
    own = "fewshot_located_augmented_head_weighted"
    for dataset in ("msd_hippocampus", "openkbp_hn_ct"):
        assert {run.shots for run in planned(dataset, "within_volume") if run.variant == own} == {4, 8, 16}
    assert not [run for run in planned("spine_vb3", "within_volume") if run.variant == own]


def test_a_dataset_override_replaces_only_its_nested_keys_and_only_for_that_dataset():
    smoke = load_profile("smoke")
    ct = load_profile("smoke", "data_manifests/openkbp_hn_ct.yaml")
    assert smoke.section("fewshot").training == {"steps": 60}
    assert ct.section("fewshot").training == {"steps": 20, "slices_per_step": 1} and ct.section("fewshot").shots == (1,)
    assert smoke.section("fewshot").shots == (5,)
    assert ct.section("fewshot").backbones == smoke.section("fewshot").backbones
    assert ct.test_slices == smoke.test_slices == 12
    assert load_profile("smoke", "data_manifests/msd_hippocampus.yaml").raw == smoke.raw


def test_nnunet_trainers_may_be_listed_per_budget():
    def nnunet_cells(profile):
        return {(Path(run.manifest).stem, run.budget, run.variant) for run in profile.runs() if run.method == "nnunet"}

    assert nnunet_cells(load_profile("cpu")) == {
        ("chest_xray", "full", "2d-nnUNetTrainer_fewsam5epochsNoMirroring"),
        ("chest_xray", "matched", "2d-nnUNetTrainer_fewsam5epochsNoMirroring"),
        ("chest_xray", "same_slices", "2d-nnUNetTrainer_fewsam5epochsNoMirroring"),
        ("msd_hippocampus", "full", "2d-nnUNetTrainer_fewsam5epochsBatch32"),
        ("msd_hippocampus", "matched", "2d-nnUNetTrainer_fewsamCpuPlateau30"),
        ("msd_hippocampus", "same_slices", "2d-nnUNetTrainer_fewsam5epochsBatch32"),
        ("openkbp_hn_ct", "full", "2d-nnUNetTrainer_fewsam5epochsBatch13"),
        ("openkbp_hn_ct", "matched", "2d-nnUNetTrainer_fewsam5epochsBatch32"),
        ("openkbp_hn_ct", "same_slices", "2d-nnUNetTrainer_fewsam5epochsBatch13"),
        ("spine_vb3", "full", "2d-nnUNetTrainer_fewsam5epochsBatch13NoMirroring"),
        ("spine_vb3", "matched", "2d-nnUNetTrainer_fewsam5epochsBatch13NoMirroring"),
        ("spine_vb3", "same_slices", "2d-nnUNetTrainer_fewsam5epochsBatch13NoMirroring"),
    }
    one_budget_listed = dict(
        load_profile("cpu").raw,
        overrides={},
        nnunet={
            "configurations": ["2d"],
            "budgets": ["full", "matched"],
            "trainers": {"matched": ["nnUNetTrainer_fewsamSmoke"]},
        },
    )
    assert {(budget, variant) for _, budget, variant in nnunet_cells(_profile_from(one_budget_listed))} == {
        ("matched", "2d-nnUNetTrainer_fewsamSmoke")
    }


def test_the_nnunet_curve_keeps_nnunets_own_moving_average_and_the_schedule_table_reads_it():
    """On committed nnU-Net runs: the moving average read from the log is the one nnU-Net printed
    whenever it was a new best, and the schedule table reports each run's epochs, batch and precision."""
    runs = Path("results/runs/msd_hippocampus/nnunet")
    folder = next(runs.glob("*_2d-nnUNetTrainer_fewsamCpuPlateau30_shots42_seed0_cpu"))
    curve = nnunet_log_curve(folder)
    printed = [
        float(line.rsplit(":", 1)[1])
        for line in (folder / "nnunet_training_log.txt").read_text().splitlines()
        if "New best EMA pseudo Dice" in line
    ]
    assert len(curve) == 30 and len(printed) == 30  # a new best after every epoch of this run
    assert np.allclose(curve.ema_pseudo_dice, printed, atol=2e-4)
    bf16 = next(runs.glob("*_2d-nnUNetTrainer_fewsam5epochsBatch32Bf16_*_validation"))
    index = pd.DataFrame(
        [
            {
                "folder": str(run),
                "dataset": "msd_hippocampus",
                "method": "nnunet",
                "variant": f"2d-{trainer}",
                "shots": shots,
                "budget": budget,
            }
            for run, trainer, shots, budget in (
                (folder, "nnUNetTrainer_fewsamCpuPlateau30", 42, "slices40seed0"),
                (bf16, "nnUNetTrainer_fewsam5epochsBatch32Bf16", 4261, "full"),
            )
        ]
    )
    row, bf16_row = nnunet_schedule_table(index, {"msd_hippocampus": "found"}).to_dict("records")
    assert row["validation search"] == bf16_row["validation search"] == "found"
    assert nnunet_schedule_table(index).iloc[0]["validation search"] == "none"
    assert (row["epochs"], row["batch"], row["precision"]) == (30, 3, "fp32")
    assert (bf16_row["epochs"], bf16_row["batch"], bf16_row["precision"]) == (5, 32, "bf16")
    # The moving average starts at epoch 0's value and lags: still 0.04 up over the last 6 epochs.
    assert row["plateau"] == "no"
    assert row["its gain, last fifth"] == pytest.approx(curve.ema_pseudo_dice.iloc[-1] - curve.ema_pseudo_dice.iloc[-7])
