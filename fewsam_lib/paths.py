"""Where things live. Every location comes from an environment variable with a repo-local default."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """sha256 of fewsam's own source files: what a stored model or an unfinished run is reused by
    only when the code is the one that made it."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


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


def converted_encoders_root() -> Path:
    """Image encoders converted once for another runtime (OpenVINO IR): ``$FEWSAM_CACHE/_converted``,
    shared by every embedding cache folder of the installation (a ``--cache`` folder too)."""
    return cache_root() / "_converted"


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


def check_writable_file(path: str | Path, option: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse an output file that cannot be written, before the work that makes it.

    Missing folders are fine (they are created); a wrong suffix, a folder in the file's place or a
    read-only folder is one clear error naming ``option`` and the path.
    """
    from .errors import FewsamError

    path = Path(path).expanduser()
    if suffixes and not path.name.endswith(suffixes):
        raise FewsamError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise FewsamError(f"{option} {path}: is a folder; give a file name")
    existing = next(parent for parent in (path.absolute(), *path.absolute().parents) if parent.exists())
    if existing != path.absolute() and not existing.is_dir():
        raise FewsamError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
        raise FewsamError(f"{option} {path}: {existing if existing.is_dir() else existing.parent} is not writable")
    return path


def check_writable_folder(path: str | Path, what: str) -> Path:
    """Refuse a folder fewsam must write into when it is a file or read-only (it may not exist yet)."""
    from .errors import FewsamError

    path = Path(path).expanduser()
    existing = next(parent for parent in (path.absolute(), *path.absolute().parents) if parent.exists())
    if not existing.is_dir():
        raise FewsamError(f"{what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FewsamError(f"{what} {path}: {existing} is not writable")
    return path


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON beside ``path`` and rename it into place: never a half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2, default=str) + "\n")
    partial.replace(path)


def portable(path: str | Path) -> str:
    """``path`` as another machine can read it: ``${FEWSAM_DATA}/...`` or ``${FEWSAM_CONVERTED}/...``
    under those roots, relative to the repository inside it, else absolute."""
    path = Path(path).resolve()
    roots = {"FEWSAM_DATA": data_root(), "FEWSAM_CONVERTED": converted_root()}
    for variable, root in roots.items():
        if root is not None and path.is_relative_to(root):
            return f"${{{variable}}}/{path.relative_to(root)}".rstrip("/.")
    return display(path)


NNUNET_VARIABLES = {"raw": "nnUNet_raw", "preprocessed": "nnUNet_preprocessed", "results": "nnUNet_results"}


def nnunet_roots() -> dict[str, Path]:
    """nnU-Net's three folders: its own environment variables, else ``<repo>/work/nnunet/*`` (git-ignored)."""
    return {
        role: _from_env(variable, REPO_ROOT / "work" / "nnunet" / role) for role, variable in NNUNET_VARIABLES.items()
    }
