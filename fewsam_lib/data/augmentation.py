"""Augmented copies of a few-shot collection's slices: more examples for the heads trained on it.

Twenty labelled slices are few for a location head that must tell a structure from its neighbours
(issue 19). Each support slice gets ``copies`` randomly transformed twins: a rotation, an isotropic
scale and a shift about the slice centre (the grey slice linearly interpolated, the label slice by
nearest neighbour, so label values stay label values) and a gamma change of the grey levels. A
twin is a new encoder input: it goes through the embedding cache like any slice, and the same
seed gives the same twins, hence the same cache entries.

Shapes: grey slices (H, W) float32 in [0, 255]; label slices (H, W) integer, same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import FewsamError


@dataclass(frozen=True)
class SupportAugmentation:
    """How many twins per support slice and how far each transform may go (uniform draws)."""

    copies: int = 4
    rotation_degrees: float = 15.0  # +- about the slice centre
    scale: float = 0.1  # zoom factor drawn from [1 - scale, 1 + scale]
    shift_pixels: float = 2.0  # +- along each axis
    gamma: float = 1.25  # grey-level exponent drawn log-uniformly from [1 / gamma, gamma]

    def __post_init__(self) -> None:
        if self.copies < 1:
            raise FewsamError(f"support augmentation needs at least 1 copy per slice, got {self.copies}")
        if not 0 <= self.scale < 1 or self.rotation_degrees < 0 or self.shift_pixels < 0 or self.gamma < 1:
            raise FewsamError(
                "support augmentation needs 0 <= scale < 1, rotation_degrees >= 0, shift_pixels >= 0 and "
                f"gamma >= 1, got {self}"
            )


def augmented_twin(
    grey: np.ndarray, label: np.ndarray, settings: SupportAugmentation, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One transformed copy of a (grey, label) slice pair; the label keeps only values it had."""
    if grey.shape != label.shape:
        raise FewsamError(f"a support slice and its label differ in shape: {grey.shape} and {label.shape}")
    angle = np.deg2rad(rng.uniform(-settings.rotation_degrees, settings.rotation_degrees))
    zoom = rng.uniform(1 - settings.scale, 1 + settings.scale)
    # affine_transform maps output coordinates to input ones: the inverse of rotate-then-zoom
    inverse = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / zoom
    centre = (np.array(grey.shape) - 1) / 2
    offset = centre - inverse @ centre + rng.uniform(-settings.shift_pixels, settings.shift_pixels, 2)
    moved = ndimage.affine_transform(grey.astype(np.float32), inverse, offset, order=1, mode="nearest")
    moved_label = ndimage.affine_transform(label, inverse, offset, order=0, mode="constant", cval=0)
    exponent = np.exp(rng.uniform(-np.log(settings.gamma), np.log(settings.gamma)))
    moved = 255.0 * (np.clip(moved, 0, 255) / 255.0) ** exponent
    return moved.astype(np.float32), moved_label.astype(label.dtype)


def augment_support(
    greys: list[np.ndarray], labels: list[np.ndarray], settings: SupportAugmentation, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``settings.copies`` twins of every slice, copy-major (all first twins, then all second ones)."""
    rng = np.random.default_rng([seed, 2])
    twins = [augmented_twin(g, lab, settings, rng) for _ in range(settings.copies) for g, lab in zip(greys, labels)]
    return [g for g, _ in twins], [lab for _, lab in twins]
