"""``fewsam reproduce``: the smoke profile's whole matrix, resumable, with the summary and figures."""

from __future__ import annotations

import shutil

import pandas as pd

from conftest import results_dir_of
from fewsam_lib.profiles import load_profile
from fewsam_lib.reproduce import reproduce
from fewsam_lib.runs import summarize


def test_reproduce_skips_complete_runs_and_writes_overview_summary_and_figures(
        prompting_smoke_run, fewshot_smoke_run, nnunet_smoke_run, tmp_path):
    results = tmp_path / "results"
    folders = []
    for run_folder in (prompting_smoke_run, fewshot_smoke_run, nnunet_smoke_run):
        target = results / run_folder.relative_to(results_dir_of(run_folder))
        shutil.copytree(run_folder, target)
        folders.append(target)
    assert [run.method for run in load_profile("smoke").runs()] == ["sam_prompting", "fewshot", "nnunet"]
    stamps = [(folder / "run.json").stat().st_mtime_ns for folder in folders]

    assert reproduce("smoke", results, dry_run=True) == [(folder, "complete") for folder in folders]
    assert reproduce("smoke", results) == [(folder, "complete") for folder in folders]

    assert [(folder / "run.json").stat().st_mtime_ns for folder in folders] == stamps  # nothing recomputed
    overview = results / "datasets" / "msd_hippocampus" / "00_dataset_overview.ipynb"
    assert "slices_with_task" in overview.read_text()
    assert set(pd.read_csv(results / "tables" / "summary.csv").method) == {"sam_prompting", "fewshot", "nnunet"}
    assert (results / "figures" / "prompting_iou.png").exists()
    assert (results / "figures" / "fewshot_iou_vs_shots.png").exists()


def test_reproduce_dry_run_lists_a_missing_run_as_planned(tmp_path):
    outcome = reproduce("smoke", tmp_path, dry_run=True)
    assert [state for _, state in outcome] == ["planned"] * 3
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
