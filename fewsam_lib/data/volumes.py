"""NIfTI volumes: loading in canonical (RAS+) orientation, intensity handling and 2D slicing.

Every method sees a case the same way: image and label reoriented to RAS+ with nibabel, checked to
share a grid, cut into 2D slices along the manifest's axis. Predictions go back to the original
grid with :meth:`Volume.to_original`.

A 2D NIfTI (a radiograph) is held as (rows, columns, 1) and never reoriented: a projection image
has no third anatomical axis to sort by, and its rows and columns stay as stored, which is how it
is displayed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from ..data.manifest import IntensitySpec, Manifest
from ..errors import VolumeError

AFFINE_TOLERANCE = 1e-3  # mm; MSD images and labels agree to ~1e-6, resampled files often to ~1e-4
_RAS = axcodes2ornt(("R", "A", "S"))


def load_nifti(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI file, turning every nibabel/zlib failure into an error that names the file."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file does not exist")
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises many types for a bad header
        raise VolumeError(f"{path}: not a readable NIfTI file ({type(error).__name__}: {error})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{path}: not a NIfTI image ({type(image).__name__})")
    if len(image.shape) not in (2, 3):
        raise VolumeError(f"{path}: expected a 2D image or a 3D volume, got shape {image.shape}")
    return image


def read_array(image: nib.Nifti1Image, path: str | Path, dtype: type) -> np.ndarray:
    """The voxel array of an opened NIfTI; a truncated or corrupt payload names the file."""
    try:
        return np.asarray(image.dataobj, dtype=dtype)
    except Exception as error:  # EOFError, zlib.error, ValueError ... from a damaged payload
        raise VolumeError(f"{path}: corrupt NIfTI data ({type(error).__name__}: {error})") from None


def _to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient to RAS+ (a 2D image: only gains its singleton axis); returns array and affine."""
    if array.ndim == 2:
        return np.ascontiguousarray(array[:, :, None]), affine
    transform = ornt_transform(io_orientation(affine), _RAS)
    canonical = apply_orientation(array, transform)
    canonical_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(canonical), canonical_affine


@dataclass
class Volume:
    """One case in canonical RAS+ orientation. ``image`` is raw (e.g. HU), ``label`` integer."""

    case_id: str
    image: np.ndarray | None
    label: np.ndarray | None
    affine: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, ...]  # (rows, columns) for a 2D image
    image_path: Path | None
    label_path: Path | None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape if self.image is not None else self.label.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical axes."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    def to_original(self, canonical: np.ndarray) -> np.ndarray:
        """Map an array on the canonical grid back to the grid of the files on disk."""
        if len(self.original_shape) == 2:
            return np.ascontiguousarray(canonical[:, :, 0])
        transform = ornt_transform(_RAS, io_orientation(self.original_affine))
        return np.ascontiguousarray(apply_orientation(canonical, transform))

    def read_on_canonical_grid(self, path: str | Path) -> np.ndarray:
        """A label file on this case's original grid (e.g. a saved prediction), as a canonical array."""
        image = load_nifti(path)
        if tuple(image.shape) != self.original_shape or not np.allclose(
            image.affine, self.original_affine, atol=AFFINE_TOLERANCE
        ):
            raise VolumeError(
                f"{path}: not on the grid of case {self.case_id} (shape {image.shape}, expected {self.original_shape})"
            )
        return _to_canonical(read_array(image, path, np.int32), image.affine)[0]

    def save_on_original_grid(self, canonical_labels: np.ndarray, path: str | Path) -> None:
        """Write a canonical label array as NIfTI on the original grid (atomic: tmp file, rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_original(canonical_labels.astype(np.uint8))
        image = nib.Nifti1Image(data, self.original_affine)
        image.set_qform(self.original_affine, code=1)
        image.set_sform(self.original_affine, code=1)
        partial = path.with_name(f".partial-{os.getpid()}-{path.name}")
        try:
            nib.save(image, str(partial))
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)


def load_volume(image_path: str | Path | None, label_path: str | Path | None, case_id: str) -> Volume:
    """Load an image and/or label; when both are given they must share shape and affine."""
    if image_path is None and label_path is None:
        raise ValueError("load_volume needs an image, a label or both")
    loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for role, path, dtype in (("image", image_path, np.float32), ("label", label_path, np.int32)):
        if path is None:
            continue
        nifti = load_nifti(path)
        loaded[role] = (read_array(nifti, path, dtype), nifti.affine)
    if len(loaded) == 2:
        (image, image_affine), (label, label_affine) = loaded["image"], loaded["label"]
        if image.shape != label.shape:
            raise VolumeError(
                f"{label_path}: label shape {label.shape} differs from image shape {image.shape} ({image_path})"
            )
        if not np.allclose(image_affine, label_affine, atol=AFFINE_TOLERANCE):
            worst = float(np.abs(image_affine - label_affine).max())
            raise VolumeError(
                f"{label_path}: label affine differs from the image's ({image_path}) by up to {worst:.3g}"
            )
    reference_array, reference_affine = next(iter(loaded.values()))
    canonical: dict[str, np.ndarray] = {}
    for role, (array, affine) in loaded.items():
        canonical[role], canonical_affine = _to_canonical(array, affine)
    return Volume(
        case_id=case_id,
        image=canonical.get("image"),
        label=canonical.get("label"),
        affine=canonical_affine,
        original_affine=reference_affine,
        original_shape=tuple(reference_array.shape),
        image_path=Path(image_path) if image_path else None,
        label_path=Path(label_path) if label_path else None,
    )


def load_case(manifest: Manifest, case_id: str, image: bool = True, label: bool = True) -> Volume:
    case = manifest.case(case_id)
    return load_volume(case.image if image else None, case.label if label else None, case_id)


def normalise_intensity(image: np.ndarray, spec: IntensitySpec) -> np.ndarray:
    """Raw voxels -> float32 grey levels in [0, 255], per volume, as the manifest says."""
    image = image.astype(np.float32, copy=False)
    if spec.mode == "percentile":
        foreground = image[image > 0]
        if foreground.size == 0:
            return np.zeros_like(image)
        low, high = np.percentile(foreground, [spec.lower_percentile, spec.upper_percentile])
    elif spec.mode == "window":
        low, high = spec.level - spec.width / 2, spec.level + spec.width / 2
    else:
        return np.clip(image, 0, 255)
    if high <= low:
        return np.zeros_like(image)
    return ((np.clip(image, low, high) - low) * (255.0 / (high - low))).astype(np.float32)


def grey_slices(manifest: Manifest, volume: Volume, indices: list[int] | range) -> list[np.ndarray]:
    """The encoder-ready grey-level slices ``indices`` of a loaded case, as the manifest prescribes."""
    return image_grey_slices(volume.image, manifest.intensity, manifest.slice_axis, indices)


def image_grey_slices(
    image: np.ndarray, intensity: IntensitySpec, axis: int, indices: list[int] | range | None = None
) -> list[np.ndarray]:
    """Grey-level slices ``indices`` (default: all) of a canonical image, without a manifest."""
    grey = normalise_intensity(image, intensity)
    return [take_slice(grey, axis, i) for i in (range(grey.shape[axis]) if indices is None else indices)]


def take_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice ``index`` along ``axis`` (remaining axes keep their order)."""
    return np.ascontiguousarray(np.take(array, index, axis=axis))


def stack_slices(slices: list[np.ndarray], axis: int) -> np.ndarray:
    """Inverse of :func:`take_slice` over all indices."""
    return np.stack(slices, axis=axis)


def task_voxels_per_slice(label: np.ndarray, axis: int, tasks: dict[int, str]) -> pd.DataFrame:
    """Voxel count of every task on every slice of one label volume (rows = slice index)."""
    moved = np.moveaxis(label, axis, 0).reshape(label.shape[axis], -1)
    counts = {name: (moved == value).sum(axis=1) for value, name in tasks.items()}
    frame = pd.DataFrame(counts)
    frame.index.name = "slice_index"
    return frame


def slice_table(manifest: Manifest, case_ids: list[str] | None = None) -> pd.DataFrame:
    """One row per (case, slice) with the voxel count of each task; only label files are read.

    ``table[table.anterior > 0]`` lists the slices that contain the task ``anterior``.
    """
    frames = []
    for case_id in case_ids if case_ids is not None else manifest.case_ids():
        volume = load_case(manifest, case_id, image=False)
        frame = task_voxels_per_slice(volume.label, manifest.slice_axis, manifest.tasks).reset_index()
        frame.insert(0, "case_id", case_id)
        frames.append(frame)
    columns = ["case_id", "slice_index", *manifest.task_names]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
