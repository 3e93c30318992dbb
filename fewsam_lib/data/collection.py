"""The few-shot collection: the labelled training slices a method may learn from.

Few-shot trains on it; nnU-Net's matched budget is sized by it, so both see the same labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from ..errors import FewsamError
from .manifest import Manifest
from .volumes import slice_table


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
        return {
            "shots": self.shots,
            "seed": self.seed,
            "slices": [asdict(s) for s in self.slices],
            "per_task": {task: [asdict(s) for s in slices] for task, slices in self.per_task.items()},
        }


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
            raise FewsamError(
                f"{manifest.path}: task '{task}' is on {len(candidates)} training slices, fewer than {shots} shots"
            )
        order = np.random.default_rng([seed, offset]).permutation(len(candidates))[:shots]
        per_task[task] = tuple(
            SupportSlice(str(candidates.case_id.iloc[i]), int(candidates.slice_index.iloc[i])) for i in order
        )
    unique = sorted({s for slices in per_task.values() for s in slices}, key=lambda s: (s.case_id, s.slice_index))
    return Collection(tuple(unique), per_task, shots, seed)


def explicit_collection(
    manifest: Manifest, entries: list[tuple[str, int]], table: pd.DataFrame | None = None
) -> Collection:
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
