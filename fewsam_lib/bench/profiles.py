"""Profiles decide how much data a run touches: ``smoke`` (tests, CI), ``cpu`` (committed results), ``full``.

A profile is a YAML file in ``fewsam_lib/profiles/``: a few top-level keys, then one section per
registered method (its typed dataclass, e.g. :class:`~fewsam_lib.methods.fewshot.FewShotSection`)
and ``overrides`` per dataset. An unknown key or a wrong type anywhere fails when it loads,
naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.manifest import Manifest
from ..data.volumes import Volume, task_voxels_per_slice
from ..errors import FewsamError
from ..methods.base import PlannedRun, get_method, registered_methods
from ..sections import check_keys, parse_section

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"
TOP_LEVEL_KEYS = (
    "name",
    "description",
    "test_cases",
    "test_slices",
    "encoder_path",
    "evaluate_on",
    "validation",
    "datasets",
    "overrides",
)
EVALUATED_SPLITS = ("test", "validation")

__all__ = ["PROFILE_DIR", "PlannedRun", "Profile", "available_profiles", "load_profile"]


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    test_cases: int | None  # the first N test cases (sorted); None = all
    test_slices: int | None  # per test case, a slab of N slices around its most telling slice; None = all
    raw: dict[str, Any]
    path: Path | None = None
    sections: dict[str, Any] = field(default_factory=dict)  # method name -> typed section (present ones)
    encoder_path: str | None = None  # how SAM encoders run (encoders/runtimes.py); None = the device's default
    evaluate_on: str = "test"  # or "validation": runs score validation cases carved from the training cases
    validation_fraction: float = 0.2
    validation_seed: int = 0

    def view(self, manifest: Manifest) -> Manifest:
        """The dataset as this profile's runs see it: as it is, or its validation view."""
        if self.evaluate_on == "validation":
            return manifest.validation_view(self.validation_fraction, self.validation_seed)
        return manifest

    def encoder_path_on(self, device: str) -> str:
        """The encoder path runs of this profile use on ``device``."""
        from ..encoders.runtimes import check_encoder_path, default_encoder_path

        return check_encoder_path(self.encoder_path or default_encoder_path(device), device).name

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
    def reference(self) -> str:
        """How a command names this profile: its name if shipped, else its file."""
        shipped = self.path is None or self.path.resolve() == (PROFILE_DIR / f"{self.name}.yaml").resolve()
        return self.name if shipped else str(self.path)

    @property
    def datasets(self) -> list[str]:
        """Manifests of the matrix, relative to the repository."""
        return list(self.raw.get("datasets") or [])

    def section(self, method: str) -> Any:
        """The typed section of ``method`` (its defaults, which plan no run, when the profile has none)."""
        chosen = get_method(method)
        return self.sections.get(chosen.name) or chosen.section_type()

    def backbones(self, method: str) -> list[str]:
        """A section's ``backbones``, plus its ``optional_backbones`` whose checkpoint is present."""
        from ..encoders.weights import checkpoint_available

        section = self.section(method)
        optional = [name for name in getattr(section, "optional_backbones", ()) if checkpoint_available(name)]
        return list(getattr(section, "backbones", ())) + optional

    def for_dataset(self, manifest: str | Path) -> Profile:
        """The profile as it applies to one dataset: its ``overrides`` entry (keyed by the
        manifest's file name without ``.yaml``) merged into the profile, nested keys one by one."""
        override = (self.raw.get("overrides") or {}).get(Path(manifest).stem)
        if not override:
            return self
        return _profile_from(_merged(self.raw, override), self.path, f"overrides: {Path(manifest).stem}: ")

    def runs(self) -> list[PlannedRun]:
        """Every run of the profile's matrix, method by method, in a stable order."""
        planned = []
        for method in registered_methods():
            for manifest in self.datasets:
                dataset_profile = self.for_dataset(manifest)
                if method.name not in dataset_profile.sections:
                    continue
                planned += method.plan(
                    manifest,
                    dataset_profile.section(method.name),
                    dataset_profile.backbones(method.name),
                    self.reference,
                )
        return planned


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return merged


def _profile_from(raw: Any, path: Path | None = None, prefix: str = "") -> Profile:
    where = str(path) if path else "profile"
    methods = {method.section_key: method for method in registered_methods()}
    raw = check_keys(raw, (*TOP_LEVEL_KEYS, *methods), f"{where}: {prefix}".rstrip(": "))
    for key, kind in (
        ("name", str),
        ("description", str),
        ("test_cases", int),
        ("test_slices", int),
        ("encoder_path", str),
    ):
        value = raw.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise FewsamError(f"{where}: {prefix}'{key}' must be {kind.__name__}, got {value!r}")
    if "name" not in raw:
        raise FewsamError(f"{where}: missing key 'name'")
    datasets = raw.get("datasets") or []
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise FewsamError(f"{where}: {prefix}'datasets' must be a list of manifest paths, got {datasets!r}")
    sections = {
        method.name: parse_section(method.section_type, raw[key], f"{where}: {prefix}{key}")
        for key, method in methods.items()
        if key in raw
    }
    if raw.get("encoder_path") is not None:
        from ..encoders.runtimes import ENCODER_PATHS

        if raw["encoder_path"] not in ENCODER_PATHS:
            raise FewsamError(
                f"{where}: {prefix}unknown encoder_path '{raw['encoder_path']}' (known: {', '.join(ENCODER_PATHS)})"
            )
    evaluate_on = raw.get("evaluate_on") or "test"
    if evaluate_on not in EVALUATED_SPLITS:
        raise FewsamError(
            f"{where}: {prefix}'evaluate_on' must be one of {', '.join(EVALUATED_SPLITS)}, got {evaluate_on!r}"
        )
    validation = check_keys(raw.get("validation") or {}, ("fraction", "seed"), f"{where}: {prefix}validation")
    fraction, seed = validation.get("fraction", 0.2), validation.get("seed", 0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise FewsamError(
            f"{where}: {prefix}validation: 'fraction' must lie strictly between 0 and 1, got {fraction!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FewsamError(f"{where}: {prefix}validation: 'seed' must be int, got {seed!r}")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise FewsamError(f"{where}: 'overrides' must map manifest names to keys, got {overrides!r}")
    return Profile(
        raw["name"],
        raw.get("description", ""),
        raw.get("test_cases"),
        raw.get("test_slices"),
        raw,
        path,
        sections,
        raw.get("encoder_path"),
        evaluate_on,
        float(fraction),
        seed,
    )


def available_profiles() -> list[str]:
    return sorted(path.stem for path in PROFILE_DIR.glob("*.yaml"))


def profile_path(name: str | Path) -> Path:
    """A shipped profile by name (``cpu``), or a profile file of the user's own (``my_profile.yaml``)."""
    text = str(name)
    path = Path(text).expanduser() if text.endswith((".yaml", ".yml")) else PROFILE_DIR / f"{text}.yaml"
    if path.is_dir():
        raise FewsamError(f"{path}: is a folder, not a profile file")
    if not path.exists():
        if text.endswith((".yaml", ".yml")):
            raise FewsamError(f"{path}: no such profile file")
        raise FewsamError(f"unknown profile '{text}' (known: {', '.join(available_profiles())}, or a .yaml file)")
    return path


def load_profile(name: str | Path, manifest: str | Path | None = None) -> Profile:
    """A profile by name or file; with ``manifest``, as it applies to that dataset (see
    :meth:`Profile.for_dataset`). Every dataset's overrides are checked too, so a bad key anywhere
    fails at load time.
    """
    path = profile_path(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise FewsamError(f"{path}: not valid YAML ({error})") from None
    profile = _profile_from(raw, path)
    for dataset in profile.raw.get("overrides") or {}:
        profile.for_dataset(f"{dataset}.yaml")
    return profile.for_dataset(manifest) if manifest is not None else profile
