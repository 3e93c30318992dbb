"""OpenKBP conversion on real patients: values, labels voxel for voxel, spacing, orientation, errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import OPENKBP_MANIFEST, OPENKBP_SOURCE

from fewsam_lib.data.convert import ConversionError
from fewsam_lib.data.manifest import load_manifest
from fewsam_lib.data.openkbp import (
    OPENKBP_LABELS,
    ConvertedPatient,
    Patient,
    convert_openkbp,
    find_patients,
    openkbp_manifest_text,
    orientation_problems,
    read_patient,
)
from fewsam_lib.errors import ManifestError

TRAIN_PATIENT = "pt_1"  # all five organs contoured


@pytest.fixture(scope="module")
def converted_patient(tmp_path_factory):
    destination = tmp_path_factory.mktemp("openkbp") / "converted"
    convert_openkbp(OPENKBP_SOURCE, destination, case_ids=[TRAIN_PATIENT], progress=False)
    return destination


def _source_indices(name: str) -> np.ndarray:
    return pd.read_csv(OPENKBP_SOURCE / "train-pats" / TRAIN_PATIENT / f"{name}.csv", index_col=0).index.to_numpy()


def test_converted_ct_is_in_plausible_hounsfield_units(converted_patient):
    image = nib.load(str(converted_patient / "imagesTr" / f"{TRAIN_PATIENT}.nii.gz"))
    hu = np.asarray(image.dataobj)
    assert hu.dtype == np.int16 and hu.shape == (128, 128, 128)
    assert hu.min() == -1000  # unlisted voxels are air
    assert 1000 < hu.max() < 4000
    body = hu > -500
    assert 0.01 < body.mean() < 0.5
    assert -100 < np.median(hu[body]) < 100  # mostly soft tissue
    ct = pd.read_csv(OPENKBP_SOURCE / "train-pats" / TRAIN_PATIENT / "ct.csv", index_col=0)
    assert np.array_equal(hu.ravel()[ct.index.to_numpy()], ct["data"].to_numpy() - 1000)


def test_spacing_is_preserved(converted_patient):
    source = np.loadtxt(OPENKBP_SOURCE / "train-pats" / TRAIN_PATIENT / "voxel_dimensions.csv")
    for folder in ("imagesTr", "labelsTr"):
        zooms = nib.load(str(converted_patient / folder / f"{TRAIN_PATIENT}.nii.gz")).header.get_zooms()
        assert np.allclose(zooms, source, atol=1e-4)


def test_every_label_matches_its_source_file_voxel_for_voxel(converted_patient):
    label = np.asarray(nib.load(str(converted_patient / "labelsTr" / f"{TRAIN_PATIENT}.nii.gz")).dataobj).ravel()
    sources = {value: _source_indices(name) for value, name in OPENKBP_LABELS.items()}
    sizes = {value: indices.size for value, indices in sources.items()}
    for value, indices in sources.items():
        written = np.flatnonzero(label == value)
        assert np.isin(written, indices).all(), f"{OPENKBP_LABELS[value]} written outside its contour"
        lost = np.setdiff1d(indices, written)
        # A voxel is only lost to a smaller structure whose contour also holds it.
        for voxel in lost:
            assert sizes[int(label[voxel])] < sizes[value] and voxel in sources[int(label[voxel])]
    assert set(np.unique(label)) == {0, *OPENKBP_LABELS}


def test_mandible_is_bone_and_the_cord_lies_inside_the_vertebrae(converted_patient):
    hu = np.asarray(nib.load(str(converted_patient / "imagesTr" / f"{TRAIN_PATIENT}.nii.gz")).dataobj)
    assert np.median(hu.ravel()[_source_indices("Mandible")]) > 300
    patient = next(p for p in find_patients(OPENKBP_SOURCE) if p.case_id == TRAIN_PATIENT)
    assert orientation_problems(patient, read_patient(patient)) == []


def test_orientation_checks_catch_a_wrong_index_order_or_side():
    patient = next(p for p in find_patients(OPENKBP_SOURCE) if p.case_id == TRAIN_PATIENT)
    right = read_patient(patient)
    fortran = ConvertedPatient(
        right.hu.transpose(),
        {k: m.transpose() for k, m in right.masks.items()},
        right.label.transpose(),
        right.voxel_size,
    )
    assert any("head to feet" in p for p in orientation_problems(patient, fortran))
    mirrored = ConvertedPatient(
        right.hu[:, ::-1], {k: m[:, ::-1] for k, m in right.masks.items()}, right.label[:, ::-1], right.voxel_size
    )
    assert any("LeftParotid" in p for p in orientation_problems(patient, mirrored))


def test_converted_case_loads_through_a_manifest_in_ras(openkbp):
    from fewsam_lib.data.volumes import load_case

    volume = load_case(openkbp, TRAIN_PATIENT)
    assert np.allclose(volume.spacing, (3.906, 3.906, 2.5), atol=1e-3)
    centroid = {name: np.argwhere(volume.label == value).mean(axis=0) for value, name in openkbp.tasks.items()}
    assert centroid["Brainstem"][2] > centroid["SpinalCord"][2]  # superior = larger z in RAS+
    assert centroid["LeftParotid"][0] < centroid["RightParotid"][0]  # patient's left = smaller x


def test_committed_manifest_is_what_the_converter_writes():
    assert OPENKBP_MANIFEST.read_text() == openkbp_manifest_text(OPENKBP_SOURCE)


def test_openkbp_manifest_splits_and_annotations(openkbp):
    assert openkbp.modality == "CT" and openkbp.task_names == list(OPENKBP_LABELS.values())
    patients = {p.case_id: p for p in find_patients(OPENKBP_SOURCE)}
    assert {patients[c].split for c in openkbp.case_ids("train")} == {"train"}
    assert sorted(openkbp.case_ids("test")) == sorted(c for c, p in patients.items() if p.split == "test")
    assert all(not openkbp.not_annotated.get(c) for c in openkbp.case_ids("train"))
    assert "Mandible" not in openkbp.annotated_tasks("pt_203").values()
    assert len(openkbp.annotated_tasks("pt_201")) == 5


def test_unannotated_tasks_are_not_scored(openkbp):
    from fewsam_lib.bench.runs import RunSpec, score_case
    from fewsam_lib.data.volumes import load_case

    volume = load_case(openkbp, "pt_203")  # no mandible contour
    spec = RunSpec(openkbp.dataset, "fewshot", "mobile_sam", "centred", 0, "smoke", shots=1)
    prediction = np.zeros_like(volume.label)
    rows = score_case(openkbp, spec, volume, prediction, slices=[], slice_selection="all_slices")
    assert {row["task"] for row in rows} == set(openkbp.task_names) - {"Mandible"}


def test_a_training_case_without_every_annotation_is_refused(tmp_path, openkbp):
    text = OPENKBP_MANIFEST.read_text().replace("  pt_3: [Mandible]", "  pt_1: [Mandible]\n  pt_3: [Mandible]")
    broken = tmp_path / "openkbp.yaml"
    broken.write_text(text)
    with pytest.raises(ManifestError, match="training case 'pt_1' lacks annotations of Mandible"):
        load_manifest(broken)


def _patient_copy(tmp_path) -> Patient:
    folder = tmp_path / "provided-data" / "train-pats" / TRAIN_PATIENT
    shutil.copytree(OPENKBP_SOURCE / "train-pats" / TRAIN_PATIENT, folder)
    (tmp_path / "provided-data" / "validation-pats").mkdir()
    return Patient(TRAIN_PATIENT, folder, "train")


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("ct.csv", ",data\n12,abc\n", "line 2: the value is not a number"),
        ("ct.csv", "index,value\n12,30\n", "expected the OpenKBP header"),
        ("Mandible.csv", ",data\n2097152,\n", "flat indices must be integers in"),
        ("Mandible.csv", ",data\nx,\n", "integer flat voxel indices"),
        ("Brainstem.csv", ",data\n", "lists no voxel"),
        ("voxel_dimensions.csv", "3.9\n3.9\n", "expected three positive voxel sizes"),
    ],
)
def test_malformed_source_files_are_named(tmp_path, file, content, message):
    patient = _patient_copy(tmp_path)
    (patient.folder / file).write_text(content)
    destination = tmp_path / "converted"
    with pytest.raises(ConversionError, match=message) as error:
        convert_openkbp(tmp_path / "provided-data", destination, progress=False)
    assert str(patient.folder / file) in str(error.value)
    assert not destination.exists() and not list(tmp_path.glob(".converted-*"))  # nothing half-written


def test_cli_reports_a_malformed_file_without_traceback(tmp_path):
    patient = _patient_copy(tmp_path)
    (patient.folder / "ct.csv").write_text(",data\n12,abc\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fewsam_lib.cli",
            "convert",
            "openkbp",
            str(tmp_path / "provided-data"),
            str(tmp_path / "out"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "ct.csv: line 2" in result.stderr


def test_a_second_conversion_does_no_work(tmp_path):
    _patient_copy(tmp_path)
    destination = convert_openkbp(tmp_path / "provided-data", tmp_path / "converted", progress=False)
    written = (destination / "imagesTr" / f"{TRAIN_PATIENT}.nii.gz").stat().st_mtime_ns
    convert_openkbp(tmp_path / "provided-data", destination, progress=False)
    assert (destination / "imagesTr" / f"{TRAIN_PATIENT}.nii.gz").stat().st_mtime_ns == written
    with pytest.raises(ConversionError, match="holds a conversion already"):
        convert_openkbp(tmp_path / "provided-data", destination, case_ids=[TRAIN_PATIENT], progress=False)


def test_validation_flags_a_not_annotated_task_that_has_voxels(tmp_path, openkbp):
    from fewsam_lib.data.validation import validate

    text = OPENKBP_MANIFEST.read_text().replace("  pt_203: [Mandible]", "  pt_201: [Mandible]\n  pt_203: [Mandible]")
    broken = tmp_path / "openkbp.yaml"
    broken.write_text(text)
    report = validate(broken, progress=False)
    assert report.cases_checked == 64
    assert len(report.problems) == 1  # everything else of the real conversion is valid
    assert "pt_201.nii.gz: task 'Mandible' is listed as not annotated" in report.problems[0]
