"""Profiles decide how much data a run touches: ``smoke`` (tests, CI), ``cpu`` (committed results), ``full``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import FewsamError
from .manifest import Manifest
from .volumes import Volume, task_voxels_per_slice

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    test_cases: int | None  # the first N test cases (sorted); None = all
    test_slices: int | None  # per test case, a slab of N slices around its most telling slice; None = all
    raw: dict[str, Any]

    def test_case_ids(self, manifest: Manifest) -> list[str]:
        ids = sorted(manifest.case_ids("test"))
        return ids if self.test_cases is None else ids[: self.test_cases]

    def scored_slices(self, manifest: Manifest, volume: Volume) -> range:
        """The slices of a test case that runs segment and score: all, or the profile's slab.

        The slab is centred on the slice that shows the most tasks (then the most task voxels), so
        a smoke run on a CT volume of 128 slices still meets most organs at a fraction of the
        encoder cost.
        """
        depth = volume.shape[manifest.slice_axis]
        if self.test_slices is None or self.test_slices >= depth:
            return range(depth)
        counts = task_voxels_per_slice(volume.label, manifest.slice_axis, manifest.tasks)
        tasks_shown, voxels = (counts > 0).sum(axis=1), counts.sum(axis=1)
        centre = int((tasks_shown * (voxels.max() + 1) + voxels).idxmax())
        start = min(max(centre - self.test_slices // 2, 0), depth - self.test_slices)
        return range(start, start + self.test_slices)

    @property
    def datasets(self) -> list[str]:
        """Manifests of the matrix, relative to the repository."""
        return list(self.raw.get("datasets", []))

    @property
    def fewshot_training(self) -> dict[str, Any]:
        """Overrides of the few-shot training schedule (``fewshot.training``), e.g. fewer steps for smoke."""
        return dict((self.raw.get("fewshot") or {}).get("training") or {})

    @property
    def fewshot_shots(self) -> list[int]:
        """Shot counts of the few-shot matrix (the largest sets nnU-Net's matched label budget)."""
        return list((self.raw.get("fewshot") or {}).get("shots") or [])

    @property
    def nnunet_disable_tta(self) -> bool:
        """``nnunet.disable_tta``: predict without nnU-Net's mirroring (4x faster in 2d; smoke, and cpu on CT)."""
        return bool((self.raw.get("nnunet") or {}).get("disable_tta", False))

    def backbones(self, section: str) -> list[str]:
        """A section's ``backbones``, plus its ``optional_backbones`` whose checkpoint is present."""
        from .weights import checkpoint_available

        matrix = self.raw.get(section) or {}
        optional = [name for name in matrix.get("optional_backbones", []) if checkpoint_available(name)]
        return list(matrix.get("backbones", [])) + optional

    def for_dataset(self, manifest: str | Path) -> Profile:
        """The profile as it applies to one dataset: its ``overrides`` entry (keyed by the
        manifest's file name without ``.yaml``) merged into the profile, nested keys one by one."""
        override = (self.raw.get("overrides") or {}).get(Path(manifest).stem)
        if not override:
            return self
        return _profile_from(_merged(self.raw, override))

    def runs(self) -> list[PlannedRun]:
        """Every run of the profile's matrix, method by method, in a stable order."""
        planned = []
        for method, section in METHOD_SECTIONS.items():
            for manifest in self.datasets:
                dataset_profile = self.for_dataset(manifest)
                matrix = dataset_profile.raw.get(section) or {}
                if method == "nnunet":
                    planned += [PlannedRun(method, manifest, "none", f"{configuration}-{trainer}", seed, self.name,
                                           budget=budget)
                                for configuration in matrix.get("configurations", [])
                                for budget in matrix.get("budgets", [])
                                for trainer in _budget_trainers(matrix, budget)
                                for seed in matrix.get("seeds", [0])]
                    continue
                planned += [PlannedRun(method, manifest, backbone, variant, seed, self.name, shots)
                            for backbone in dataset_profile.backbones(section)
                            for variant in matrix.get("variants", [])
                            for shots in matrix.get("shots", [None])
                            for seed in matrix.get("seeds", [0])]
        return planned


@dataclass(frozen=True)
class PlannedRun:
    """One cell of a profile's matrix; ``manifest`` is relative to the repository.

    nnU-Net runs have no backbone (``none``), ``variant = <configuration>-<trainer>`` and a label
    ``budget`` (``full`` or ``matched``); their ``shots`` are known once the budget is drawn.
    """

    method: str
    manifest: str
    backbone: str
    variant: str
    seed: int
    profile: str
    shots: int | None = None
    budget: str | None = None


# method name in run folders -> section of the profile YAML that lists its matrix
METHOD_SECTIONS = {"sam_prompting": "prompting", "fewshot": "fewshot", "nnunet": "nnunet"}


def _budget_trainers(matrix: dict[str, Any], budget: str) -> list[str]:
    """``nnunet.trainers``: one list for every budget, or a list per budget (``{full: [...], ...}``)."""
    trainers = matrix.get("trainers") or []
    return list(trainers.get(budget, [])) if isinstance(trainers, dict) else list(trainers)


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _profile_from(raw: dict[str, Any]) -> Profile:
    return Profile(raw["name"], raw.get("description", ""), raw.get("test_cases"), raw.get("test_slices"), raw)


def available_profiles() -> list[str]:
    return sorted(path.stem for path in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str, manifest: str | Path | None = None) -> Profile:
    """A profile by name; with ``manifest``, as it applies to that dataset (see :meth:`Profile.for_dataset`)."""
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.exists():
        raise FewsamError(f"unknown profile '{name}' (known: {', '.join(available_profiles())})")
    profile = _profile_from(yaml.safe_load(path.read_text()))
    return profile.for_dataset(manifest) if manifest is not None else profile
