"""Volume loading, orientation, intensity handling and slicing on real hippocampus volumes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from fewsam_lib.data.manifest import IntensitySpec
from fewsam_lib.data.volumes import (
    load_case,
    load_volume,
    normalise_intensity,
    slice_table,
    stack_slices,
    take_slice,
    task_voxels_per_slice,
)
from fewsam_lib.errors import VolumeError


def test_real_case_loads_canonically(hippocampus):
    case_id = hippocampus.case_ids("train")[0]
    volume = load_case(hippocampus, case_id)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert volume.image.shape == volume.label.shape
    assert volume.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert set(np.unique(volume.label)) <= {0, 1, 2}
    assert (volume.label == 1).any() and (volume.label == 2).any()


def test_non_ras_files_reorient_and_map_back(tmp_path, hippocampus):
    """A copy stored as LPI with permuted axes loads to the same canonical arrays and maps back."""
    case = hippocampus.case(hippocampus.case_ids("test")[0])
    reference = load_case(hippocampus, case.case_id)
    image, label = nib.load(case.image), nib.load(case.label)
    # New voxel (a, b, c) holds old voxel (X-1-a, c, Z-1-b): x flipped, y and z swapped, z flipped.
    flip_permute = np.array(
        [[-1, 0, 0, image.shape[0] - 1], [0, 0, 1, 0], [0, -1, 0, image.shape[2] - 1], [0, 0, 0, 1]]
    )
    affine = image.affine @ flip_permute
    data = np.transpose(np.asarray(image.dataobj)[::-1, :, ::-1], (0, 2, 1))
    labels = np.transpose(np.asarray(label.dataobj)[::-1, :, ::-1], (0, 2, 1))
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "label.nii.gz")
    assert nib.aff2axcodes(affine) != ("R", "A", "S")

    moved = load_volume(tmp_path / "image.nii.gz", tmp_path / "label.nii.gz", "moved")
    np.testing.assert_array_equal(moved.image, reference.image)
    np.testing.assert_array_equal(moved.label, reference.label)
    np.testing.assert_allclose(moved.affine, reference.affine, atol=1e-5)
    np.testing.assert_array_equal(moved.to_original(moved.label), labels)

    moved.save_on_original_grid(moved.label, tmp_path / "written.nii.gz")
    written = nib.load(tmp_path / "written.nii.gz")
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    assert not list(tmp_path.glob(".partial*"))


def test_image_label_mismatch_names_the_files(tmp_path, hippocampus):
    cases = [hippocampus.case(c) for c in hippocampus.case_ids("train")[:10]]
    first = cases[0]
    second = next(c for c in cases if nib.load(c.label).shape != nib.load(first.image).shape)
    with pytest.raises(VolumeError, match=second.label.name):
        load_volume(first.image, second.label, "mixed")


def test_percentile_normalisation_on_real_mri(hippocampus):
    volume = load_case(hippocampus, hippocampus.case_ids("train")[0])
    grey = normalise_intensity(volume.image, hippocampus.intensity)
    assert grey.dtype == np.float32
    assert grey.min() == 0.0 and grey.max() == pytest.approx(255.0)
    foreground = volume.image[volume.image > 0]
    high = np.percentile(foreground, 99.5)
    assert np.allclose(grey[volume.image >= high], 255.0)


def test_window_and_none_intensity():
    hounsfield = np.array([-1200.0, -160.0, 40.0, 240.0, 3000.0], dtype=np.float32)
    grey = normalise_intensity(hounsfield, IntensitySpec("window", level=40, width=400))
    np.testing.assert_allclose(grey, [0.0, 0.0, 127.5, 255.0, 255.0])
    np.testing.assert_allclose(
        normalise_intensity(np.array([-5.0, 100.0, 300.0]), IntensitySpec("none")), [0, 100, 255]
    )
    assert not normalise_intensity(np.zeros(4), IntensitySpec("percentile")).any()


def test_slicing_round_trip_on_each_axis(hippocampus):
    volume = load_case(hippocampus, hippocampus.case_ids("test")[0])
    for axis in range(3):
        slices = [take_slice(volume.image, axis, i) for i in range(volume.image.shape[axis])]
        np.testing.assert_array_equal(stack_slices(slices, axis), volume.image)


def test_slice_table_matches_brute_force(hippocampus):
    case_ids = hippocampus.case_ids("test")[:3]
    table = slice_table(hippocampus, case_ids)
    for case_id in case_ids:
        label = load_case(hippocampus, case_id, image=False).label
        rows = table[table.case_id == case_id].set_index("slice_index")
        assert len(rows) == label.shape[2]
        for index in range(label.shape[2]):
            assert rows.loc[index, "anterior"] == int((label[:, :, index] == 1).sum())
            assert rows.loc[index, "posterior"] == int((label[:, :, index] == 2).sum())
    assert (table.anterior > 0).any() and (table.anterior == 0).any()


def test_task_voxels_per_slice_small_case():
    label = np.zeros((2, 3, 4), dtype=np.int32)
    label[0, 1, 2] = 1
    label[1, 2, 2] = 2
    label[1, 0, 3] = 2
    counts = task_voxels_per_slice(label, axis=2, tasks={1: "a", 2: "b"})
    assert counts["a"].tolist() == [0, 0, 1, 0]
    assert counts["b"].tolist() == [0, 0, 1, 1]
