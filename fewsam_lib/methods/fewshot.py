"""The few-shot method: pooled support embeddings as prompt tokens for SAM's mask decoder.

A few labelled 2D slices (the collection) give, per task, the image embedding averaged inside the
task's mask. Those few-shot tokens replace point/box tokens as ``sparse_prompt_embeddings``; the
dense prompt is SAM's no-mask embedding. Only the mask decoder is trained, on cached embeddings
of the collection; the image encoder never runs during training.

Token designs (variants, see :data:`TOKEN_DESIGNS`):

- ``raw``: the masked average of the support embeddings, as is. Measured on hippocampus: norm
  ~1.3 against ~11.6 for SAM's own prompt tokens, and the two tasks' tokens nearly identical
  (cosine 0.98); a decoder trained on them learns one mask for every prompt.
- ``centred`` (default): the task's pooled embedding minus the mean embedding of all support
  slices (inside the image, not the padding), rescaled to the norm of SAM's embedding of one
  positive point, plus SAM's learned positive-point type embedding.
- ``centred_bg``: ``centred`` plus a background token (pooled outside every task's mask, built the
  same way with SAM's negative-point type embedding), as a negative click would be.

No positional encoding is added: a token describes what the anatomy looks like, not where it is.
Variants with a ``locator`` (``located``, ``located_box``) also learn where it is: a light head on
the cached embeddings (:mod:`.location`) that finds each task on a slice, or finds it absent.
Their ``segmenter`` says what then draws the mask (:data:`SEGMENTERS`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, Sam
from tqdm import tqdm

from .. import paths
from ..data.augmentation import SupportAugmentation, augment_support
from ..data.collection import Collection, draw_collection
from ..data.manifest import Manifest
from ..data.volumes import Volume, grey_slices, load_case, take_slice
from ..encoders.backbones import resized_shape
from ..encoders.cache import EmbeddingCache
from ..errors import FewsamError, lookup
from ..sections import check_variant_keys, parse_section, positive_int
from .base import CasePrediction, Method, MethodRun, PlannedRun, RunContext, register_method, settings_hash
from .location import (
    LocationMap,
    LocationSettings,
    fit_location_map,
    located_regions,
    region_box,
)
from .prompting import bounding_box, box_prompt_tokens, jitter_box
from .sam_decoding import EMBEDDING_GRID, decode_masks, no_mask_prompt, resolve_overlaps

log = logging.getLogger(__name__)

MODEL_FORMAT = "fewsam-fewshot-decoder-v2"
# v1 files (before variants were records) stored only the token design; they load with the
# registered variant of that name and its default schedule.
READABLE_FORMATS = ("fewsam-fewshot-decoder-v1", MODEL_FORMAT)
MODEL_FILE = "fewshot_model.pt"  # git-ignored (~16 MB of decoder weights); the run regenerates it
CURVE_FILE = "training_curve.csv"
# Fine-tuning a trained location head on one volume's labelled slices (FewShotModel.adapted), chosen
# on validation for the within-volume track (docs/results.md): 100 steps at lr 3e-4.
ADAPT_STEPS = 100
ADAPT_LEARNING_RATE = 3e-4


@dataclass(frozen=True)
class TokenDesign:
    name: str
    centred: bool
    background_token: bool
    description: str


TOKEN_DESIGNS = {
    design.name: design
    for design in (
        TokenDesign("raw", False, False, "masked average of support embeddings, unscaled"),
        TokenDesign(
            "centred", True, False, "pooled minus support mean, SAM point-token norm, + positive type embedding"
        ),
        TokenDesign(
            "centred_bg", True, True, "centred task token + centred background token (negative type embedding)"
        ),
    )
}


def get_design(name: str) -> TokenDesign:
    return lookup(TOKEN_DESIGNS, name, "few-shot variant")


def embedding_grid_weights(mask: np.ndarray, input_size: int) -> torch.Tensor:
    """Fraction of each 64x64 embedding cell that ``mask`` covers, through SAM's resize and padding."""
    height, width = mask.shape
    target = resized_shape(height, width, input_size)
    resized = F.interpolate(
        torch.as_tensor(mask, dtype=torch.float32)[None, None], target, mode="bilinear", align_corners=False
    )
    padded = F.pad(resized, (0, input_size - target[1], 0, input_size - target[0]))
    return F.adaptive_avg_pool2d(padded, EMBEDDING_GRID)[0, 0]


def pooled_embedding(embeddings: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor | None:
    """Weighted mean of (256, 64, 64) embeddings over cells, pooled over slices; None if all weights are 0."""
    total = sum(float(w.sum()) for w in weights)
    if total <= 0:
        return None
    summed = sum((e * w).sum(dim=(1, 2)) for e, w in zip(embeddings, weights))
    return summed / total


def point_token_norm(model: Sam) -> float:
    """Norm of SAM's own token for one positive click at the image centre (the scale of a prompt)."""
    size = model.prompt_encoder.input_image_size
    with torch.no_grad():
        centre = torch.tensor([[[size[1] / 2, size[0] / 2]]], dtype=torch.float32, device=model.device)
        sparse, _ = model.prompt_encoder(points=(centre, torch.ones(1, 1, device=model.device)), boxes=None, masks=None)
    return float(sparse[0, 0].norm())


def few_shot_tokens(
    model: Sam,
    embeddings: list[torch.Tensor],
    label_slices: list[np.ndarray],
    tasks: dict[int, str],
    design: TokenDesign,
) -> dict[str, torch.Tensor]:
    """Prompt tokens (k, 256) per task from the support embeddings and their label slices."""
    input_size = model.image_encoder.img_size
    image_weights = [embedding_grid_weights(np.ones(label.shape, bool), input_size) for label in label_slices]
    mean_embedding = pooled_embedding(embeddings, image_weights)
    scale = point_token_norm(model)
    type_embeddings = model.prompt_encoder.point_embeddings

    def token(weights: list[torch.Tensor], name: str, type_index: int) -> torch.Tensor:
        pooled = pooled_embedding(embeddings, weights)
        if pooled is None:
            raise FewsamError(f"task '{name}' has no labelled pixel in the few-shot collection")
        if not design.centred:
            return pooled
        direction = pooled - mean_embedding
        return direction / direction.norm().clamp_min(1e-8) * scale + type_embeddings[type_index].weight[0].detach()

    tokens = {}
    for value, name in tasks.items():
        task_token = token([embedding_grid_weights(label == value, input_size) for label in label_slices], name, 1)
        tokens[name] = task_token[None]
    if design.background_token:
        background = token([embedding_grid_weights(label == 0, input_size) for label in label_slices], "background", 0)
        tokens = {name: torch.cat([t, background[None]]) for name, t in tokens.items()}
    return tokens


def decode(
    decoder: MaskDecoder, model: Sam, embedding: torch.Tensor, token_batch: torch.Tensor, slice_shape: tuple[int, int]
) -> torch.Tensor:
    """Logits (T, H, W) at slice size for T token sets (T, k, 256) on one image embedding."""
    logits, _ = decode_masks(
        decoder, model, embedding, token_batch, no_mask_prompt(model, len(token_batch)), slice_shape
    )
    return logits[:, 0]


def decode_with_boxes(
    decoder: MaskDecoder,
    model: Sam,
    embedding: torch.Tensor,
    token_batch: torch.Tensor,
    boxes: np.ndarray,
    slice_shape: tuple[int, int],
) -> torch.Tensor:
    """Logits (T, H, W) for T token sets (T, k, 256), each with its (T, 4) pixel-edge box's corner tokens."""
    with torch.no_grad():  # SAM's prompt encoder stays frozen
        corners, dense = box_prompt_tokens(model, boxes, slice_shape)
    sparse = torch.cat([token_batch.to(model.device), corners], dim=1)
    logits, _ = decode_masks(decoder, model, embedding.to(model.device), sparse, dense, slice_shape)
    return logits[:, 0]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice per mask (smoothing 1, so an empty target asks for an empty mask)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probability = torch.sigmoid(logits).flatten(1)
    flat = target.flatten(1)
    dice = (2 * (probability * flat).sum(1) + 1) / (probability.sum(1) + flat.sum(1) + 1)
    return bce + (1 - dice).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"bce_dice": segmentation_loss}
# What the encoder sees of a slice; a crop around the anatomy would be a view with its inverse.
VIEWS = {"full_slice": "the whole slice, resized and padded by SAM's own preprocessing"}
SEGMENTERS = {
    "decoder": "SAM's mask decoder, fine-tuned, prompted by the few-shot token(s) alone",
    "location_map": "the location head's own map: each pixel takes its most probable class",
    "decoder_box": "SAM's mask decoder, fine-tuned, prompted by the few-shot token(s) and the box of the "
    "location head's most confident component; a task the head finds absent is absent",
    "decoder_box_fused": "decoder_box, each pixel's mask probability averaged with the location head's "
    "probability of the task against background (two predictors of one mask; the head's weight "
    "is the variant's head_weight)",
}


@dataclass(frozen=True)
class TrainingSettings:
    """One fixed schedule for every task and dataset (no early stopping); profiles may shorten it."""

    steps: int = 200
    slices_per_step: int = 2
    learning_rate: float = 1e-4
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if self.steps < 1 or self.slices_per_step < 1:
            raise FewsamError(
                f"a few-shot schedule needs at least 1 step of at least 1 slice, got steps={self.steps}, "
                f"slices_per_step={self.slices_per_step}"
            )
        if self.learning_rate <= 0:
            raise FewsamError(f"the learning rate must be positive, got {self.learning_rate}")


@dataclass(frozen=True)
class FewShotVariant:
    """A few-shot variant: named components. ``base`` is the registered name; :attr:`name` adds a
    hash of the settings when they differ from the registered ones (a profile's shorter schedule),
    so two runs that differ in any setting never share a run folder."""

    base: str
    tokens: TokenDesign
    loss: str = "bce_dice"
    schedule: TrainingSettings = field(default_factory=TrainingSettings)
    view: str = "full_slice"
    description: str = ""
    locator: LocationSettings | None = None
    segmenter: str = "decoder"
    # Transformed twins of the support slices, encoded like any slice, for the location head; the
    # tokens and the decoder stay the collection's own (twins did not help the decoder on validation).
    augmentation: SupportAugmentation | None = None
    # decoder_box_fused: the head's share of the averaged probability (None: 0.5, a plain mean).
    head_weight: float | None = None

    @property
    def name(self) -> str:
        registered = FEWSHOT_VARIANTS.get(self.base)
        if registered is not None and self.definition() == registered.definition():
            return self.base
        return f"{self.base}-{settings_hash(self.definition())}"

    def definition(self) -> dict[str, Any]:
        """Every setting that changes a prediction (the description does not)."""
        tokens = {key: value for key, value in asdict(self.tokens).items() if key != "description"}
        definition = {
            "base": self.base,
            "tokens": tokens,
            "loss": self.loss,
            "schedule": asdict(self.schedule),
            "view": self.view,
        }
        if self.locator is not None:  # absent for the variants before it, so their names stay
            definition.update(locator=asdict(self.locator), segmenter=self.segmenter)
        if self.augmentation is not None:
            definition.update(augmentation=asdict(self.augmentation))
        if self.head_weight is not None:
            definition.update(head_weight=self.head_weight)
        return definition

    @property
    def trains_decoder(self) -> bool:
        return self.segmenter != "location_map"

    @property
    def prompts_boxes(self) -> bool:
        """The decoder gets the location head's box (and is trained on boxes)."""
        return self.segmenter in ("decoder_box", "decoder_box_fused")

    def with_schedule(self, **overrides: Any) -> FewShotVariant:
        try:
            schedule = dataclasses.replace(self.schedule, **overrides)
        except TypeError as error:
            known = ", ".join(f.name for f in dataclasses.fields(TrainingSettings))
            raise FewsamError(f"few-shot training: {error} (known settings: {known})") from None
        return dataclasses.replace(self, schedule=schedule)


FEWSHOT_VARIANTS: dict[str, FewShotVariant] = {}


def register_fewshot_variant(variant: FewShotVariant) -> FewShotVariant:
    if variant.loss not in LOSSES or variant.view not in VIEWS or variant.segmenter not in SEGMENTERS:
        raise ValueError(
            f"few-shot variant {variant.base}: unknown loss '{variant.loss}', view '{variant.view}' "
            f"or segmenter '{variant.segmenter}'"
        )
    weight = variant.head_weight
    if weight is not None and not (variant.segmenter == "decoder_box_fused" and 0 < weight < 1):
        raise ValueError(f"few-shot variant {variant.base}: head_weight needs segmenter decoder_box_fused, 0 < w < 1")
    if (variant.segmenter != "decoder" or variant.augmentation is not None) and variant.locator is None:
        raise ValueError(
            f"few-shot variant {variant.base}: segmenter '{variant.segmenter}' and support augmentation need a locator"
        )
    FEWSHOT_VARIANTS[variant.base] = variant
    return variant


for _design in TOKEN_DESIGNS.values():
    register_fewshot_variant(FewShotVariant(_design.name, _design, description=_design.description))
register_fewshot_variant(
    FewShotVariant(
        "located",
        TOKEN_DESIGNS["centred"],
        locator=LocationSettings(),
        segmenter="location_map",
        description="a class-balanced location head on the cached embeddings segments each task",
    )
)
register_fewshot_variant(
    FewShotVariant(
        "located_box",
        TOKEN_DESIGNS["centred"],
        locator=LocationSettings(),
        segmenter="decoder_box",
        description="the location head's box and the centred token prompt a decoder fine-tuned on boxes",
    )
)


# Chosen on validation (docs/results.md): a pooled context branch, a gentler and longer schedule
# (the first head's loss swung between seeds), smoothing over +-1 slice and a 1-pixel box margin.
CONTEXT_LOCATOR = LocationSettings(steps=600, learning_rate=1e-3, context_pool=4, slice_smoothing=1.0, box_margin=1.0)
register_fewshot_variant(
    FewShotVariant(
        "located_context",
        TOKEN_DESIGNS["centred"],
        locator=CONTEXT_LOCATOR,
        segmenter="location_map",
        description="located, with a pooled context branch in the head and its map smoothed across slices",
    )
)
register_fewshot_variant(
    FewShotVariant(
        "located_context_box",
        TOKEN_DESIGNS["centred"],
        locator=CONTEXT_LOCATOR,
        segmenter="decoder_box",
        description="located_box with the located_context head; each box grown by one pixel",
    )
)
# Chosen on validation (docs/results.md): four transformed twins of every support slice.
_AUGMENTED = register_fewshot_variant(
    dataclasses.replace(
        FEWSHOT_VARIANTS["located_context_box"],
        base="located_augmented",
        augmentation=SupportAugmentation(),
        description="located_context_box, its head also trained on 4 augmented twins of each support slice",
    )
)
register_fewshot_variant(
    dataclasses.replace(
        _AUGMENTED,
        base="located_augmented_fused",
        segmenter="decoder_box_fused",
        description="located_augmented, the decoder's mask probability averaged with the head's",
    )
)
# Chosen on validation (docs/results.md): of head weights 0, 0.25, 0.5, 0.65 and 0.8 on the saved
# located_augmented_fused models, 0.65 scored best in every (dataset, shots) cell.
register_fewshot_variant(
    dataclasses.replace(
        FEWSHOT_VARIANTS["located_augmented_fused"],
        base="located_augmented_head_weighted",
        head_weight=0.65,
        description="located_augmented_fused with the head's probability weighted 0.65 against the decoder's 0.35",
    )
)


def get_fewshot_variant(name: str) -> FewShotVariant:
    """A registered variant by name; ``centred-1a2b3c4d`` (a run's full name) gives its base ``centred``."""
    return lookup(FEWSHOT_VARIANTS, name.split("-", 1)[0], "few-shot variant")


def variant_from_definition(definition: dict[str, Any], where: str) -> FewShotVariant:
    """A saved variant: the registered one of its base name with the saved settings that still exist
    (a component added since keeps its registered value)."""
    try:
        registered = get_fewshot_variant(definition["base"])
    except (KeyError, TypeError):
        raise FewsamError(f"{where}: no few-shot variant recorded (expected format '{MODEL_FORMAT}')") from None

    def known(record: Any, saved: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(record)}
        return dataclasses.replace(record, **{k: v for k, v in (saved or {}).items() if k in names})

    return dataclasses.replace(
        registered,
        tokens=known(registered.tokens, definition.get("tokens")),
        schedule=known(registered.schedule, definition.get("schedule")),
        loss=definition.get("loss", registered.loss),
        view=definition.get("view", registered.view),
        locator=known(registered.locator, definition.get("locator")) if registered.locator else None,
        segmenter=definition.get("segmenter", registered.segmenter),
        augmentation=known(registered.augmentation, definition.get("augmentation"))
        if registered.augmentation
        else None,
        head_weight=definition.get("head_weight", registered.head_weight),
    )


def fused_logits(
    decoded: torch.Tensor, task: torch.Tensor, background: torch.Tensor, head_weight: float | None
) -> torch.Tensor:
    """``decoder_box_fused``: logits (T, H, W) of the decoder's mask probability (from its logits
    ``decoded``) averaged with the head's probability of each task (``task``, (T, H, W)) against
    ``background`` ((H, W)), the head's weighted by ``head_weight`` (None: the plain mean)."""
    # the decoder says task or background, so the head's vote is its odds of the task against background
    against_background = task / (task + background).clamp_min(1e-8)
    if head_weight is None:
        mean = (torch.sigmoid(decoded) + against_background) / 2
    else:
        mean = head_weight * against_background + (1 - head_weight) * torch.sigmoid(decoded)
    return torch.logit(mean.clamp(1e-6, 1 - 1e-6))


@dataclass
class FewShotModel:
    """A trained few-shot decoder with its tokens: segments new images without the collection."""

    backbone: str
    variant: FewShotVariant
    tasks: dict[int, str]
    tokens: dict[str, torch.Tensor]
    decoder: MaskDecoder
    # How grey slices were made from the volumes ({"slice_axis": int, "intensity": {...}}): a
    # query must be cut and normalised the same way.
    preprocessing: dict[str, Any]
    locator: LocationMap | None = None  # variants with a locator

    def token_batch(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(T, k, 256): one token set per task, in label order."""
        return torch.stack([self.tokens[name] for name in self.tasks.values()]).to(device)

    def segment(self, model: Sam, embeddings: torch.Tensor, slice_shape: tuple[int, int]) -> np.ndarray:
        """Label slices (N, H, W) for the embeddings (N, 256, 64, 64) of N consecutive slices: per
        pixel the task with the highest positive logit (the location head's most probable class for
        ``location_map``). A locator that smooths across slices reads the N slices as one stack."""
        if self.variant.segmenter == "location_map":
            with torch.inference_mode():
                probabilities = self.locator.volume_probabilities(embeddings, slice_shape)
            return np.asarray([0, *self.tasks], dtype=np.uint8)[probabilities.argmax(1)]
        values = list(self.tasks)
        slices = self.slice_logits(model, embeddings, slice_shape)
        return np.stack([resolve_overlaps(logits, values) for logits in slices])

    def slice_logits(self, model: Sam, embeddings: torch.Tensor, slice_shape: tuple[int, int]) -> Iterator[np.ndarray]:
        """Per-task logits (T, H, W) for each of N consecutive slices (embeddings (N, 256, 64, 64)), one
        slice at a time so that a volume of them is never held; in label order, -inf for a task the
        location head finds absent on a slice (``location_map``: the head's log-odds of each task
        against background)."""
        if self.variant.segmenter == "decoder":
            tokens = self.token_batch(model.device)
            for embedding in embeddings:
                with torch.inference_mode():
                    decoded = decode(self.decoder, model, embedding.to(model.device), tokens, slice_shape)
                yield decoded.cpu().numpy()
            return
        with torch.inference_mode():
            probabilities = self.locator.volume_probabilities(embeddings, slice_shape)
        if self.variant.segmenter == "location_map":
            clamped = np.clip(probabilities, 1e-8, None)
            yield from np.log(clamped[:, 1:]) - np.log(clamped[:, :1])
            return
        for embedding, slice_probabilities in zip(embeddings, probabilities):
            with torch.inference_mode():
                located = self._located_logits(model, embedding, slice_probabilities, slice_shape)
            yield located

    def _located_logits(
        self, model: Sam, embedding: torch.Tensor, probabilities: np.ndarray, slice_shape: tuple[int, int]
    ) -> np.ndarray:
        """``decoder_box`` on one slice: each task the head finds gets its box; the others stay absent.
        ``decoder_box_fused`` averages the decoder's and the head's probabilities, the head's weighted by
        the variant's ``head_weight`` (logits of the mean)."""
        regions = located_regions(probabilities)
        logits = np.full((len(self.tasks), *slice_shape), -np.inf, dtype=np.float32)
        present = [index for index, region in enumerate(regions) if region.any()]
        if present:
            margin = self.locator.settings.box_margin
            boxes = np.stack([region_box(regions[i], probabilities[i + 1], margin) for i in present])
            tokens = self.token_batch(model.device)[present]
            decoded = decode_with_boxes(self.decoder, model, embedding, tokens, boxes, slice_shape).cpu()
            if self.variant.segmenter == "decoder_box_fused":
                task = torch.as_tensor(probabilities[[i + 1 for i in present]])
                decoded = fused_logits(decoded, task, torch.as_tensor(probabilities[0]), self.variant.head_weight)
            logits[present] = decoded.numpy()
        return logits

    def segment_volume(
        self,
        model: Sam,
        embeddings: torch.Tensor,
        volume_shape: tuple[int, int, int],
        axis: int,
        extent: range | None = None,
    ) -> np.ndarray:
        """A label volume from the embeddings of its slices ``extent`` (default: all); other slices background."""
        extent = range(volume_shape[axis]) if extent is None else extent
        slice_shape = tuple(size for i, size in enumerate(volume_shape) if i != axis)
        labels = np.zeros(volume_shape, dtype=np.uint8)
        np.moveaxis(labels, axis, 0)[extent.start : extent.stop] = self.segment(model, embeddings, slice_shape)
        return labels

    def adapted(
        self,
        embeddings: list[torch.Tensor],
        label_slices: list[np.ndarray],
        seed: int,
        steps: int = ADAPT_STEPS,
        learning_rate: float = ADAPT_LEARNING_RATE,
    ) -> FewShotModel:
        """A copy whose location head is fine-tuned on labelled slices of the volume to segment (their
        embeddings (256, 64, 64) and label maps (H, W)); decoder and tokens stay as trained. A task with
        no voxel on these slices keeps what the head knew of it."""
        if self.locator is None:
            raise FewsamError(
                f"few-shot variant '{self.variant.base}' has no location head to adapt to a volume's labelled "
                f"slices (a located variant has one, e.g. the default '{FEWSHOT.default_variant}')"
            )
        settings = dataclasses.replace(self.locator.settings, steps=steps, learning_rate=learning_rate)
        locator, _ = fit_location_map(
            embeddings,
            label_slices,
            list(self.tasks),
            self.locator.input_size,
            settings,
            seed,
            progress=False,
            start=self.locator.head,
        )
        return dataclasses.replace(self, locator=locator)

    def save(self, path: str | Path) -> Path:
        """Decoder weights and tokens in one small file (atomic write)."""
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "format": MODEL_FORMAT,
                "backbone": self.backbone,
                "variant": self.variant.name,
                "variant_definition": self.variant.definition(),
                "tasks": self.tasks,
                "preprocessing": self.preprocessing,
                "tokens": {name: t.cpu() for name, t in self.tokens.items()},
                "decoder": {k: v.cpu() for k, v in self.decoder.state_dict().items()},
                "locator": self.locator.state() if self.locator is not None else None,
            },
            partial,
        )
        partial.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, model: Sam, backbone: str) -> FewShotModel:
        """A saved model, checked against the backbone whose embeddings it will decode."""
        path = Path(path)
        if not path.exists():
            raise FewsamError(f"{path}: no such few-shot model file")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a truncated or foreign file
            raise FewsamError(f"{path}: not a readable few-shot model ({type(error).__name__}: {error})") from None
        if not isinstance(saved, dict) or saved.get("format") not in READABLE_FORMATS:
            raise FewsamError(f"{path}: not a fewsam few-shot model (expected format '{MODEL_FORMAT}')")
        if saved["backbone"] != backbone:
            raise FewsamError(f"{path}: trained on {saved['backbone']} embeddings, cannot decode {backbone} ones")
        decoder = copy.deepcopy(model.mask_decoder)
        decoder.load_state_dict(saved["decoder"])
        if saved["format"] == MODEL_FORMAT:
            variant = variant_from_definition(saved.get("variant_definition"), str(path))
        else:
            variant = variant_from_definition({"base": (saved.get("design") or {}).get("name")}, str(path))
        tasks = {int(k): v for k, v in saved["tasks"].items()}
        locator = saved.get("locator")
        if variant.locator is not None and locator is None:
            raise FewsamError(f"{path}: variant '{variant.name}' needs a location head, and the file has none")
        return cls(
            backbone,
            variant,
            tasks,
            saved["tokens"],
            decoder.eval().requires_grad_(False),
            saved["preprocessing"],
            LocationMap.from_state(locator, len(tasks) + 1) if locator is not None else None,
        )


def train_decoder(
    model: Sam,
    tokens: dict[str, torch.Tensor],
    embeddings: list[torch.Tensor],
    label_slices: list[np.ndarray],
    tasks: dict[int, str],
    settings: TrainingSettings,
    seed: int,
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = segmentation_loss,
    progress: bool = True,
    with_boxes: bool = False,
) -> tuple[MaskDecoder, list[float]]:
    """Fine-tune a copy of SAM's mask decoder on the collection; returns it and the loss per step.

    Without boxes every support slice trains every task: a task missing from a slice is a negative
    example. With boxes (``decoder_box``) a slice trains the tasks it shows, each prompted by its
    token and its ground-truth box jittered as the ``jitter`` prompt is (up to 10% of each side),
    since at inference the box comes from the location head, which finds absent tasks itself; a
    slice that shows no task (a volume's labelled slice between organs) then trains nothing and is
    never drawn.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    decoder = copy.deepcopy(model.mask_decoder).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    token_batch = torch.stack([tokens[name] for name in tasks.values()]).to(model.device)
    targets = [np.stack([label == value for value in tasks]) for label in label_slices]

    def slice_loss(index: int) -> torch.Tensor:
        embedding, shape = embeddings[index].to(model.device), label_slices[index].shape
        target = torch.as_tensor(targets[index], dtype=torch.float32, device=model.device)
        if not with_boxes:
            return loss_function(decode(decoder, model, embedding, token_batch, shape), target)
        shown = [task for task in range(len(tasks)) if targets[index][task].any()]
        boxes = np.stack([jitter_box(bounding_box(targets[index][task]), shape, rng) for task in shown])
        return loss_function(
            decode_with_boxes(decoder, model, embedding, token_batch[shown], boxes, shape), target[shown]
        )

    drawable = [index for index, target in enumerate(targets) if target.any() or not with_boxes]
    if not drawable:
        raise FewsamError(f"no support slice shows any of the tasks {', '.join(tasks.values())}: nothing to train on")
    history = []
    per_step = min(settings.slices_per_step, len(drawable))
    for _ in tqdm(range(settings.steps), desc="train decoder", unit="step", disable=not progress):
        picks = [drawable[pick] for pick in rng.choice(len(drawable), size=per_step, replace=False)]
        loss = sum(slice_loss(i) for i in picks) / per_step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return decoder.eval().requires_grad_(False), history


def fit_fewshot(
    model: Sam,
    backbone: str,
    embeddings: list[torch.Tensor],
    label_slices: list[np.ndarray],
    tasks: dict[int, str],
    variant: FewShotVariant,
    seed: int,
    preprocessing: dict[str, Any],
    progress: bool = True,
    twins: tuple[list[torch.Tensor], list[np.ndarray]] | None = None,
) -> tuple[FewShotModel, pd.DataFrame]:
    """Tokens from the collection, then the location head and/or the decoder trained on it; the head
    also on the ``twins``' embeddings and label slices (:func:`encode_twins`) when the variant
    augments. Returns the model and the training curve (``stage``, ``step``, ``loss``; stage
    ``location`` or ``decoder``)."""
    if (variant.augmentation is None) != (twins is None):
        raise FewsamError(f"few-shot variant {variant.name}: twins are given exactly when the variant augments")
    tokens = few_shot_tokens(model, embeddings, label_slices, tasks, variant.tokens)
    curves = []
    locator = None
    if variant.locator is not None:
        head_embeddings, head_labels = list(embeddings), list(label_slices)
        if twins is not None:
            head_embeddings += twins[0]
            head_labels += twins[1]
        input_size = model.image_encoder.img_size
        locator, history = fit_location_map(
            head_embeddings, head_labels, list(tasks), input_size, variant.locator, seed, progress
        )
        curves.append(("location", history))
    if variant.trains_decoder:
        decoder, history = train_decoder(
            model,
            tokens,
            embeddings,
            label_slices,
            tasks,
            variant.schedule,
            seed,
            LOSSES[variant.loss],
            progress,
            with_boxes=variant.prompts_boxes,
        )
        curves.append(("decoder", history))
    else:
        decoder = copy.deepcopy(model.mask_decoder).eval().requires_grad_(False)
    curve = pd.concat(
        [pd.DataFrame({"stage": stage, "step": range(1, len(h) + 1), "loss": h}) for stage, h in curves],
        ignore_index=True,
    )
    return FewShotModel(backbone, variant, dict(tasks), tokens, decoder, preprocessing, locator), curve


def support_slices(manifest: Manifest, collection: Collection) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Grey and label slices of the collection, grouped by case (one volume read per case)."""
    by_case: dict[str, list[int]] = {}
    for support in collection.slices:
        by_case.setdefault(support.case_id, []).append(support.slice_index)
    greys, labels = [], []
    for case_id, indices in by_case.items():
        volume = load_case(manifest, case_id)
        greys += grey_slices(manifest, volume, indices)
        labels += [take_slice(volume.label, manifest.slice_axis, i) for i in indices]
    return greys, labels


def load_support(
    manifest: Manifest, collection: Collection, cache: EmbeddingCache, progress: bool = True
) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Cached embeddings and label slices of the collection."""
    greys, labels = support_slices(manifest, collection)
    return list(cache.get_many(greys, progress=progress, desc="encode support")), labels


def encode_twins(
    cache: EmbeddingCache,
    greys: list[np.ndarray],
    labels: list[np.ndarray],
    variant: FewShotVariant,
    seed: int,
    progress: bool = True,
) -> tuple[list[torch.Tensor], list[np.ndarray]] | None:
    """Embeddings and label slices of the support's augmented twins (None when the variant does not augment)."""
    if variant.augmentation is None:
        return None
    twin_greys, twin_labels = augment_support(greys, labels, variant.augmentation, seed)
    return list(cache.get_many(twin_greys, progress=progress, desc="encode augmented support")), twin_labels


@dataclass
class CollectionModel:
    """A few-shot model trained on a collection, with its training curve and what it saw.

    ``train_seconds`` is what this call spent (training, or reading a stored model back);
    ``trained_seconds`` what training took when the model was trained."""

    model: FewShotModel
    curve: pd.DataFrame
    support_slices: int
    augmented_slices: int | None
    train_seconds: float
    trained_seconds: float
    key: str
    reused: bool = False

    def record(self) -> dict[str, Any]:
        """What a run records of it: the counts, and whether it was trained here or reused."""
        record: dict[str, Any] = {"support_slices": self.support_slices}
        if self.augmented_slices is not None:
            record["augmented_slices"] = self.augmented_slices
        record["collection_model"] = {
            "key": self.key,
            "reused": self.reused,
            "trained_seconds": round(self.trained_seconds, 1),
        }
        return record


class CollectionModelStore:
    """Trained collection models, content-addressed next to the embeddings they were trained on.

    A few-shot run and every k of the within-volume track's adapted variant train the same model on
    the same collection. The key hashes everything training reads: the support slices' embedding
    keys (backbone, checkpoint, encoder path, pixels) and label slices, the tasks, the variant's
    definition (schedule included), the seed, fewsam's source and torch's version. A stored model is
    the one this code would train, up to float rounding across thread counts. One entry is
    ``<cache root>/_collection_models/<backbone>/<key>.pt`` (the model file) and ``<key>.json``
    (curve, counts, seconds), the JSON renamed into place last: a crash leaves no complete-looking
    entry, and an unreadable one is reported, deleted and trained again.
    """

    def __init__(self, cache: EmbeddingCache) -> None:
        self.cache = cache
        self.folder = cache.root / "_collection_models" / cache.spec.name

    def key(
        self,
        greys: list[np.ndarray],
        labels: list[np.ndarray],
        tasks: dict[int, str],
        variant: FewShotVariant,
        seed: int,
        preprocessing: dict[str, Any],
    ) -> str:
        identity = {
            "tasks": {str(value): name for value, name in tasks.items()},
            "variant": variant.definition(),
            "seed": seed,
            "preprocessing": preprocessing,
            "fewsam_source": paths.source_fingerprint(),
            "torch": torch.__version__,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
        for grey, label in zip(greys, labels):
            digest.update(self.cache.key(grey).encode())
            digest.update(repr((label.shape, label.dtype.str)).encode())
            digest.update(np.ascontiguousarray(label).tobytes())
        return digest.hexdigest()

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.pt", self.folder / f"{key}.json"

    def load(self, key: str) -> CollectionModel | None:
        """The stored model, or None when there is none (or it was unreadable, and is now deleted)."""
        model_path, record_path = self.paths(key)
        if not record_path.exists():
            return None
        started = time.perf_counter()
        try:
            record = json.loads(record_path.read_text())
            model = FewShotModel.load(model_path, self.cache.backbone.model, self.cache.spec.name)
            curve = pd.DataFrame(record["curve"])
            counts = (int(record["support_slices"]), record["augmented_slices"], float(record["trained_seconds"]))
        except (FewsamError, OSError, ValueError, KeyError, TypeError) as error:
            log.warning("stored collection model %s is unreadable (%s): deleted, training again", record_path, error)
            record_path.unlink(missing_ok=True)
            model_path.unlink(missing_ok=True)
            return None
        seconds = time.perf_counter() - started
        return CollectionModel(model, curve, counts[0], counts[1], seconds, counts[2], key, reused=True)

    def save(self, trained: CollectionModel) -> None:
        model_path, record_path = self.paths(trained.key)
        trained.model.save(model_path)
        record = {
            "curve": trained.curve.to_dict(orient="list"),
            "support_slices": trained.support_slices,
            "augmented_slices": trained.augmented_slices,
            "trained_seconds": trained.trained_seconds,
        }
        paths.write_json(record_path, record)


def train_on_collection(
    manifest: Manifest,
    collection: Collection,
    cache: EmbeddingCache,
    variant: FewShotVariant,
    seed: int,
    progress: bool = True,
) -> CollectionModel:
    """Encode the collection (and its twins when the variant augments) and train the variant on it,
    or read back the model this code trained on the same inputs before (:class:`CollectionModelStore`)."""
    greys, labels = support_slices(manifest, collection)
    preprocessing = {"slice_axis": manifest.slice_axis, "intensity": manifest.intensity.as_dict()}
    store = CollectionModelStore(cache)
    key = store.key(greys, labels, manifest.tasks, variant, seed, preprocessing)
    stored = store.load(key)
    if stored is not None:
        return stored
    embeddings = list(cache.get_many(greys, progress=progress, desc="encode support"))
    twins = encode_twins(cache, greys, labels, variant, seed, progress)
    started = time.perf_counter()
    model, curve = fit_fewshot(
        cache.backbone.model,
        cache.spec.name,
        embeddings,
        labels,
        manifest.tasks,
        variant,
        seed,
        preprocessing,
        progress,
        twins,
    )
    seconds = time.perf_counter() - started
    augmented = None if twins is None else len(twins[1])
    trained = CollectionModel(model, curve, len(collection.slices), augmented, seconds, seconds, key)
    try:
        store.save(trained)
    except OSError as error:  # a full or read-only disk costs the next run a retraining, not this run
        log.warning("could not store the trained collection model in %s (%s)", store.folder, error)
    return trained


@dataclass(frozen=True)
class FewShotSection:
    """The ``fewshot`` section of a profile."""

    backbones: tuple[str, ...] = ()
    optional_backbones: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()
    shots: tuple[int, ...] = ()
    seeds: tuple[int, ...] = (0,)
    training: dict[str, Any] = field(default_factory=dict)  # overrides of TrainingSettings
    # Seeds (shots) of the variants named here, instead of ``seeds`` (``shots``): a costly variant
    # may run fewer, or join shot count by shot count.
    variant_seeds: dict[str, list[int]] = field(default_factory=dict)
    variant_shots: dict[str, list[int]] = field(default_factory=dict)
    # Shot counts of the seeds named here, among their variant's: a later seed (a new collection)
    # may join shot count by shot count; ``variant_seed_shots`` replaces it for the variants it
    # names, so that one variant's new seed can join while another's is complete.
    seed_shots: dict[int, list[int]] = field(default_factory=dict)
    variant_seed_shots: dict[str, dict[int, list[int]]] = field(default_factory=dict)

    def check_section(self, where: str) -> None:
        parse_section(TrainingSettings, self.training, f"{where}: training")
        check_variant_keys(self.variant_seeds, self.variants, "variant_seeds", where)
        check_variant_keys(self.variant_shots, self.variants, "variant_shots", where)
        check_variant_keys(self.variant_seed_shots, self.variants, "variant_seed_shots", where)
        planned_seeds = {seed for variant in self.variants for seed in self.seeds_of(variant)}
        unplanned = [seed for seed in self.seed_shots if seed not in planned_seeds]
        if unplanned:
            raise FewsamError(f"{where}: seed_shots names seed {unplanned[0]}, which no variant runs")
        for variant, seed_shots in self.variant_seed_shots.items():
            unplanned = [seed for seed in seed_shots if seed not in self.seeds_of(variant)]
            if unplanned:
                raise FewsamError(
                    f"{where}: variant_seed_shots names seed {unplanned[0]} of '{variant}', which it does not run"
                )

    def seeds_of(self, variant: str) -> tuple[int, ...]:
        return tuple(self.variant_seeds.get(variant, self.seeds))

    def shots_of(self, variant: str, seed: int | None = None) -> tuple[int, ...]:
        shots = self.variant_shots.get(variant, self.shots)
        seed_shots = self.variant_seed_shots.get(variant, self.seed_shots)
        if seed in seed_shots:
            shots = [count for count in shots if count in seed_shots[seed]]
        return tuple(shots)


class FewShotRun(MethodRun):
    """Draw a collection, train the decoder on it, segment every slice of the profile's test cases."""

    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        run = context.run
        if run.shots is None:
            raise FewsamError("fewshot runs need --shots (labelled slices per task)")
        self.variant = FEWSHOT.resolve_variant(run.variant, context.section)
        self.backbone, self.shots = run.backbone, run.shots
        self.cache = EmbeddingCache(
            self.backbone, checkpoint=context.checkpoint, device=context.device, encoder_path=context.encoder_path
        )
        self.collection = draw_collection(context.manifest, run.shots, run.seed)
        self.timings = {"encode": 0.0, "train": 0.0, "predict": 0.0}

    def parameters(self) -> dict[str, Any]:
        return {
            "token_design": asdict(self.variant.tokens),
            "training": asdict(self.variant.schedule),
            "variant_definition": self.variant.definition(),
        }

    def provenance(self) -> dict[str, Any]:
        return {
            **self.cache.provenance(),
            "collection": self.collection.as_dict(),
        }

    def prepare(self, writer: Any, case_ids: list[str]) -> None:
        manifest, progress, seed = self.context.manifest, self.context.progress, self.context.run.seed
        trained = train_on_collection(manifest, self.collection, self.cache, self.variant, seed, progress)
        self.model = trained.model
        self.timings["train"] = trained.train_seconds
        self.model.save(writer.folder / MODEL_FILE)
        trained.curve.to_csv(writer.folder / CURVE_FILE, index=False)
        self.extra.update(final_training_loss=float(trained.curve.loss.iloc[-1]), **trained.record())

    def predict_case(self, volume: Volume, extent: range) -> CasePrediction:
        manifest = self.context.manifest
        slices = grey_slices(manifest, volume, extent)
        embeddings = self.cache.get_many(slices, progress=self.context.progress, desc=f"encode {volume.case_id}")
        started = time.perf_counter()
        prediction = self.model.segment_volume(
            self.cache.backbone.model, embeddings, volume.shape, manifest.slice_axis, extent
        )
        self.timings["predict"] += time.perf_counter() - started
        self.timings["encode"] = self.cache.stats.encode_seconds
        self.extra["cache"] = self.cache.stats.as_dict()
        return CasePrediction(prediction)


class FewShot(Method):
    name = "fewshot"
    command = "fewshot"
    description = "pooled support embeddings as prompt tokens; SAM's mask decoder fine-tuned on a few labelled slices"
    section_key = "fewshot"
    section_type = FewShotSection
    notebook = "20_fewshot.ipynb"
    rank = 1
    # The variant the validation runs rank first (results/tables/ablation.md, docs/results.md);
    # ``centred`` is the paper-faithful one and stays in every profile beside it.
    default_variant = "located_augmented_head_weighted"
    report_role = "few_shot"

    def labelled_slices(self, meta: dict[str, Any]) -> int | None:
        return meta.get("support_slices")

    def plan(self, manifest: str, section: FewShotSection, backbones: list[str], profile: str) -> list[PlannedRun]:
        return [
            PlannedRun(self.name, manifest, backbone, variant, seed, profile, shots)
            for backbone in backbones
            for variant in section.variants
            for shots in section.shots_of(variant)
            for seed in section.seeds_of(variant)
            if shots in section.shots_of(variant, seed)
        ]

    def variant_names(self) -> list[str]:
        return list(FEWSHOT_VARIANTS)

    def resolve_variant(self, name: str, section: FewShotSection | None) -> FewShotVariant:
        variant = get_fewshot_variant(name)
        if section is not None and section.training:
            variant = variant.with_schedule(**section.training)
        if "-" in name and name != variant.name:
            raise FewsamError(
                f"few-shot variant '{name}' does not match this profile's settings, which make "
                f"'{variant.name}'; name the registered variant '{variant.base}'"
            )
        return variant

    def add_run_options(self, parser: Any) -> None:
        super().add_run_options(parser)
        parser.add_argument("--shots", type=positive_int, required=True, help="labelled slices per task")

    def start(self, context: RunContext) -> FewShotRun:
        return FewShotRun(context)

    def label(self, variant: str, shots: int | None, budget: str | None = None) -> str:
        design = "" if variant == self.default_variant else f" ({variant})"
        count = int(shots) if shots is not None else 0
        return f"few-shot {count} shot{'s' if count != 1 else ''}{design}"

    def variant_order(self, variant: str) -> int:
        names = list(FEWSHOT_VARIANTS)
        base = variant.split("-", 1)[0]
        return names.index(base) if base in names else len(names)


FEWSHOT = register_method(FewShot())
