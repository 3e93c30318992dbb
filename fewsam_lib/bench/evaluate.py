"""The one evaluation loop every method runs through.

``evaluate`` owns what all methods share: the run folder (:class:`RunWriter`), the per-case loop
over the profile's test cases, saving each prediction on the ground truth's original grid, and
scoring it with the shared metrics. A method contributes only :meth:`MethodRun.prepare` and
:meth:`MethodRun.predict_case`.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .. import paths
from ..data.manifest import Manifest, load_manifest
from ..data.volumes import load_case
from ..errors import FewsamError
from ..methods.base import PlannedRun, RunContext, get_method
from .profiles import Profile, load_profile
from .runs import RunSpec, RunWriter, default_results_dir, score_case


def variant_definition(variant: Any) -> dict[str, Any]:
    """Every setting of a variant record, for ``run.json``."""
    if hasattr(variant, "definition"):
        return variant.definition()
    return asdict(variant) if is_dataclass(variant) else {"name": str(variant)}


def manifest_path(manifest: str | Path) -> Path:
    """A manifest path as given, else relative to the repository (profiles name them so)."""
    path = Path(manifest)
    return path if path.is_absolute() or path.exists() else paths.REPO_ROOT / path


def run_spec(
    run: PlannedRun, manifest: Manifest | None = None, profile: Profile | None = None, device: str = "cpu"
) -> RunSpec:
    """Where and under which name ``run`` writes, without running it (cheap: no model is loaded)."""
    method = get_method(run.method)
    manifest = manifest or load_manifest(manifest_path(run.manifest))
    profile = profile or load_profile(run.profile, manifest.path)
    if manifest.evaluated_split == "test":
        manifest = profile.view(manifest)
    variant = method.resolve_variant(run.variant, profile.section(method.name))
    uses_encoder = method.needs_backbone(run.variant)
    backbone = run.backbone if uses_encoder else "none"
    return RunSpec(
        manifest.dataset,
        method.name,
        variant.name,
        backbone,
        run.seed,
        profile.name,
        method.shots_of(run, manifest, profile),
        profile.encoder_path_on(device) if uses_encoder else None,
        run.budget,
    )


def planned_folder(run: PlannedRun, results_dir: str | Path | None = None) -> Path:
    """The run folder ``run`` writes."""
    return run_spec(run).folder(Path(results_dir) if results_dir else default_results_dir())


def evaluate(
    run: PlannedRun,
    results_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """One run of any registered method over the profile's test cases; returns the complete run folder."""
    method = get_method(run.method)
    method.check_request(run)
    manifest = load_manifest(manifest_path(run.manifest))
    profile = load_profile(run.profile, manifest.path)
    manifest = profile.view(manifest)  # a validation profile scores validation cases, trains on the rest
    uses_encoder = method.needs_backbone(run.variant)
    if uses_encoder:
        from ..encoders.backbones import get_spec

        get_spec(run.backbone)  # an unknown backbone fails before any work
    context = RunContext(run, manifest, profile, device=device, checkpoint=checkpoint, progress=progress)
    method_run = method.start(context)
    spec = RunSpec(
        manifest.dataset,
        method.name,
        method_run.variant.name,
        method_run.backbone,
        run.seed,
        profile.name,
        method_run.shots,
        context.encoder_path if uses_encoder else None,
        run.budget,
    )
    case_ids = profile.test_case_ids(manifest)
    if not case_ids:
        raise FewsamError(f"{manifest.path}: no test case to run on (profile {profile.name})")
    parameters = {
        "manifest": paths.display(manifest.path),
        "method": method.name,
        "backbone": method_run.backbone,
        "variant": method_run.variant.name,
        "variant_definition": variant_definition(method_run.variant),
        "shots": method_run.shots,
        "seed": run.seed,
        "profile": profile.name,
        "device": device,
        "test_cases": case_ids,
        **method_run.parameters(),
    }
    # What else decides a case's prediction and rows: an unfinished attempt is gone on from only
    # when these are the same.
    scope = {
        "test_slices": profile.test_slices,
        "evaluate_on": profile.evaluate_on,
        "validation": [profile.validation_fraction, profile.validation_seed],
    }
    writer = RunWriter(
        spec,
        results_dir,
        parameters=parameters,
        provenance={"data": manifest.summary(), **method_run.provenance()},
        scope=scope,
    )
    method_run.prepare(writer, case_ids)
    writer.prepared(method_run.timings)
    rows: list[dict] = []
    axis = manifest.slice_axis
    for case_id in tqdm(case_ids, desc=spec.run_id, unit="case", disable=not progress):
        if case_id in writer.finished:  # by an earlier attempt of this same run
            rows += writer.finished[case_id]
            continue
        volume = load_case(manifest, case_id)
        extent = profile.scored_slices(manifest, volume)
        writer.record_extent(case_id, extent, volume.shape[axis])
        prediction = method_run.predict_case(volume, extent)
        volume.save_on_original_grid(prediction.labels, writer.predictions / f"{case_id}.nii.gz")
        scored = list(extent) if prediction.scored_slices is None else prediction.scored_slices
        writer.record_withheld(case_id, prediction.withheld_slices)
        case_rows = score_case(
            manifest,
            spec,
            volume,
            prediction.labels,
            slices=scored,
            slice_selection=prediction.slice_selection,
            extent=extent,
            withheld=prediction.withheld_slices,
        )
        writer.case_finished(case_id, case_rows, dict(method_run.timings))
        rows += case_rows
    return writer.finish(rows, timings=dict(method_run.timings), extra=dict(method_run.extra))
