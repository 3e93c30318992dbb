"""``fewsam validate``: check a manifest and every file it names, one clear line per problem."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.manifest import SPLITS, Manifest, load_manifest
from ..data.volumes import load_volume
from ..errors import FewsamError


@dataclass
class ValidationReport:
    manifest: Manifest | None
    problems: list[str]  # one line each, starting with the file it is about
    cases_checked: int = 0
    warnings: list[str] = field(default_factory=list)  # worth a look, not wrong by themselves

    @property
    def ok(self) -> bool:
        return not self.problems


def _split_problems(manifest: Manifest) -> list[str]:
    problems = []
    where = manifest.path
    for name in SPLITS:
        ids = manifest.split[name]
        if not ids:
            problems.append(f"{where}: split '{name}' is empty")
        unknown = sorted(set(ids) - set(manifest.cases))
        if unknown:
            listed = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            problems.append(
                f"{where}: split '{name}' names {len(unknown)} case(s) without an image/label pair: {listed}"
            )
        if len(set(ids)) != len(ids):
            problems.append(f"{where}: split '{name}' lists a case more than once")
    overlap = sorted(set(manifest.split["train"]) & set(manifest.split["test"]))
    if overlap:
        problems.append(f"{where}: {len(overlap)} case(s) are in both train and test: {', '.join(overlap[:5])}")
    return problems


def validate(path: str | Path, progress: bool = True) -> ValidationReport:
    """Load the manifest, then open every image/label pair and check it against the manifest."""
    try:
        manifest = load_manifest(path)
    except FewsamError as error:
        return ValidationReport(None, [str(error)])

    problems = _split_problems(manifest)
    known_values = {0, *manifest.tasks}
    task_voxels = dict.fromkeys(manifest.tasks, 0)
    checked = 0
    warnings: list[str] = []
    for case in tqdm(manifest.cases.values(), desc=f"validate {manifest.dataset}", unit="case", disable=not progress):
        try:
            volume = load_volume(case.image, case.label, case.case_id)
        except FewsamError as error:
            problems.append(str(error))
            continue
        checked += 1
        if len(volume.original_shape) != manifest.image_dimensions:
            problems.append(
                f"{case.image}: a {len(volume.original_shape)}D file of shape {volume.original_shape}, but "
                f"{manifest.path.name} says image_dimensions: {manifest.image_dimensions}"
            )
        values, counts = np.unique(volume.label, return_counts=True)
        unexpected = sorted(set(values.tolist()) - known_values)
        if unexpected:
            problems.append(
                f"{case.label}: label values {unexpected} are not in the manifest's label map {sorted(known_values)}"
            )
        for task in sorted(manifest.not_annotated.get(case.case_id, ())):
            if manifest.label_of(task) in values:
                problems.append(
                    f"{case.label}: task '{task}' is listed as not annotated in {manifest.path.name} "
                    f"but has labelled voxels"
                )
        for value, count in zip(values.tolist(), counts.tolist()):
            if value in task_voxels:
                task_voxels[value] += count
        missing = [name for value, name in manifest.annotated_tasks(case.case_id).items() if value not in values]
        if missing:
            what = "no labelled voxel at all" if values.tolist() == [0] else f"no voxel of {', '.join(missing)}"
            line = f"{case.label}: case {case.case_id} has {what}"
            if manifest.every_case_shows_every_task:
                problems.append(f"{line}, but {manifest.path.name} says every case shows every task")
            else:
                warnings.append(f"{line} (list it under not_annotated if it was not annotated)")
        if volume.image is not None and not np.isfinite(volume.image).all():
            problems.append(f"{case.image}: image contains NaN or infinite values")
    if checked:
        for value, count in task_voxels.items():
            if count == 0:
                problems.append(
                    f"{manifest.path}: task '{manifest.tasks[value]}' (label {value}) has no "
                    f"labelled voxels in any of the {checked} readable cases"
                )
    if not manifest.cases:
        problems.append(f"{manifest.path}: no image/label pairs found")
    return ValidationReport(manifest, problems, checked, warnings)
