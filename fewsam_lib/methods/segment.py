"""The user's case: label a few slices of one volume, segment another (``fewsam segment``).

The support label volume may be partial: every slice with at least one labelled voxel counts as
annotated (and fully annotated: a task missing from it is a negative example); slices with no
label at all are ignored. The trained decoder can be saved and reused with ``--model``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import paths
from ..data.manifest import NIFTI_SUFFIXES, SLICE_AXES, parse_axis, parse_intensity, parse_labels
from ..data.volumes import image_grey_slices, load_volume, take_slice
from ..encoders.cache import EmbeddingCache
from ..errors import FewsamError
from ..methods.fewshot import FEWSHOT, FewShotModel, TrainingSettings, encode_twins, fit_fewshot, get_fewshot_variant

DEFAULT_INTENSITY = {"mode": "percentile", "lower": 0.5, "upper": 99.5}


@dataclass
class SegmentResult:
    output: Path
    tasks: dict[int, str]
    support_slices: list[int]
    predicted_voxels: dict[str, int]
    model_file: Path | None


def parse_label_names(text: str | None, values: list[int]) -> dict[int, str]:
    """``"1=anterior,2=posterior"`` -> {1: "anterior", 2: "posterior"}; default names ``label_<v>``."""
    if not text:
        return {value: f"label_{value}" for value in values}
    pairs: dict[Any, Any] = {}
    for item in text.split(","):
        key, separator, name = item.partition("=")
        if not separator:
            raise FewsamError(f"--labels: '{item}' is not VALUE=NAME (e.g. 1=anterior,2=posterior)")
        pairs[key.strip()] = name.strip()
    return parse_labels(pairs, "--labels")


def annotated_slices(label: np.ndarray, axis: int) -> list[int]:
    moved = np.moveaxis(label, axis, 0).reshape(label.shape[axis], -1)
    return [int(i) for i in np.flatnonzero(moved.any(axis=1))]


def fit_on_partial_labels(
    support: Path,
    support_labels: Path,
    cache: EmbeddingCache,
    tasks_text: str | None,
    slice_axis: str,
    intensity: dict[str, Any],
    variant: str,
    settings: TrainingSettings,
    seed: int,
    progress: bool,
) -> tuple[FewShotModel, list[int]]:
    """Train a few-shot decoder on the annotated slices of one support volume."""
    axis = parse_axis(slice_axis, "--slice-axis")
    volume = load_volume(support, support_labels, "support")  # mismatched grids fail here, naming both files
    indices = annotated_slices(volume.label, axis)
    if not indices:
        raise FewsamError(
            f"{support_labels}: no labelled slice (every voxel is 0); label at least one slice of each structure"
        )
    present = sorted(int(v) for v in np.unique(volume.label) if v > 0)
    tasks = parse_label_names(tasks_text, present)
    foreign = sorted(set(present) - set(tasks))
    if foreign:
        raise FewsamError(f"{support_labels}: label values {foreign} are not named in --labels {tasks_text}")
    absent = [name for value, name in tasks.items() if value not in present]
    if absent:
        raise FewsamError(f"{support_labels}: no voxel of {', '.join(absent)}; each task needs a labelled slice")
    grey = image_grey_slices(volume.image, parse_intensity(intensity, str(support)), axis)
    greys = [grey[i] for i in indices]
    embeddings = list(cache.get_many(greys, progress=progress, desc="encode support"))
    labels = [take_slice(volume.label, axis, i) for i in indices]
    chosen = get_fewshot_variant(variant).with_schedule(**asdict(settings))
    model, _ = fit_fewshot(
        cache.backbone.model,
        cache.spec.name,
        embeddings,
        labels,
        tasks,
        chosen,
        seed,
        {"slice_axis": axis, "intensity": intensity},
        progress,
        encode_twins(cache, greys, labels, chosen, seed, progress),
    )
    return model, indices


def segment_query(
    query: str | Path,
    out: str | Path,
    backbone: str = "mobile_sam",
    support: str | Path | None = None,
    support_labels: str | Path | None = None,
    model_file: str | Path | None = None,
    save_model: str | Path | None = None,
    labels: str | None = None,
    slice_axis: str = "axial",
    intensity: dict[str, Any] | None = None,
    variant: str = FEWSHOT.default_variant,
    settings: TrainingSettings | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    encoder_path: str | None = None,
    progress: bool = True,
) -> SegmentResult:
    """Train on (or load) a few-shot decoder, segment every slice of ``query``, write the label volume."""
    if slice_axis not in SLICE_AXES:
        raise FewsamError(f"--slice-axis must be one of {', '.join(SLICE_AXES)}, got '{slice_axis}'")
    if model_file is None and (support is None or support_labels is None):
        raise FewsamError("give --support and --support-labels (to train), or --model (a saved few-shot model)")
    if model_file is not None and (support is not None or support_labels is not None):
        raise FewsamError("--model and --support/--support-labels exclude each other: load, or train")
    paths.check_writable_file(out, "--out", suffixes=NIFTI_SUFFIXES)
    if save_model is not None:
        paths.check_writable_file(save_model, "--save-model")
    # An unknown backbone or encoder path fails here.
    cache = EmbeddingCache(backbone, checkpoint=checkpoint, device=device, encoder_path=encoder_path)
    query_volume = load_volume(query, None, "query")
    support_indices: list[int] = []
    if model_file is not None:
        model = FewShotModel.load(model_file, cache.backbone.model, backbone)
    else:
        model, support_indices = fit_on_partial_labels(
            Path(support),
            Path(support_labels),
            cache,
            labels,
            slice_axis,
            intensity or DEFAULT_INTENSITY,
            variant,
            settings or TrainingSettings(),
            seed,
            progress,
        )
        if save_model is not None:
            model.save(save_model)
    axis = model.preprocessing["slice_axis"]
    grey = image_grey_slices(query_volume.image, parse_intensity(model.preprocessing["intensity"], str(query)), axis)
    embeddings = cache.get_many(grey, progress=progress, desc="encode query")
    prediction = model.segment_volume(cache.backbone.model, embeddings, query_volume.shape, axis)
    out = Path(out)
    query_volume.save_on_original_grid(prediction, out)
    return SegmentResult(
        out,
        model.tasks,
        support_indices,
        {name: int((prediction == value).sum()) for value, name in model.tasks.items()},
        Path(save_model) if save_model else (Path(model_file) if model_file else None),
    )
