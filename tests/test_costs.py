"""Costs visible to users: the cost table's totals and the estimate of what is left to run."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO

from fewsam_lib.bench.profiles import load_profile
from fewsam_lib.bench.reproduce import estimate_remaining, measured_totals
from fewsam_lib.report.benchmark import cost_table, run_index

COMMITTED = REPO / "results"


def test_the_cost_table_adds_every_run_per_dataset_and_for_the_profile():
    index = run_index(COMMITTED, "cpu")
    costs = cost_table(index)
    total = costs[costs.label == "profile total (sum)"].iloc[0]
    assert total["runs"] == len(index) >= 48  # the cpu matrix, and any later cpu runs beside it
    assert total["run total"] == pytest.approx(index.total_s.sum())
    per_dataset = costs[costs.label == "every run (sum)"]
    assert per_dataset["run total"].sum() == pytest.approx(total["run total"])


def test_the_estimate_uses_measured_runs_of_the_same_kind(tmp_path):
    assert estimate_remaining("cpu") == "every run of profile cpu is complete"
    results = tmp_path / "results"
    kept = sorted((COMMITTED / "runs" / "msd_hippocampus" / "fewshot").iterdir())[:2]
    for folder in kept:
        shutil.copytree(folder, results / "runs" / "msd_hippocampus" / "fewshot" / folder.name)
    measured = measured_totals(results)
    assert len(measured) == 2
    text = estimate_remaining("cpu", results)
    assert text.startswith(f"{len(load_profile('cpu').runs()) - 2} runs to do in profile cpu: about ")
    assert "without a measured match" in text  # prompting and nnU-Net have no measured run here
    assert "part done" not in text


def test_the_estimate_counts_only_the_cases_an_unfinished_run_has_left(tmp_path):
    results = tmp_path / "results"
    fewshot = COMMITTED / "runs" / "msd_hippocampus" / "fewshot"
    (measured, unfinished) = sorted(fewshot.iterdir())[:2]
    copied = results / "runs" / "msd_hippocampus" / "fewshot" / measured.name
    shutil.copytree(measured, copied)
    meta = json.loads((copied / "run.json").read_text())
    meta["timings_s"]["total"] = 10 * 3600.0  # a long run: the share left shows past rounding
    (copied / "run.json").write_text(json.dumps(meta))
    before = estimate_remaining("cpu", results)
    progress = {"case_count": 20, "cases": {f"case{i}": [] for i in range(15)}}
    folder = results / "runs" / "msd_hippocampus" / "fewshot" / unfinished.name
    folder.mkdir(parents=True)
    (folder / ".progress.json").write_text(json.dumps(progress))
    after = estimate_remaining("cpu", results)
    assert "(1 of them part done" in after
    hours = [float(text.split("about ")[1].split(" h")[0]) for text in (before, after)]
    assert hours[1] == pytest.approx(hours[0] - 0.75 * 10, abs=0.11)  # 15 of its 20 cases are done
