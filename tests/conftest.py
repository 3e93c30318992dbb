"""Shared fixtures: the real hippocampus data (``FEWSAM_DATA``) and the real verified backbones."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("FEWSAM_DATA", str((REPO.parent / "shared" / "data").resolve()))
HIPPOCAMPUS_MANIFEST = REPO / "data_manifests" / "msd_hippocampus.yaml"
OPENKBP_MANIFEST = REPO / "data_manifests" / "openkbp_hn_ct.yaml"
OPENKBP_SOURCE = Path(os.environ["FEWSAM_DATA"]) / "open-kbp" / "provided-data"

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def hippocampus():
    from fewsam_lib.data.manifest import load_manifest

    return load_manifest(HIPPOCAMPUS_MANIFEST)


@pytest.fixture(scope="session")
def hippocampus_slices(hippocampus):
    """Four real grey-level slices of the first test case that contain hippocampus."""
    from fewsam_lib.data.volumes import load_case, normalise_intensity, take_slice

    case_id = hippocampus.case_ids("test")[0]
    volume = load_case(hippocampus, case_id)
    grey = normalise_intensity(volume.image, hippocampus.intensity)
    axis = hippocampus.slice_axis
    labelled = [i for i in range(grey.shape[axis]) if take_slice(volume.label, axis, i).any()]
    middle = len(labelled) // 2
    return [take_slice(grey, axis, i) for i in labelled[middle - 2 : middle + 2]]


# The converted datasets: converter name -> its source under FEWSAM_DATA.
CONVERTED_SOURCES = {
    "openkbp": OPENKBP_SOURCE,
    "chest-xray": Path(os.environ["FEWSAM_DATA"]) / "covid-19-chest-xray-segmentations-dataset",
    "spine": Path(os.environ["FEWSAM_DATA"])
    / "fastcleverseg"
    / "ImageDatasets"
    / "VBs"
    / "VB3"
    / "Isotropic"
    / "Matlab",
}


@pytest.fixture(scope="session")
def converted_datasets(tmp_path_factory) -> Path:
    """A FEWSAM_CONVERTED with a complete conversion of every converted dataset: the user's own
    where it is complete, fresh ones (in a temporary folder) for the others."""
    from fewsam_lib import paths
    from fewsam_lib.data.convert import get_converter

    user = paths.converted_root()
    converters = {name: get_converter(name) for name in CONVERTED_SOURCES}
    complete = {name for name, c in converters.items() if c.is_converted(user / c.dataset, CONVERTED_SOURCES[name])}
    if complete == set(converters):
        return user
    root = tmp_path_factory.mktemp("converted")
    for name, converter in converters.items():
        if name in complete:
            (root / converter.dataset).symlink_to(user / converter.dataset)
        else:
            converter.convert(CONVERTED_SOURCES[name], root / converter.dataset, progress=False)
    os.environ["FEWSAM_CONVERTED"] = str(root)
    return root


@pytest.fixture(scope="session")
def openkbp(converted_datasets):
    """The OpenKBP manifest over a complete conversion."""
    from fewsam_lib.data.manifest import load_manifest

    return load_manifest(OPENKBP_MANIFEST)


@pytest.fixture(scope="session")
def chest_xray(converted_datasets):
    from fewsam_lib.data.manifest import load_manifest

    return load_manifest(REPO / "data_manifests" / "chest_xray.yaml")


@pytest.fixture(scope="session")
def spine(converted_datasets):
    from fewsam_lib.data.manifest import load_manifest

    return load_manifest(REPO / "data_manifests" / "spine_vb3.yaml")


@pytest.fixture(scope="session")
def mobile_sam():
    from fewsam_lib.encoders.backbones import load_backbone

    return load_backbone("mobile_sam")


@pytest.fixture(scope="session")
def lite_medsam():
    from fewsam_lib.encoders.backbones import load_backbone

    return load_backbone("lite_medsam")


@pytest.fixture
def mini_dataset(tmp_path, hippocampus):
    """A writable copy of three real hippocampus cases and a manifest for them (for breaking)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    case_ids = hippocampus.case_ids("train")[:2] + hippocampus.case_ids("test")[:1]
    for case_id in case_ids:
        case = hippocampus.case(case_id)
        shutil.copy(case.image, root / "images" / case.image.name)
        shutil.copy(case.label, root / "labels" / case.label.name)
    return root, case_ids


def write_manifest(path: Path, root: Path, case_ids: list[str], **overrides) -> Path:
    """A manifest in the shipped format over ``case_ids`` under ``root``; keys can be overridden."""
    import yaml

    manifest = {
        "dataset": "mini_hippocampus",
        "modality": "MRI",
        "root": str(root),
        "pairs": {"glob": {"image": "images/*.nii.gz", "label": "labels/{case_id}.nii.gz"}},
        "labels": {1: "anterior", 2: "posterior"},
        "slice_axis": "axial",
        "intensity": {"mode": "percentile", "lower": 0.5, "upper": 99.5},
        "split": {"train": case_ids[:-1], "test": case_ids[-1:]},
    }
    manifest.update(overrides)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tests never read or write the user's embedding cache (papermill kernels inherit this too)."""
    previous = os.environ.get("FEWSAM_CACHE")
    os.environ["FEWSAM_CACHE"] = str(tmp_path_factory.mktemp("embedding-cache"))
    yield Path(os.environ["FEWSAM_CACHE"])
    if previous is None:
        os.environ.pop("FEWSAM_CACHE")
    else:
        os.environ["FEWSAM_CACHE"] = previous


def _smoke_run(
    tmp_path_factory,
    method: str,
    variant: str,
    shots: int | None = None,
    backbone: str = "mobile_sam",
    budget: str | None = None,
    manifest: Path = HIPPOCAMPUS_MANIFEST,
) -> Path:
    """One run of the smoke profile executed through its notebook, in a results folder of its own."""
    from fewsam_lib.bench.notebooks import run_notebook
    from fewsam_lib.bench.profiles import PlannedRun

    results = tmp_path_factory.mktemp(f"{method}-results")
    return run_notebook(
        PlannedRun(method, str(manifest), backbone, variant, 0, "smoke", shots, budget), results_dir=results
    )


@pytest.fixture(scope="session")
def prompting_smoke_run(tmp_path_factory) -> Path:
    """Run folder of 10_sam_prompting (mobile_sam, box, smoke profile: one real test case)."""
    return _smoke_run(tmp_path_factory, "sam_prompting", "box")


@pytest.fixture(scope="session")
def fewshot_smoke_run(tmp_path_factory) -> Path:
    """Run folder of 20_fewshot (mobile_sam, 5 shots, the smoke profile's short schedule)."""
    return _smoke_run(tmp_path_factory, "fewshot", "centred", shots=5)


@pytest.fixture(scope="session")
def nnunet_roots(tmp_path_factory):
    """nnU-Net's raw/preprocessed/results folders for this session (nnunetv2 reads them from the env)."""
    from fewsam_lib.paths import NNUNET_VARIABLES

    root = tmp_path_factory.mktemp("nnunet")
    saved = {variable: os.environ.get(variable) for variable in NNUNET_VARIABLES.values()}
    for role, variable in NNUNET_VARIABLES.items():
        os.environ[variable] = str(root / role)
    yield root
    for variable, value in saved.items():
        if value is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = value


@pytest.fixture(scope="session")
def nnunet_smoke_run(nnunet_roots, tmp_path_factory) -> Path:
    """Run folder of 30_nnunet: plan -> train (1 epoch of 2 iterations) -> predict, matched budget."""
    return _smoke_run(tmp_path_factory, "nnunet", "2d-nnUNetTrainer_fewsamSmoke", backbone="none", budget="matched")


@pytest.fixture(scope="session")
def ct_smoke_runs(openkbp, nnunet_roots, tmp_path_factory) -> list[Path]:
    """The smoke profile's three runs on head-and-neck CT (box prompts, 1 shot, nnU-Net matched)."""
    return [
        _smoke_run(tmp_path_factory, "sam_prompting", "box", manifest=OPENKBP_MANIFEST),
        _smoke_run(tmp_path_factory, "fewshot", "centred", shots=1, manifest=OPENKBP_MANIFEST),
        _smoke_run(
            tmp_path_factory,
            "nnunet",
            "2d-nnUNetTrainer_fewsamSmoke",
            backbone="none",
            budget="matched",
            manifest=OPENKBP_MANIFEST,
        ),
    ]


@pytest.fixture(scope="session")
def new_dataset_smoke_runs(converted_datasets, nnunet_roots, tmp_path_factory) -> list[list[Path]]:
    """The smoke profile's SAM, few-shot and nnU-Net runs on the chest X-rays (one image) and the
    spine MRI (a slab), in that order: [[sam, few-shot, nnU-Net] per dataset]."""
    from fewsam_lib.bench.notebooks import run_notebook
    from fewsam_lib.bench.profiles import load_profile

    results = tmp_path_factory.mktemp("new-dataset-results")
    runs = [run for run in load_profile("smoke").runs() if run.method != "within_volume"]
    return [
        [run_notebook(run, results_dir=results) for run in runs if run.manifest.endswith(f"/{dataset}.yaml")]
        for dataset in ("chest_xray", "spine_vb3")
    ]


@pytest.fixture(scope="session")
def within_volume_smoke_runs(tmp_path_factory, openkbp) -> list:
    """The smoke profile's within-volume runs through 40_within_volume (hippocampus and CT slabs)."""
    from fewsam_lib.bench.notebooks import run_notebook
    from fewsam_lib.bench.profiles import load_profile

    results = tmp_path_factory.mktemp("within-volume-results")
    runs = [run for run in load_profile("smoke").runs() if run.method == "within_volume"]
    return [run_notebook(run, results_dir=results) for run in runs]


def results_dir_of(run_folder: Path) -> Path:
    """results/runs/<dataset>/<method>/<run_id> -> results."""
    return run_folder.parents[3]


def assert_predictions_reproduce_the_metrics(run_folder: Path) -> None:
    """Reload a run's saved predictions and recompute its metric rows with the shared metric code."""
    from fewsam_lib.bench.runs import verify_run

    problems = verify_run(run_folder)
    assert not problems, "\n".join(problems[:10])
