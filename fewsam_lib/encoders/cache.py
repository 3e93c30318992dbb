"""The embedding cache: the only code in fewsam that runs an image encoder.

Entries are content-addressed: the key hashes the backbone name, its checkpoint sha256, the
preprocessing parameters, the encoder path (runtime and precision, ``encoders/runtimes.py``) and the
exact float32 pixels of the slice the encoder would see, so a changed input can never return a
stale embedding and paths never mix. One file per entry::

    <root>/<backbone>/<key[:2]>/<key>.emb

holding a magic line, a JSON header (key, shape, dtype, sha256 of the payload, slice size) and the
float16 payload (256x64x64, 2 MiB). Entries are written to a temporary file, fsynced and renamed,
so a crash never leaves a partial entry under a real name, and are verified on every read; a
damaged entry is reported, deleted and recomputed. Encoders converted once for another runtime
(OpenVINO IR) live in :func:`paths.converted_encoders_root`, renamed into place whole in the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .. import paths
from ..encoders.backbones import EMBEDDING_SHAPE, BackboneSpec, LoadedBackbone, get_spec, load_backbone
from ..encoders.runtimes import TORCH_FP32_EAGER, Encode, check_encoder_path, default_encoder_path

log = logging.getLogger(__name__)

MAGIC = b"FEWSAM-EMBEDDING-1\n"
ENTRY_SUFFIX = ".emb"
STORED_DTYPE = np.float16


@dataclass
class CacheStats:
    """Counters a benchmark can read to prove each slice was encoded at most once per backbone."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # damaged entries found (each is also counted as a miss and recomputed)
    encode_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class CorruptEntry(Exception):
    pass


class EmbeddingCache:
    """Cached image embeddings of one backbone; the model is loaded only when something is missing.

    >>> cache = EmbeddingCache("mobile_sam")
    >>> embeddings = cache.get_many(grey_slices)   # (N, 256, 64, 64) float32; encodes only misses
    >>> cache.stats.misses
    """

    def __init__(
        self,
        backbone: str | LoadedBackbone,
        root: str | Path | None = None,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        encoder_path: str | None = None,
    ) -> None:
        if isinstance(backbone, LoadedBackbone):
            self._backbone: LoadedBackbone | None = backbone
            self.spec: BackboneSpec = backbone.spec
        else:
            self._backbone = None
            self.spec = get_spec(backbone)
        self._checkpoint = checkpoint
        self.device = device
        self.encoder_path = check_encoder_path(encoder_path or default_encoder_path(device), device).name
        self._encode_fn: Encode | None = None
        # On CPU one slice at a time is fastest (measured: MobileSAM 2.8 s/slice at batch 1,
        # 3.8 s/slice at batch 4 on 2 cores); a GPU profits from batches.
        self.batch_size = batch_size or (1 if torch.device(device).type == "cpu" else 8)
        self.root = paths.check_writable_folder(
            Path(root) if root is not None else paths.cache_root(), "embedding cache"
        )
        self.folder = self.root / self.spec.name
        self.stats = CacheStats()
        # A file verified against the official sha256 is the official checkpoint, so the
        # published hash identifies the weights without loading them.
        identity = {
            "backbone": self.spec.name,
            "checkpoint_sha256": self.spec.checkpoint.sha256,
            "preprocessing": self.spec.preprocessing(),
        }
        if self.encoder_path != TORCH_FP32_EAGER:  # entries made before paths existed keep their keys
            identity["encoder_path"] = self.encoder_path
        self._key_prefix = json.dumps(identity, sort_keys=True).encode()

    def provenance(self) -> dict[str, object]:
        """What made this cache's embeddings, for a run's ``run.json``."""
        return {
            "backbone_checkpoint": {"name": self.spec.name, "sha256": self.spec.checkpoint.sha256},
            "encoder_path": self.encoder_path,
        }

    @property
    def backbone(self) -> LoadedBackbone:
        """The loaded model (loaded and verified on first use)."""
        if self._backbone is None:
            self._backbone = load_backbone(self.spec.name, self._checkpoint, self.device)
        return self._backbone

    @property
    def encode(self) -> Encode:
        """The encoder's forward pass on this cache's path (built on first use)."""
        if self._encode_fn is None:
            path = check_encoder_path(self.encoder_path, self.device)
            self._encode_fn = path.build(self.backbone, paths.converted_encoders_root())
        return self._encode_fn

    def key(self, grey: np.ndarray) -> str:
        pixels = np.ascontiguousarray(grey, dtype=np.float32)
        digest = hashlib.sha256(self._key_prefix)
        digest.update(repr(pixels.shape).encode())
        digest.update(pixels.tobytes())
        return digest.hexdigest()

    def path_for(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}{ENTRY_SUFFIX}"

    def __contains__(self, grey: np.ndarray) -> bool:
        return self.path_for(self.key(grey)).exists()

    def get(self, grey: np.ndarray) -> torch.Tensor:
        return self.get_many([grey], progress=False)[0]

    def get_many(self, slices: Sequence[np.ndarray], progress: bool = True, desc: str | None = None) -> torch.Tensor:
        """Embeddings (N, 256, 64, 64) float32 for 2D grey-level slices in [0, 255]."""
        out = torch.empty((len(slices), *EMBEDDING_SHAPE), dtype=torch.float32)
        keys = [self.key(s) for s in slices]
        todo: dict[str, list[int]] = {}
        for index, key in enumerate(keys):
            if key in todo:  # identical slice earlier in this call: encode once
                todo[key].append(index)
                continue
            try:
                out[index] = self._read(key)
                self.stats.hits += 1
            except FileNotFoundError:
                todo[key] = [index]
            except CorruptEntry as problem:
                log.warning("embedding cache: %s; recomputing", problem)
                self.stats.corrupt += 1
                self.path_for(key).unlink(missing_ok=True)
                todo[key] = [index]
        self.stats.misses += len(todo)
        pending = list(todo.items())
        bar = tqdm(
            total=len(pending),
            desc=desc or f"encode {self.spec.name}",
            unit="slice",
            disable=not progress or not pending,
            leave=False,
        )
        for start in range(0, len(pending), self.batch_size):
            batch = pending[start : start + self.batch_size]
            embeddings = self._encode([slices[indices[0]] for _, indices in batch])
            for (key, indices), embedding in zip(batch, embeddings):
                self._write(key, embedding, slices[indices[0]].shape)
                for index in indices:
                    out[index] = embedding.float()
            bar.update(len(batch))
        bar.close()
        return out

    def _encode(self, slices: list[np.ndarray]) -> torch.Tensor:
        backbone, encode = self.backbone, self.encode
        started = time.perf_counter()
        with torch.inference_mode():
            batch = torch.stack([backbone.prepare(s) for s in slices])
            embeddings = encode(batch).to("cpu", torch.float16)
        self.stats.encode_seconds += time.perf_counter() - started
        if tuple(embeddings.shape[1:]) != EMBEDDING_SHAPE:
            raise RuntimeError(
                f"{self.spec.name} encoder returned {tuple(embeddings.shape)}, expected (N, *{EMBEDDING_SHAPE})"
            )
        return embeddings

    def _write(self, key: str, embedding: torch.Tensor, slice_shape: tuple[int, ...]) -> None:
        payload = embedding.numpy().astype(STORED_DTYPE, copy=False).tobytes()
        header = json.dumps(
            {
                "key": key,
                "backbone": self.spec.name,
                "shape": list(EMBEDDING_SHAPE),
                "dtype": np.dtype(STORED_DTYPE).name,
                "payload_sha256": hashlib.sha256(payload).hexdigest(),
                "slice_shape": list(slice_shape),
            }
        ).encode()
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as handle:
                handle.write(MAGIC + struct.pack("<I", len(header)) + header + payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    def _read(self, key: str) -> torch.Tensor:
        path = self.path_for(key)
        data = path.read_bytes()  # FileNotFoundError = plain miss
        try:
            if not data.startswith(MAGIC):
                raise ValueError("bad magic")
            offset = len(MAGIC)
            (header_length,) = struct.unpack_from("<I", data, offset)
            offset += 4
            header = json.loads(data[offset : offset + header_length])
            payload = data[offset + header_length :]
            expected_bytes = int(np.prod(header["shape"])) * np.dtype(header["dtype"]).itemsize
            if header["key"] != key:
                raise ValueError("key in header differs from file name")
            if tuple(header["shape"]) != EMBEDDING_SHAPE or header["dtype"] != np.dtype(STORED_DTYPE).name:
                raise ValueError(
                    f"header says {header['dtype']} {tuple(header['shape'])}, expected "
                    f"{np.dtype(STORED_DTYPE).name} {EMBEDDING_SHAPE}"
                )
            if len(payload) != expected_bytes:
                raise ValueError(f"payload has {len(payload)} bytes, expected {expected_bytes} (truncated)")
            if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
                raise ValueError("payload sha256 mismatch")
        except (ValueError, KeyError, TypeError, struct.error) as error:
            raise CorruptEntry(f"{path}: damaged entry ({error})") from None
        array = np.frombuffer(payload, dtype=header["dtype"]).reshape(header["shape"])
        return torch.from_numpy(array.astype(np.float32))

    def entries(self) -> list[Path]:
        return sorted(self.folder.glob(f"*/*{ENTRY_SUFFIX}"))

    def leftover_partials(self) -> list[Path]:
        """Temporary files of writers that were killed (never read; safe to delete)."""
        return sorted(self.folder.glob("*/.*.partial-*"))
