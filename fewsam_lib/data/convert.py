"""``fewsam convert <dataset>``: public datasets in their original formats as NIfTI + a manifest.

One converter per dataset, each in its own module (:mod:`.openkbp`, :mod:`.chest_xray`,
:mod:`.spine`) and registered in :data:`CONVERTERS`. They share what makes a conversion safe to
rerun: everything is written to a scratch folder beside the destination and renamed into place
only when every case passed its checks (a failed conversion leaves nothing half-written), and a
stamp (``conversion.json``) records the converter version and a fingerprint of the source, so a
second conversion of the same source does no work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import FewsamError

CaseT = TypeVar("CaseT")

CONVERSION_FILE = "conversion.json"


class ConversionError(FewsamError):
    """A source file is malformed or the converted data fails a plausibility check."""


def source_digest(files: Iterable[tuple[str, Path]]) -> str:
    """A digest of (name, size) of each source file: a cheap fingerprint, not a content hash."""
    digest = hashlib.sha256()
    for name, file in files:
        digest.update(f"{name}:{file.stat().st_size}\n".encode())
    return digest.hexdigest()


def is_converted_by(destination: str | Path, version: int, digest: str) -> bool:
    """Whether ``destination`` holds a complete conversion by converter ``version`` of a source
    whose fingerprint is ``digest``."""
    stamp = Path(destination) / CONVERSION_FILE
    if not stamp.exists():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return False
    return recorded.get("converter_version") == version and recorded.get("source_digest") == digest


@contextmanager
def staged_conversion(destination: Path, partial: bool) -> Iterator[Path]:
    """A scratch folder (with empty ``imagesTr/`` and ``labelsTr/``) that replaces ``destination``
    when the block ends without an error.

    ``partial`` (a subset of the cases) may only go to a new folder, so that it never replaces a
    complete conversion; a folder that is not a fewsam conversion is never replaced.
    """
    if destination.exists() and any(destination.iterdir()):
        if not (destination / CONVERSION_FILE).exists():
            raise ConversionError(
                f"{destination}: exists and is not a fewsam conversion; choose another folder or remove it"
            )
        if partial:
            raise ConversionError(
                f"{destination}: holds a conversion already; write a partial one (--cases) to another folder"
            )
    destination.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        (scratch / "imagesTr").mkdir()
        (scratch / "labelsTr").mkdir()
        yield scratch
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(scratch, destination)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def write_dataset_files(
    folder: Path,
    *,
    name: str,
    description: str,
    licence: str,
    modality: str,
    labels: dict[int, str],
    case_ids: list[str],
    version: int,
    source: Path,
    digest: str | None,
    patients: dict[str, str] | None = None,
    **extra: object,
) -> None:
    """``dataset.json`` (MSD layout: imagesTr/<case>.nii.gz, labelsTr/<case>.nii.gz) and the stamp.

    ``digest`` is None for a partial conversion, which therefore never counts as complete.
    ``patients`` (case id -> patient id, for sources with several images per patient) goes into
    each ``training`` entry, so that validation cases are carved patient by patient.
    """
    dataset = {
        "name": name,
        "description": description,
        "licence": licence,
        "modality": {"0": modality},
        "labels": {"0": "background", **{str(k): v for k, v in labels.items()}},
        "training": [
            {
                "image": f"./imagesTr/{case_id}.nii.gz",
                "label": f"./labelsTr/{case_id}.nii.gz",
                **({"patient": patients[case_id]} if patients else {}),
            }
            for case_id in case_ids
        ],
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    stamp = {"converter_version": version, "source": str(source), "source_digest": digest, "cases": case_ids, **extra}
    (folder / CONVERSION_FILE).write_text(json.dumps(stamp, indent=2) + "\n")


def cases_to_convert(
    found: list[CaseT], requested: list[str] | None, complete: Callable[[], bool], source: Path
) -> list[CaseT] | None:
    """The cases (anything with a ``case_id``) a conversion writes: the requested ones, or all of
    them unless ``complete()`` says a complete conversion is there already (then None)."""
    unknown = sorted(set(requested or []) - {case.case_id for case in found})
    if unknown:
        raise ConversionError(f"{source}: no case {', '.join(unknown)}")
    if requested is not None:
        return [case for case in found if case.case_id in requested]
    return None if complete() else found


def wrapped_ids(ids: list[str], indent: str = "    ", width: int = 96) -> str:
    """Case ids as the lines of a YAML flow list, ``width`` characters at most."""
    lines, line = [], indent
    for i, case_id in enumerate(ids):
        item = case_id + ("," if i < len(ids) - 1 else "")
        if len(line) + len(item) + 1 > width:
            lines.append(line.rstrip())
            line = indent
        line += item + " "
    lines.append(line.rstrip())
    return "\n".join(lines)


@dataclass(frozen=True)
class Converter:
    """One dataset's converter, as ``fewsam convert <name>`` runs it."""

    name: str  # the command's word, e.g. openkbp
    dataset: str  # the manifest's dataset name = its file in data_manifests/ and its folder
    source_help: str
    convert: Callable[..., Path]  # (source, destination, case_ids=None, progress=True) -> destination
    is_converted: Callable[[Path, Path], bool]  # (destination, source): a complete conversion of it
    manifest_text: Callable[[Path], str]  # the manifest written from the source


def _registry() -> dict[str, Converter]:
    from . import chest_xray, openkbp, spine

    return {converter.name: converter for converter in (openkbp.CONVERTER, chest_xray.CONVERTER, spine.CONVERTER)}


CONVERTER_NAMES = ("openkbp", "chest-xray", "spine")


def get_converter(name: str) -> Converter:
    converters = _registry()
    if name not in converters:
        raise ConversionError(f"no converter '{name}' (converters: {', '.join(converters)})")
    return converters[name]
