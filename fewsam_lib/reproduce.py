"""Run a profile's whole matrix through the notebooks, skipping runs that are already complete."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from . import paths
from .manifest import load_manifest
from .notebooks import planned_folder, run_dataset_overview, run_notebook
from .plots import write_result_figures
from .profiles import load_profile
from .runs import IncompleteRun, default_results_dir, load_run, summarize


def is_complete(folder: Path) -> bool:
    try:
        load_run(folder)
    except IncompleteRun:
        return False
    return True


def reproduce(profile: str, results_dir: str | Path | None = None, dry_run: bool = False,
              force: bool = False) -> list[tuple[Path, str]]:
    """Execute every run of ``profile`` that is not complete, then the dataset overviews and summary.

    Returns (run folder, what happened) per run: ``complete`` (skipped), ``ran``, or ``planned``.
    """
    chosen = load_profile(profile)
    results_dir = Path(results_dir) if results_dir else default_results_dir()
    outcome = []
    runs = chosen.runs()
    for run in tqdm(runs, desc=f"reproduce {chosen.name}", unit="run", disable=dry_run):
        folder = planned_folder(run, results_dir)
        if is_complete(folder) and not force:
            outcome.append((folder, "complete"))
        elif dry_run:
            outcome.append((folder, "planned"))
        else:
            run_notebook(run, results_dir)
            outcome.append((folder, "ran"))
    if not dry_run:
        for manifest in chosen.datasets:
            overview = results_dir / "datasets" / load_manifest(paths.REPO_ROOT / manifest).dataset
            if force or not (overview / "00_dataset_overview.ipynb").exists():
                run_dataset_overview(manifest, results_dir)
        write_result_figures(results_dir, summarize(results_dir))
    return outcome
