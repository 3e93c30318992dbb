"""The paper's use case as a benchmark track: label every k-th slice of a volume, segment the rest.

For each test volume, the slices from the first to the last that holds any task (its *extent*,
within the profile's slab) are labelled every ``k`` slices, the first one drawn with the seed, and
a labelled slice is labelled for every task (as a person outlining a slice outlines all its
structures; ``fewsam segment`` reads partial labels the same way). The methods see those slices'
labels and nothing else of the ground truth: each gets a copy of the volume whose label holds only
the labelled slices (:class:`SparseLabels`). The scored slices are all the others; labelled
slices keep their given labels in the saved prediction but are never scored.

A method segments the slices within ``k // 2`` of a labelled slice (every slice between the first
and the last labelled one, and half a step beyond them); farther slices stay empty. Each method is
one registered :class:`WithinVolumeVariant`.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch

from ..data.collection import draw_collection
from ..data.manifest import Manifest
from ..data.volumes import Volume, grey_slices, take_slice, task_voxels_per_slice
from ..encoders.cache import EmbeddingCache
from ..errors import FewsamError, lookup
from ..sections import check_variant_keys
from .base import CasePrediction, Method, MethodRun, PlannedRun, RunContext, register_method
from .fewshot import (
    ADAPT_LEARNING_RATE,
    ADAPT_STEPS,
    CURVE_FILE,
    MODEL_FILE,
    FewShotModel,
    FewShotVariant,
    encode_twins,
    fit_fewshot,
    get_fewshot_variant,
    train_on_collection,
)
from .prompting import bounding_box, box_prompt_tokens
from .sam_decoding import decode_masks, resolve_overlaps

STEPS = (4, 8, 16)
BUDGET = "every_kth"  # run.json's ``budget``: every k-th slice labelled, k the run's ``shots``
BOX_GROWTH = 0.10  # sam_box_propagated grows the nearest labelled mask's box by 10% of its size per side
# Slices this close to a labelled slice take its labels in the adapted few-shot method and in
# ``fewsam segment`` on the support volume itself (chosen on validation, docs/results.md).
COPY_DISTANCE = 1
# How hard the blended variant chooses between a model and the labelled slices (chosen on validation,
# docs/results.md).
BLEND_SHARPNESS = 4.0


def labelled_slice_indices(
    label: np.ndarray, axis: int, tasks: dict[int, str], step: int, seed: int, case_id: str, extent: range | None = None
) -> list[int]:
    """Every ``step``-th slice of the tasks' extent (within ``extent``), from a first slice drawn with
    ``seed`` among the extent's first ``step`` slices (one draw per case: volumes differ)."""
    if step < 1:
        raise FewsamError(f"the labelling step must be at least 1, got {step}")
    counts = task_voxels_per_slice(label, axis, tasks)
    holding = [int(i) for i in counts.index[(counts > 0).any(axis=1)] if extent is None or i in extent]
    if not holding:
        return []
    first, last = holding[0], holding[-1]
    rng = np.random.default_rng([seed, zlib.crc32(case_id.encode())])
    start = first + int(rng.integers(min(step, last - first + 1)))
    return list(range(start, last + 1, step))


@dataclass(frozen=True)
class SparseLabels:
    """The labelled slices of one volume: all a within-volume method may know of its ground truth."""

    axis: int
    step: int
    slices: dict[int, np.ndarray]  # slice index -> 2D label map (every task on it)

    @property
    def indices(self) -> list[int]:
        return sorted(self.slices)

    def nearest(self, index: int) -> int | None:
        """The labelled slice nearest to ``index`` (the lower one on a tie), if within ``step // 2``
        of it or between two labelled slices; else None."""
        labelled = np.asarray(self.indices)
        if not len(labelled):
            return None
        distance = np.abs(labelled - index)
        nearest = int(labelled[np.argmin(distance)])  # argmin takes the first: the lower index on a tie
        inside = labelled[0] <= index <= labelled[-1]
        return nearest if inside or abs(nearest - index) <= self.step // 2 else None

    def dense(self, shape: tuple[int, ...]) -> np.ndarray:
        """A label volume with the labelled slices filled and every other voxel 0."""
        volume = np.zeros(shape, dtype=np.uint8)
        moved = np.moveaxis(volume, self.axis, 0)
        for index, labels in self.slices.items():
            moved[index] = labels
        return volume

    def reached(self, depth: int) -> list[int]:
        """The unlabelled slices a method segments (every one :meth:`nearest` reaches)."""
        return [i for i in range(depth) if i not in self.slices and self.nearest(i) is not None]


@dataclass
class TrackInputs:
    """What a within-volume method gets for one volume: the image, the labelled slices, the tasks,
    the run's seed, and a SAM embedding cache for methods that use one."""

    volume: Volume  # its label holds the labelled slices only
    support: SparseLabels
    tasks: dict[int, str]
    seed: int
    grey: Any  # indices -> encoder-ready grey slices (the manifest's intensity handling)
    cache: EmbeddingCache | None
    progress: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return self.volume.shape

    def empty(self) -> np.ndarray:
        return np.zeros(self.shape, dtype=np.uint8)


@dataclass(frozen=True)
class WithinVolumeVariant:
    """One method of the track. Subclasses set the class variables and override :meth:`segment`."""

    name: ClassVar[str]
    description: ClassVar[str]
    label: ClassVar[str]  # how the report names it
    uses_backbone: ClassVar[bool] = False

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "uses_backbone": self.uses_backbone}

    def segment(self, inputs: TrackInputs) -> np.ndarray:
        """The label volume for every slice :meth:`SparseLabels.reached` names (others 0)."""
        raise NotImplementedError

    def prepared(
        self, manifest: Manifest, seed: int, cache: EmbeddingCache | None, progress: bool
    ) -> WithinVolumePrepared:
        """Work shared by every volume of a run (none by default): the variant to segment with."""
        return WithinVolumePrepared(self)


@dataclass
class WithinVolumePrepared:
    """A variant ready to segment, with what its preparation cost and recorded."""

    variant: WithinVolumeVariant
    seconds: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)  # for run.json's ``extra``
    files: dict[str, Callable[[Path], Any]] = field(default_factory=dict)  # file name -> its writer


WITHIN_VOLUME_VARIANTS: dict[str, WithinVolumeVariant] = {}


def register_within_volume_variant(variant: WithinVolumeVariant) -> WithinVolumeVariant:
    if variant.name in WITHIN_VOLUME_VARIANTS:
        raise ValueError(f"within-volume method '{variant.name}' is already registered")
    WITHIN_VOLUME_VARIANTS[variant.name] = variant
    return variant


def get_within_volume_variant(name: str) -> WithinVolumeVariant:
    """A registered method by name; a run's full name (``fewshot_centred-1a2b3c4d``) gives its base."""
    if name not in WITHIN_VOLUME_VARIANTS and "-" in name:
        name = name.rsplit("-", 1)[0]
    return lookup(WITHIN_VOLUME_VARIANTS, name, "within-volume method")


def copy_near_labelled(
    labels: np.ndarray,
    axis: int,
    labelled: dict[int, np.ndarray],
    distance: int,
    only: list[int] | None = None,
) -> np.ndarray:
    """``labels`` (a label volume) with each labelled slice's map (``labelled``: index -> (H, W)) on
    itself and on every slice within ``distance`` of it, the nearest labelled slice winning (the lower
    on a tie); with ``only``, other slices are left as they are."""
    result = labels.copy()
    moved = np.moveaxis(result, axis, 0)
    indices = np.asarray(sorted(labelled))
    if not len(indices):
        return result
    for index in range(moved.shape[0]) if only is None else [*only, *labelled]:
        gaps = np.abs(indices - index)
        if gaps.min() <= distance:
            moved[index] = labelled[int(indices[np.argmin(gaps)])]  # argmin takes the first: the lower on a tie
    return result


def _put(volume: np.ndarray, axis: int, index: int, labels: np.ndarray) -> None:
    np.moveaxis(volume, axis, 0)[index] = labels


class NearestSlice(WithinVolumeVariant):
    name = "nearest_slice"
    description = "every slice takes the label map of its nearest labelled slice"
    label = "nearest labelled slice"

    def segment(self, inputs: TrackInputs) -> np.ndarray:
        support, output = inputs.support, inputs.empty()
        for index in support.reached(inputs.shape[support.axis]):
            _put(output, support.axis, index, support.slices[support.nearest(index)])
        return output


class Interpolation(WithinVolumeVariant):
    name = "interpolation"
    description = (
        "ITK's morphological contour interpolation between labelled slices, per task along the slice "
        "axis; beyond a task's first and last labelled slice, its nearest labelled mask is copied"
    )
    label = "interpolation (ITK)"

    def segment(self, inputs: TrackInputs) -> np.ndarray:
        import itk  # the import takes seconds: only runs of this method pay for it

        # With more than one thread the interpolator corrupts the heap now and then (a process
        # that ran it some dozens of times aborts in malloc; tests/test_within_volume.py repeats it).
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
        support = inputs.support
        sparse = support.dense(inputs.shape)
        interpolator = itk.MorphologicalContourInterpolator.New(itk.image_from_array(sparse))
        interpolator.SetAxis(sparse.ndim - 1 - support.axis)  # ITK indexes axes in reverse of numpy
        interpolator.SetLabel(0)  # every label
        interpolator.Update()
        output = np.asarray(itk.array_from_image(interpolator.GetOutput()), dtype=np.uint8).copy()
        moved, reach = np.moveaxis(output, support.axis, 0), support.step // 2
        for value in inputs.tasks:
            holding = [i for i in support.indices if (support.slices[i] == value).any()]
            for end in holding[:1] + holding[-1:]:
                for index in range(max(end - reach, 0), min(end + reach + 1, moved.shape[0])):
                    if holding[0] <= index <= holding[-1]:
                        continue
                    moved[index][(support.slices[end] == value) & (moved[index] == 0)] = value
        return output


def grown_box(mask: np.ndarray, growth: float = BOX_GROWTH) -> np.ndarray:
    """The pixel-edge box of a non-empty mask, grown by ``growth`` of its size (at least 1 pixel) per
    side and clipped to the slice."""
    box = bounding_box(mask)
    margin = np.maximum(1.0, np.ceil(growth * np.array([box[2] - box[0], box[3] - box[1]])))
    grown = box + np.array([-margin[0], -margin[1], margin[0], margin[1]])
    height, width = mask.shape
    return np.clip(grown, 0, [width, height, width, height])


class SamBoxPropagated(WithinVolumeVariant):
    name = "sam_box_propagated"
    description = (
        "SAM on each slice with, per task, the box of the nearest labelled slice's mask grown by 10% "
        "per side (no box where that mask is empty): a semi-automatic workflow without any prompt "
        "from the slice itself"
    )
    label = "SAM box from nearest labelled slice"
    uses_backbone = True

    @torch.inference_mode()
    def segment(self, inputs: TrackInputs) -> np.ndarray:
        support, output = inputs.support, inputs.empty()
        model = inputs.cache.backbone.model
        targets = support.reached(inputs.shape[support.axis])
        embeddings = inputs.cache.get_many(inputs.grey(targets), progress=inputs.progress, desc="encode")
        for index, embedding in zip(targets, embeddings):
            source = support.slices[support.nearest(index)]
            values = [value for value in inputs.tasks if (source == value).any()]
            if not values:
                continue
            boxes = np.stack([grown_box(source == value) for value in values])
            sparse, dense = box_prompt_tokens(model, boxes, source.shape)
            logits, _ = decode_masks(model.mask_decoder, model, embedding, sparse, dense, source.shape)
            _put(output, support.axis, index, resolve_overlaps(logits[:, 0].cpu().numpy(), values))
        return output


def _reached_span(inputs: TrackInputs, targets: list[int]) -> tuple[range, torch.Tensor]:
    """The slices from the first to the last of ``targets`` (consecutive: a locator smooths across
    slices) and their embeddings (N, 256, 64, 64)."""
    span = range(targets[0], targets[-1] + 1)
    grey = inputs.grey(span)
    return span, torch.stack(list(inputs.cache.get_many(grey, progress=inputs.progress, desc="encode")))


def _segment_reached(model: FewShotModel, inputs: TrackInputs, targets: list[int]) -> np.ndarray:
    """The few-shot model's label volume over the slices from the first to the last of ``targets``."""
    span, embeddings = _reached_span(inputs, targets)
    return model.segment_volume(inputs.cache.backbone.model, embeddings, inputs.shape, inputs.support.axis, span)


@dataclass(frozen=True)
class FewShotOnVolume(WithinVolumeVariant):
    """A few-shot model (``fewsam segment``'s path) trained on the volume's own labelled slices with
    the few-shot variant's fixed schedule, then run on the slices between and around them."""

    fewshot: FewShotVariant
    uses_backbone = True

    @property
    def name(self) -> str:  # a profile's shorter schedule adds its hash, as for few-shot runs
        return f"fewshot_{self.fewshot.name}"

    @property
    def description(self) -> str:
        return f"few-shot variant {self.fewshot.base} trained on this volume's labelled slices"

    @property
    def label(self) -> str:
        return f"few-shot {self.fewshot.base} (own slices)"

    def definition(self) -> dict[str, Any]:
        return {**super().definition(), "fewshot": self.fewshot.definition()}

    def segment(self, inputs: TrackInputs) -> np.ndarray:
        support, output, cache = inputs.support, inputs.empty(), inputs.cache
        # A task without a voxel on any labelled slice has nothing to learn from: it stays empty.
        tasks = {v: name for v, name in inputs.tasks.items() if any((s == v).any() for s in support.slices.values())}
        targets = support.reached(inputs.shape[support.axis])
        if not tasks or not targets:
            return output
        greys, labels = inputs.grey(support.indices), [support.slices[i] for i in support.indices]
        labelled = list(cache.get_many(greys, progress=inputs.progress, desc="encode labelled"))
        model, _ = fit_fewshot(
            cache.backbone.model,
            cache.spec.name,
            labelled,
            labels,
            tasks,
            self.fewshot,
            inputs.seed,
            {"slice_axis": support.axis},
            inputs.progress,
            encode_twins(cache, greys, labels, self.fewshot, inputs.seed, inputs.progress),
        )
        segmented = _segment_reached(model, inputs, targets)
        for index in targets:
            _put(output, support.axis, index, take_slice(segmented, support.axis, index))
        return output


@dataclass(frozen=True)
class FewShotAdapted(WithinVolumeVariant):
    """The cross-subject few-shot model (the variant trained on a collection of ``shots`` slices per
    task from the training cases, the run's seed) with its location head fine-tuned on the volume's
    own labelled slices; a slice next to a labelled one (within ``copy_distance``) takes its labels.

    Chosen on validation (docs/results.md): fine-tuning the head took CT from far behind copying to
    level with it at k=8, and copying at distance 1 gained on CT and cost little on hippocampus."""

    fewshot: FewShotVariant
    shots: int = 20
    head_steps: int = ADAPT_STEPS
    head_learning_rate: float = ADAPT_LEARNING_RATE
    copy_distance: int = COPY_DISTANCE
    model: FewShotModel | None = field(default=None, compare=False, repr=False)
    uses_backbone = True

    @property
    def name(self) -> str:
        return f"fewshot_adapted_{self.fewshot.name}"

    @property
    def description(self) -> str:
        return (
            f"few-shot variant {self.fewshot.base} trained on {self.shots} slices per task of the training cases, "
            f"its location head fine-tuned on this volume's labelled slices ({self.head_steps} steps); slices "
            f"within {self.copy_distance} of a labelled slice copy its labels"
        )

    @property
    def label(self) -> str:
        return f"few-shot {self.fewshot.base} ({self.shots}-shot collection, head tuned on own slices)"

    def definition(self) -> dict[str, Any]:
        own = {"shots": self.shots, "head_steps": self.head_steps, "head_learning_rate": self.head_learning_rate}
        own["copy_distance"] = self.copy_distance
        return {**super().definition(), **own, "fewshot": self.fewshot.definition()}

    def prepared(
        self, manifest: Manifest, seed: int, cache: EmbeddingCache | None, progress: bool
    ) -> WithinVolumePrepared:
        collection = draw_collection(manifest, self.shots, seed)
        trained = train_on_collection(manifest, collection, cache, self.fewshot, seed, progress)
        record = {"collection": collection.as_dict(), **trained.record()}
        files = {MODEL_FILE: trained.model.save, CURVE_FILE: lambda path: trained.curve.to_csv(path, index=False)}
        return WithinVolumePrepared(replace(self, model=trained.model), trained.train_seconds, record, files)

    def segment(self, inputs: TrackInputs) -> np.ndarray:
        if self.model is None:
            raise FewsamError(f"within-volume method {self.name} segments only once prepared (its collection model)")
        support, output, cache = inputs.support, inputs.empty(), inputs.cache
        targets = support.reached(inputs.shape[support.axis])
        if not targets:
            return output
        labelled = list(cache.get_many(inputs.grey(support.indices), progress=inputs.progress, desc="encode labelled"))
        labels = [support.slices[i] for i in support.indices]
        model = self.model.adapted(labelled, labels, inputs.seed, self.head_steps, self.head_learning_rate)
        return self.label_reached(model, labelled, inputs, targets)

    def label_reached(
        self, model: FewShotModel, labelled: list[torch.Tensor], inputs: TrackInputs, targets: list[int]
    ) -> np.ndarray:
        """The label volume over ``targets`` from the adapted ``model`` (``labelled``: the labelled
        slices' embeddings): its labels, and a labelled slice's on the slices next to it."""
        support, output = inputs.support, inputs.empty()
        segmented = _segment_reached(model, inputs, targets)
        for index in targets:
            _put(output, support.axis, index, take_slice(segmented, support.axis, index))
        return copy_near_labelled(output, support.axis, support.slices, self.copy_distance, only=targets)


def pooled_dice(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float | None:
    """Dice of boolean mask pairs pooled over the pairs (2 sum |A and B| / sum (|A| + |B|)); None when
    every mask is empty."""
    total = sum(int(a.sum()) + int(b.sum()) for a, b in pairs)
    if total == 0:
        return None
    return 2.0 * sum(int(np.logical_and(a, b).sum()) for a, b in pairs) / total


def label_persistence(support: SparseLabels, value: int) -> float | None:
    """How much of a task's mask survives ``support.step`` slices: the pooled Dice of each labelled
    slice's mask with the next labelled slice's (None where no labelled slice holds the task)."""
    indices = support.indices
    return pooled_dice([(support.slices[a] == value, support.slices[b] == value) for a, b in zip(indices, indices[1:])])


def neighbour_prior(support: SparseLabels, value: int, index: int) -> tuple[np.ndarray, int]:
    """The task's mask at slice ``index`` as the labelled slices around it suggest: the bracketing
    labelled masks mixed linearly by distance (the nearer weighs more), or the nearer one's alone
    beyond the first or last labelled slice; with the distance to the nearer labelled slice."""
    labelled = np.asarray(support.indices)
    below, above = labelled[labelled <= index], labelled[labelled >= index]
    if not len(below) or not len(above):
        nearest = int(above[0] if len(above) else below[-1])
        return (support.slices[nearest] == value).astype(np.float32), abs(nearest - index)
    low, high = int(below[-1]), int(above[0])
    if low == high:
        return (support.slices[low] == value).astype(np.float32), 0
    upper_weight = (index - low) / (high - low)
    prior = (1 - upper_weight) * (support.slices[low] == value) + upper_weight * (support.slices[high] == value)
    return prior.astype(np.float32), min(index - low, high - index)


def prior_weight(prior_quality: float, model_quality: float, sharpness: float) -> float:
    """``q_p^s / (q_p^s + q_m^s)``, written so that a large ``s`` (a hard choice) cannot overflow."""
    if prior_quality == model_quality:
        return 0.5
    if prior_quality == 0:
        return 0.0
    with np.errstate(over="ignore"):
        return float(1 / (1 + np.power(model_quality / prior_quality, sharpness)))


def blend_with_neighbours(
    probabilities: Iterable[np.ndarray],
    span: range,
    support: SparseLabels,
    values: list[int],
    model_quality: dict[int, float | None],
    sharpness: float = BLEND_SHARPNESS,
) -> np.ndarray:
    """Label slices (N, H, W) over ``span`` from a model's task probabilities, (T, H, W) per slice,
    each task's blended with its :func:`neighbour_prior`. The prior's weight is
    ``q_p^s / (q_p^s + q_m^s)``: ``q_m`` the model's Dice on the labelled slices (``model_quality``),
    ``q_p`` the task's :func:`label_persistence` raised to (distance / step), what copying a mask that
    far should score if overlap decays evenly; ``s`` the ``sharpness``. A pixel takes the task of
    highest blended probability above 0.5."""
    slice_shape = next(iter(support.slices.values())).shape
    labels = np.zeros((len(span), *slice_shape), dtype=np.uint8)
    persistence = {value: label_persistence(support, value) for value in values}
    for position, (index, slice_probabilities) in enumerate(zip(span, probabilities, strict=True)):
        blended = np.zeros(slice_probabilities.shape, dtype=np.float32)
        for task, value in enumerate(values):
            prior, distance = neighbour_prior(support, value, index)
            prior_quality = (persistence[value] or 0.0) ** (distance / support.step)
            weight = prior_weight(prior_quality, model_quality.get(value) or 0.0, sharpness)
            blended[task] = weight * prior + (1 - weight) * slice_probabilities[task]
        best = blended.argmax(0)
        labels[position] = np.where(blended.max(0) > 0.5, np.asarray(values, dtype=np.uint8)[best], 0)
    return labels


def blended_segmentation(
    model: FewShotModel,
    sam: Any,
    embeddings: torch.Tensor,
    span: range,
    support: SparseLabels,
    labelled: list[torch.Tensor],
    sharpness: float = BLEND_SHARPNESS,
    judged: FewShotModel | None = None,
) -> np.ndarray:
    """Label slices (N, H, W) over ``span`` (embeddings (N, 256, 64, 64)): ``model``'s task
    probabilities blended with the labelled slices around each (:func:`blend_with_neighbours`), the
    model's quality measured as ``judged``'s (default ``model``) on the labelled slices (embeddings
    ``labelled``, in index order)."""
    values = list(model.tasks)
    quality = model_quality(judged or model, sam, labelled, support, values)
    slice_shape = next(iter(support.slices.values())).shape
    probabilities = (1 / (1 + np.exp(-logits)) for logits in model.slice_logits(sam, embeddings, slice_shape))
    return blend_with_neighbours(probabilities, span, support, values, quality, sharpness)


def model_quality(
    model: FewShotModel, sam: Any, labelled: list[torch.Tensor], support: SparseLabels, values: list[int]
) -> dict[int, float | None]:
    """Per task, the pooled Dice of ``model`` on the labelled slices, each segmented alone."""
    slice_shape = next(iter(support.slices.values())).shape
    predicted = [model.segment(sam, embedding[None], slice_shape)[0] for embedding in labelled]
    truth = [support.slices[i] for i in support.indices]
    return {value: pooled_dice([(t == value, p == value) for t, p in zip(truth, predicted)]) for value in values}


@dataclass(frozen=True)
class FewShotNeighbourBlend(FewShotAdapted):
    """:class:`FewShotAdapted` whose task probabilities are blended with the labelled slices around
    each slice (:func:`blend_with_neighbours`): a task whose masks persist from one labelled slice to
    the next leans on them, one whose masks change fast, or that the model segments well, on the
    model. Both weights are measured on the volume's own labelled slices, never on a scored one."""

    copy_distance: int = 0  # the blend weighs the labelled neighbours itself
    # Chosen on validation (docs/results.md): sharpness 4, and the adapted model's Dice on the
    # labelled slices (it was tuned on them, so optimistic) rather than the collection model's (an
    # honest estimate for a model that never saw them, if low); the settings differed by < 0.003.
    sharpness: float = BLEND_SHARPNESS
    quality_of: str = "adapted"

    def __post_init__(self) -> None:
        if self.quality_of not in ("collection", "adapted") or self.sharpness <= 0:
            raise FewsamError(
                f"{self.name}: quality_of must be 'collection' or 'adapted' and sharpness positive, "
                f"got {self.quality_of!r} and {self.sharpness}"
            )

    @property
    def name(self) -> str:
        return f"fewshot_blended_{self.fewshot.name}"

    @property
    def description(self) -> str:
        return (
            f"few-shot variant {self.fewshot.base} trained on {self.shots} slices per task of the training cases, its "
            f"location head fine-tuned on this volume's labelled slices ({self.head_steps} steps), its probabilities "
            f"blended with the labelled slices around each slice, weighted by how well each does on them"
        )

    @property
    def label(self) -> str:
        return f"few-shot {self.fewshot.base} ({self.shots}-shot collection, head tuned, blended with labelled slices)"

    def definition(self) -> dict[str, Any]:
        return {**super().definition(), "sharpness": self.sharpness, "quality_of": self.quality_of}

    def label_reached(
        self, model: FewShotModel, labelled: list[torch.Tensor], inputs: TrackInputs, targets: list[int]
    ) -> np.ndarray:
        support, output, sam = inputs.support, inputs.empty(), inputs.cache.backbone.model
        judged = self.model if self.quality_of == "collection" else model
        span, embeddings = _reached_span(inputs, targets)
        blended = blended_segmentation(model, sam, embeddings, span, support, labelled, self.sharpness, judged)
        for index in targets:
            _put(output, support.axis, index, blended[index - span.start])
        return output


for _variant in (
    NearestSlice(),
    Interpolation(),
    SamBoxPropagated(),
    FewShotOnVolume(get_fewshot_variant("centred")),
    FewShotOnVolume(get_fewshot_variant("located_context_box")),
    FewShotOnVolume(get_fewshot_variant("located_augmented_head_weighted")),
    FewShotAdapted(get_fewshot_variant("located_augmented_head_weighted")),
    FewShotNeighbourBlend(get_fewshot_variant("located_augmented_head_weighted")),
):
    register_within_volume_variant(_variant)


@dataclass(frozen=True)
class WithinVolumeSection:
    """The ``within_volume`` section of a profile."""

    variants: tuple[str, ...] = ()
    backbones: tuple[str, ...] = ()  # for the variants that use a SAM encoder
    steps: tuple[int, ...] = STEPS  # k: every k-th slice labelled
    seeds: tuple[int, ...] = (0,)
    training: dict[str, Any] = field(default_factory=dict)  # few-shot methods: changes to their schedule
    # Steps of the variants named here, instead of ``steps`` (a costly variant may join k by k).
    variant_steps: dict[str, list[int]] = field(default_factory=dict)

    def check_section(self, where: str) -> None:
        for name in self.variants:
            get_within_volume_variant(name)
        check_variant_keys(self.variant_steps, self.variants, "variant_steps", where)
        if any(step < 2 for steps in (self.steps, *self.variant_steps.values()) for step in steps):
            raise FewsamError(f"{where}: steps: every step must be at least 2 (k=1 leaves nothing to segment)")

    def steps_of(self, variant: str) -> tuple[int, ...]:
        return tuple(self.variant_steps.get(variant, self.steps))


class WithinVolumeRun(MethodRun):
    def __init__(self, context: RunContext) -> None:
        if context.manifest.planar:
            raise FewsamError(
                f"{context.manifest.path}: a dataset of 2D images has one slice per case, so no other slice "
                f"of it to label; the within-volume track needs volumes"
            )
        super().__init__(context)
        self.variant = WITHIN_VOLUME.resolve_variant(context.run.variant, context.section)
        self.step = int(context.run.shots)
        self.backbone = context.run.backbone if self.variant.uses_backbone else "none"
        self.shots = self.step
        self.cache = None
        if self.variant.uses_backbone:
            self.cache = EmbeddingCache(
                self.backbone, checkpoint=context.checkpoint, device=context.device, encoder_path=context.encoder_path
            )
        self.timings = {"segment": 0.0}

    def parameters(self) -> dict[str, Any]:
        return {"labelling_step": self.step}

    def prepare(self, writer: Any, case_ids: list[str]) -> None:
        context = self.context
        prepared = self.variant.prepared(context.manifest, context.run.seed, self.cache, context.progress)
        self.variant = prepared.variant
        for name, write in prepared.files.items():
            write(writer.folder / name)
        if prepared.seconds:
            self.timings["train"] = prepared.seconds
        self.extra.update(prepared.record)

    def provenance(self) -> dict[str, Any]:
        provenance: dict[str, Any] = {"label_budget": {"kind": BUDGET, "step": self.step}}
        return {**provenance, **(self.cache.provenance() if self.cache else {})}

    def predict_case(self, volume: Volume, extent: range) -> CasePrediction:
        manifest, run = self.context.manifest, self.context.run
        axis = manifest.slice_axis
        indices = labelled_slice_indices(
            volume.label, axis, manifest.tasks, self.step, run.seed, volume.case_id, extent
        )
        support = SparseLabels(axis, self.step, {i: take_slice(volume.label, axis, i) for i in indices})
        blind = replace(volume, label=support.dense(volume.shape))  # no scored slice's ground truth leaves here
        inputs = TrackInputs(
            blind,
            support,
            dict(manifest.tasks),
            run.seed,
            lambda wanted: grey_slices(manifest, blind, wanted),
            self.cache,
            self.context.progress,
        )
        started = time.perf_counter()
        prediction = self.variant.segment(inputs)
        self.timings["segment"] += time.perf_counter() - started
        moved = np.moveaxis(prediction, axis, 0)
        outside = [i for i in range(volume.shape[axis]) if i not in extent]
        moved[outside] = 0
        for index, labels in support.slices.items():
            moved[index] = labels
        if self.cache is not None:
            self.timings["encode"] = self.cache.stats.encode_seconds
            self.extra["cache"] = self.cache.stats.as_dict()
        return CasePrediction(
            prediction,
            scored_slices=[i for i in extent if i not in support.slices],
            slice_selection="unlabelled_slices",
            withheld_slices=indices,
        )


class WithinVolume(Method):
    name = "within_volume"
    command = "within-volume"
    description = "label every k-th slice of a test volume, segment the rest (the paper's use case)"
    section_key = "within_volume"
    section_type = WithinVolumeSection
    notebook = "40_within_volume.ipynb"
    rank = 3
    uses_backbone = False  # per variant: see needs_backbone
    default_variant = "nearest_slice"
    report_role = "within_volume"

    def needs_backbone(self, variant: str) -> bool:
        return get_within_volume_variant(variant).uses_backbone

    def variant_names(self) -> list[str]:
        return list(WITHIN_VOLUME_VARIANTS)

    def resolve_variant(self, name: str, section: WithinVolumeSection | None) -> WithinVolumeVariant:
        variant = get_within_volume_variant(name)
        if isinstance(variant, (FewShotOnVolume, FewShotAdapted)) and section is not None and section.training:
            return replace(variant, fewshot=variant.fewshot.with_schedule(**section.training))
        return variant

    def plan(self, manifest: str, section: WithinVolumeSection, backbones: list[str], profile: str) -> list[PlannedRun]:
        return [
            PlannedRun(self.name, manifest, backbone, variant, seed, profile, step, BUDGET)
            for variant in section.variants
            for backbone in (backbones if self.needs_backbone(variant) else ["none"])
            for step in section.steps_of(variant)
            for seed in section.seeds
        ]

    def check_request(self, run: PlannedRun) -> None:
        variant = get_within_volume_variant(run.variant)
        if run.shots is None or run.shots < 2:
            raise FewsamError(f"within-volume runs need --step k (every k-th slice labelled, k >= 2), got {run.shots}")
        if variant.uses_backbone and run.backbone in (None, "none"):
            raise FewsamError(f"within-volume method {variant.name} needs --backbone")

    def add_run_options(self, parser: Any) -> None:
        parser.add_argument("--variant", default=self.default_variant, help=", ".join(self.variant_names()))
        parser.add_argument("--backbone", default="none", help="for methods that use SAM: mobile_sam, lite_medsam ...")
        parser.add_argument(
            "--step", type=int, required=True, help="label every k-th slice (k = 4, 8, 16 in the cpu profile)"
        )

    def run_from_options(self, options: Any) -> PlannedRun:
        backbone = options.backbone if self.needs_backbone(options.variant) else "none"
        return PlannedRun(
            self.name, options.manifest, backbone, options.variant, options.seed, options.profile, options.step, BUDGET
        )

    def command_options(self, run: PlannedRun) -> list[str]:
        options = ["--variant", run.variant, "--step", str(run.shots)]
        return options + (["--backbone", run.backbone] if self.needs_backbone(run.variant) else [])

    def notebook_parameters(self, run: PlannedRun) -> dict[str, Any]:
        return {"variant": run.variant, "backbone": run.backbone, "step": run.shots}

    def start(self, context: RunContext) -> WithinVolumeRun:
        return WithinVolumeRun(context)

    def label(self, variant: str, shots: int | None, budget: str | None = None) -> str:
        known = WITHIN_VOLUME_VARIANTS.get(variant)
        return known.label if known else variant


WITHIN_VOLUME = register_method(WithinVolume())
