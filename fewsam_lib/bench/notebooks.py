"""Executing the numbered notebooks with papermill; executed copies land beside the results they made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import paths
from ..data.manifest import load_manifest
from ..errors import FewsamError
from ..methods.base import PlannedRun, get_method
from .evaluate import evaluate, planned_folder
from .runs import default_results_dir

NOTEBOOK_DIR = paths.REPO_ROOT / "notebooks"


def execute(notebook: str, output: Path, parameters: dict[str, Any]) -> Path:
    """Run ``notebooks/<notebook>`` with ``parameters`` (its ``parameters`` cell), saving to ``output``."""
    import papermill

    source = NOTEBOOK_DIR / notebook
    if not source.exists():
        raise FewsamError(f"{source}: no such notebook")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(
            str(source),
            str(output),
            parameters=parameters,
            cwd=str(paths.REPO_ROOT),
            kernel_name="python3",
            progress_bar=False,
        )
    except papermill.PapermillExecutionError as error:
        raise FewsamError(
            f"{source.name} failed in cell {error.exec_count}: {error.ename}: {error.evalue} "
            f"(the partly executed notebook is {output})"
        ) from None
    return output


def run_notebook(run: PlannedRun, results_dir: str | Path | None = None) -> Path:
    """Execute the method's notebook for one run; returns the run folder (``notebook.ipynb`` inside,
    for a method that has one).

    The run folder is checked first (an unknown profile, variant or manifest fails here, before a
    notebook lands anywhere).
    """
    method = get_method(run.method)
    method.check_request(run)
    results_dir = Path(results_dir) if results_dir else default_results_dir()
    if method.notebook is None:  # a method without a notebook runs through the loop alone
        return evaluate(run, results_dir, progress=False)
    folder = planned_folder(run, results_dir)
    parameters = {
        "manifest": run.manifest,
        "seed": run.seed,
        "profile": run.profile,
        "results_dir": str(results_dir),
        **method.notebook_parameters(run),
    }
    if method.needs_backbone(run.variant):
        parameters["progress"] = False
    execute(method.notebook, folder / "notebook.ipynb", parameters)
    return folder


def run_dataset_overview(manifest: str, results_dir: str | Path | None = None) -> Path:
    """``00_dataset_overview.ipynb`` for one manifest, saved under ``results/datasets/<dataset>/``."""
    results_dir = Path(results_dir) if results_dir else default_results_dir()
    dataset = load_manifest(manifest).dataset
    output = results_dir / "datasets" / dataset / "00_dataset_overview.ipynb"
    return execute("00_dataset_overview.ipynb", output, {"manifest": str(manifest)})


def run_report(results_dir: str | Path | None = None, profile: str = "cpu", readme: str | Path | None = None) -> Path:
    """``90_report.ipynb`` over ``results_dir``, saved under ``results/report/<profile>/``."""
    results_dir = Path(results_dir) if results_dir else default_results_dir()
    output = results_dir / "report" / profile / "90_report.ipynb"
    return execute(
        "90_report.ipynb",
        output,
        {"results_dir": str(results_dir), "profile": profile, "readme": str(readme) if readme else None},
    )
