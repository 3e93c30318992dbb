"""The method registry and the one loop: a method registered here runs end to end without any other
module naming it; run folders say every setting; typed profiles refuse unknown keys."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import HIPPOCAMPUS_MANIFEST, REPO, results_dir_of

from fewsam_lib.bench.evaluate import evaluate, planned_folder, run_spec
from fewsam_lib.bench.profiles import PROFILE_DIR, load_profile
from fewsam_lib.bench.reproduce import run_command
from fewsam_lib.bench.runs import GROUP_COLUMNS, load_run, summarize
from fewsam_lib.cli import build_parser, main
from fewsam_lib.errors import FewsamError
from fewsam_lib.methods.base import (
    CasePrediction,
    Method,
    MethodRun,
    PlannedRun,
    get_method,
    register_method,
    unregister_method,
)
from fewsam_lib.methods.fewshot import FewShotModel, get_fewshot_variant
from fewsam_lib.report.benchmark import check_one_encoder_path, main_table, method_label


@dataclass(frozen=True)
class EmptySection:
    seeds: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class EmptyVariant:
    name: str = "nothing"


class EmptyRun(MethodRun):
    def __init__(self, context):
        super().__init__(context)
        self.variant = EmptyVariant(context.run.variant)

    def predict_case(self, volume, extent):
        return CasePrediction(np.zeros(volume.shape, dtype=np.uint8))


class EmptyMask(Method):
    name = "empty_mask"
    command = "empty"
    description = "predicts the empty mask everywhere (a test method)"
    section_key = "empty"
    section_type = EmptySection
    rank = 9
    uses_backbone = False
    default_variant = "nothing"

    def resolve_variant(self, name, section):
        return EmptyVariant(name)

    def start(self, context):
        return EmptyRun(context)

    def label(self, variant, shots, budget=None):
        return "empty mask"


@pytest.fixture
def empty_method():
    method = register_method(EmptyMask())
    yield method
    unregister_method(method.name)


def profile_file(folder: Path, **sections) -> str:
    """A one-dataset profile (hippocampus, 1 test case, a 4-slice slab) with the given sections."""
    raw = {
        "name": "tiny",
        "description": "a test profile",
        "test_cases": 1,
        "test_slices": 4,
        "datasets": ["data_manifests/msd_hippocampus.yaml"],
        **sections,
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_method_registered_in_a_test_runs_end_to_end(empty_method, tmp_path, capsys):
    profile = profile_file(tmp_path, empty={"seeds": [0]})
    assert build_parser().parse_args(["run", "empty", "m.yaml"]).method == "empty"
    (planned,) = load_profile(profile).runs()
    assert planned == PlannedRun("empty_mask", "data_manifests/msd_hippocampus.yaml", "none", "nothing", 0, profile)
    assert run_command(planned, tmp_path)[:3] == ["fewsam", "run", "empty"]
    results = tmp_path / "results"
    assert (
        main(
            [
                "run",
                "empty",
                str(HIPPOCAMPUS_MANIFEST),
                "--profile",
                profile,
                "--no-notebook",
                "--quiet",
                "--results",
                str(results),
            ]
        )
        == 0
    )
    folder = planned_folder(planned, results)
    assert folder == results / "runs" / "msd_hippocampus" / "empty_mask" / "none_nothing_seed0_tiny"
    meta, metrics = load_run(folder)
    assert meta["method"] == "empty_mask" and len(list((folder / "predictions").glob("*.nii.gz"))) == 1
    assert set(metrics.level) == {"slice", "volume"} and (metrics.pred_voxels == 0).all()
    summary = summarize(results)
    assert set(summary.method) == {"empty_mask"}
    assert method_label("empty_mask", "nothing", None) == "empty mask"
    assert set(main_table(summary).label) == {"empty mask"}


def test_runs_that_differ_only_in_training_steps_never_share_a_folder(tmp_path):
    specs = []
    for steps in (10, 20):
        (tmp_path / str(steps)).mkdir()
        profile = profile_file(tmp_path / str(steps), fewshot={"training": {"steps": steps}})
        specs.append(run_spec(PlannedRun("fewshot", str(HIPPOCAMPUS_MANIFEST), "mobile_sam", "centred", 0, profile, 5)))
    assert specs[0].variant != specs[1].variant and specs[0].run_id != specs[1].run_id
    assert all(spec.variant.startswith("centred-") for spec in specs)
    # The registered schedule keeps the plain name: the committed cpu runs keep their folders.
    cpu_fewshot = next(run for run in load_profile("cpu").runs() if run.method == "fewshot")
    assert run_spec(cpu_fewshot).variant == "centred"
    smoke = get_fewshot_variant("centred").with_schedule(steps=60)
    assert smoke.name != "centred" and smoke.name == get_fewshot_variant("centred").with_schedule(steps=60).name


def test_a_variant_may_run_its_own_seeds_and_shots(tmp_path):
    fewshot = {"backbones": ["mobile_sam"], "variants": ["centred", "located"], "shots": [5], "seeds": [0, 1]}
    profile = profile_file(tmp_path, fewshot={**fewshot, "variant_seeds": {"centred": [0]}})
    planned = [(run.variant, run.seed) for run in load_profile(profile).runs()]
    assert planned == [("centred", 0), ("located", 0), ("located", 1)]
    broken = profile_file(tmp_path, fewshot={**fewshot, "variant_seeds": {"centered": [0]}})
    with pytest.raises(FewsamError, match="variant_seeds names 'centered', which is not one of the variants"):
        load_profile(broken)
    fewer_shots = profile_file(tmp_path, fewshot={**fewshot, "shots": [1, 5], "variant_shots": {"located": [5]}})
    planned = [(run.variant, run.shots, run.seed) for run in load_profile(fewer_shots).runs()]
    assert planned == [
        ("centred", 1, 0),
        ("centred", 1, 1),
        ("centred", 5, 0),
        ("centred", 5, 1),
        ("located", 5, 0),
        ("located", 5, 1),
    ]
    broken = profile_file(tmp_path, fewshot={**fewshot, "variant_shots": {"centered": [5]}})
    with pytest.raises(FewsamError, match="variant_shots names 'centered', which is not one of the variants"):
        load_profile(broken)
    # a later seed joins shot count by shot count
    seed_joining = profile_file(
        tmp_path, fewshot={**fewshot, "shots": [1, 5], "variant_seeds": {"centred": [0]}, "seed_shots": {1: [1]}}
    )
    planned = [(run.variant, run.shots, run.seed) for run in load_profile(seed_joining).runs()]
    assert planned == [("centred", 1, 0), ("centred", 5, 0), ("located", 1, 0), ("located", 1, 1), ("located", 5, 0)]
    broken = profile_file(tmp_path, fewshot={**fewshot, "seed_shots": {2: [5]}})
    with pytest.raises(FewsamError, match="seed_shots names seed 2, which no variant runs"):
        load_profile(broken)
    # one variant's later seed joins while the other variant's is complete
    one_variant_joining = profile_file(
        tmp_path, fewshot={**fewshot, "shots": [1, 5], "variant_seed_shots": {"located": {1: [1]}}}
    )
    planned = [(run.variant, run.shots, run.seed) for run in load_profile(one_variant_joining).runs()]
    assert planned == [
        ("centred", 1, 0),
        ("centred", 1, 1),
        ("centred", 5, 0),
        ("centred", 5, 1),
        ("located", 1, 0),
        ("located", 1, 1),
        ("located", 5, 0),
    ]
    broken = profile_file(
        tmp_path, fewshot={**fewshot, "variant_seeds": {"located": [0]}, "variant_seed_shots": {"located": {1: [5]}}}
    )
    with pytest.raises(FewsamError, match="variant_seed_shots names seed 1 of 'located', which it does not run"):
        load_profile(broken)


def test_a_within_volume_variant_may_run_its_own_steps(tmp_path):
    section = {"variants": ["nearest_slice", "interpolation"], "steps": [4, 8]}
    profile = profile_file(tmp_path, within_volume={**section, "variant_steps": {"interpolation": [8]}})
    planned = [(run.variant, run.shots) for run in load_profile(profile).runs()]
    assert planned == [("nearest_slice", 4), ("nearest_slice", 8), ("interpolation", 8)]
    misspelt = profile_file(tmp_path, within_volume={**section, "variant_steps": {"interpolate": [8]}})
    with pytest.raises(FewsamError, match="variant_steps names 'interpolate', which is not one of the variants"):
        load_profile(misspelt)
    too_small = profile_file(tmp_path, within_volume={**section, "variant_steps": {"interpolation": [1]}})
    with pytest.raises(FewsamError, match=r"within_volume: steps: every step must be at least 2"):
        load_profile(too_small)


def test_a_saved_model_of_the_previous_format_still_loads(mobile_sam, tmp_path):
    decoder = mobile_sam.model.mask_decoder
    old = {
        "format": "fewsam-fewshot-decoder-v1",
        "backbone": "mobile_sam",
        "design": {"name": "centred", "centred": True, "background_token": False, "description": "..."},
        "tasks": {1: "anterior"},
        "preprocessing": {"slice_axis": 2, "intensity": {"mode": "none"}},
        "tokens": {"anterior": torch.zeros(1, 256)},
        "decoder": decoder.state_dict(),
    }
    torch.save(old, tmp_path / "old.pt")
    model = FewShotModel.load(tmp_path / "old.pt", mobile_sam.model, "mobile_sam")
    assert model.variant == get_fewshot_variant("centred")
    again = FewShotModel.load(model.save(tmp_path / "sub" / "new.pt"), mobile_sam.model, "mobile_sam")
    assert again.variant == model.variant
    torch.save({**old, "format": "fewsam-fewshot-decoder-v9"}, tmp_path / "future.pt")
    with pytest.raises(FewsamError, match=r"future\.pt: not a fewsam few-shot model \(expected format"):
        FewShotModel.load(tmp_path / "future.pt", mobile_sam.model, "mobile_sam")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda raw: raw["fewshot"].update(step=3), "fewshot: unknown key 'step'"),
        (lambda raw: raw["fewshot"]["training"].update(stpes=3), "unknown key 'stpes'"),
        (lambda raw: raw.update(test_case=2), "unknown key 'test_case'"),
        (lambda raw: raw["prompting"].update(seeds="0"), "prompting: 'seeds' must be"),
        (lambda raw: raw["nnunet"].update(disable_tta="yes"), "nnunet: 'disable_tta' must be bool"),
        (lambda raw: raw.update(test_slices=1.5), "'test_slices' must be int"),
        (lambda raw: raw.update(encoder_path="onnx-fp32"), "unknown encoder_path 'onnx-fp32' \\(known: torch-fp32"),
        (lambda raw: raw["overrides"]["openkbp_hn_ct"]["fewshot"].update(shot=[1]), "overrides: openkbp_hn_ct"),
    ],
)
def test_a_profile_with_an_unknown_key_or_a_wrong_type_fails_at_load_naming_file_and_key(tmp_path, change, message):
    raw = yaml.safe_load((PROFILE_DIR / "smoke.yaml").read_text())
    change(raw)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(FewsamError, match=message) as error:
        load_profile(str(path))
    assert str(path) in str(error.value)


def test_the_cpu_profile_keeps_the_encoder_path_of_its_committed_runs():
    """Until the cpu runs are regenerated together, new runs must not land beside them with another path."""
    cpu = load_profile("cpu")
    assert cpu.encoder_path_on("cpu") == "torch-fp32-eager"
    assert load_profile("smoke").encoder_path_on("cpu") == "openvino-fp32"
    assert all(planned_folder(run).exists() for run in cpu.runs() if run.method != "nnunet")


def test_a_misspelt_profile_fails_before_a_run_folder_exists(tmp_path, capsys):
    results = tmp_path / "results"
    assert (
        main(
            [
                "run",
                "prompting",
                str(HIPPOCAMPUS_MANIFEST),
                "--backbone",
                "mobile_sam",
                "--profile",
                "smok",
                "--results",
                str(results),
            ]
        )
        == 2
    )
    assert "unknown profile 'smok'" in capsys.readouterr().err
    assert not results.exists()


def test_run_json_of_a_new_run_holds_no_absolute_path(empty_method, tmp_path):
    run = PlannedRun(
        "empty_mask", "data_manifests/msd_hippocampus.yaml", "none", "nothing", 0, profile_file(tmp_path, empty={})
    )
    folder = evaluate(run, results_dir=tmp_path / "results", progress=False)
    text = (folder / "run.json").read_text()
    for absolute in {str(REPO), str(Path(json.loads(text)["data"]["root"]).anchor + "work"), "/tmp/"}:
        assert absolute not in text
    assert json.loads(text)["data"]["root"] == "${FEWSAM_DATA}/Task04_Hippocampus"


def test_a_run_records_which_encoder_path_made_its_embeddings(prompting_smoke_run, tmp_path):
    meta = json.loads((prompting_smoke_run / "run.json").read_text())
    assert meta["encoder_path"] == "openvino-fp32" and meta["backbone_checkpoint"]["name"] == "mobile_sam"
    copied = tmp_path / prompting_smoke_run.relative_to(results_dir_of(prompting_smoke_run))
    shutil.copytree(prompting_smoke_run, copied)  # alone: other tests leave incomplete runs beside it
    summary = summarize(results_dir_of(copied), strict=True)
    assert set(summary.encoder_path) == {"openvino-fp32"}


def test_the_report_refuses_a_row_of_runs_from_two_encoder_paths():
    row = {column: "x" for column in GROUP_COLUMNS}
    summary = pd.DataFrame([{**row, "encoder_path": "torch-fp32-eager"}, {**row, "encoder_path": "openvino-fp32"}])
    with pytest.raises(FewsamError, match="mix runs of different encoder paths.*openvino-fp32, torch-fp32-eager"):
        check_one_encoder_path(summary)
    check_one_encoder_path(summary.iloc[:1])  # one path: fine


def test_every_shipped_method_is_registered_with_its_notebook():
    for name in ("sam_prompting", "fewshot", "nnunet"):
        method = get_method(name)
        assert (REPO / "notebooks" / method.notebook).exists() and get_method(method.command) is method


def _interrupted_after(cases: int, monkeypatch) -> list[str]:
    """Make the evaluation loop fail when it loads case ``cases + 1``; returns the cases it loaded."""
    import fewsam_lib.bench.evaluate as evaluation

    loaded, load = [], evaluation.load_case

    def failing_load(manifest, case_id):
        if len(loaded) == cases:
            raise KeyboardInterrupt  # what a session's end does to a run
        loaded.append(case_id)
        return load(manifest, case_id)

    monkeypatch.setattr(evaluation, "load_case", failing_load)
    return loaded


def test_an_interrupted_run_goes_on_from_its_last_finished_case(tmp_path, monkeypatch):
    within = {"variants": ["nearest_slice"], "steps": [2], "seeds": [0]}
    profile = profile_file(tmp_path, within_volume=within, test_cases=3)
    (run,) = load_profile(profile).runs()
    whole = evaluate(run, results_dir=tmp_path / "whole", progress=False)

    loaded = _interrupted_after(2, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(run, results_dir=tmp_path / "resumed", progress=False)
    folder = planned_folder(run, tmp_path / "resumed")
    progress = json.loads((folder / ".progress.json").read_text())
    assert list(progress["cases"]) == loaded and progress["case_count"] == 3 and not (folder / ".complete").exists()
    assert sorted(p.name for p in (folder / "predictions").iterdir()) == [f"{case}.nii.gz" for case in loaded]

    monkeypatch.undo()
    _interrupted_after(0, monkeypatch)  # stopped again before it finishes a case: nothing is lost
    with pytest.raises(KeyboardInterrupt):
        evaluate(run, results_dir=tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    loaded_again = _interrupted_after(3, monkeypatch)
    evaluate(run, results_dir=tmp_path / "resumed", progress=False)
    assert len(loaded_again) == 1 and loaded_again[0] not in loaded  # the finished cases are kept
    meta, metrics = load_run(folder)
    assert [attempt["cases_before"] for attempt in meta["attempts"]] == [0, 2, 2]
    assert meta["timings_s"]["total"] >= meta["timings_s"]["segment"] > 0
    assert not (folder / ".progress.json").exists()
    pd.testing.assert_frame_equal(metrics, load_run(whole)[1])
    assert meta["withheld_slices"] == load_run(whole)[0]["withheld_slices"]


@pytest.mark.parametrize("change", ["identity", "slab"])
def test_an_unfinished_attempt_of_other_code_or_settings_is_started_again(tmp_path, monkeypatch, change):
    within = {"variants": ["nearest_slice"], "steps": [2], "seeds": [0]}
    (run,) = load_profile(profile_file(tmp_path, within_volume=within, test_cases=2)).runs()
    _interrupted_after(1, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(run, results_dir=tmp_path / "results", progress=False)
    folder = planned_folder(run, tmp_path / "results")
    if change == "identity":  # as other code, libraries or parameters would make it
        progress = json.loads((folder / ".progress.json").read_text())
        (folder / ".progress.json").write_text(json.dumps({**progress, "identity": "made by other code"}))
    else:  # the same profile file, its slab grown: the kept case would be scored on other slices
        profile_file(tmp_path, within_volume=within, test_cases=2, test_slices=6)

    monkeypatch.undo()
    loaded = _interrupted_after(2, monkeypatch)
    evaluate(run, results_dir=tmp_path / "results", progress=False)
    assert len(loaded) == 2 and "attempts" not in load_run(folder)[0]
