"""Public downloads of the datasets the shipped manifests use (``make data``).

A dataset already present under ``FEWSAM_DATA`` is never downloaded again; the network is touched
only when the folder is missing. Archives are verified (md5, as published) before extraction, and
extraction goes to a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .. import paths
from ..errors import FewsamError


@dataclass(frozen=True)
class PublicDataset:
    folder: str  # name under FEWSAM_DATA
    url: str
    md5: str
    required: tuple[str, ...]  # paths inside the folder that a complete copy has
    citation: str


DATASETS = {
    "msd_hippocampus": PublicDataset(
        folder="Task04_Hippocampus",
        # The Decathlon's release as mirrored for MONAI's DecathlonDataset (same URL and md5 as MONAI).
        url="https://msd-for-monai.s3-us-west-2.amazonaws.com/Task04_Hippocampus.tar",
        md5="9d24dba78a72977dbd1d2e110310f31b",
        required=("dataset.json", "imagesTr", "labelsTr"),
        citation="Antonelli et al., The Medical Segmentation Decathlon, Nature Communications 13, 4128 (2022)",
    ),
}


def _data_root(root: str | Path | None) -> Path:
    if root is not None:
        return Path(root)
    found = paths.data_root()
    if found is None:
        raise FewsamError(
            "FEWSAM_DATA is not set: export FEWSAM_DATA=/path/to/data (the Makefile defaults to ../shared/data)"
        )
    return found


def local_copy(name: str, root: str | Path | None = None) -> Path | None:
    """The dataset's folder if a complete copy is present, else None."""
    dataset = DATASETS[name]
    folder = _data_root(root) / dataset.folder
    return folder if all((folder / part).exists() for part in dataset.required) else None


def fetch_dataset(name: str, root: str | Path | None = None) -> Path:
    """Return the local copy of ``name``, downloading and verifying it only if it is missing."""
    if name not in DATASETS:
        raise FewsamError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})")
    dataset = DATASETS[name]
    found = local_copy(name, root)
    if found is not None:
        return found
    target_root = _data_root(root)
    target_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dataset.folder}-", dir=target_root) as scratch:
        archive = Path(scratch) / "download.tar"
        digest = hashlib.md5()
        try:
            with urllib.request.urlopen(dataset.url, timeout=60) as response, open(archive, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dataset.folder}") as bar:
                    while chunk := response.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        except OSError as error:
            raise FewsamError(
                f"could not download {dataset.url} ({error}); put the extracted {dataset.folder}/ under {target_root}"
            ) from None
        if digest.hexdigest() != dataset.md5:
            raise FewsamError(f"{dataset.url}: md5 {digest.hexdigest()} differs from the published {dataset.md5}")
        with tarfile.open(archive) as tar:
            tar.extractall(scratch, filter="data")
        extracted = Path(scratch) / dataset.folder
        if not all((extracted / part).exists() for part in dataset.required):
            raise FewsamError(f"{dataset.url}: archive lacks {dataset.folder}/{{{', '.join(dataset.required)}}}")
        final = target_root / dataset.folder
        if final.exists():
            shutil.rmtree(final)  # an incomplete earlier copy
        extracted.rename(final)
    return final
