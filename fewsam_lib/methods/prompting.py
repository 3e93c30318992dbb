"""SAM prompted by points and boxes derived from the ground truth: the prompting baselines.

Geometry convention. A slice pixel (row r, column c) covers the continuous square
[c, c+1) x [r, r+1). Points sit at pixel centres (c + 0.5, r + 0.5); boxes run along pixel edges
(x0, y0, x1 + 1, y1 + 1) for a mask spanning columns x0..x1 and rows y0..y1. SAM's prompt encoder
adds 0.5 to every coordinate it is given (it treats them as pixel indices of the resized image),
so continuous coordinates are sent as ``continuous * scale - 0.5``; a point then lands exactly on
the centre of its upsampled pixel and a box exactly on the upsampled mask's edges.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from segment_anything.modeling import Sam

from ..bench.metrics import overlap
from ..data.volumes import Volume, grey_slices, take_slice, task_voxels_per_slice
from ..encoders.backbones import resized_shape
from ..encoders.cache import EmbeddingCache
from ..errors import lookup
from .base import CasePrediction, Method, MethodRun, RunContext, register_method
from .sam_decoding import decode_masks, resolve_overlaps

NEGATIVE_MARGIN = 0.10  # negative points come from the mask's box grown by 10% on each side
JITTER = 0.10  # jittered box sides move by up to 10% of the box size


@dataclass(frozen=True)
class PromptVariant:
    """How prompts are derived from a ground-truth mask, and how SAM's candidate masks are chosen."""

    name: str
    positive_points: int = 0
    negative_points: int = 0
    box: Literal["tight", "jitter"] | None = None
    mask_selection: Literal["sam", "oracle"] = "sam"
    description: str = ""

    @property
    def multimask(self) -> bool:
        """SAM's advice: three candidates for one ambiguous click, one mask for richer prompts.

        The oracle always asks for three candidates and keeps the best against the ground truth.
        """
        single_click = self.box is None and self.positive_points + self.negative_points == 1
        return self.mask_selection == "oracle" or single_click


def _variants() -> dict[str, PromptVariant]:
    base = [
        PromptVariant("point1", 1, description="the innermost point of the mask"),
        PromptVariant("point3", 3, description="innermost point + 2 uniform interior points"),
        PromptVariant("point5", 5, description="innermost point + 4 uniform interior points"),
        PromptVariant("point1_neg1", 1, 1, description="innermost point + 1 negative point near the mask"),
        PromptVariant("box", box="tight", description="tight bounding box"),
        PromptVariant("box_jitter", box="jitter", description="bounding box, each side moved by up to 10%"),
        PromptVariant("box_point", 1, box="tight", description="tight bounding box + innermost point"),
    ]
    variants = {v.name: v for v in base}
    for v in base:
        variants[f"{v.name}_oracle"] = PromptVariant(
            f"{v.name}_oracle",
            v.positive_points,
            v.negative_points,
            v.box,
            "oracle",
            v.description + "; best of SAM's 3 candidates against the ground truth (upper bound)",
        )
    return variants


PROMPT_VARIANTS: dict[str, PromptVariant] = _variants()


def get_variant(name: str) -> PromptVariant:
    return lookup(PROMPT_VARIANTS, name, "prompt variant")


@dataclass
class Prompt:
    """Prompt geometry in continuous slice coordinates (x = column, y = row)."""

    points: np.ndarray  # (N, 2) float, may be empty
    labels: np.ndarray  # (N,) 1 positive, 0 negative
    box: np.ndarray | None  # (4,) x0, y0, x1, y1 along pixel edges


def prompt_rng(seed: int, case_id: str, slice_index: int, label: int) -> np.random.Generator:
    """A generator per (seed, case, slice, task): prompts do not depend on processing order."""
    return np.random.default_rng([seed, zlib.crc32(case_id.encode()), slice_index, label])


def innermost_point(mask: np.ndarray) -> tuple[int, int]:
    """(row, col) of the mask pixel farthest from the background (first in row-major order on ties)."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return tuple(int(i) for i in np.unravel_index(np.argmax(distance), mask.shape))


def bounding_box(mask: np.ndarray) -> np.ndarray:
    """Pixel-edge box (x0, y0, x1 + 1, y1 + 1) of a non-empty mask."""
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float64)


def jitter_box(box: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    width, height = box[2] - box[0], box[3] - box[1]
    moved = box + rng.uniform(-JITTER, JITTER, 4) * np.array([width, height, width, height])
    moved[[0, 2]] = np.clip(moved[[0, 2]], 0, shape[1])
    moved[[1, 3]] = np.clip(moved[[1, 3]], 0, shape[0])
    if moved[2] - moved[0] < 1 or moved[3] - moved[1] < 1:  # degenerate after clipping
        return box.copy()
    return moved


def boxes_on_input(boxes: np.ndarray, slice_shape: tuple[int, int], model: Sam) -> torch.Tensor:
    """(T, 4) pixel-edge boxes on a slice -> SAM's input coordinates (pixel centres), on the model's device."""
    height, width = slice_shape
    input_size = resized_shape(height, width, model.image_encoder.img_size)
    scale = torch.tensor([input_size[1] / width, input_size[0] / height], dtype=torch.float32)
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    return (boxes.view(-1, 2, 2) * scale - 0.5).view(-1, 4).to(model.device)


def box_prompt_tokens(model: Sam, boxes: np.ndarray, slice_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's prompt tokens for T boxes on a slice: sparse (T, 2, 256) corner tokens, dense (T, 256, 64, 64)."""
    return model.prompt_encoder(points=None, boxes=boxes_on_input(boxes, slice_shape, model), masks=None)


def _pixel_centres(pixels: np.ndarray) -> np.ndarray:
    """(row, col) index pairs -> (x, y) pixel centres."""
    return pixels[:, ::-1].astype(np.float64) + 0.5


def negative_candidates(mask: np.ndarray) -> np.ndarray:
    """(row, col) of background pixels inside the mask's box grown by 10% on each side."""
    rows, cols = np.nonzero(mask)
    margin_r = max(1, int(np.ceil(NEGATIVE_MARGIN * (rows.max() - rows.min() + 1))))
    margin_c = max(1, int(np.ceil(NEGATIVE_MARGIN * (cols.max() - cols.min() + 1))))
    region = np.zeros_like(mask, dtype=bool)
    region[
        max(rows.min() - margin_r, 0) : rows.max() + margin_r + 1,
        max(cols.min() - margin_c, 0) : cols.max() + margin_c + 1,
    ] = True
    candidates = np.argwhere(region & ~mask)
    return candidates if len(candidates) else np.argwhere(~mask)


def make_prompt(mask: np.ndarray, variant: PromptVariant, rng: np.random.Generator) -> Prompt:
    """Prompt for one task on one slice from its (non-empty) ground-truth mask."""
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("a prompt needs a non-empty mask")
    points, labels = [], []
    if variant.positive_points:
        centre = np.array([innermost_point(mask)])
        points.append(_pixel_centres(centre))
        extra = variant.positive_points - 1
        if extra:
            others = np.argwhere(mask)
            others = others[~np.all(others == centre, axis=1)]
            if len(others) == 0:
                others = centre
            chosen = others[rng.choice(len(others), size=extra, replace=len(others) < extra)]
            points.append(_pixel_centres(chosen))
        labels += [1] * variant.positive_points
    if variant.negative_points:
        candidates = negative_candidates(mask)
        chosen = candidates[
            rng.choice(len(candidates), size=variant.negative_points, replace=len(candidates) < variant.negative_points)
        ]
        points.append(_pixel_centres(chosen))
        labels += [0] * variant.negative_points
    box = None
    if variant.box is not None:
        box = bounding_box(mask)
        if variant.box == "jitter":
            box = jitter_box(box, mask.shape, rng)
    return Prompt(
        points=np.concatenate(points) if points else np.zeros((0, 2)),
        labels=np.asarray(labels, dtype=np.int64),
        box=box,
    )


@torch.inference_mode()
def predict_masks(
    model: Sam,
    embedding: torch.Tensor,
    slice_shape: tuple[int, int],
    prompts: list[Prompt],
    variant: PromptVariant,
    ground_truth: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (T, H, W) at slice size for T prompts on one cached embedding, plus SAM's IoU guess (T,).

    All prompts of a slice go through the prompt encoder and mask decoder as one batch.
    ``ground_truth`` (one mask per prompt) is used only by the oracle to pick among candidates.
    """
    if variant.mask_selection == "oracle" and ground_truth is None:
        raise ValueError("the oracle selection needs the ground-truth masks")
    height, width = slice_shape
    input_size = resized_shape(height, width, model.image_encoder.img_size)
    scale = torch.tensor([input_size[1] / width, input_size[0] / height], dtype=torch.float32)
    device = model.device

    point_input = None
    if len(prompts[0].points):
        coords = torch.as_tensor(np.stack([p.points for p in prompts]), dtype=torch.float32) * scale - 0.5
        labels = torch.as_tensor(np.stack([p.labels for p in prompts]), dtype=torch.int64)
        point_input = (coords.to(device), labels.to(device))
    box_input = None
    if prompts[0].box is not None:
        box_input = boxes_on_input(np.stack([p.box for p in prompts]), slice_shape, model)

    sparse, dense = model.prompt_encoder(points=point_input, boxes=box_input, masks=None)
    logits, predicted_iou = decode_masks(
        model.mask_decoder, model, embedding, sparse, dense, slice_shape, variant.multimask
    )
    logits, predicted_iou = logits.cpu(), predicted_iou.cpu()  # (T, C, H, W), (T, C)
    if variant.mask_selection == "oracle":
        choice = torch.tensor(
            [
                int(np.argmax([overlap(gt, (candidate > 0).numpy())[0] for candidate in candidates]))
                for gt, candidates in zip(ground_truth, logits)
            ]
        )
    else:
        choice = predicted_iou.argmax(dim=1)
    picked = torch.arange(len(prompts))
    return logits[picked, choice].numpy(), predicted_iou[picked, choice].numpy()


def draw_prompt(ax, prompt: Prompt, planar: bool = False) -> None:
    """A prompt's points (star: positive, cross: negative) and box on a slice drawn by show_slice."""
    from ..report.drawing import draw_box, draw_point

    for (x, y), positive in zip(prompt.points, prompt.labels):
        draw_point(ax, x - 0.5, y - 0.5, planar, marker="*" if positive else "x", color="yellow", markersize=9)
    if prompt.box is not None:
        draw_box(ax, prompt.box - 0.5, planar, edgecolor="yellow", linewidth=1)


@dataclass(frozen=True)
class PromptingSection:
    """The ``prompting`` section of a profile."""

    backbones: tuple[str, ...] = ()
    optional_backbones: tuple[str, ...] = ()  # run only where their checkpoint is installed
    variants: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)


class PromptingRun(MethodRun):
    """Every slice that contains a task gets that task's prompt (only those: a prompt needs a
    target, and the rows say so with ``slice_selection = gt_slices``). Masks of all tasks on a
    slice are merged into one label map (highest positive logit wins)."""

    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        self.variant = get_variant(context.run.variant)
        self.backbone = context.run.backbone
        self.cache = EmbeddingCache(
            self.backbone, checkpoint=context.checkpoint, device=context.device, encoder_path=context.encoder_path
        )
        self.timings = {"encode": 0.0, "decode": 0.0}

    def parameters(self) -> dict:
        return {"variant_definition": asdict(self.variant), "multimask_output": self.variant.multimask}

    def provenance(self) -> dict:
        return self.cache.provenance()

    def predict_case(self, volume: Volume, extent: range) -> CasePrediction:
        manifest, seed = self.context.manifest, self.context.run.seed
        axis = manifest.slice_axis
        counts = task_voxels_per_slice(volume.label, axis, manifest.tasks)
        indices = [index for index in counts.index[(counts > 0).any(axis=1)] if index in extent]
        embeddings = self.cache.get_many(
            grey_slices(manifest, volume, indices), progress=self.context.progress, desc=f"encode {volume.case_id}"
        )
        prediction = np.zeros(volume.label.shape, dtype=np.uint8)
        started = time.perf_counter()
        for index, embedding in zip(indices, embeddings):
            label_slice = take_slice(volume.label, axis, index)
            values = [value for value in manifest.tasks if (label_slice == value).any()]
            masks = [label_slice == value for value in values]
            prompts = [
                make_prompt(mask, self.variant, prompt_rng(seed, volume.case_id, index, value))
                for mask, value in zip(masks, values)
            ]
            logits, _ = predict_masks(
                self.cache.backbone.model, embedding, label_slice.shape, prompts, self.variant, masks
            )
            np.moveaxis(prediction, axis, 0)[index] = resolve_overlaps(logits, values)
        self.timings["decode"] += time.perf_counter() - started
        self.timings["encode"] = self.cache.stats.encode_seconds
        self.extra["cache"] = self.cache.stats.as_dict()
        return CasePrediction(prediction, scored_slices=indices, slice_selection="gt_slices")


PROMPT_NAMES = {
    "point1": "1 point",
    "point3": "3 points",
    "point5": "5 points",
    "point1_neg1": "1 point + 1 negative",
    "box": "box",
    "box_jitter": "jittered box",
    "box_point": "box + point",
}


class SamPrompting(Method):
    name = "sam_prompting"
    command = "prompting"
    description = "SAM prompted by points and boxes derived from the ground truth of every test slice"
    section_key = "prompting"
    section_type = PromptingSection
    notebook = "10_sam_prompting.ipynb"
    rank = 0
    default_variant = "box"
    report_role = "prompted"
    reference_variants = ("point1", "box")

    def variant_names(self) -> list[str]:
        return list(PROMPT_VARIANTS)

    def draw_example(
        self, ax, meta: dict, case_id: str, slice_index: int, mask: np.ndarray, value: int, planar: bool = False
    ) -> None:
        prompt = make_prompt(mask, get_variant(meta["variant"]), prompt_rng(meta["seed"], case_id, slice_index, value))
        draw_prompt(ax, prompt, planar)

    def resolve_variant(self, name: str, section: PromptingSection) -> PromptVariant:
        return get_variant(name)

    def start(self, context: RunContext) -> PromptingRun:
        return PromptingRun(context)

    def label(self, variant: str, shots: int | None, budget: str | None = None) -> str:
        return f"SAM {PROMPT_NAMES.get(variant, variant)}"

    def variant_order(self, variant: str) -> int:
        names = list(PROMPT_NAMES)
        return names.index(variant) if variant in names else len(names)


register_method(SamPrompting())
