"""``fewsam convert spine``: lumbar spine MRI (vertebral bodies L1-L5) from MATLAB files to NIfTI.

The source is the ``VB3`` set of the FastCleverSeg repository (Ramos et al., Magnetic Resonance
Imaging 109, 2024; github.com/JonathanRamos/fastcleverseg, GPL-3.0), volumes of the MyoSegmenTUM
spine dataset (Burian et al., BMC Musculoskeletal Disorders 20, 2019): one ``NN.mat`` per volume
with ``I`` (uint8 grey levels) and ``GT`` (0 background, 1-5 the vertebral bodies), resampled by
the authors to 1 mm, and no affine.

The orientation comes from the data, and :func:`orientation_problems` checks it on every volume:

- the five labels lie one after the other along the first array axis, label 1 at small indices,
  and in most volumes body 1 is smaller than body 4 (lumbar bodies grow from L1 to L4; 28 of the
  29 distinct volumes here): label 1 is L1 and the first axis runs head to feet;
- the middle three bodies lie towards small second-axis indices from the line through L1 and L5:
  that is the lumbar lordosis (the lumbar spine bows forwards), so the second axis runs to the back;
- the third axis crosses the bodies' narrow left-right extent: the 224x224 planes are sagittal,
  as the repository shows them. Which way it runs is not in the data (a vertebral body is
  left-right symmetric): the affine says to the patient's right, a convention, not a finding.

A volume whose arrays repeat an earlier file's is left out (the source has one such pair), so that
it cannot sit in both training and test.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
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
from .manifest import draw_split

SPINE_LABELS = {1: "L1", 2: "L2", 3: "L3", 4: "L4", 5: "L5"}
SPINE_SHAPE = (224, 224, 77)
VOXEL_MM = 1.0
CONVERTER_VERSION = 1
SPLIT_SEED = 0
TEST_VOLUMES = 8
DATASET = "spine_vb3"
SOURCE_FOLDER = "ImageDatasets/VBs/VB3/Isotropic/Matlab"  # in the FastCleverSeg repository
# Array axes (a0, a1, a2) = (to feet, to back, to the patient's right, by convention) in RAS+ mm.
SPINE_AFFINE = np.array(
    [[0.0, 0.0, VOXEL_MM, 0.0], [0.0, -VOXEL_MM, 0.0, 0.0], [-VOXEL_MM, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


@dataclass(frozen=True)
class SpineFile:
    case_id: str
    path: Path


def find_volumes(source: str | Path) -> list[SpineFile]:
    """The ``NN.mat`` files under ``source`` (the repository's ``.../VB3/Isotropic/Matlab`` folder)."""
    source = Path(source)
    if not source.is_dir():
        raise ConversionError(f"{source}: not a folder (expected FastCleverSeg's {SOURCE_FOLDER})")
    files = sorted(p for p in source.iterdir() if re.fullmatch(r"\d+\.mat", p.name))
    if not files:
        raise ConversionError(f"{source}: no NN.mat volume files")
    return [SpineFile(f"vb3_{p.stem}", p) for p in files]


@dataclass
class SpineVolume:
    image: np.ndarray  # uint8 grey levels, source array order
    label: np.ndarray  # uint8, 0-5


def read_volume(volume: SpineFile) -> SpineVolume:
    """``I`` and ``GT`` of one file, checked for shape, type and label values."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        content = loadmat(volume.path)
    except (MatReadError, ValueError, OSError) as error:
        raise ConversionError(f"{volume.path}: not a readable MATLAB file ({error})") from None
    arrays = {}
    for name in ("I", "GT"):
        if name not in content:
            raise ConversionError(
                f"{volume.path}: no variable '{name}' (holds {sorted(k for k in content if not k.startswith('__'))})"
            )
        array = content[name]
        if array.shape != SPINE_SHAPE or array.dtype != np.uint8:
            raise ConversionError(
                f"{volume.path}: '{name}' is {array.dtype} {array.shape}, expected uint8 {SPINE_SHAPE}"
            )
        arrays[name] = np.ascontiguousarray(array)
    values = set(np.unique(arrays["GT"]).tolist())
    if not values <= {0, *SPINE_LABELS} or not set(SPINE_LABELS) <= values:
        raise ConversionError(f"{volume.path}: GT holds labels {sorted(values)}, expected 0 and all of 1-5")
    return SpineVolume(arrays["I"], arrays["GT"])


def orientation_problems(volume: SpineFile, content: SpineVolume) -> list[str]:
    """The per-volume checks behind :data:`SPINE_AFFINE` (see the module docstring)."""
    centres = np.array([np.argwhere(content.label == value).mean(axis=0) for value in SPINE_LABELS])
    problems = []
    if not np.all(np.diff(centres[:, 0]) > 0):
        problems.append(
            f"{volume.path}: the bodies 1-5 do not follow one another along the first axis ({centres[:, 0].round()})"
        )
    along = (centres[:, 0] - centres[0, 0]) / (centres[4, 0] - centres[0, 0])
    chord = centres[0, 1] + along * (centres[4, 1] - centres[0, 1])
    if np.mean(centres[1:4, 1] - chord[1:4]) >= 0:
        problems.append(
            f"{volume.path}: no lordosis towards small second-axis indices, so that axis may not run to the back"
        )
    extent = [int(np.ptp(np.nonzero(content.label == 3)[axis])) for axis in range(3)]
    if not 20 <= extent[2] < 2 * max(extent[0], extent[1]):
        problems.append(f"{volume.path}: body 3 spans {extent} voxels: the third axis does not look left-right")
    return problems


def body_one_is_smaller(content: SpineVolume) -> bool:
    """Whether body 1 has fewer voxels than body 4: lumbar bodies grow from L1 to L4, though one
    spine may not show it (so the rule is checked over a whole conversion, not per volume)."""
    return int((content.label == 1).sum()) < int((content.label == 4).sum())


MOSTLY = 2 / 3  # body 1 smaller than body 4 in at least this share of the volumes: label 1 is L1


def _content_digest(content: SpineVolume) -> str:
    return hashlib.sha256(content.image.tobytes() + content.label.tobytes()).hexdigest()


def _source_digest(volumes: list[SpineFile]) -> str:
    return source_digest((volume.path.name, volume.path) for volume in volumes)


def is_converted(destination: str | Path, source: str | Path) -> bool:
    return is_converted_by(destination, CONVERTER_VERSION, _source_digest(find_volumes(source)))


def convert_spine(
    source: str | Path, destination: str | Path, case_ids: list[str] | None = None, progress: bool = True
) -> Path:
    """Write ``imagesTr/``, ``labelsTr/``, ``dataset.json`` and a stamp under ``destination``."""
    source, destination = Path(source).resolve(), Path(destination).resolve()
    volumes = cases_to_convert(find_volumes(source), case_ids, lambda: is_converted(destination, source), source)
    if volumes is None:
        return destination
    with staged_conversion(destination, partial=case_ids is not None) as scratch:
        problems, written, smaller, repeats, seen = [], [], [], {}, {}
        for volume in tqdm(volumes, desc="convert spine MRI", unit="volume", disable=not progress):
            content = read_volume(volume)
            digest = _content_digest(content)
            if digest in seen:
                repeats[volume.case_id] = seen[digest]
                continue
            seen[digest] = volume.case_id
            problems += orientation_problems(volume, content)
            smaller.append(body_one_is_smaller(content))
            for folder, array in (("imagesTr", content.image), ("labelsTr", content.label)):
                nib.save(nib.Nifti1Image(array, SPINE_AFFINE), str(scratch / folder / f"{volume.case_id}.nii.gz"))
            written.append(volume.case_id)
        if np.mean(smaller) < MOSTLY:
            problems.append(
                f"{source}: body 1 is smaller than body 4 in only {sum(smaller)} of {len(smaller)} volumes, "
                f"so label 1 may not be L1 and the first axis may not run head to feet"
            )
        if problems:
            raise ConversionError("the converted data fails its anatomical checks:\n" + "\n".join(problems))
        write_dataset_files(
            scratch,
            name=DATASET,
            description="Lumbar spine MRI, vertebral bodies L1-L5 (FastCleverSeg VB3, MyoSegmenTUM), by fewsam",
            licence="GPL-3.0 (github.com/JonathanRamos/fastcleverseg)",
            modality="MR",
            labels=SPINE_LABELS,
            case_ids=written,
            version=CONVERTER_VERSION,
            source=source,
            digest=_source_digest(volumes) if case_ids is None else None,
            left_out_as_repeats=repeats,
        )
    return destination


def spine_manifest_text(source: str | Path) -> str:
    """The manifest ``data_manifests/spine_vb3.yaml``: a seeded split of the distinct volumes."""
    volumes = find_volumes(source)
    distinct, repeats, seen = [], {}, {}
    for volume in volumes:
        digest = _content_digest(read_volume(volume))
        if digest in seen:
            repeats[volume.case_id] = seen[digest]
        else:
            seen[digest] = volume.case_id
            distinct.append(volume.case_id)
    split = draw_split(distinct, TEST_VOLUMES / len(distinct), SPLIT_SEED)
    labels = "\n".join(f"  {value}: {name}" for value, name in SPINE_LABELS.items())
    repeated = "; ".join(f"{case} repeats {first}" for case, first in repeats.items()) or "none"
    return f"""\
# Lumbar spine MRI, vertebral bodies L1-L5: the VB3 set of FastCleverSeg (Ramos et al., Magnetic
# Resonance Imaging 109, 2024; github.com/JonathanRamos/fastcleverseg, GPL-3.0), from the
# MyoSegmenTUM spine dataset (Burian et al., BMC Musculoskeletal Disorders 20, 2019).
# Written by `fewsam convert spine`; do not edit by hand.
dataset: {DATASET}
description: lumbar spine MRI of healthy volunteers, vertebral bodies L1-L5 (224x224x77 at 1 mm)
modality: MR
root: ${{FEWSAM_CONVERTED}}/{DATASET}
prepare: fewsam convert spine ${{FEWSAM_DATA}}/fastcleverseg/{SOURCE_FOLDER} ${{FEWSAM_CONVERTED}}/{DATASET}
pairs:
  dataset_json: dataset.json
labels:
{labels}
slice_axis: sagittal                # the source's 224x224 planes; 77 slices per volume
intensity:
  mode: percentile
  lower: 0.5
  upper: 99.5
# Every volume shows all five bodies.
every_case_shows_every_task: true
split:
  # {len(distinct)} distinct volumes (left out as repeats of an earlier file: {repeated});
  # {len(split["test"])} test volumes drawn with seed {SPLIT_SEED}.
  train: [
{wrapped_ids(split["train"])}]
  test: [
{wrapped_ids(split["test"])}]
"""


CONVERTER = Converter(
    name="spine",
    dataset=DATASET,
    source_help="FastCleverSeg's ImageDatasets/VBs/VB3/Isotropic/Matlab folder (01.mat ... 30.mat)",
    convert=convert_spine,
    is_converted=is_converted,
    manifest_text=spine_manifest_text,
)
