"""Encoder paths: how an image encoder's forward pass runs (runtime and precision).

A path is one registered :class:`EncoderPath`; the embedding cache keys its entries by the path's
name, so embeddings of different paths never mix, and every run records the path that made its
embeddings. ``fewsam bench`` measures the candidates; the default on CPU is the fastest one whose
embeddings stay within :data:`TOLERANCE` of fp32 eager torch (``docs/performance.md``).

>>> encode = get_encoder_path("openvino-fp32").build(loaded_backbone, cache_root)
>>> encode(batch)    # (N, 3, S, S) float32 -> (N, 256, 64, 64) float32
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import FewsamError, lookup
from ..hardware import native_bf16

if TYPE_CHECKING:
    from .backbones import LoadedBackbone

Encode = Callable[[torch.Tensor], torch.Tensor]
log = logging.getLogger(__name__)

# The path of every run before paths existed; its cache keys and run names carry no path name, so
# those entries and run folders stay valid.
TORCH_FP32_EAGER = "torch-fp32-eager"
# Largest |difference| to fp32 eager torch an fp32 path may have on a real slice's embedding; the
# cache stores float16, whose rounding alone is ~5e-4 at the embeddings' magnitude. A bf16 path
# differs by ~1e-2 (cosine 0.997-0.9999); it could be a default only if the smoke runs' mean IoUs
# stayed within ``fewsam bench --accuracy``'s bar (0.005) of fp32 eager torch, and openvino-bf16
# did not (results/benchmarks/cpu-amd-avx512-bf16-2threads-encoder-accuracy.md): it is opt-in.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class EncoderPath:
    name: str
    description: str
    build: Callable[[LoadedBackbone, Path], Encode]  # (backbone, folder for converted models) -> encode
    devices: tuple[str, ...] = ("cpu",)  # torch device types it runs on
    # Only on a CPU that computes bf16 itself: elsewhere it is emulated, tens of times slower.
    needs_native_bf16: bool = False


def _torch_eager(backbone: LoadedBackbone, workdir: Path) -> Encode:
    def encode(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return backbone.model.image_encoder(batch.to(backbone.device))

    return encode


def openvino_folder(backbone: LoadedBackbone, workdir: Path) -> Path:
    """Where the converted model of ``backbone`` lives, keyed by what makes it."""
    import openvino

    version = openvino.__version__.split("-")[0]
    name = f"{backbone.spec.name}-{backbone.checkpoint_sha256[:16]}-{backbone.spec.input_size}px-openvino{version}"
    return workdir / name


def _openvino(precision: str) -> Callable[[LoadedBackbone, Path], Encode]:
    """OpenVINO's CPU runtime at ``precision`` ("f32" or "bf16"): one converted fp32 model, compiled
    with that inference precision (the weights on disk are the same for both)."""
    name = f"openvino-{'fp32' if precision == 'f32' else precision}"

    def build(backbone: LoadedBackbone, workdir: Path) -> Encode:
        try:
            import openvino  # noqa: F401  (only: is it installed?)
        except ImportError:
            raise FewsamError(
                f"encoder path {name} needs the openvino package (in requirements.txt; `make setup`), "
                f"or choose encoder_path: {TORCH_FP32_EAGER}"
            ) from None
        folder = openvino_folder(backbone, workdir)
        if not (folder / "encoder.xml").exists():
            _convert(backbone, folder)
        try:
            compiled = openvino_compile(folder / "encoder.xml", precision)
        except RuntimeError as error:  # damaged on disk after it was written: convert again, like a cache entry
            log.warning("converted encoder %s cannot be read (%s); converting it again", folder, str(error)[:200])
            shutil.rmtree(folder, ignore_errors=True)
            _convert(backbone, folder)
            compiled = openvino_compile(folder / "encoder.xml", precision)

        def encode(batch: torch.Tensor) -> torch.Tensor:
            # The converted model has the batch size 1 it was traced with; one slice is fastest on CPU anyway.
            return torch.cat([torch.from_numpy(compiled(item[None].numpy())[0].copy()) for item in batch.cpu()])

        return encode

    return build


def _convert(backbone: LoadedBackbone, folder: Path) -> None:
    """Trace the encoder into OpenVINO IR (~16 s) once; written aside and renamed into place whole."""
    import openvino

    size = backbone.spec.input_size
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    try:
        model = openvino_convert(backbone.model.image_encoder.cpu(), torch.zeros(1, 3, size, size))
        # fp16 weight compression is OpenVINO's default; fp32 keeps the embeddings within TOLERANCE.
        openvino.save_model(model, partial / "encoder.xml", compress_to_fp16=False)
        try:
            partial.rename(folder)
        except OSError:  # another process converted it first: theirs is as good
            if not (folder / "encoder.xml").exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def openvino_convert(module: torch.nn.Module, example: Any) -> Any:
    """``module`` traced into an OpenVINO model, without the tracer's warnings and printout."""
    import openvino

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # e.g. TinyViT's python control flow
        return openvino.convert_model(module, example_input=example)


def openvino_compile(model: Any, precision: str = "f32") -> Any:
    """An OpenVINO model (or IR file) compiled for this CPU on torch's thread count."""
    import openvino

    settings = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    return openvino.Core().compile_model(model, "CPU", settings)


ENCODER_PATHS: dict[str, EncoderPath] = {
    path.name: path
    for path in (
        EncoderPath(TORCH_FP32_EAGER, "torch, eager, fp32 (the reference)", _torch_eager, ("cpu", "cuda", "mps")),
        EncoderPath(
            "openvino-fp32",
            "OpenVINO CPU runtime, fp32, model converted once and kept in the cache",
            _openvino("f32"),
        ),
        EncoderPath(
            "openvino-bf16",
            "OpenVINO CPU runtime computing in bf16 (CPUs with AVX512-BF16 or AMX), the same converted model",
            _openvino("bf16"),
            needs_native_bf16=True,
        ),
    )
}


def get_encoder_path(name: str) -> EncoderPath:
    return lookup(ENCODER_PATHS, name, "encoder path", FewsamError)


def default_encoder_path(device: str | torch.device = "cpu") -> str:
    """The fastest path within TOLERANCE on this device (measured by ``fewsam bench``)."""
    return "openvino-fp32" if torch.device(device).type == "cpu" else TORCH_FP32_EAGER


def check_encoder_path(name: str, device: str | torch.device) -> EncoderPath:
    """``name``'s path, refused with one clear line when it cannot run on ``device``."""
    path = get_encoder_path(name)
    kind = torch.device(device).type
    if kind not in path.devices:
        raise FewsamError(
            f"encoder path {name} runs on {', '.join(path.devices)}, not {kind}; "
            f"use {default_encoder_path(device)} on {kind}"
        )
    if path.needs_native_bf16 and not native_bf16():
        raise FewsamError(
            f"encoder path {name} needs a CPU that computes bf16 natively (AVX512-BF16 or AMX), which this one "
            f"does not; use {default_encoder_path(device)}"
        )
    return path
