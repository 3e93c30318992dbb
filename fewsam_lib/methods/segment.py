"""The user's case: label a few slices of a volume, segment the rest of it or another volume
(``fewsam segment``).

The support label volume may be partial: every slice with at least one labelled voxel counts as
annotated (and fully annotated: a task missing from it is a negative example); slices with no
label at all are ignored. The trained model can be saved and reused with ``--model``; a saved model
given a support too has its location head fine-tuned on the support's labelled slices first
(``fewshot_adapted_...`` in the within-volume track). When the query is the support volume, its
labelled slices keep their labels and the other slices blend the model with the labelled slices
around them by default (``fewshot_blended_...``, the track's best, docs/results.md), or, with
``--no-blend``, the slices next to a labelled one copy it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import paths
from ..data.manifest import NIFTI_SUFFIXES, SLICE_AXES, parse_axis, parse_intensity, parse_labels
from ..data.volumes import image_grey_slices, load_volume, take_slice
from ..encoders.cache import EmbeddingCache
from ..errors import FewsamError
from .fewshot import (
    ADAPT_STEPS,
    FEWSHOT,
    FewShotModel,
    TrainingSettings,
    encode_twins,
    fit_fewshot,
    get_fewshot_variant,
)
from .within_volume import COPY_DISTANCE, SparseLabels, blended_segmentation, copy_near_labelled

DEFAULT_INTENSITY = {"mode": "percentile", "lower": 0.5, "upper": 99.5}


@dataclass
class SegmentResult:
    output: Path
    tasks: dict[int, str]
    support_slices: list[int]
    predicted_voxels: dict[str, int]
    model_file: Path | None
    adapted: bool = False  # a loaded model's location head fine-tuned on the support's labelled slices
    copy_distance: int | None = None  # the query is the support: labels copied this far from a labelled slice
    blended: bool = False  # the query is the support: the model blended with the labelled slices around each slice


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


@dataclass
class PartialLabels:
    """The annotated slices of one support volume, cut and normalised for the encoder."""

    indices: list[int]  # slice indices along the slice axis
    greys: list[np.ndarray]  # (H, W) encoder-ready grey slices
    labels: list[np.ndarray]  # (H, W) label maps
    present: list[int]  # label values with a voxel on them

    def by_index(self) -> dict[int, np.ndarray]:
        return dict(zip(self.indices, self.labels))


def read_partial_labels(support: Path, support_labels: Path, axis: int, intensity: dict[str, Any]) -> PartialLabels:
    """Every slice of ``support_labels`` with a labelled voxel, and the support image's slices there."""
    volume = load_volume(support, support_labels, "support")  # mismatched grids fail here, naming both files
    indices = annotated_slices(volume.label, axis)
    if not indices:
        raise FewsamError(
            f"{support_labels}: no labelled slice (every voxel is 0); label at least one slice of each structure"
        )
    grey = image_grey_slices(volume.image, parse_intensity(intensity, str(support)), axis)
    return PartialLabels(
        indices,
        [grey[i] for i in indices],
        [take_slice(volume.label, axis, i) for i in indices],
        sorted(int(v) for v in np.unique(volume.label) if v > 0),
    )


def fit_on_partial_labels(
    partial: PartialLabels,
    support_labels: Path,
    cache: EmbeddingCache,
    tasks_text: str | None,
    preprocessing: dict[str, Any],
    variant: str,
    settings: TrainingSettings,
    seed: int,
    progress: bool,
    head_steps: int | None = None,
) -> FewShotModel:
    """Train a few-shot model on the annotated slices of one support volume (``head_steps``: the
    location head's training steps instead of the variant's)."""
    tasks = parse_label_names(tasks_text, partial.present)
    foreign = sorted(set(partial.present) - set(tasks))
    if foreign:
        raise FewsamError(f"{support_labels}: label values {foreign} are not named in --labels {tasks_text}")
    absent = [name for value, name in tasks.items() if value not in partial.present]
    if absent:
        raise FewsamError(f"{support_labels}: no voxel of {', '.join(absent)}; each task needs a labelled slice")
    embeddings = list(cache.get_many(partial.greys, progress=progress, desc="encode support"))
    chosen = get_fewshot_variant(variant).with_schedule(**asdict(settings))
    if head_steps is not None:
        chosen = replace(chosen, locator=replace(chosen.locator, steps=head_steps))
    model, _ = fit_fewshot(
        cache.backbone.model,
        cache.spec.name,
        embeddings,
        partial.labels,
        tasks,
        chosen,
        seed,
        preprocessing,
        progress,
        encode_twins(cache, partial.greys, partial.labels, chosen, seed, progress),
    )
    return model


def adapt_to_partial_labels(
    model: FewShotModel,
    model_file: Path,
    partial: PartialLabels,
    support_labels: Path,
    cache: EmbeddingCache,
    steps: int,
    seed: int,
    progress: bool,
) -> FewShotModel:
    """A saved model's location head fine-tuned on the annotated slices of one support volume."""
    foreign = sorted(set(partial.present) - set(model.tasks))
    if foreign:
        known = ", ".join(f"{value}={name}" for value, name in model.tasks.items())
        raise FewsamError(f"{support_labels}: label values {foreign} are not tasks of {model_file} ({known})")
    embeddings = list(cache.get_many(partial.greys, progress=progress, desc="encode support"))
    return model.adapted(embeddings, partial.labels, seed, steps=steps)


def typical_gap(indices: list[int]) -> int:
    """The median distance between consecutive labelled slices (1 for a single one): the blend's
    ``step``, the distance over which it measures how well a labelled mask persists."""
    return max(1, int(np.median(np.diff(indices)))) if len(indices) > 1 else 1


def _same_file(first: str | Path | None, second: str | Path) -> bool:
    return first is not None and Path(first).resolve() == Path(second).resolve()


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
    adapt_steps: int = ADAPT_STEPS,
    copy_distance: int | None = None,
    head_steps: int | None = None,
    blend: bool | None = None,
) -> SegmentResult:
    """Segment every slice of ``query`` with a few-shot model and write the label volume. The model is
    trained on the support's labelled slices, or loaded (``model_file``), or loaded and its location
    head fine-tuned on the support's labelled slices (both given). When the query is the support
    volume, its labelled slices keep their labels, and slices within ``copy_distance`` (default
    :data:`COPY_DISTANCE`; 0 with ``blend``) of one take its labels; with ``blend`` (default: when
    the query is the support), each other slice blends the model's probabilities with the labelled
    slices around it (the within-volume track's ``fewshot_blended_...``). ``head_steps`` replaces the
    variant's location-head training steps when a model is trained."""
    if slice_axis not in SLICE_AXES:
        raise FewsamError(f"--slice-axis must be one of {', '.join(SLICE_AXES)}, got '{slice_axis}'")
    if (support is None) != (support_labels is None):
        raise FewsamError("give --support and --support-labels together (an image and its partial labels)")
    if model_file is None and support is None:
        raise FewsamError("give --support and --support-labels (to train), or --model (a saved few-shot model)")
    if head_steps is not None:
        if model_file is not None:
            raise FewsamError("--head-steps trains a new model's location head; with --model use --adapt-steps")
        if get_fewshot_variant(variant).locator is None:
            raise FewsamError(f"--head-steps: variant {variant} has no location head")
    same_volume = _same_file(support, query)
    if blend is None:
        blend = same_volume  # the within-volume track's best (docs/results.md)
    if blend and not same_volume:
        raise FewsamError("--blend mixes in the labelled slices around each slice: give --query the --support volume")
    if copy_distance is None:
        copy_distance = COPY_DISTANCE if same_volume and not blend else 0
    if copy_distance < 0:
        raise FewsamError(f"--copy-distance must be 0 or more, got {copy_distance}")
    if copy_distance > 0 and not same_volume:
        raise FewsamError("--copy-distance copies labels within one volume: give the --support volume as --query")
    paths.check_writable_file(out, "--out", suffixes=NIFTI_SUFFIXES)
    if save_model is not None:
        paths.check_writable_file(save_model, "--save-model")
    # An unknown backbone or encoder path fails here.
    cache = EmbeddingCache(backbone, checkpoint=checkpoint, device=device, encoder_path=encoder_path)
    query_volume = load_volume(query, None, "query")
    model = FewShotModel.load(model_file, cache.backbone.model, backbone) if model_file is not None else None
    if model is not None:
        preprocessing = model.preprocessing
    else:
        preprocessing = {
            "slice_axis": parse_axis(slice_axis, "--slice-axis"),
            "intensity": intensity or DEFAULT_INTENSITY,
        }
    partial = None
    if support is not None:
        support, support_labels = Path(support), Path(support_labels)
        partial = read_partial_labels(support, support_labels, preprocessing["slice_axis"], preprocessing["intensity"])
        if model is None:
            model = fit_on_partial_labels(
                partial,
                support_labels,
                cache,
                labels,
                preprocessing,
                variant,
                settings or TrainingSettings(),
                seed,
                progress,
                head_steps,
            )
        elif adapt_steps > 0:
            model = adapt_to_partial_labels(
                model, Path(model_file), partial, support_labels, cache, adapt_steps, seed, progress
            )
    if save_model is not None:  # the model that segments: trained, adapted, or as loaded
        model.save(save_model)
    axis = model.preprocessing["slice_axis"]
    grey = image_grey_slices(query_volume.image, parse_intensity(model.preprocessing["intensity"], str(query)), axis)
    embeddings = cache.get_many(grey, progress=progress, desc="encode query")
    if blend:
        labelled = SparseLabels(axis, typical_gap(partial.indices), partial.by_index())
        span = range(query_volume.shape[axis])
        labelled_embeddings = [embeddings[i] for i in partial.indices]
        blended = blended_segmentation(model, cache.backbone.model, embeddings, span, labelled, labelled_embeddings)
        prediction = np.ascontiguousarray(np.moveaxis(blended, 0, axis))
    else:
        prediction = model.segment_volume(cache.backbone.model, embeddings, query_volume.shape, axis)
    if same_volume:
        prediction = copy_near_labelled(prediction, axis, partial.by_index(), copy_distance)
    out = Path(out)
    query_volume.save_on_original_grid(prediction, out)
    return SegmentResult(
        out,
        model.tasks,
        partial.indices if partial is not None else [],
        {name: int((prediction == value).sum()) for value, name in model.tasks.items()},
        Path(save_model) if save_model else (Path(model_file) if model_file else None),
        adapted=model_file is not None and partial is not None and adapt_steps > 0,
        copy_distance=copy_distance if same_volume else None,
        blended=blend,
    )
