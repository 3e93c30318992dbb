"""Choose on validation, report on test: validation cases carved from the training cases."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import HIPPOCAMPUS_MANIFEST

from fewsam_lib.bench.evaluate import evaluate
from fewsam_lib.bench.profiles import PROFILE_DIR, PlannedRun, load_profile
from fewsam_lib.data.collection import draw_collection
from fewsam_lib.errors import FewsamError
from fewsam_lib.methods.nnunet import dataset_suffix, full_budget


@pytest.mark.parametrize("dataset", ["hippocampus", "openkbp"])
def test_validation_cases_come_from_training_and_never_meet_the_test_split(dataset, request):
    manifest = request.getfixturevalue(dataset)
    view = load_profile("validation").view(manifest)
    train, test = set(manifest.split["train"]), set(manifest.split["test"])
    validation, rest = set(view.split["test"]), set(view.split["train"])
    assert validation and rest and validation | rest == train and not validation & rest
    assert not (validation | rest) & test  # the real test cases are in neither
    assert len(validation) == round(0.2 * len(train)) and view.evaluated_split == "validation"
    assert manifest.validation_view(0.2, 0).split == view.split  # seeded: the same draw every time
    assert manifest.validation_view(0.2, 1).split != view.split
    assert view.summary()["evaluated_split"] == "validation" and manifest.summary()["evaluated_split"] == "test"
    with pytest.raises(FewsamError, match="already a validation view"):
        view.validation_view(0.2, 0)


def test_a_validation_collection_and_nnunet_export_use_only_the_remaining_training_cases(hippocampus):
    view = load_profile("validation").view(hippocampus)
    collection = draw_collection(view, shots=20, seed=0)
    assert {s.case_id for s in collection.slices} <= set(view.split["train"])
    assert not {s.case_id for s in collection.slices} & set(view.split["test"])
    budget = full_budget(view)
    assert set(budget.case_ids) == set(view.split["train"])
    assert dataset_suffix(view, budget) != dataset_suffix(hippocampus, full_budget(hippocampus))


def test_a_validation_run_scores_validation_cases(hippocampus, tmp_path):
    raw = yaml.safe_load((PROFILE_DIR / "smoke.yaml").read_text())
    raw.update(name="smoke-validation", evaluate_on="validation", validation={"fraction": 0.2, "seed": 0})
    profile_file = tmp_path / "smoke-validation.yaml"
    profile_file.write_text(yaml.safe_dump(raw))
    run = PlannedRun("sam_prompting", str(HIPPOCAMPUS_MANIFEST), "mobile_sam", "box", 0, str(profile_file))
    folder = evaluate(run, results_dir=tmp_path / "results", progress=False)
    meta = json.loads((folder / "run.json").read_text())
    validation = hippocampus.validation_view(0.2, 0).split["test"]
    assert meta["parameters"]["test_cases"] == [sorted(validation)[0]]
    assert meta["data"]["evaluated_split"] == "validation" and folder.name.startswith("mobile_sam_box_seed0_smoke-val")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"evaluate_on": "train"}, "'evaluate_on' must be one of test, validation"),
        ({"validation": {"fraction": 1.5}}, "'fraction' must lie strictly between 0 and 1"),
        ({"validation": {"seeds": 1}}, "validation: unknown key 'seeds'"),
    ],
)
def test_a_bad_validation_setting_fails_at_load(tmp_path, change, message):
    raw = {**yaml.safe_load((PROFILE_DIR / "validation.yaml").read_text()), **change}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(FewsamError, match=message):
        load_profile(path)
