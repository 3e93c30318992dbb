"""``fewsam convert openkbp``: the OpenKBP head-and-neck CT challenge data as NIfTI + a manifest.

OpenKBP (Babier et al., Medical Physics 48, 5549-5561, 2021; github.com/ababier/open-kbp, MIT
licence) ships each patient as sparse CSV files on a fixed 128x128x128 grid: ``ct.csv`` lists
``flat_index,value`` with value = HU + 1000 (unlisted voxels are air), every contoured structure
has a CSV of the flat indices inside it, and ``voxel_dimensions.csv`` holds the voxel size in mm.

What the data itself shows (and :func:`orientation_problems` checks for every patient): flat
indices are C-order over (a, b, c); ``c`` runs head to feet (the brainstem lies at smaller ``c``
than the spinal cord) with the 2.5 mm voxel size, ``a`` runs front to back (the mandible lies at
smaller ``a`` than the cord) and ``b`` runs from the patient's right to left (LeftParotid at larger
``b``). The written NIfTI keeps the array as it is and says so in its affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from .convert import (
    ConversionError,
    Converter,
    cases_to_convert,
    is_converted_by,
    source_digest,
    staged_conversion,
    wrapped_ids,
    write_dataset_files,
)

OPENKBP_SHAPE = (128, 128, 128)
# Structures written as labels (the anatomy; PTVs are treatment targets, not anatomy, and
# Larynx/Esophagus are contoured for too few patients to train and test on).
OPENKBP_LABELS = {1: "Brainstem", 2: "SpinalCord", 3: "Mandible", 4: "LeftParotid", 5: "RightParotid"}
OPENKBP_SPLITS = {"train": "train-pats", "test": "validation-pats"}
HU_OFFSET = 1000  # ct.csv stores HU + 1000
CONVERTER_VERSION = 1
BONE_HU = 150


@dataclass(frozen=True)
class Patient:
    case_id: str  # the challenge's folder name, e.g. pt_1
    folder: Path
    split: str  # train or test (the challenge's train-pats or validation-pats)

    @property
    def contoured(self) -> list[str]:
        return [name for name in OPENKBP_LABELS.values() if (self.folder / f"{name}.csv").exists()]

    @property
    def missing(self) -> list[str]:
        return [name for name in OPENKBP_LABELS.values() if name not in self.contoured]


def _patient_order(case_id: str) -> tuple[int, str]:
    number = case_id.rsplit("_", 1)[-1]
    return (int(number), case_id) if number.isdigit() else (1 << 30, case_id)


def find_patients(source: str | Path) -> list[Patient]:
    """The patients under ``source`` (the challenge's ``provided-data`` folder), in numeric order."""
    source = Path(source)
    patients = []
    for split, folder_name in OPENKBP_SPLITS.items():
        folder = source / folder_name
        if not folder.is_dir():
            raise ConversionError(
                f"{source}: no {folder_name}/ folder (expected OpenKBP's provided-data layout "
                f"with {', '.join(OPENKBP_SPLITS.values())})"
            )
        patients += [Patient(p.name, p, split) for p in folder.iterdir() if p.is_dir() and p.name.startswith("pt_")]
    if not patients:
        raise ConversionError(f"{source}: no pt_* patient folders")
    return sorted(patients, key=lambda p: _patient_order(p.case_id))


def _read_sparse(path: Path, with_values: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Flat indices (and values) of one sparse CSV; any malformation names the file."""
    try:
        table = pd.read_csv(path, index_col=0)
    except FileNotFoundError:
        raise ConversionError(f"{path}: file does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not a readable CSV ({error})") from None
    if list(table.columns) != ["data"]:
        raise ConversionError(f"{path}: expected the OpenKBP header ',data', got columns {list(table.columns)}")
    try:
        indices = pd.to_numeric(table.index, errors="raise").to_numpy()
    except (ValueError, TypeError):
        raise ConversionError(f"{path}: the first column must hold integer flat voxel indices") from None
    size = int(np.prod(OPENKBP_SHAPE))
    if indices.size and (not np.all(np.mod(indices, 1) == 0) or indices.min() < 0 or indices.max() >= size):
        raise ConversionError(
            f"{path}: flat indices must be integers in [0, {size}) for the {'x'.join(map(str, OPENKBP_SHAPE))} grid"
        )
    indices = indices.astype(np.int64)
    if np.unique(indices).size != indices.size:
        raise ConversionError(f"{path}: a flat index is listed more than once")
    if not with_values:
        return indices, None
    values = pd.to_numeric(table["data"], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        line = int(np.flatnonzero(~np.isfinite(values))[0]) + 2
        raise ConversionError(f"{path}: line {line}: the value is not a number")
    return indices, values


def read_voxel_size(path: Path) -> tuple[float, float, float]:
    try:
        values = np.loadtxt(path, dtype=np.float64).ravel()
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path}: not a list of three voxel sizes in mm ({error})") from None
    if values.size != 3 or not np.all(values > 0):
        raise ConversionError(f"{path}: expected three positive voxel sizes in mm, got {values.tolist()}")
    return tuple(float(v) for v in values)


def openkbp_affine(voxel_size: tuple[float, float, float]) -> np.ndarray:
    """Array axes (a, b, c) = (to posterior, to patient's left, to feet) in RAS+ world millimetres."""
    a, b, c = voxel_size
    return np.array([[0.0, -b, 0.0, 0.0], [-a, 0.0, 0.0, 0.0], [0.0, 0.0, -c, 0.0], [0.0, 0.0, 0.0, 1.0]])


@dataclass
class ConvertedPatient:
    hu: np.ndarray  # int16, array order of the source grid
    masks: dict[str, np.ndarray]  # contoured structures only
    label: np.ndarray  # uint8 label map
    voxel_size: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        return openkbp_affine(self.voxel_size)


def _dense_mask(indices: np.ndarray) -> np.ndarray:
    mask = np.zeros(int(np.prod(OPENKBP_SHAPE)), dtype=bool)
    mask[indices] = True
    return mask.reshape(OPENKBP_SHAPE)


def read_patient(patient: Patient) -> ConvertedPatient:
    """CT in HU and the label map of one patient.

    Contours overlap on a few voxels (mandible and parotid borders); such a voxel goes to the
    smaller structure so that no structure loses its thin edge to a large neighbour.
    """
    indices, values = _read_sparse(patient.folder / "ct.csv", with_values=True)
    flat = np.zeros(int(np.prod(OPENKBP_SHAPE)), dtype=np.float64)
    flat[indices] = values
    hu = flat.reshape(OPENKBP_SHAPE) - HU_OFFSET
    if hu.max() > 32767 or hu.min() < -32768:
        raise ConversionError(f"{patient.folder / 'ct.csv'}: values outside the int16 HU range")
    masks = {
        name: _dense_mask(_read_sparse(patient.folder / f"{name}.csv", with_values=False)[0])
        for name in patient.contoured
    }
    empty = [name for name, mask in masks.items() if not mask.any()]
    if empty:
        raise ConversionError(f"{patient.folder / (empty[0] + '.csv')}: lists no voxel")
    label = np.zeros(OPENKBP_SHAPE, dtype=np.uint8)
    by_size = sorted(masks, key=lambda name: (-int(masks[name].sum()), name))
    values_of = {name: value for value, name in OPENKBP_LABELS.items()}
    for name in by_size:  # largest first, so smaller structures are written last and win overlaps
        label[masks[name]] = values_of[name]
    return ConvertedPatient(
        np.rint(hu).astype(np.int16), masks, label, read_voxel_size(patient.folder / "voxel_dimensions.csv")
    )


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (affine @ np.append(np.argwhere(mask).mean(axis=0), 1.0))[:3]


def orientation_problems(patient: Patient, converted: ConvertedPatient) -> list[str]:
    """Anatomical checks that the index order and the affine are right (one line per failure)."""
    masks, hu, affine = converted.masks, converted.hu, converted.affine
    where = patient.folder
    problems = []
    if "Mandible" in masks and np.median(hu[masks["Mandible"]]) < 300:
        problems.append(f"{where}: mandible median {np.median(hu[masks['Mandible']]):.0f} HU is not bone")
    if "SpinalCord" in masks:
        cord = masks["SpinalCord"]
        if not -100 <= np.median(hu[cord]) <= 150:
            problems.append(f"{where}: spinal cord median {np.median(hu[cord]):.0f} HU is not soft tissue")
        # The cord runs inside the vertebral canal: bone within ~1 cm of it in its axial slices.
        ring = ndimage.binary_dilation(cord, structure=np.ones((5, 5, 1), dtype=bool)) & ~cord
        if np.mean(hu[ring] > BONE_HU) < 0.1:
            problems.append(
                f"{where}: little bone around the spinal cord ({np.mean(hu[ring] > BONE_HU):.0%} "
                f"of its axial neighbourhood), so it is not inside the vertebrae"
            )
        # Its length runs head to feet: it crosses more millimetres of axial planes than of any
        # other planes (counting occupied planes, so a stray contour voxel does not matter).
        extent = [len(np.unique(np.nonzero(cord)[axis])) * converted.voxel_size[axis] for axis in range(3)]
        if extent[2] <= max(extent[0], extent[1]):
            problems.append(
                f"{where}: the spinal cord does not run head to feet (spans "
                f"{extent[0]:.0f}/{extent[1]:.0f}/{extent[2]:.0f} mm along the array axes)"
            )
    centre = {name: _world_centroid(mask, affine) for name, mask in masks.items() if mask.any()}
    if {"Brainstem", "SpinalCord"} <= centre.keys() and centre["Brainstem"][2] <= centre["SpinalCord"][2]:
        problems.append(
            f"{where}: brainstem is not superior to the spinal cord (z {centre['Brainstem'][2]:.0f} "
            f"vs {centre['SpinalCord'][2]:.0f} mm)"
        )
    if {"Mandible", "SpinalCord"} <= centre.keys() and centre["Mandible"][1] <= centre["SpinalCord"][1]:
        problems.append(f"{where}: mandible is not anterior to the spinal cord")
    if {"LeftParotid", "RightParotid"} <= centre.keys() and centre["LeftParotid"][0] >= centre["RightParotid"][0]:
        problems.append(f"{where}: LeftParotid is not on the patient's left of RightParotid")
    return problems


def _source_digest(patients: list[Patient]) -> str:
    return source_digest(
        (f"{p.split}/{p.case_id}/{file.name}", file) for p in patients for file in sorted(p.folder.glob("*.csv"))
    )


def is_converted(destination: str | Path, source: str | Path) -> bool:
    """Whether ``destination`` holds a complete conversion of ``source`` by this converter version."""
    return is_converted_by(destination, CONVERTER_VERSION, _source_digest(find_patients(source)))


def convert_openkbp(
    source: str | Path, destination: str | Path, case_ids: list[str] | None = None, progress: bool = True
) -> Path:
    """Write ``imagesTr/``, ``labelsTr/``, ``dataset.json`` and a stamp under ``destination``.

    Everything is written to a temporary folder beside ``destination`` and renamed into place
    when every patient passed its checks, so a failed conversion leaves nothing half-written.
    An existing complete conversion of the same source is kept as it is.
    """
    source, destination = Path(source).resolve(), Path(destination).resolve()
    patients = cases_to_convert(find_patients(source), case_ids, lambda: is_converted(destination, source), source)
    if patients is None:
        return destination
    with staged_conversion(destination, partial=case_ids is not None) as scratch:
        problems = []
        for patient in tqdm(patients, desc="convert OpenKBP", unit="patient", disable=not progress):
            converted = read_patient(patient)
            problems += orientation_problems(patient, converted)
            for folder, array in (("imagesTr", converted.hu), ("labelsTr", converted.label)):
                nib.save(nib.Nifti1Image(array, converted.affine), str(scratch / folder / f"{patient.case_id}.nii.gz"))
        if problems:
            raise ConversionError("the converted data fails its anatomical checks:\n" + "\n".join(problems))
        write_dataset_files(
            scratch,
            name="openkbp_hn_ct",
            description="OpenKBP head-and-neck CT (Babier et al., Medical Physics 2021), converted by fewsam",
            licence="MIT (github.com/ababier/open-kbp)",
            modality="CT",
            labels=OPENKBP_LABELS,
            case_ids=[p.case_id for p in patients],
            version=CONVERTER_VERSION,
            source=source,
            digest=_source_digest(patients) if case_ids is None else None,
        )
    return destination


def openkbp_manifest_text(source: str | Path) -> str:
    """The manifest ``data_manifests/openkbp_hn_ct.yaml``, derived from which contours exist.

    Train = the challenge's train-pats with every task contoured (every method learns from full
    label maps, and an uncontoured organ would otherwise be taught as background); test = all of
    validation-pats, where an organ nobody contoured is left out of the scores.
    """
    patients = find_patients(source)
    train = [p.case_id for p in patients if p.split == "train" and not p.missing]
    left_out = [p for p in patients if p.split == "train" and p.missing]
    test = [p.case_id for p in patients if p.split == "test"]
    not_annotated = {p.case_id: p.missing for p in patients if p.missing}
    labels = "\n".join(f"  {value}: {name}" for value, name in OPENKBP_LABELS.items())
    not_annotated_text = "\n".join(f"  {case_id}: [{', '.join(tasks)}]" for case_id, tasks in not_annotated.items())
    return f"""\
# OpenKBP head-and-neck CT (Babier et al., "OpenKBP: The open-access knowledge-based planning grand
# challenge and dataset", Medical Physics 48, 5549-5561, 2021; github.com/ababier/open-kbp, MIT).
# Written by `fewsam convert openkbp` from which contours exist; do not edit by hand.
dataset: openkbp_hn_ct
description: OpenKBP radiotherapy organ-at-risk contours on head-and-neck CT (128x128x128, 3.9x3.9x2.5 mm)
modality: CT
root: ${{FEWSAM_CONVERTED}}/openkbp_hn_ct
prepare: fewsam convert openkbp ${{FEWSAM_DATA}}/open-kbp/provided-data ${{FEWSAM_CONVERTED}}/openkbp_hn_ct
pairs:
  dataset_json: dataset.json
labels:
{labels}
slice_axis: axial                   # canonical RAS+ axis 2; slices are 128x128 px at 3.9 mm
intensity:
  # One soft-tissue window (W400 L40) for every task: parotids, brainstem and cord need soft-tissue
  # contrast; bone saturates to white, which keeps the mandible's outline sharp.
  mode: window
  level: 40
  width: 400
split:
  # train: the challenge's train-pats with all five organs contoured ({len(train)} of {len(train) + len(left_out)});
  # test: the challenge's validation-pats ({len(test)}); organs not contoured there are not scored.
  train: [
{wrapped_ids(train)}]
  test: [
{wrapped_ids(test)}]
# Organs without a contour in a case: unknown there, not absent.
not_annotated:
{not_annotated_text}
"""


CONVERTER = Converter(
    name="openkbp",
    dataset="openkbp_hn_ct",
    source_help="OpenKBP's provided-data folder (with train-pats/ and validation-pats/)",
    convert=convert_openkbp,
    is_converted=is_converted,
    manifest_text=openkbp_manifest_text,
)
