"""SAM's mask decoder on a cached embedding, shared by every SAM-based method."""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.modeling import MaskDecoder, Sam

from ..encoders.backbones import resized_shape

EMBEDDING_GRID = 64  # SAM's image embedding is (256, 64, 64)


def decode_masks(
    decoder: MaskDecoder,
    model: Sam,
    embedding: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    slice_shape: tuple[int, int],
    multimask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (T, C, H, W) at slice size and predicted IoU (T, C) for T prompt sets on one embedding.

    ``sparse``: (T, k, 256) prompt tokens; ``dense``: (T, 256, 64, 64); C is 3 with ``multimask``
    (SAM's candidates), else 1.
    """
    low_res, predicted_iou = decoder(
        image_embeddings=embedding[None].to(model.device),
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )
    input_size = resized_shape(*slice_shape, model.image_encoder.img_size)
    return model.postprocess_masks(low_res, input_size, slice_shape), predicted_iou


def decode_many(
    decoder: MaskDecoder,
    model: Sam,
    embeddings: torch.Tensor,
    sparse: torch.Tensor,
    slice_shapes: list[tuple[int, int]],
    dense: torch.Tensor | None = None,
    multimask: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One decoder call for B slices with T prompt sets each: logits per slice, (T, C, H_i, W_i), and
    predicted IoU (B*T, C).

    ``embeddings`` (B, 256, 64, 64); ``sparse`` (B*T, k, 256) grouped by slice; ``dense`` (B*T, 256,
    64, 64) or SAM's no-mask prompt. SAM's decoder repeats one image embedding for every prompt;
    here each prompt gets its own slice's embedding through the dense input (SAM adds the two),
    with a zero image embedding, so a batch of slices costs one call instead of B.
    """
    if not isinstance(embeddings, torch.Tensor):
        embeddings = torch.stack(list(embeddings))
    count = sparse.shape[0] // len(embeddings)
    per_prompt = embeddings.to(model.device).repeat_interleave(count, dim=0)
    dense = no_mask_prompt(model, len(per_prompt)) if dense is None else dense
    low_res, predicted_iou = decoder(
        image_embeddings=torch.zeros_like(per_prompt[:1]),
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=per_prompt + dense,
        multimask_output=multimask,
    )
    logits = []
    for index, shape in enumerate(slice_shapes):
        input_size = resized_shape(*shape, model.image_encoder.img_size)
        logits.append(model.postprocess_masks(low_res[index * count : (index + 1) * count], input_size, shape))
    return logits, predicted_iou


def no_mask_prompt(model: Sam, count: int) -> torch.Tensor:
    """SAM's dense embedding for 'no mask prompt', (count, 256, 64, 64)."""
    dense = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    return dense.expand(count, -1, EMBEDDING_GRID, EMBEDDING_GRID)


def resolve_overlaps(logits: np.ndarray, labels: list[int]) -> np.ndarray:
    """One label map from per-task logits (T, H, W): a pixel takes the task with the highest positive logit."""
    if not len(labels):
        raise ValueError("no tasks to resolve")
    best = np.argmax(logits, axis=0)
    label_map = np.asarray(labels, dtype=np.uint8)[best]
    label_map[logits.max(axis=0) <= 0] = 0  # SAM's mask threshold is logit 0
    return label_map
