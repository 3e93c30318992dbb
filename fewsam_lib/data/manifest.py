"""Dataset manifests: the one place that knows where a dataset's files are and what they mean.

A manifest is a YAML file (see ``data_manifests/`` and the README) naming the dataset, its modality,
its root folder, the image/label pairs, the label map (one segmentation task per non-background
label), the 2D slicing axis, the intensity handling and a fixed train/test split.

A dataset of 2D images (``image_dimensions: 2``, e.g. chest X-rays) has no slicing axis: each case
is one image, stored as a 2D NIfTI, and every method treats it as a single slice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from .. import paths
from ..errors import ManifestError
from ..sections import check_keys

SPLITS = ("train", "test")
# Axis of the canonical (RAS+) array that stays fixed within one 2D slice.
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
# A 2D image is held as an array of shape (rows, columns, 1): its one slice lies along axis 2.
PLANAR_SLICE_AXIS = 2
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_ENV_REFERENCE = re.compile(r"\$\{(\w+)\}")


@dataclass(frozen=True)
class Case:
    """One labelled volume."""

    case_id: str
    image: Path
    label: Path
    # Whose images these are, where a dataset holds several per patient (dataset.json's "patient"):
    # a validation carve then keeps each patient's images on one side.
    patient: str | None = None


@dataclass(frozen=True)
class IntensitySpec:
    """How raw voxel values become grey levels in [0, 255] before any backbone sees them.

    ``percentile`` (MR): clip to the volume's [lower, upper] percentiles of non-zero voxels, rescale.
    ``window`` (CT): clip to level +- width/2 (in the image's units, e.g. HU), rescale.
    ``none``: values are already grey levels; clip to [0, 255].
    """

    mode: Literal["percentile", "window", "none"]
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    level: float | None = None
    width: float | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.mode == "percentile":
            return {"mode": self.mode, "lower": self.lower_percentile, "upper": self.upper_percentile}
        if self.mode == "window":
            return {"mode": self.mode, "level": self.level, "width": self.width}
        return {"mode": self.mode}


@dataclass(frozen=True)
class Manifest:
    path: Path
    dataset: str
    modality: str
    root: Path
    cases: dict[str, Case]
    tasks: dict[int, str]
    slice_axis: int
    intensity: IntensitySpec
    split: dict[str, tuple[str, ...]]
    split_seed: int | None
    sha256: str
    description: str = ""
    # Tasks nobody annotated in a case (e.g. an organ not contoured): unknown there, not absent,
    # so they are never scored and never taught as background. Training cases have none.
    not_annotated: dict[str, frozenset[str]] = field(default_factory=dict)
    # ``fewsam validate`` then fails a case without one of its annotated tasks (else it warns).
    every_case_shows_every_task: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # "test", or "validation" for a view whose test split is validation cases carved from the
    # training cases (see :meth:`validation_view`); what a run records as the split it scored.
    evaluated_split: str = "test"
    image_dimensions: int = 3  # 2: every case is one 2D image (slice_axis is then PLANAR_SLICE_AXIS)

    @property
    def planar(self) -> bool:
        """Every case is one 2D image (drawn as displayed, scored in its own plane)."""
        return self.image_dimensions == 2

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks.values())

    def label_of(self, task: str) -> int:
        for value, name in self.tasks.items():
            if name == task:
                return value
        raise ManifestError(f"{self.path}: unknown task '{task}' (tasks: {', '.join(self.task_names)})")

    def case_ids(self, split: str | None = None) -> list[str]:
        """Case ids of one split (``train``/``test``) or of every listed pair (``None``/``all``)."""
        if split in (None, "all"):
            return list(self.cases)
        if split not in self.split:
            raise ManifestError(f"{self.path}: unknown split '{split}' (splits: {', '.join(SPLITS)}, all)")
        return list(self.split[split])

    def annotated_tasks(self, case_id: str) -> dict[int, str]:
        """The label map's tasks that were annotated in ``case_id`` (all of them unless listed)."""
        missing = self.not_annotated.get(case_id, frozenset())
        return {value: task for value, task in self.tasks.items() if task not in missing}

    def case(self, case_id: str) -> Case:
        try:
            return self.cases[case_id]
        except KeyError:
            raise ManifestError(f"{self.path}: no case '{case_id}' in dataset '{self.dataset}'") from None

    def validation_view(self, fraction: float, seed: int) -> Manifest:
        """The dataset as a validation run sees it: ``fraction`` of the training cases, drawn with
        ``seed``, become its test split and the rest its training split; the real test cases are in
        neither. Design choices are made on such views; only test-split runs report. Where the
        cases name their patients, ``fraction`` of the training patients are drawn, so that no
        patient has images on both sides."""
        if self.evaluated_split != "test":
            raise ManifestError(f"{self.path}: already a validation view")
        if len(self.split["train"]) < 2:
            raise ManifestError(
                f"{self.path}: {len(self.split['train'])} training case(s), too few to carve validation"
            )
        training = list(self.split["train"])
        patients = [self.cases[case_id].patient for case_id in training]
        if None in patients:
            carved = draw_split(training, fraction, seed)
        else:
            drawn = set(draw_split(sorted(set(patients)), fraction, seed)["test"])
            carved = {
                "train": sorted(case for case, patient in zip(training, patients) if patient not in drawn),
                "test": sorted(case for case, patient in zip(training, patients) if patient in drawn),
            }
        split = {"train": tuple(carved["train"]), "test": tuple(carved["test"])}
        return replace(self, split=split, evaluated_split="validation", extra={**self.extra, "validation_seed": seed})

    def summary(self) -> dict[str, Any]:
        """What a run records about the data that made it."""
        return {
            "dataset": self.dataset,
            "modality": self.modality,
            "manifest": paths.display(self.path),
            "manifest_sha256": self.sha256,
            "root": paths.portable(self.root),
            "tasks": {str(k): v for k, v in self.tasks.items()},
            "slice_axis": self.slice_axis,
            **({"image_dimensions": 2} if self.planar else {}),
            "intensity": self.intensity.as_dict(),
            "split_seed": self.split_seed,
            "n_train": len(self.split["train"]),
            "n_test": len(self.split["test"]),
            "evaluated_split": self.evaluated_split,
        }


def case_id_from_path(path: str | Path) -> str:
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def draw_split(case_ids: list[str], test_fraction: float, seed: int) -> dict[str, list[str]]:
    """A seeded train/test split of sorted case ids; both lists come back sorted."""
    if not 0 < test_fraction < 1:
        raise ManifestError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    ordered = sorted(case_ids)
    n_test = max(1, int(round(len(ordered) * test_fraction)))
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    test = sorted(ordered[i] for i in permutation[:n_test])
    train = sorted(set(ordered) - set(test))
    return {"train": train, "test": test}


def _expand_env(text: str, manifest_path: Path) -> str:
    def replace(match: re.Match[str]) -> str:
        variable = match.group(1)
        if variable == "FEWSAM_DATA":
            value = paths.data_root()
            value = str(value) if value else None
        elif variable == "FEWSAM_CONVERTED":
            value = str(paths.converted_root())
        else:
            value = os.environ.get(variable)
        if not value:
            raise ManifestError(
                f"{manifest_path}: root refers to ${{{variable}}} but that environment variable is not set "
                f"(e.g. export {variable}=/path/to/data)"
            )
        return value

    return _ENV_REFERENCE.sub(replace, text)


def _require(raw: dict[str, Any], key: str, manifest_path: Path) -> Any:
    if key not in raw or raw[key] in (None, ""):
        raise ManifestError(f"{manifest_path}: missing required field '{key}'")
    return raw[key]


def _parse_pairs(spec: Any, root: Path, manifest_path: Path) -> dict[str, Case]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ManifestError(f"{manifest_path}: 'pairs' must have exactly one of: dataset_json, glob, list")
    ((kind, value),) = spec.items()
    entries: list[tuple[str, Path, Path]] = []
    patients: dict[str, str] = {}
    if kind == "dataset_json":
        json_path = root / (value or "dataset.json")
        try:
            training = json.loads(json_path.read_text())["training"]
        except FileNotFoundError:
            raise ManifestError(f"{manifest_path}: {json_path} does not exist") from None
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ManifestError(f"{json_path}: not an MSD dataset.json with a 'training' list ({error})") from None
        for item in training:
            image, label = root / item["image"], root / item["label"]
            case_id = case_id_from_path(image)
            entries.append((case_id, image.resolve(), label.resolve()))
            if item.get("patient") is not None:
                patients[case_id] = str(item["patient"])
    elif kind == "glob":
        if not isinstance(value, dict) or "image" not in value or "label" not in value:
            raise ManifestError(
                f"{manifest_path}: pairs.glob needs 'image' (a glob) and 'label' (a template with {{case_id}})"
            )
        for image in sorted(root.glob(value["image"])):
            case_id = case_id_from_path(image)
            entries.append((case_id, image.resolve(), (root / value["label"].format(case_id=case_id)).resolve()))
    elif kind == "list":
        if not isinstance(value, list):
            raise ManifestError(f"{manifest_path}: pairs.list must be a list of {{case_id, image, label}}")
        for item in value:
            try:
                entries.append(
                    (str(item["case_id"]), (root / item["image"]).resolve(), (root / item["label"]).resolve())
                )
            except (KeyError, TypeError):
                raise ManifestError(
                    f"{manifest_path}: pairs.list entry {item!r} needs case_id, image and label"
                ) from None
    else:
        raise ManifestError(f"{manifest_path}: unknown pairs kind '{kind}' (use dataset_json, glob or list)")

    cases: dict[str, Case] = {}
    for case_id, image, label in sorted(entries):
        if case_id in cases:
            raise ManifestError(f"{manifest_path}: case id '{case_id}' is listed twice")
        cases[case_id] = Case(case_id, image, label, patients.get(case_id))
    return cases


def parse_labels(spec: Any, manifest_path: str | Path) -> dict[int, str]:
    if not isinstance(spec, dict) or not spec:
        raise ManifestError(f"{manifest_path}: 'labels' must map label values to task names, e.g. {{1: liver}}")
    tasks: dict[int, str] = {}
    for key, name in spec.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise ManifestError(f"{manifest_path}: label value '{key}' is not an integer") from None
        if value <= 0:
            raise ManifestError(f"{manifest_path}: label {value}: 0 is background and values must be positive")
        if not isinstance(name, str) or not _TASK_NAME.match(name):
            raise ManifestError(f"{manifest_path}: task name {name!r} must be an identifier (letters, digits, _)")
        if name in tasks.values():
            raise ManifestError(f"{manifest_path}: task name '{name}' is used twice")
        tasks[value] = name
    return dict(sorted(tasks.items()))


def parse_axis(spec: Any, manifest_path: str | Path) -> int:
    if isinstance(spec, str) and spec.lower() in SLICE_AXES:
        return SLICE_AXES[spec.lower()]
    if isinstance(spec, int) and spec in (0, 1, 2):
        return spec
    raise ManifestError(f"{manifest_path}: slice_axis must be axial, coronal, sagittal or 0/1/2, got {spec!r}")


INTENSITY_KEYS = {"percentile": ("mode", "lower", "upper"), "window": ("mode", "level", "width"), "none": ("mode",)}
MANIFEST_KEYS = (
    "dataset",
    "description",
    "modality",
    "root",
    "prepare",
    "pairs",
    "labels",
    "slice_axis",
    "image_dimensions",
    "intensity",
    "split",
    "not_annotated",
    "every_case_shows_every_task",
)


def parse_intensity(spec: Any, manifest_path: str | Path) -> IntensitySpec:
    if not isinstance(spec, dict) or "mode" not in spec:
        raise ManifestError(f"{manifest_path}: 'intensity' needs a mode: percentile, window or none")
    mode = spec["mode"]
    if mode in INTENSITY_KEYS:
        check_keys(spec, INTENSITY_KEYS[mode], f"{manifest_path}: intensity ({mode})", ManifestError)
    try:
        if mode == "percentile":
            lower, upper = float(spec.get("lower", 0.5)), float(spec.get("upper", 99.5))
            if not 0 <= lower < upper <= 100:
                raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
            return IntensitySpec("percentile", lower_percentile=lower, upper_percentile=upper)
        if mode == "window":
            level, width = float(spec["level"]), float(spec["width"])
            if width <= 0:
                raise ValueError(f"window width must be positive, got {width}")
            return IntensitySpec("window", level=level, width=width)
        if mode == "none":
            return IntensitySpec("none")
    except (KeyError, TypeError, ValueError) as error:
        raise ManifestError(f"{manifest_path}: intensity {mode}: {error}") from None
    raise ManifestError(f"{manifest_path}: unknown intensity mode {mode!r} (percentile, window or none)")


def _parse_split(
    spec: Any, cases: dict[str, Case], manifest_path: Path
) -> tuple[dict[str, tuple[str, ...]], int | None]:
    if not isinstance(spec, dict):
        raise ManifestError(f"{manifest_path}: 'split' must give train/test lists, or a seed and test_fraction")
    seed = spec.get("seed")
    if "train" in spec or "test" in spec:
        split = {name: tuple(str(c) for c in (spec.get(name) or [])) for name in SPLITS}
    elif seed is not None:
        split = {
            k: tuple(v) for k, v in draw_split(list(cases), float(spec.get("test_fraction", 0.2)), int(seed)).items()
        }
    else:
        raise ManifestError(f"{manifest_path}: 'split' must give train/test lists, or a seed and test_fraction")
    return split, (int(seed) if seed is not None else None)


def _parse_not_annotated(
    spec: Any, cases: dict[str, Case], tasks: dict[int, str], split: dict[str, tuple[str, ...]], manifest_path: Path
) -> dict[str, frozenset[str]]:
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ManifestError(f"{manifest_path}: 'not_annotated' must map case ids to lists of task names")
    result = {}
    for case_id, names in spec.items():
        case_id = str(case_id)
        if case_id not in cases:
            raise ManifestError(f"{manifest_path}: not_annotated names case '{case_id}' without an image/label pair")
        names = [names] if isinstance(names, str) else list(names or [])
        unknown = sorted(set(names) - set(tasks.values()))
        if unknown:
            raise ManifestError(f"{manifest_path}: not_annotated {case_id}: unknown task(s) {', '.join(unknown)}")
        if case_id in split["train"]:
            raise ManifestError(
                f"{manifest_path}: training case '{case_id}' lacks annotations of "
                f"{', '.join(names)}; every method learns from full label maps, so leave it "
                f"out of the train split"
            )
        result[case_id] = frozenset(names)
    return result


def _parse_flag(raw: dict[str, Any], key: str, manifest_path: Path) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ManifestError(f"{manifest_path}: '{key}' must be true or false, got {value!r}")
    return value


def parse_dimensions(raw: dict[str, Any], manifest_path: Path) -> tuple[int, int]:
    """(image_dimensions, slice_axis): a 3D dataset names its slicing axis, a 2D one must not."""
    dimensions = raw.get("image_dimensions", 3)
    if dimensions not in (2, 3) or isinstance(dimensions, bool):
        raise ManifestError(f"{manifest_path}: image_dimensions must be 2 or 3, got {dimensions!r}")
    if dimensions == 3:
        return 3, parse_axis(_require(raw, "slice_axis", manifest_path), manifest_path)
    if raw.get("slice_axis") is not None:
        raise ManifestError(
            f"{manifest_path}: a dataset of 2D images (image_dimensions: 2) has no slice_axis; remove it"
        )
    return 2, PLANAR_SLICE_AXIS


def load_manifest(path: str | Path) -> Manifest:
    """Read and structurally check a manifest. File-level checks live in :func:`validate`."""
    manifest_path = Path(path).resolve()
    if manifest_path.is_dir():
        raise ManifestError(f"{manifest_path}: is a folder, not a manifest file (a .yaml in data_manifests/)")
    try:
        text = manifest_path.read_text()
    except FileNotFoundError:
        raise ManifestError(f"{manifest_path}: manifest does not exist") from None
    except (PermissionError, UnicodeDecodeError) as error:
        raise ManifestError(f"{manifest_path}: cannot be read as a text manifest ({error})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ManifestError(f"{manifest_path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{manifest_path}: a manifest must be a YAML mapping")
    check_keys(raw, MANIFEST_KEYS, str(manifest_path), ManifestError)

    root = Path(_expand_env(str(_require(raw, "root", manifest_path)), manifest_path)).expanduser()
    if not root.is_absolute():
        root = manifest_path.parent / root
    root = root.resolve()
    if not root.is_dir():
        if raw.get("prepare"):
            raise ManifestError(
                f"{manifest_path}: data root {root} is not a folder; prepare it with "
                f"`{_expand_env(str(raw['prepare']), manifest_path)}` (or `make data`)"
            )
        raise ManifestError(f"{manifest_path}: data root {root} is not a folder (is FEWSAM_DATA right?)")

    cases = _parse_pairs(_require(raw, "pairs", manifest_path), root, manifest_path)
    split, seed = _parse_split(_require(raw, "split", manifest_path), cases, manifest_path)
    tasks = parse_labels(_require(raw, "labels", manifest_path), manifest_path)
    dimensions, slice_axis = parse_dimensions(raw, manifest_path)
    return Manifest(
        path=manifest_path,
        dataset=str(_require(raw, "dataset", manifest_path)),
        modality=str(_require(raw, "modality", manifest_path)),
        root=root,
        cases=cases,
        tasks=tasks,
        slice_axis=slice_axis,
        image_dimensions=dimensions,
        intensity=parse_intensity(_require(raw, "intensity", manifest_path), manifest_path),
        split=split,
        split_seed=seed,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        description=str(raw.get("description", "")),
        not_annotated=_parse_not_annotated(raw.get("not_annotated"), cases, tasks, split, manifest_path),
        extra={"prepare": raw["prepare"]} if "prepare" in raw else {},
        every_case_shows_every_task=_parse_flag(raw, "every_case_shows_every_task", manifest_path),
    )
