"""Where is the anatomy? A light per-cell classifier on cached SAM embeddings.

The few-shot token says what a task looks like, not where it is, and on small anatomy (organs of
one to a few cells of the 64x64 embedding grid) a decoder fine-tuned on it learns to predict
nothing (issue 19). A :class:`LocationHead` is trained on the same collection: per embedding cell,
the probability of background and of each task, from the cell's (L2-normalised) embedding and
its position inside the image. It is the "self-prompting" idea of Self-Prompting SAM (Wu et al.,
MICCAI-W 2023) and PerSAM's location prior, made few-shot:

- Class-balanced: the loss weighs each class by (cells of all classes / cells of the class) to
  the power ``class_weight_power`` and adds a soft Dice term over the (slice, task) pairs where
  the task is present, so a task on 0.1% of the cells is not learnt away.
- A slice without the task is a plain negative for its cells; the presence decision is the
  head's own: a task is present on a slice when some pixel's most probable class is the task.

Shapes: embeddings (256, 64, 64); probabilities per cell (T+1, 64, 64) and per pixel (T+1, H, W),
class 0 background, class i the i-th task in label order.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from ..encoders.backbones import resized_shape
from ..errors import FewsamError
from .prompting import bounding_box
from .sam_decoding import EMBEDDING_GRID

FEATURE_SCALE = 10.0  # unit-norm embeddings times 10: logits of a fresh head start near SAM's scale


@dataclass(frozen=True)
class LocationSettings:
    """The head and its schedule; fixed for every task and dataset (chosen on validation)."""

    hidden: int = 64
    steps: int = 300
    slices_per_step: int = 8
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    class_weight_power: float = 0.5
    positions: bool = True  # the cell's (y, x) inside the image as two extra features
    # A second branch of two 3x3 convolutions on the grid average-pooled by this factor (0: none):
    # a context of ~20 cells, enough to tell the anterior from the posterior hippocampus.
    context_pool: int = 0
    # Gaussian sigma, in slices, of the smoothing of the probabilities across the neighbouring
    # slices of a volume before any decision (0: each slice alone).
    slice_smoothing: float = 0.0
    # Pixels added on every side of the box of a located region (``decoder_box``).
    box_margin: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.steps < 1 or self.slices_per_step < 1:
            raise FewsamError(f"a location head needs hidden, steps and slices_per_step >= 1, got {self}")
        if self.context_pool < 0 or self.slice_smoothing < 0 or self.box_margin < 0:
            raise FewsamError(f"context_pool, slice_smoothing and box_margin cannot be negative, got {self}")


def cell_centres(input_size: int) -> torch.Tensor:
    """(64,): cell centres in input pixels; a cell spans input_size / 64 of them (16 for SAM's
    1024-pixel input, 4 for LiteMedSAM's 256)."""
    return (torch.arange(EMBEDDING_GRID) + 0.5) * (input_size / EMBEDDING_GRID)


def image_cells(slice_shape: tuple[int, int], input_size: int) -> torch.Tensor:
    """(64, 64) bool: the cells whose centre lies on the image rather than SAM's padding."""
    height, width = resized_shape(*slice_shape, input_size)
    centres = cell_centres(input_size)
    return (centres[:, None] < height) & (centres[None, :] < width)


def cell_positions(slice_shape: tuple[int, int], input_size: int) -> torch.Tensor:
    """(2, 64, 64): each cell centre's (y, x) in [-1, 1] across the image (not the padding)."""
    height, width = resized_shape(*slice_shape, input_size)
    centres = cell_centres(input_size)
    rows, cols = torch.meshgrid(centres / height * 2 - 1, centres / width * 2 - 1, indexing="ij")
    return torch.stack([rows, cols])


def cell_fractions(label: np.ndarray, values: list[int], input_size: int) -> torch.Tensor:
    """(T+1, 64, 64): the fraction of each cell covered by background and by each task value."""
    from .fewshot import embedding_grid_weights

    tasks = torch.stack([embedding_grid_weights(label == value, input_size) for value in values])
    return torch.cat([(1 - tasks.sum(0)).clamp_min(0)[None], tasks])


class LocationHead(torch.nn.Module):
    """1x1 reduction, two 3x3 convolutions (a 5x5-cell context), 1x1 to background + tasks; with
    ``context_pool`` a second pair of 3x3 convolutions on the pooled grid joins before the last 1x1."""

    def __init__(self, channels: int, hidden: int, classes: int, context_pool: int = 0) -> None:
        super().__init__()
        self.context_pool = context_pool
        self.reduce = torch.nn.Sequential(torch.nn.Conv2d(channels, hidden, 1), torch.nn.GELU())
        self.local = _convolutions(hidden)
        self.context = _convolutions(hidden) if context_pool else None
        self.classify = torch.nn.Conv2d(hidden * (2 if context_pool else 1), classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, 64, 64) -> (B, T+1, 64, 64) logits."""
        reduced = self.reduce(features)
        merged = self.local(reduced)
        if self.context is not None:
            context = self.context(F.avg_pool2d(reduced, self.context_pool))
            merged = torch.cat(
                [merged, F.interpolate(context, merged.shape[-2:], mode="bilinear", align_corners=False)], 1
            )
        return self.classify(merged)


def _convolutions(hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv2d(hidden, hidden, 3, padding=1),
        torch.nn.GELU(),
        torch.nn.Conv2d(hidden, hidden, 3, padding=1),
        torch.nn.GELU(),
    )


# Heads saved before the context branch kept their layers in one Sequential.
_FIRST_HEAD_LAYOUT = {
    "layers.0.": "reduce.0.",
    "layers.2.": "local.0.",
    "layers.4.": "local.2.",
    "layers.6.": "classify.",
}


def _current_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        old = next((prefix for prefix in _FIRST_HEAD_LAYOUT if key.startswith(prefix)), None)
        renamed[key if old is None else _FIRST_HEAD_LAYOUT[old] + key[len(old) :]] = value
    return renamed


@dataclass
class LocationMap:
    """A trained head with what it needs to read a new embedding."""

    head: LocationHead
    settings: LocationSettings
    input_size: int

    def features(self, embedding: torch.Tensor, slice_shape: tuple[int, int]) -> torch.Tensor:
        """(C, 64, 64) head input: the unit-norm embedding (+ positions)."""
        features = F.normalize(embedding.float(), dim=0) * FEATURE_SCALE
        if self.settings.positions:
            features = torch.cat([features, cell_positions(slice_shape, self.input_size)])
        return features

    def cell_probabilities(self, embedding: torch.Tensor, slice_shape: tuple[int, int]) -> torch.Tensor:
        """(T+1, 64, 64); padding cells are background."""
        with torch.inference_mode():
            logits = self.head(self.features(embedding.cpu(), slice_shape)[None])[0]
        probabilities = torch.softmax(logits, 0)
        outside = ~image_cells(slice_shape, self.input_size)
        probabilities[:, outside] = 0
        probabilities[0, outside] = 1
        return probabilities

    def pixel_probabilities(self, embedding: torch.Tensor, slice_shape: tuple[int, int]) -> np.ndarray:
        """(T+1, H, W) at slice size, through SAM's resize and padding in reverse."""
        cells = self.cell_probabilities(embedding, slice_shape)
        height, width = resized_shape(*slice_shape, self.input_size)
        size = (self.input_size, self.input_size)
        on_input = F.interpolate(cells[None], size, mode="bilinear", align_corners=False)[..., :height, :width]
        return F.interpolate(on_input, slice_shape, mode="bilinear", align_corners=False)[0].numpy()

    def volume_probabilities(self, embeddings: torch.Tensor, slice_shape: tuple[int, int]) -> np.ndarray:
        """(N, T+1, H, W) for the embeddings (N, 256, 64, 64) of N consecutive slices of a volume,
        smoothed across slices when the settings ask for it (still summing to 1 per pixel)."""
        probabilities = np.stack([self.pixel_probabilities(embedding, slice_shape) for embedding in embeddings])
        if self.settings.slice_smoothing > 0 and len(probabilities) > 1:
            probabilities = ndimage.gaussian_filter1d(
                probabilities, self.settings.slice_smoothing, axis=0, mode="nearest"
            )
        return probabilities

    def state(self) -> dict:
        return {"settings": asdict(self.settings), "input_size": self.input_size, "head": self.head.state_dict()}

    @classmethod
    def from_state(cls, state: dict, classes: int) -> LocationMap:
        settings = LocationSettings(**state["settings"])
        head = _new_head(settings, classes)
        head.load_state_dict(_current_layout(state["head"]))
        return cls(head.eval().requires_grad_(False), settings, int(state["input_size"]))


def _new_head(settings: LocationSettings, classes: int) -> LocationHead:
    channels = 256 + (2 if settings.positions else 0)
    return LocationHead(channels, settings.hidden, classes, settings.context_pool)


def fit_location_map(
    embeddings: list[torch.Tensor],
    label_slices: list[np.ndarray],
    values: list[int],
    input_size: int,
    settings: LocationSettings,
    seed: int,
    progress: bool = True,
    start: LocationHead | None = None,
) -> tuple[LocationMap, list[float]]:
    """Train a head on the collection's cached embeddings and label slices; returns it and the loss per
    step. From ``start`` (a trained head, left unchanged) it fine-tunes a copy instead, and a value
    without a labelled cell keeps what ``start`` knows of it."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    head = _new_head(settings, len(values) + 1) if start is None else copy.deepcopy(start).train().requires_grad_(True)
    untrained = LocationMap(head, settings, input_size)
    features = torch.stack([untrained.features(e, label.shape) for e, label in zip(embeddings, label_slices)])
    targets = torch.stack([cell_fractions(label, values, input_size) for label in label_slices])
    inside = torch.stack([image_cells(label.shape, input_size) for label in label_slices]).float()
    cells = (targets * inside[:, None]).sum(dim=(0, 2, 3))
    if start is None and (cells[1:] == 0).any():
        missing = [values[i] for i in np.flatnonzero(cells[1:].numpy() == 0)]
        raise FewsamError(f"no labelled cell of label value(s) {missing} in the few-shot collection")
    # a value without cells has no target to weigh: its weight only has to stay finite
    counted = torch.where(cells > 0, cells, torch.ones_like(cells))
    class_weights = (cells.sum() / (counted * len(cells))) ** settings.class_weight_power
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    per_step = min(settings.slices_per_step, len(features))
    history = []
    head.train()
    for _ in tqdm(range(settings.steps), desc="train location head", unit="step", disable=not progress):
        picks = torch.as_tensor(rng.choice(len(features), size=per_step, replace=False))
        loss = location_loss(head(features[picks]), targets[picks], inside[picks], class_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return LocationMap(head.eval().requires_grad_(False), settings, input_size), history


def location_loss(
    logits: torch.Tensor, targets: torch.Tensor, inside: torch.Tensor, class_weights: torch.Tensor
) -> torch.Tensor:
    """Class-weighted soft cross-entropy over image cells + soft Dice over present (slice, task) pairs.

    ``logits``/``targets`` (B, T+1, 64, 64), ``inside`` (B, 64, 64), ``class_weights`` (T+1,).
    """
    log_probabilities = torch.log_softmax(logits, 1)
    cross_entropy = -(targets * log_probabilities * class_weights[:, None, None]).sum(1)
    cross_entropy = (cross_entropy * inside).sum() / inside.sum()
    probabilities = log_probabilities.exp()[:, 1:] * inside[:, None]
    task_targets = targets[:, 1:]
    present = (task_targets.sum(dim=(2, 3)) > 0).float()
    dice = (2 * (probabilities * task_targets).sum(dim=(2, 3)) + 1) / (
        probabilities.sum(dim=(2, 3)) + task_targets.sum(dim=(2, 3)) + 1
    )
    return cross_entropy + ((1 - dice) * present).sum() / present.sum().clamp_min(1)


def located_regions(probabilities: np.ndarray) -> np.ndarray:
    """(T, H, W) bool from pixel probabilities (T+1, H, W): the pixels whose most probable class is
    the task, an empty mask being the presence decision "absent on this slice"."""
    best = probabilities.argmax(0)
    return np.stack([best == index for index in range(1, len(probabilities))])


def region_box(region: np.ndarray, probability: np.ndarray, margin: float) -> np.ndarray:
    """Pixel-edge box (x0, y0, x1, y1) of the most confident component of a non-empty region,
    grown by ``margin`` pixels on every side and kept on the slice."""
    height, width = region.shape
    box = bounding_box(most_confident_component(region, probability)) + np.array([-margin, -margin, margin, margin])
    return np.clip(box, 0, [width, height, width, height])


def most_confident_component(region: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """The connected part of ``region`` with the largest probability mass (empty stays empty)."""
    components, count = ndimage.label(region)
    if count <= 1:
        return region
    mass = ndimage.sum(probability, components, range(1, count + 1))
    return components == 1 + int(np.argmax(mass))
