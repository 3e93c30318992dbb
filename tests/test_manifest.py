"""Manifests and ``fewsam validate`` on the real hippocampus data and on broken copies of it."""

from __future__ import annotations

import gzip
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import HIPPOCAMPUS_MANIFEST, write_manifest

from fewsam_lib.cli import main
from fewsam_lib.data.manifest import draw_split, load_manifest
from fewsam_lib.errors import ManifestError


def test_hippocampus_manifest_describes_the_decathlon_task(hippocampus):
    assert hippocampus.dataset == "msd_hippocampus"
    assert hippocampus.modality == "MRI"
    assert len(hippocampus.cases) == 260
    assert hippocampus.tasks == {1: "anterior", 2: "posterior"}
    assert hippocampus.slice_axis == 2
    train, test = hippocampus.split["train"], hippocampus.split["test"]
    assert (len(train), len(test)) == (208, 52)
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(hippocampus.cases)


def test_hippocampus_split_is_the_recorded_seeded_draw(hippocampus):
    drawn = draw_split(list(hippocampus.cases), test_fraction=0.2, seed=hippocampus.split_seed)
    assert drawn == {name: list(ids) for name, ids in hippocampus.split.items()}
    assert draw_split(list(hippocampus.cases), 0.2, seed=1) != drawn


def test_validate_passes_on_the_real_hippocampus_manifest(capsys):
    assert main(["validate", "--quiet", str(HIPPOCAMPUS_MANIFEST)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "260 cases" in out and "PROBLEM" not in out


def test_unset_data_root_names_the_variable(monkeypatch):
    monkeypatch.delenv("FEWSAM_DATA")
    with pytest.raises(ManifestError, match=r"FEWSAM_DATA.*not set"):
        load_manifest(HIPPOCAMPUS_MANIFEST)


def _first_label(root):
    return sorted((root / "labels").iterdir())[0]


def _first_image(root):
    return sorted((root / "images").iterdir())[0]


def _delete_label(root):
    path = _first_label(root)
    path.unlink()
    return path.name, "does not exist"


def _truncate_image(root):
    path = _first_image(root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.name, "corrupt NIfTI"


def _garbage_image(root):
    path = _first_image(root)
    path.write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    return path.name, "not a readable NIfTI"


def _crop_label(root):
    path = _first_label(root)
    label = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:-2], label.affine), path)
    return path.name, "label shape"


def _shift_label_affine(root):
    path = _first_label(root)
    label = nib.load(path)
    affine = label.affine.copy()
    affine[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), affine), path)
    return path.name, "affine differs"


def _foreign_label_value(root):
    path = _first_label(root)
    label = nib.load(path)
    data = np.asarray(label.dataobj).copy()
    data[data == 2] = 7
    nib.save(nib.Nifti1Image(data, label.affine, label.header), path)
    return path.name, "label values [7]"


BREAKAGES = {
    "missing file": _delete_label,
    "truncated NIfTI": _truncate_image,
    "not a NIfTI": _garbage_image,
    "shape mismatch": _crop_label,
    "affine mismatch": _shift_label_affine,
    "label outside the map": _foreign_label_value,
}


def test_mini_copy_is_valid(tmp_path, mini_dataset, capsys):
    root, case_ids = mini_dataset
    manifest = write_manifest(tmp_path / "mini.yaml", root, case_ids)
    assert main(["validate", "--quiet", str(manifest)]) == 0


@pytest.mark.parametrize("breakage", BREAKAGES, ids=list(BREAKAGES))
def test_validate_reports_each_broken_file(breakage, tmp_path, mini_dataset, capsys):
    root, case_ids = mini_dataset
    file_name, message = BREAKAGES[breakage](root)
    manifest = write_manifest(tmp_path / "mini.yaml", root, case_ids)
    assert main(["validate", "--quiet", str(manifest)]) == 1
    problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 1, problems
    assert file_name in problems[0] and message in problems[0]


def test_validate_reports_a_task_without_voxels(tmp_path, mini_dataset, capsys):
    root, case_ids = mini_dataset
    manifest = write_manifest(tmp_path / "mini.yaml", root, case_ids, labels={1: "anterior", 2: "posterior", 3: "tail"})
    assert main(["validate", "--quiet", str(manifest)]) == 1
    assert "task 'tail' (label 3) has no labelled voxels" in capsys.readouterr().out


def test_validate_reports_split_problems(tmp_path, mini_dataset, capsys):
    root, case_ids = mini_dataset
    manifest = write_manifest(
        tmp_path / "mini.yaml", root, case_ids, split={"train": case_ids + ["hippocampus_999"], "test": []}
    )
    assert main(["validate", "--quiet", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "split 'test' is empty" in out
    assert "hippocampus_999" in out


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"slice_axis": "oblique"}, "slice_axis must be"),
        ({"labels": {0: "background"}}, "0 is background"),
        ({"intensity": {"mode": "window", "level": 40}}, "intensity window"),
        ({"pairs": {"folders": "x"}}, "unknown pairs kind"),
        ({"dataset": None}, "missing required field 'dataset'"),
    ],
)
def test_malformed_manifest_fields_are_named(overrides, message, tmp_path, mini_dataset, capsys):
    root, case_ids = mini_dataset
    manifest = write_manifest(tmp_path / "mini.yaml", root, case_ids, **overrides)
    assert main(["validate", "--quiet", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert message in out and str(manifest) in out


def test_console_script_prints_no_traceback(tmp_path, mini_dataset):
    root, case_ids = mini_dataset
    _truncate_image(root)
    manifest = write_manifest(tmp_path / "mini.yaml", root, case_ids)
    result = subprocess.run(
        [sys.executable, "-m", "fewsam_lib.cli", "validate", "--quiet", str(manifest)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert "corrupt NIfTI" in result.stdout
