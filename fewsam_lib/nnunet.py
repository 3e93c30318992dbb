"""The nnU-Net baseline, run by nnunetv2 itself: export a manifest's training split as an nnU-Net
raw dataset, and match nnU-Net's label budget to the few-shot method's.

nnU-Net needs whole annotated volumes, so a label budget of N labelled slices becomes the
training volumes, taken in a seeded random order, until together they hold at least N slices that
contain a task; both counts are reported.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import paths
from .errors import FewsamError
from .manifest import Manifest
from .volumes import slice_table

FILE_ENDING = ".nii.gz"
# nnU-Net picks its intensity normalisation from the channel name: "CT" means its CT scheme.
CHANNEL_NAMES = {"CT": "CT"}


@dataclass(frozen=True)
class Budget:
    """The training volumes nnU-Net gets, and how many labelled slices they hold."""

    name: str  # "full" or "slices<N>"
    case_ids: tuple[str, ...]
    labelled_slices: int
    requested_slices: int | None


def labelled_slice_counts(manifest: Manifest, case_ids: list[str], table: pd.DataFrame | None = None) -> pd.Series:
    """Slices that contain at least one task, per case."""
    table = table if table is not None else slice_table(manifest, case_ids)
    table = table[table.case_id.isin(case_ids)]
    counts = (table[manifest.task_names] > 0).any(axis=1).groupby(table.case_id).sum()
    return counts.reindex(case_ids, fill_value=0).astype(int)


def full_budget(manifest: Manifest, table: pd.DataFrame | None = None) -> Budget:
    case_ids = sorted(manifest.case_ids("train"))
    return Budget("full", tuple(case_ids), int(labelled_slice_counts(manifest, case_ids, table).sum()), None)


def matched_budget(manifest: Manifest, slices: int, seed: int, table: pd.DataFrame | None = None) -> Budget:
    """Whole training volumes, in an order drawn with ``seed``, until they hold ``slices`` labelled slices."""
    if slices < 1:
        raise FewsamError(f"a label budget needs at least 1 labelled slice, got {slices}")
    train = sorted(manifest.case_ids("train"))
    counts = labelled_slice_counts(manifest, train, table)
    chosen, total = [], 0
    for index in np.random.default_rng(seed).permutation(len(train)):
        if total >= slices:
            break
        chosen.append(train[index])
        total += int(counts[train[index]])
    if total < slices:
        raise FewsamError(f"{manifest.path}: the training split holds {total} labelled slices, fewer than the "
                          f"budget of {slices}")
    return Budget(f"slices{slices}", tuple(sorted(chosen)), total, slices)


def dataset_folder_name(dataset_id: int, manifest: Manifest, budget: Budget) -> str:
    if not 1 <= dataset_id <= 999:
        raise FewsamError(f"nnU-Net dataset ids run from 1 to 999, got {dataset_id}")
    name = "".join(part.capitalize() for part in manifest.dataset.split("_"))
    return f"Dataset{dataset_id:03d}_{name}{budget.name.capitalize()}"


def export_raw_dataset(manifest: Manifest, budget: Budget, dataset_id: int, raw_root: Path | None = None) -> Path:
    """``Dataset<id>_<Name>/imagesTr, labelsTr, dataset.json`` in nnU-Net v2's raw format.

    Only the budget's training volumes are written; the test split never enters. The folder is
    built beside its final name and renamed at the end, so a failed export leaves nothing behind.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    leaked = sorted(set(budget.case_ids) - set(manifest.case_ids("train")))
    if leaked:
        raise FewsamError(f"{manifest.path}: cases {leaked} are not in the training split; nnU-Net trains on "
                          f"training cases only")
    values = sorted(manifest.tasks)
    if values != list(range(1, len(values) + 1)):
        raise FewsamError(f"{manifest.path}: nnU-Net needs consecutive label values 1..{len(values)}, the manifest "
                          f"has {values}")
    raw_root = Path(raw_root) if raw_root else paths.nnunet_roots()["raw"]
    target = raw_root / dataset_folder_name(dataset_id, manifest, budget)
    others = [p for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p != target] if raw_root.exists() else []
    if others:
        raise FewsamError(f"nnU-Net dataset id {dataset_id} is taken by {others[0]}; choose another id")
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "imagesTr").mkdir(parents=True)
    (partial / "labelsTr").mkdir()
    for case_id in budget.case_ids:
        case = manifest.case(case_id)
        shutil.copyfile(case.image, partial / "imagesTr" / f"{case_id}_0000{FILE_ENDING}")
        shutil.copyfile(case.label, partial / "labelsTr" / f"{case_id}{FILE_ENDING}")
    generate_dataset_json(
        str(partial), channel_names={0: CHANNEL_NAMES.get(manifest.modality, manifest.modality)},
        labels={"background": 0, **{name: value for value, name in manifest.tasks.items()}},
        num_training_cases=len(budget.case_ids), file_ending=FILE_ENDING, dataset_name=target.name,
        description=f"fewsam export of {paths.display(manifest.path)} (sha256 {manifest.sha256[:12]}), "
                    f"budget {budget.name}: {len(budget.case_ids)} volumes, {budget.labelled_slices} labelled slices",
        license="see the source dataset", converted_by="fewsam")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target
