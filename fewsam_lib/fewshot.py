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
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, Sam
from tqdm import tqdm

from . import paths
from .backbones import resized_shape
from .cache import EmbeddingCache
from .errors import FewsamError, lookup
from .manifest import Manifest, load_manifest
from .profiles import load_profile
from .prompting import resolve_overlaps
from .runs import RunSpec, RunWriter, run_provenance, score_case
from .volumes import grey_slices, load_case, slice_table, take_slice

EMBEDDING_GRID = 64
MODEL_FORMAT = "fewsam-fewshot-decoder-v1"
MODEL_FILE = "fewshot_model.pt"  # git-ignored (~16 MB of decoder weights); the run regenerates it
CURVE_FILE = "training_curve.csv"


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
        TokenDesign("centred", True, False, "pooled minus support mean, SAM point-token norm, + positive type embedding"),
        TokenDesign("centred_bg", True, True, "centred task token + centred background token (negative type embedding)"),
    )
}


def get_design(name: str) -> TokenDesign:
    return lookup(TOKEN_DESIGNS, name, "few-shot variant")


@dataclass(frozen=True)
class SupportSlice:
    case_id: str
    slice_index: int


@dataclass(frozen=True)
class Collection:
    """The labelled slices the method may use; ``per_task`` says which slice was drawn for which task."""

    slices: tuple[SupportSlice, ...]
    per_task: dict[str, tuple[SupportSlice, ...]]
    shots: int | None
    seed: int | None

    def as_dict(self) -> dict:
        return {"shots": self.shots, "seed": self.seed,
                "slices": [asdict(s) for s in self.slices],
                "per_task": {task: [asdict(s) for s in slices] for task, slices in self.per_task.items()}}


def draw_collection(manifest: Manifest, shots: int, seed: int, table: pd.DataFrame | None = None) -> Collection:
    """``shots`` training slices per task that contain it, drawn with ``seed``.

    Per task, the candidate slices (sorted by case and index) are permuted once with the seed and
    the first ``shots`` are taken, so collections are nested: the 5-shot collection holds the
    1-shot one. A drawn slice brings all of its labels (it is fully annotated), so it also serves
    the other tasks it shows, and as a negative example for the tasks it does not.
    """
    if shots < 1:
        raise FewsamError(f"shots must be at least 1, got {shots}")
    table = table if table is not None else slice_table(manifest, manifest.case_ids("train"))
    per_task: dict[str, tuple[SupportSlice, ...]] = {}
    for offset, task in enumerate(manifest.task_names):
        candidates = table[table[task] > 0].sort_values(["case_id", "slice_index"])
        if len(candidates) < shots:
            raise FewsamError(f"{manifest.path}: task '{task}' is on {len(candidates)} training slices, fewer than "
                              f"{shots} shots")
        order = np.random.default_rng([seed, offset]).permutation(len(candidates))[:shots]
        per_task[task] = tuple(SupportSlice(str(candidates.case_id.iloc[i]), int(candidates.slice_index.iloc[i]))
                               for i in order)
    unique = sorted({s for slices in per_task.values() for s in slices}, key=lambda s: (s.case_id, s.slice_index))
    return Collection(tuple(unique), per_task, shots, seed)


def explicit_collection(manifest: Manifest, entries: list[tuple[str, int]],
                        table: pd.DataFrame | None = None) -> Collection:
    """A collection given as (case id, slice index) pairs, e.g. the slices a user labelled.

    Each slice serves every task it shows; every task must be on at least one of them.
    """
    if not entries:
        raise FewsamError("an explicit collection needs at least one (case id, slice index)")
    case_ids = sorted({case_id for case_id, _ in entries})
    for case_id in case_ids:
        manifest.case(case_id)  # an unknown case is a ManifestError naming the manifest
    table = table if table is not None else slice_table(manifest, case_ids)
    chosen = [SupportSlice(str(case_id), int(index)) for case_id, index in dict.fromkeys(entries)]
    per_task: dict[str, tuple[SupportSlice, ...]] = {}
    for task in manifest.task_names:
        showing = []
        for support in chosen:
            row = table[(table.case_id == support.case_id) & (table.slice_index == support.slice_index)]
            if row.empty:
                raise FewsamError(f"{manifest.path}: case {support.case_id} has no slice {support.slice_index}")
            if int(row[task].iloc[0]) > 0:
                showing.append(support)
        if not showing:
            raise FewsamError(f"task '{task}' is on none of the collection's slices")
        per_task[task] = tuple(showing)
    return Collection(tuple(chosen), per_task, shots=None, seed=None)


def embedding_grid_weights(mask: np.ndarray, input_size: int) -> torch.Tensor:
    """Fraction of each 64x64 embedding cell that ``mask`` covers, through SAM's resize and padding."""
    height, width = mask.shape
    target = resized_shape(height, width, input_size)
    resized = F.interpolate(torch.as_tensor(mask, dtype=torch.float32)[None, None], target, mode="bilinear",
                            align_corners=False)
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


def decode(decoder: MaskDecoder, model: Sam, embedding: torch.Tensor, token_batch: torch.Tensor,
           slice_shape: tuple[int, int]) -> torch.Tensor:
    """Logits (T, H, W) at slice size for T token sets (T, k, 256) on one image embedding."""
    dense = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    dense = dense.expand(len(token_batch), -1, EMBEDDING_GRID, EMBEDDING_GRID)
    low_res, _ = decoder(
        image_embeddings=embedding[None],
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=token_batch,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    input_size = resized_shape(*slice_shape, model.image_encoder.img_size)
    return model.postprocess_masks(low_res, input_size, slice_shape)[:, 0]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice per mask (smoothing 1, so an empty target asks for an empty mask)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probability = torch.sigmoid(logits).flatten(1)
    flat = target.flatten(1)
    dice = (2 * (probability * flat).sum(1) + 1) / (probability.sum(1) + flat.sum(1) + 1)
    return bce + (1 - dice).mean()


@dataclass
class TrainingSettings:
    """One fixed schedule for every task and dataset (no early stopping); profiles may shorten it."""

    steps: int = 200
    slices_per_step: int = 2
    learning_rate: float = 1e-4
    weight_decay: float = 0.01


@dataclass
class FewShotModel:
    """A trained few-shot decoder with its tokens: segments new images without the collection."""

    backbone: str
    design: TokenDesign
    tasks: dict[int, str]
    tokens: dict[str, torch.Tensor]
    decoder: MaskDecoder
    # How grey slices were made from the volumes ({"slice_axis": int, "intensity": {...}}): a
    # query must be cut and normalised the same way.
    preprocessing: dict[str, Any]

    def token_batch(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(T, k, 256): one token set per task, in label order."""
        return torch.stack([self.tokens[name] for name in self.tasks.values()]).to(device)

    def segment(self, model: Sam, embeddings: torch.Tensor, slice_shape: tuple[int, int]) -> np.ndarray:
        """Label slices (N, H, W) for N embeddings: per pixel the task with the highest positive logit."""
        tokens = self.token_batch(model.device)
        values = list(self.tasks)
        with torch.inference_mode():
            return np.stack([
                resolve_overlaps(decode(self.decoder, model, embedding.to(model.device), tokens,
                                        slice_shape).cpu().numpy(), values)
                for embedding in embeddings
            ])

    def segment_volume(self, model: Sam, embeddings: torch.Tensor, volume_shape: tuple[int, int, int], axis: int,
                       extent: range | None = None) -> np.ndarray:
        """A label volume from the embeddings of its slices ``extent`` (default: all); other slices background."""
        extent = range(volume_shape[axis]) if extent is None else extent
        slice_shape = tuple(size for i, size in enumerate(volume_shape) if i != axis)
        labels = np.zeros(volume_shape, dtype=np.uint8)
        np.moveaxis(labels, axis, 0)[extent.start:extent.stop] = self.segment(model, embeddings, slice_shape)
        return labels

    def save(self, path: str | Path) -> Path:
        """Decoder weights and tokens in one small file (atomic write)."""
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        torch.save({"format": MODEL_FORMAT, "backbone": self.backbone, "design": asdict(self.design),
                    "tasks": self.tasks, "preprocessing": self.preprocessing,
                    "tokens": {name: t.cpu() for name, t in self.tokens.items()},
                    "decoder": {k: v.cpu() for k, v in self.decoder.state_dict().items()}}, partial)
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
        if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
            raise FewsamError(f"{path}: not a fewsam few-shot model (expected format '{MODEL_FORMAT}')")
        if saved["backbone"] != backbone:
            raise FewsamError(f"{path}: trained on {saved['backbone']} embeddings, cannot decode {backbone} ones")
        decoder = copy.deepcopy(model.mask_decoder)
        decoder.load_state_dict(saved["decoder"])
        return cls(backbone, TokenDesign(**saved["design"]), {int(k): v for k, v in saved["tasks"].items()},
                   saved["tokens"], decoder.eval().requires_grad_(False), saved["preprocessing"])


def train_decoder(
    model: Sam,
    tokens: dict[str, torch.Tensor],
    embeddings: list[torch.Tensor],
    label_slices: list[np.ndarray],
    tasks: dict[int, str],
    settings: TrainingSettings,
    seed: int,
    progress: bool = True,
) -> tuple[MaskDecoder, list[float]]:
    """Fine-tune a copy of SAM's mask decoder on the collection; returns it and the loss per step.

    Every support slice trains every task: a task missing from a slice is a negative example.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    decoder = copy.deepcopy(model.mask_decoder).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    token_batch = torch.stack([tokens[name] for name in tasks.values()]).to(model.device)
    targets = [torch.as_tensor(np.stack([label == value for value in tasks]), dtype=torch.float32)
               for label in label_slices]
    history = []
    per_step = min(settings.slices_per_step, len(embeddings))
    for _ in tqdm(range(settings.steps), desc="train decoder", unit="step", disable=not progress):
        picks = rng.choice(len(embeddings), size=per_step, replace=False)
        loss = sum(
            segmentation_loss(decode(decoder, model, embeddings[i].to(model.device), token_batch,
                                     label_slices[i].shape), targets[i].to(model.device))
            for i in picks
        ) / per_step
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
    design: TokenDesign,
    settings: TrainingSettings,
    seed: int,
    preprocessing: dict[str, Any],
    progress: bool = True,
) -> tuple[FewShotModel, list[float]]:
    """Tokens from the collection, then the decoder trained with them; returns the model and loss curve."""
    tokens = few_shot_tokens(model, embeddings, label_slices, tasks, design)
    decoder, history = train_decoder(model, tokens, embeddings, label_slices, tasks, settings, seed, progress)
    return FewShotModel(backbone, design, dict(tasks), tokens, decoder, preprocessing), history


def load_support(manifest: Manifest, collection: Collection, cache: EmbeddingCache,
                 progress: bool = True) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Cached embeddings and label slices of the collection (one volume read per case)."""
    by_case: dict[str, list[int]] = {}
    for support in collection.slices:
        by_case.setdefault(support.case_id, []).append(support.slice_index)
    embeddings, labels = [], []
    axis = manifest.slice_axis
    for case_id, indices in by_case.items():
        volume = load_case(manifest, case_id)
        embeddings += list(cache.get_many(grey_slices(manifest, volume, indices), progress=progress,
                                          desc=f"encode support {case_id}"))
        labels += [take_slice(volume.label, axis, i) for i in indices]
    return embeddings, labels


def run_fewshot(
    manifest: str | Path,
    backbone: str,
    shots: int,
    seed: int = 0,
    profile: str = "smoke",
    variant: str = "centred",
    results_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    settings: TrainingSettings | None = None,
    progress: bool = True,
) -> Path:
    """Draw a collection, train the decoder on it, segment every slice of the profile's test cases.

    The schedule is the profile's (``fewshot.training``) unless ``settings`` is given.
    """
    loaded = load_manifest(manifest)
    design = get_design(variant)
    chosen_profile = load_profile(profile, loaded.path)
    settings = settings or TrainingSettings(**chosen_profile.fewshot_training)
    cache = EmbeddingCache(backbone, checkpoint=checkpoint, device=device)
    spec = RunSpec(loaded.dataset, "fewshot", variant, backbone, seed, chosen_profile.name, shots)
    case_ids = chosen_profile.test_case_ids(loaded)
    collection = draw_collection(loaded, shots, seed)
    writer = RunWriter(
        spec, results_dir,
        parameters={"manifest": paths.display(loaded.path), "backbone": backbone, "variant": variant, "shots": shots,
                    "seed": seed, "profile": chosen_profile.name, "device": device, "test_cases": case_ids,
                    "token_design": asdict(design), "training": asdict(settings)},
        provenance={**run_provenance(loaded, cache.spec), "collection": collection.as_dict()},
    )
    embeddings, labels = load_support(loaded, collection, cache, progress)
    model = cache.backbone.model
    started = time.perf_counter()
    preprocessing = {"slice_axis": loaded.slice_axis, "intensity": loaded.intensity.as_dict()}
    fewshot_model, history = fit_fewshot(model, backbone, embeddings, labels, loaded.tasks, design, settings, seed,
                                         preprocessing, progress)
    train_seconds = time.perf_counter() - started
    fewshot_model.save(writer.folder / MODEL_FILE)
    pd.DataFrame({"step": range(1, len(history) + 1), "loss": history}).to_csv(writer.folder / CURVE_FILE,
                                                                             index=False)
    axis = loaded.slice_axis
    rows: list[dict] = []
    predict_seconds = 0.0
    for case_id in tqdm(case_ids, desc=spec.run_id, unit="case", disable=not progress):
        volume = load_case(loaded, case_id)
        extent = chosen_profile.scored_slices(loaded, volume)
        writer.record_extent(case_id, extent, volume.shape[axis])
        slices = grey_slices(loaded, volume, extent)
        case_embeddings = cache.get_many(slices, progress=progress, desc=f"encode {case_id}")
        started = time.perf_counter()
        prediction = fewshot_model.segment_volume(model, case_embeddings, volume.shape, axis, extent)
        predict_seconds += time.perf_counter() - started
        volume.save_on_original_grid(prediction, writer.predictions / f"{case_id}.nii.gz")
        rows += score_case(loaded, spec, volume, prediction, slices=list(extent), slice_selection="all_slices",
                           extent=extent)
    return writer.finish(rows, timings={"encode": cache.stats.encode_seconds, "train": train_seconds,
                                        "predict": predict_seconds},
                         extra={"cache": cache.stats.as_dict(), "final_training_loss": history[-1],
                                "support_slices": len(collection.slices)})

