"""``fewsam convert chest-xray``: the COVID-19 chest X-ray segmentations as 2D NIfTI + a manifest.

The source (github.com/GeneralBlockchain/covid-19-chest-xray-segmentations-dataset, CC BY 4.0; the
images come from the public COVID-19 image collection and carry their own licences, listed in
``metadata.csv``) holds ``images/`` under their original names and ``structure.csv``: one row per
mask, each mask a PNG cropped to its box, to be pasted back at (``Left``, ``Top``) into an empty
image of the full ``Resolution`` (foreground where the first channel is above 127).

Written: one 2D NIfTI per image (grey levels 0-255 as displayed, RGB turned to luminance; rows top
to bottom, columns left to right) and one label map. Only the anatomical classes become labels;
pathology and devices are left out. Where two masks overlap (the airways lie inside the
cardiomediastinum) the pixel goes to the smaller structure, so that a thin structure keeps its
pixels. Pixel spacing is unknown (many images were cut from figures of journal articles): the
affine says 1 mm by convention.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
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

CHEST_XRAY_LABELS = {1: "LeftLung", 2: "RightLung", 3: "Cardiomediastinum", 4: "Airways"}
SOURCE_CLASSES = {  # structure.csv's Template Name -> task
    "Left Lung": "LeftLung",
    "Right Lung": "RightLung",
    "Cardiomediastinum": "Cardiomediastinum",
    "Airways": "Airways",
}
STRUCTURE_COLUMNS = ("Template Name", "Filename", "Mask", "Resolution", "Top", "Left", "Width", "Height")
CONVERTER_VERSION = 2  # 2: dataset.json names each image's patient
SPLIT_SEED = 0
TEST_IMAGES = 30  # at least this many test images, drawn patient by patient
DATASET = "chest_xray"
SOURCE_FOLDER = "covid-19-chest-xray-segmentations-dataset"  # under FEWSAM_DATA


@dataclass(frozen=True)
class MaskRow:
    line: int  # line of structure.csv (1 = header)
    task: str
    mask: Path
    top: int
    left: int
    width: int
    height: int


@dataclass(frozen=True)
class XrayImage:
    case_id: str
    image: Path
    size: tuple[int, int]  # (width, height) as structure.csv states it
    masks: tuple[MaskRow, ...]
    patient: str  # metadata.csv's patientid: images of one patient stay in one split
    view: str

    @property
    def missing(self) -> list[str]:
        present = {row.task for row in self.masks}
        return [task for task in CHEST_XRAY_LABELS.values() if task not in present]


def case_id_for(filename: str) -> str:
    """A file-name-safe case id from an image's original name (extension dropped)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(filename).stem).strip("_")


def _integer(value: object, column: str, where: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConversionError(f"{where}: {column} must be an integer, got {value!r}") from None
    if not np.isfinite(number) or number != int(number):
        raise ConversionError(f"{where}: {column} must be an integer, got {value!r}")
    return int(number)


def _resolution(value: object, where: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(value))
    if not match:
        raise ConversionError(f"{where}: Resolution must read WIDTHxHEIGHT, got {value!r}")
    return int(match.group(1)), int(match.group(2))


def _read_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ConversionError(f"{path}: file does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not a readable CSV ({error})") from None
    absent = [column for column in columns if column not in table.columns]
    if absent:
        raise ConversionError(f"{path}: no column {', '.join(absent)}")
    return table


def find_images(source: str | Path) -> list[XrayImage]:
    """The images that have anatomical masks, with their rows of ``structure.csv``, sorted by id."""
    source = Path(source)
    structure_path = source / "structure.csv"
    structure = _read_table(structure_path, STRUCTURE_COLUMNS)
    metadata = _read_table(source / "metadata.csv", ("patientid", "filename", "view"))
    about = {row.filename: (row.patientid, row.view) for row in metadata.itertuples()}
    rows: dict[str, list[MaskRow]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for index, row in enumerate(structure.to_dict("records")):
        line = index + 2
        where = f"{structure_path}: line {line}"
        if row["Template Name"] not in SOURCE_CLASSES:
            continue  # pathology or a device
        filename = row["Filename"]
        if not filename:
            raise ConversionError(f"{where}: no Filename")
        if not row["Mask"]:
            continue  # a row without a mask: the class is not annotated in that image (unless another row has it)
        size = _resolution(row["Resolution"], where)
        if sizes.setdefault(filename, size) != size:
            raise ConversionError(f"{where}: Resolution {size} differs from {sizes[filename]} on an earlier row")
        mask = MaskRow(
            line,
            SOURCE_CLASSES[row["Template Name"]],
            source / row["Mask"],
            *(_integer(row[column], column, where) for column in ("Top", "Left", "Width", "Height")),
        )
        if not mask.mask.is_file():
            raise ConversionError(f"{where}: mask file {mask.mask} does not exist")
        rows.setdefault(filename, []).append(mask)
    images = []
    for filename, masks in rows.items():
        if filename not in about:
            raise ConversionError(f"{source / 'metadata.csv'}: no row for {filename} (named in {structure_path})")
        patient, view = about[filename]
        image = source / "images" / filename
        if not image.is_file():
            raise ConversionError(f"{structure_path}: names {filename}, which is not in {source / 'images'}")
        images.append(XrayImage(case_id_for(filename), image, sizes[filename], tuple(masks), patient, view))
    ids = [image.case_id for image in images]
    clashes = sorted({case_id for case_id in ids if ids.count(case_id) > 1})
    if clashes:
        raise ConversionError(f"{structure_path}: image names that give the same case id: {', '.join(clashes)}")
    if not images:
        raise ConversionError(f"{structure_path}: no row with a mask of {', '.join(SOURCE_CLASSES)}")
    return sorted(images, key=lambda image: image.case_id)


def _read_png(path: Path, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            return np.asarray(opened)
    except FileNotFoundError:
        raise ConversionError(f"{where}: mask file {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ConversionError(f"{where}: {path} is not a readable image ({error})") from None


def read_grey(image: XrayImage) -> np.ndarray:
    """The image as displayed, in grey levels (uint8, rows x columns); RGB becomes luminance."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image.image) as opened:
            grey = np.asarray(opened.convert("L"))
    except FileNotFoundError:
        raise ConversionError(f"{image.image}: image file does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ConversionError(f"{image.image}: not a readable image ({error})") from None
    if grey.shape != (image.size[1], image.size[0]):
        raise ConversionError(
            f"{image.image}: {grey.shape[1]}x{grey.shape[0]} pixels, structure.csv says {image.size[0]}x{image.size[1]}"
        )
    return grey


def pasted_mask(row: MaskRow, size: tuple[int, int], structure_path: Path) -> np.ndarray:
    """One mask PNG pasted at its box into an empty image of ``size`` (width, height)."""
    where = f"{structure_path}: line {row.line}"
    crop = _read_png(row.mask, where)
    foreground = (crop[..., 0] if crop.ndim == 3 else crop) > 127
    if foreground.shape != (row.height, row.width):
        raise ConversionError(
            f"{row.mask}: {foreground.shape[1]}x{foreground.shape[0]} pixels, but its box ({where}) is "
            f"{row.width}x{row.height}"
        )
    width, height = size
    if row.left < 0 or row.top < 0 or row.left + row.width > width or row.top + row.height > height:
        raise ConversionError(
            f"{where}: box {row.left},{row.top} {row.width}x{row.height} leaves the {width}x{height} image"
        )
    full = np.zeros((height, width), dtype=bool)
    full[row.top : row.top + row.height, row.left : row.left + row.width] = foreground
    return full


def label_map(image: XrayImage, structure_path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The uint8 label map of one image and each task's mask (a class's masks are united)."""
    masks: dict[str, np.ndarray] = {}
    for row in image.masks:
        mask = pasted_mask(row, image.size, structure_path)
        masks[row.task] = masks[row.task] | mask if row.task in masks else mask
    label = np.zeros((image.size[1], image.size[0]), dtype=np.uint8)
    values_of = {name: value for value, name in CHEST_XRAY_LABELS.items()}
    for task in sorted(masks, key=lambda name: (-int(masks[name].sum()), name)):  # smaller structures win
        label[masks[task]] = values_of[task]
    return label, masks


def orientation_problems(image: XrayImage, masks: dict[str, np.ndarray]) -> list[str]:
    """Every image here is a frontal view (PA or AP) displayed as if facing the patient: the
    patient's left lung lies on the image's right."""
    if not {"LeftLung", "RightLung"} <= masks.keys():
        return []
    left, right = (np.nonzero(masks[task])[1].mean() for task in ("LeftLung", "RightLung"))
    if left <= right:
        return [
            f"{image.image}: the left lung (mean column {left:.0f}) is not on the image's right of the "
            f"right lung ({right:.0f})"
        ]
    return []


def _source_digest(source: Path, images: list[XrayImage]) -> str:
    files = [("structure.csv", source / "structure.csv"), ("metadata.csv", source / "metadata.csv")]
    files += [(f"images/{image.image.name}", image.image) for image in images]
    files += [(f"masks/{row.mask.name}", row.mask) for image in images for row in image.masks]
    return source_digest(files)


def is_converted(destination: str | Path, source: str | Path) -> bool:
    source = Path(source)
    return is_converted_by(destination, CONVERTER_VERSION, _source_digest(source, find_images(source)))


def convert_chest_xray(
    source: str | Path, destination: str | Path, case_ids: list[str] | None = None, progress: bool = True
) -> Path:
    """Write ``imagesTr/``, ``labelsTr/`` (2D NIfTI), ``dataset.json`` and a stamp under ``destination``."""
    source, destination = Path(source).resolve(), Path(destination).resolve()
    images = cases_to_convert(find_images(source), case_ids, lambda: is_converted(destination, source), source)
    if images is None:
        return destination
    structure_path = source / "structure.csv"
    with staged_conversion(destination, partial=case_ids is not None) as scratch:
        problems = []
        for image in tqdm(images, desc="convert chest X-rays", unit="image", disable=not progress):
            grey = read_grey(image)
            label, masks = label_map(image, structure_path)
            problems += orientation_problems(image, masks)
            for folder, array in (("imagesTr", grey), ("labelsTr", label)):
                nib.save(nib.Nifti1Image(array, np.eye(4)), str(scratch / folder / f"{image.case_id}.nii.gz"))
        if problems:
            raise ConversionError("the converted data fails its anatomical checks:\n" + "\n".join(problems))
        write_dataset_files(
            scratch,
            name=DATASET,
            description="COVID-19 chest X-ray segmentations (GeneralBlockchain), anatomy only, converted by fewsam",
            licence="CC BY 4.0 (repository); each image's own licence is in the source's metadata.csv",
            modality="XR",
            labels=CHEST_XRAY_LABELS,
            case_ids=[image.case_id for image in images],
            version=CONVERTER_VERSION,
            source=source,
            digest=_source_digest(source, images) if case_ids is None else None,
            patients={image.case_id: image.patient for image in images},
            source_files={image.case_id: image.image.name for image in images},
        )
    return destination


def patient_split(
    images: list[XrayImage], seed: int = SPLIT_SEED, test_images: int = TEST_IMAGES
) -> dict[str, list[str]]:
    """Train/test case ids, whole patients at a time (no patient in both).

    Patients with an image that lacks an anatomical class go to test (every method learns from full
    label maps; the missing class is left out of the scores), then patients in a seeded order until
    the test split holds at least ``test_images`` images.
    """
    by_patient: dict[str, list[XrayImage]] = {}
    for image in images:
        by_patient.setdefault(image.patient, []).append(image)
    patients = sorted(by_patient)
    test = [p for p in patients if any(image.missing for image in by_patient[p])]
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    for patient in order:
        if sum(len(by_patient[p]) for p in test) >= test_images:
            break
        if patient not in test:
            test.append(patient)
    test_ids = sorted(image.case_id for p in test for image in by_patient[p])
    return {"train": sorted(set(image.case_id for image in images) - set(test_ids)), "test": test_ids}


def chest_xray_manifest_text(source: str | Path) -> str:
    """The manifest ``data_manifests/chest_xray.yaml``, derived from the source's tables."""
    images = find_images(source)
    split = patient_split(images)
    patients = len({image.patient for image in images})
    test_patients = len({image.patient for image in images if image.case_id in split["test"]})
    labels = "\n".join(f"  {value}: {name}" for value, name in CHEST_XRAY_LABELS.items())
    missing = {image.case_id: image.missing for image in images if image.missing}
    not_annotated = "\n".join(f"  {case_id}: [{', '.join(tasks)}]" for case_id, tasks in missing.items())
    return f"""\
# COVID-19 chest X-ray segmentations (GeneralBlockchain, github.com/GeneralBlockchain/
# covid-19-chest-xray-segmentations-dataset, CC BY 4.0; images from the public COVID-19 image
# collection, each under its own licence, see the source's metadata.csv). Radiologists' masks.
# Written by `fewsam convert chest-xray` from the source's tables; do not edit by hand.
dataset: {DATASET}
description: chest X-rays (PA and AP views), lungs, cardiomediastinum and airways drawn by radiologists
modality: XR
root: ${{FEWSAM_CONVERTED}}/{DATASET}
prepare: fewsam convert chest-xray ${{FEWSAM_DATA}}/{SOURCE_FOLDER} ${{FEWSAM_CONVERTED}}/{DATASET}
pairs:
  dataset_json: dataset.json
labels:
{labels}
# One 2D image per case, rows and columns as displayed (the patient's left on the image's right).
image_dimensions: 2
intensity:
  # The images are grey levels as published (windowed by whoever exported them): used as they are.
  mode: none
split:
  # {len(images)} images of {patients} patients, split by patient (seed {SPLIT_SEED}): {len(split["test"])} test
  # images of {test_patients} patients, among them every image that lacks an anatomical class.
  train: [
{wrapped_ids(split["train"])}]
  test: [
{wrapped_ids(split["test"])}]
# Classes without a mask in an image: unknown there, not absent.
not_annotated:
{not_annotated}
"""


CONVERTER = Converter(
    name="chest-xray",
    dataset=DATASET,
    source_help="the covid-19-chest-xray-segmentations-dataset folder (images/, masks/, structure.csv, metadata.csv)",
    convert=convert_chest_xray,
    is_converted=is_converted,
    manifest_text=chest_xray_manifest_text,
)
