"""The chest X-ray and spine converters on real files: labels pixel for pixel, orientation, errors."""

from __future__ import annotations

import csv
import shutil

import nibabel as nib
import numpy as np
import pytest
import scipy.io
import yaml
from conftest import CONVERTED_SOURCES, REPO
from PIL import Image

from fewsam_lib.data.chest_xray import CHEST_XRAY_LABELS, chest_xray_manifest_text, convert_chest_xray, find_images
from fewsam_lib.data.convert import ConversionError
from fewsam_lib.data.manifest import load_manifest
from fewsam_lib.data.spine import SPINE_LABELS, convert_spine, spine_manifest_text
from fewsam_lib.data.validation import validate
from fewsam_lib.data.volumes import load_case, load_volume

XRAY_SOURCE = CONVERTED_SOURCES["chest-xray"]
SPINE_SOURCE = CONVERTED_SOURCES["spine"]
# Real images from RGB JPEG, grey JPEG and RGBA PNG files; the last has two right-lung masks and
# no airways.
XRAY_IMAGES = [
    "X-ray_of_cyst_in_pneumocystis_pneumonia_1",
    "SARS-10_1148rg_242035193-g04mr34g04a-Fig4a-day7",
    "23E99E2E-447C-46E5-8EB2-D35D12473C39",
    "auntminnie-d-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus",
]


def _structure_rows(filenames: set[str]) -> list[dict[str, str]]:
    with open(XRAY_SOURCE / "structure.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["Filename"] in filenames]


@pytest.fixture(scope="module")
def xray_converted(tmp_path_factory):
    destination = tmp_path_factory.mktemp("xray") / "chest_xray"
    return convert_chest_xray(XRAY_SOURCE, destination, case_ids=XRAY_IMAGES, progress=False)


def _pasted(row: dict[str, str]) -> np.ndarray:
    """The test's own paste of one mask: the README's rule, written independently of the converter."""
    width, height = (int(n) for n in row["Resolution"].split("x"))
    crop = np.asarray(Image.open(XRAY_SOURCE / row["Mask"]))[..., 0] > 127
    full = np.zeros((height, width), dtype=bool)
    top, left = int(row["Top"]), int(row["Left"])
    full[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    return full


def test_every_xray_label_is_its_masks_pasted_at_their_boxes(xray_converted):
    images = {image.case_id: image for image in find_images(XRAY_SOURCE)}
    names = {"Left Lung": "LeftLung", "Right Lung": "RightLung"}
    names.update({"Cardiomediastinum": "Cardiomediastinum", "Airways": "Airways"})
    values = {name: value for value, name in CHEST_XRAY_LABELS.items()}
    for case_id in XRAY_IMAGES:
        label = np.asarray(nib.load(str(xray_converted / "labelsTr" / f"{case_id}.nii.gz")).dataobj)
        grey = np.asarray(nib.load(str(xray_converted / "imagesTr" / f"{case_id}.nii.gz")).dataobj)
        source = Image.open(images[case_id].image)
        assert label.shape == grey.shape == (source.height, source.width)
        assert np.array_equal(grey, np.asarray(source.convert("L")))  # grey levels as displayed
        expected: dict[str, np.ndarray] = {}
        for row in _structure_rows({images[case_id].image.name}):
            if row["Template Name"] in names and row["Mask"]:
                task = names[row["Template Name"]]
                expected[task] = expected.get(task, False) | _pasted(row)
        assert set(expected) == set(CHEST_XRAY_LABELS.values()) - set(images[case_id].missing)
        for task, mask in expected.items():
            written = label == values[task]
            smaller = [other for other in expected if expected[other].sum() < mask.sum()]
            covered = np.logical_or.reduce([expected[other] for other in smaller]) if smaller else False
            # Every pixel of the mask carries its label, except where a smaller structure lies on it.
            assert np.array_equal(written, mask & ~covered), (case_id, task)
        assert not label[~np.logical_or.reduce(list(expected.values()))].any()


def test_the_left_lung_is_on_the_images_right_in_a_pa_view(xray_converted, chest_xray):
    views = {image.case_id: image.view for image in find_images(XRAY_SOURCE)}
    assert [views[case_id] for case_id in XRAY_IMAGES] == ["PA"] * len(XRAY_IMAGES)
    for case_id in XRAY_IMAGES:
        label = np.asarray(nib.load(str(xray_converted / "labelsTr" / f"{case_id}.nii.gz")).dataobj)
        left, right = (np.nonzero(label == value)[1].mean() for value in (1, 2))
        assert left > right + label.shape[1] / 5
    # The whole dataset, as every method loads it: one slice of rows x columns, not reoriented.
    volume = load_case(chest_xray, XRAY_IMAGES[0])
    raw = np.asarray(nib.load(str(chest_xray.case(XRAY_IMAGES[0]).label)).dataobj)
    assert volume.label.shape == (*raw.shape, 1) and chest_xray.slice_axis == 2
    assert np.array_equal(volume.label[:, :, 0], raw)


def test_dataset_json_names_each_images_patient_and_validation_keeps_patients_whole(xray_converted, chest_xray):
    """Several images of one patient (days of one illness) are near copies: a validation case whose
    patient also trains would flatter the curve that chooses a schedule."""
    with open(XRAY_SOURCE / "metadata.csv", newline="") as handle:
        patient_of = {row["filename"]: row["patientid"] for row in csv.DictReader(handle)}
    images = {image.case_id: image.image.name for image in find_images(XRAY_SOURCE)}
    converted = load_manifest_over(xray_converted)
    assert {case: converted.case(case).patient for case in XRAY_IMAGES} == {
        case: patient_of[images[case]] for case in XRAY_IMAGES
    }
    view = chest_xray.validation_view(0.2, 0)
    patients = {side: {chest_xray.case(case).patient for case in view.split[side]} for side in ("train", "test")}
    assert patients["train"] and patients["test"] and not patients["train"] & patients["test"]
    assert set(view.split["train"]) | set(view.split["test"]) == set(chest_xray.split["train"])
    training_patients = {chest_xray.case(case).patient for case in chest_xray.split["train"]}
    assert len(patients["test"]) == round(0.2 * len(training_patients))
    # Drawn by case, some carved images would share a patient with the training side.
    assert len(training_patients) < len(chest_xray.split["train"])


def load_manifest_over(root):
    """A manifest over a conversion of a few images, as the committed one reads its dataset.json."""
    manifest = root.parent / "few_xrays.yaml"
    committed = yaml.safe_load((REPO / "data_manifests" / "chest_xray.yaml").read_text())
    fields = {
        key: committed[key] for key in ("dataset", "modality", "pairs", "labels", "image_dimensions", "intensity")
    }
    split = {"train": XRAY_IMAGES[:2], "test": XRAY_IMAGES[2:]}
    manifest.write_text(yaml.safe_dump({**fields, "root": str(root), "split": split}))
    return load_manifest(manifest)


def test_a_2d_prediction_goes_back_as_a_2d_nifti_on_the_images_grid(chest_xray, tmp_path):
    volume = load_case(chest_xray, XRAY_IMAGES[1])
    predicted = (volume.label > 0).astype(np.uint8)
    volume.save_on_original_grid(predicted, tmp_path / "prediction.nii.gz")
    written = nib.load(str(tmp_path / "prediction.nii.gz"))
    assert written.shape == volume.original_shape and len(written.shape) == 2
    assert np.array_equal(volume.read_on_canonical_grid(tmp_path / "prediction.nii.gz"), predicted)


def test_a_3d_file_in_a_dataset_of_2d_images_is_a_validation_problem(chest_xray, tmp_path):
    case = chest_xray.case(XRAY_IMAGES[2])
    image = nib.load(str(case.image))
    root = tmp_path / "data"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    volume = np.asarray(image.dataobj)[:, :, None].repeat(2, axis=2)
    nib.save(nib.Nifti1Image(volume, image.affine), str(root / "imagesTr" / "a.nii.gz"))
    nib.save(nib.Nifti1Image((volume > 128).astype(np.uint8), image.affine), str(root / "labelsTr" / "a.nii.gz"))
    shutil.copy(case.image, root / "imagesTr" / "b.nii.gz")
    shutil.copy(case.label, root / "labelsTr" / "b.nii.gz")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"dataset: d\nmodality: XR\nroot: {root}\npairs:\n  glob:\n    image: 'imagesTr/*.nii.gz'\n"
        "    label: 'labelsTr/{case_id}.nii.gz'\nlabels: {1: LeftLung}\nimage_dimensions: 2\n"
        "intensity: {mode: none}\nsplit: {train: [a], test: [b]}\n"
    )
    report = validate(manifest, progress=False)
    assert any("a.nii.gz: a 3D file" in problem and "image_dimensions: 2" in problem for problem in report.problems)
    manifest.write_text(manifest.read_text() + "slice_axis: axial\n")
    with pytest.raises(Exception, match="has no slice_axis"):
        load_manifest(manifest)


def _xray_copy(tmp_path, break_row=None, drop_mask=False):
    """A copy of the source reduced to the three images, optionally with one broken row or mask."""
    source = tmp_path / "xray-source"
    (source / "masks").mkdir(parents=True)
    shutil.copy(XRAY_SOURCE / "metadata.csv", source)
    (source / "images").symlink_to(XRAY_SOURCE / "images")
    filenames = {image.image.name for image in find_images(XRAY_SOURCE) if image.case_id in XRAY_IMAGES}
    rows = _structure_rows(filenames)
    for row in rows:
        if row["Mask"]:
            shutil.copy(XRAY_SOURCE / row["Mask"], source / row["Mask"])
    anatomical = [i for i, row in enumerate(rows) if row["Template Name"] == "Right Lung"]
    if break_row is not None:
        rows[anatomical[0]][break_row[0]] = break_row[1]
    if drop_mask:
        (source / rows[anatomical[0]]["Mask"]).unlink()
    with open(source / "structure.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return source, anatomical[0] + 2, rows[anatomical[0]]["Mask"]


@pytest.mark.parametrize(
    "broken, message",
    [
        (("Top", "twelve"), r"structure\.csv: line {line}: Top must be an integer"),
        (("Resolution", "943 by 751"), r"structure\.csv: line {line}: Resolution must read WIDTHxHEIGHT"),
        # found while pasting, after other images were written: the scratch folder goes too
        (("Width", "7"), r"pixels, but its box \(.*structure\.csv: line {line}\) is 7x"),
    ],
)
def test_a_malformed_structure_row_is_named_and_nothing_is_written(tmp_path, broken, message):
    source, line, _ = _xray_copy(tmp_path, break_row=broken)
    with pytest.raises(ConversionError, match=message.format(line=line)):
        convert_chest_xray(source, tmp_path / "out" / "chest_xray", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_missing_mask_file_is_named_and_nothing_is_written(tmp_path):
    source, line, mask = _xray_copy(tmp_path, drop_mask=True)
    with pytest.raises(ConversionError, match=rf"line {line}: mask file .*{mask.split('/')[-1]} does not exist"):
        convert_chest_xray(source, tmp_path / "out" / "chest_xray", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_second_conversion_does_no_work(tmp_path):
    source, _, _ = _xray_copy(tmp_path)
    destination = convert_chest_xray(source, tmp_path / "out" / "chest_xray", progress=False)
    stamp = (destination / "conversion.json").stat().st_mtime_ns
    convert_chest_xray(source, destination, progress=False)
    assert (destination / "conversion.json").stat().st_mtime_ns == stamp


def test_the_committed_manifests_are_what_the_converters_write():
    assert (REPO / "data_manifests" / "chest_xray.yaml").read_text() == chest_xray_manifest_text(XRAY_SOURCE)
    assert (REPO / "data_manifests" / "spine_vb3.yaml").read_text() == spine_manifest_text(SPINE_SOURCE)


def test_the_xray_split_keeps_each_patient_in_one_split(chest_xray):
    patient = {image.case_id: image.patient for image in find_images(XRAY_SOURCE)}
    train = {patient[c] for c in chest_xray.case_ids("train")}
    test = {patient[c] for c in chest_xray.case_ids("test")}
    assert not train & test and len(chest_xray.case_ids("test")) >= 30
    assert set(chest_xray.not_annotated) <= set(chest_xray.case_ids("test"))


# --- spine ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spine_converted(tmp_path_factory):
    destination = tmp_path_factory.mktemp("spine") / "spine_vb3"
    return convert_spine(SPINE_SOURCE, destination, case_ids=["vb3_07", "vb3_01"], progress=False)


def test_spine_grey_levels_and_labels_are_kept_voxel_for_voxel_at_1_mm(spine_converted):
    source = scipy.io.loadmat(SPINE_SOURCE / "07.mat")
    image = nib.load(str(spine_converted / "imagesTr" / "vb3_07.nii.gz"))
    label = nib.load(str(spine_converted / "labelsTr" / "vb3_07.nii.gz"))
    assert np.array_equal(np.asarray(image.dataobj), source["I"]) and image.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(label.dataobj), source["GT"])
    assert image.header.get_zooms() == label.header.get_zooms() == (1.0, 1.0, 1.0)


def test_after_ras_loading_l1_is_above_l5_and_the_slices_are_sagittal(spine_converted):
    volume = load_volume(
        spine_converted / "imagesTr" / "vb3_07.nii.gz", spine_converted / "labelsTr" / "vb3_07.nii.gz", "vb3_07"
    )
    world = {
        name: (volume.affine @ np.append(np.argwhere(volume.label == value).mean(axis=0), 1.0))[:3]
        for value, name in SPINE_LABELS.items()
    }
    heights = [world[name][2] for name in SPINE_LABELS.values()]
    assert heights == sorted(heights, reverse=True)  # L1 highest, then L2 ... L5
    assert heights[0] - heights[4] > 100  # five bodies of about 3 cm each
    # Sagittal slices (canonical axis 0) are the source's 224x224 planes; 77 of them.
    assert volume.shape == (77, 224, 224)
    spine = load_manifest(REPO / "data_manifests" / "spine_vb3.yaml")
    assert spine.slice_axis == 0


def test_a_repeated_volume_is_left_out_of_the_dataset(spine):
    assert "vb3_19" not in spine.cases and "vb3_18" in spine.cases
    assert len(spine.cases) == 29


def test_a_malformed_mat_file_is_named_and_nothing_is_written(tmp_path):
    source = tmp_path / "Matlab"
    source.mkdir()
    shutil.copy(SPINE_SOURCE / "07.mat", source / "07.mat")
    content = scipy.io.loadmat(SPINE_SOURCE / "01.mat")
    scipy.io.savemat(source / "01.mat", {"I": content["I"]})  # no GT
    with pytest.raises(ConversionError, match=r"01\.mat: no variable 'GT'"):
        convert_spine(source, tmp_path / "out" / "spine_vb3", progress=False)
    scipy.io.savemat(source / "01.mat", {"I": content["I"][:, :, :40], "GT": content["GT"][:, :, :40]})
    with pytest.raises(ConversionError, match=r"01\.mat: 'I' is uint8 \(224, 224, 40\)"):
        convert_spine(source, tmp_path / "out" / "spine_vb3", progress=False)
    assert not any((tmp_path / "out").iterdir())


def test_a_spine_whose_body_1_is_not_the_smallest_alone_fails_the_l1_check(tmp_path):
    # Volume 17's body 1 is larger than its body 4: the rule holds over the dataset, not per spine.
    with pytest.raises(ConversionError, match="body 1 is smaller than body 4 in only 0 of 1 volumes"):
        convert_spine(SPINE_SOURCE, tmp_path / "spine_vb3", case_ids=["vb3_17"], progress=False)
