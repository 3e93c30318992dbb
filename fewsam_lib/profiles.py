"""Profiles decide how much data a run touches: ``smoke`` (tests, CI), ``cpu`` (committed results), ``full``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import FewsamError
from .manifest import Manifest

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    test_cases: int | None  # the first N test cases (sorted); None = all
    raw: dict[str, Any]

    def test_case_ids(self, manifest: Manifest) -> list[str]:
        ids = sorted(manifest.case_ids("test"))
        return ids if self.test_cases is None else ids[: self.test_cases]

    @property
    def datasets(self) -> list[str]:
        """Manifests of the matrix, relative to the repository."""
        return list(self.raw.get("datasets", []))

    def prompting_runs(self) -> list[dict[str, Any]]:
        """Every (manifest, backbone, variant, seed) of the profile's prompting matrix."""
        matrix = self.raw.get("prompting") or {}
        return [
            {"manifest": manifest, "backbone": backbone, "variant": variant, "seed": seed, "profile": self.name}
            for manifest in self.datasets
            for backbone in matrix.get("backbones", [])
            for variant in matrix.get("variants", [])
            for seed in matrix.get("seeds", [0])
        ]


def available_profiles() -> list[str]:
    return sorted(path.stem for path in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str) -> Profile:
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.exists():
        raise FewsamError(f"unknown profile '{name}' (known: {', '.join(available_profiles())})")
    raw = yaml.safe_load(path.read_text())
    return Profile(raw["name"], raw.get("description", ""), raw.get("test_cases"), raw)
