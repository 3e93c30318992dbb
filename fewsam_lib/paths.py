"""Where things live. Every location comes from an environment variable with a repo-local default."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _from_env(variable: str, default: Path) -> Path:
    value = os.environ.get(variable)
    return Path(value).expanduser().resolve() if value else default


def data_root() -> Path | None:
    """``FEWSAM_DATA``: the folder that holds the datasets manifests refer to (None when unset)."""
    value = os.environ.get("FEWSAM_DATA")
    return Path(value).expanduser().resolve() if value else None


def converted_root() -> Path:
    """``FEWSAM_CONVERTED``: datasets fewsam converted to NIfTI (default ``<repo>/work/data``, git-ignored)."""
    return _from_env("FEWSAM_CONVERTED", REPO_ROOT / "work" / "data")


def cache_root() -> Path:
    """``FEWSAM_CACHE``: the embedding cache (default ``<repo>/.cache/embeddings``, git-ignored)."""
    return _from_env("FEWSAM_CACHE", REPO_ROOT / ".cache" / "embeddings")


def weights_root() -> Path:
    """``FEWSAM_WEIGHTS``: verified checkpoints (default ``<repo>/weights``, git-ignored)."""
    return _from_env("FEWSAM_WEIGHTS", REPO_ROOT / "weights")


def display(path: str | Path) -> str:
    """``path`` relative to the repository when inside it (results stay portable), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


NNUNET_VARIABLES = {"raw": "nnUNet_raw", "preprocessed": "nnUNet_preprocessed", "results": "nnUNet_results"}


def nnunet_roots() -> dict[str, Path]:
    """nnU-Net's three folders: its own environment variables, else ``<repo>/work/nnunet/*`` (git-ignored)."""
    return {role: _from_env(variable, REPO_ROOT / "work" / "nnunet" / role)
            for role, variable in NNUNET_VARIABLES.items()}
