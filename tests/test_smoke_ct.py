"""The smoke profile on head-and-neck CT: every method on a slab of one converted patient."""

from __future__ import annotations

from conftest import assert_predictions_reproduce_the_metrics

from fewsam_lib.bench.profiles import load_profile
from fewsam_lib.bench.runs import load_run
from fewsam_lib.data.volumes import load_case


def test_ct_smoke_runs_score_the_profile_slab_and_their_predictions_reproduce_the_metrics(ct_smoke_runs, openkbp):
    smoke = load_profile("smoke")
    case_id = smoke.test_case_ids(openkbp)[0]
    extent = smoke.scored_slices(openkbp, load_case(openkbp, case_id))
    assert len(extent) == smoke.test_slices < 128
    for folder in ct_smoke_runs:
        meta, metrics = load_run(folder)
        assert meta["dataset"] == "openkbp_hn_ct" and meta["scored_slices"] == {case_id: [extent.start, extent.stop]}
        if meta["method"] == "fewshot":  # the profile's override for this dataset
            assert meta["parameters"]["training"]["steps"] == 20
        assert metrics[metrics.level == "slice"].slice_index.between(extent.start, extent.stop - 1).all()
        volume_rows = metrics[metrics.level == "volume"]
        assert set(volume_rows.task) == set(openkbp.annotated_tasks(case_id).values())
        assert_predictions_reproduce_the_metrics(folder)


def test_box_prompts_find_the_organs_on_ct(ct_smoke_runs):
    _, metrics = load_run(ct_smoke_runs[0])
    slices = metrics[metrics.level == "slice"]
    assert slices.task.nunique() >= 3  # the slab meets several organs
    assert slices.iou.mean() > 0.5
