"""Executing the numbered notebooks with papermill; executed copies land beside the results they made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import paths
from .errors import FewsamError
from .manifest import load_manifest
from .profiles import PlannedRun, load_profile
from .runs import RunSpec, default_results_dir

NOTEBOOK_DIR = paths.REPO_ROOT / "notebooks"


def execute(notebook: str, output: Path, parameters: dict[str, Any]) -> Path:
    """Run ``notebooks/<notebook>`` with ``parameters`` (its ``parameters`` cell), saving to ``output``."""
    import papermill

    source = NOTEBOOK_DIR / notebook
    if not source.exists():
        raise FewsamError(f"{source}: no such notebook")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(str(source), str(output), parameters=parameters, cwd=str(paths.REPO_ROOT),
                                   kernel_name="python3", progress_bar=False)
    except papermill.PapermillExecutionError as error:
        raise FewsamError(f"{source.name} failed in cell {error.exec_count}: {error.ename}: {error.evalue} "
                          f"(the partly executed notebook is {output})") from None
    return output


NOTEBOOK_OF_METHOD = {"sam_prompting": "10_sam_prompting.ipynb", "fewshot": "20_fewshot.ipynb",
                      "nnunet": "30_nnunet.ipynb"}


def planned_folder(run: PlannedRun, results_dir: str | Path | None = None) -> Path:
    """Where ``run`` writes its run folder."""
    manifest = load_manifest(paths.REPO_ROOT / run.manifest)
    shots = run.shots
    if run.method == "nnunet":  # the folder names the labelled slices the budget holds
        from .nnunet import budget_for

        shots = budget_for(manifest, run.budget, run.seed, load_profile(run.profile, run.manifest)).labelled_slices
    spec = RunSpec(manifest.dataset, run.method, run.variant, run.backbone, run.seed, run.profile, shots)
    return spec.folder(Path(results_dir) if results_dir else default_results_dir())


def run_notebook(run: PlannedRun, results_dir: str | Path | None = None) -> Path:
    """Execute the method's notebook for one run; returns the run folder (``notebook.ipynb`` inside)."""
    results_dir = Path(results_dir) if results_dir else default_results_dir()
    folder = planned_folder(run, results_dir)
    parameters = {"manifest": run.manifest, "seed": run.seed, "profile": run.profile,
                  "results_dir": str(results_dir)}
    if run.method == "nnunet":
        configuration, trainer = run.variant.split("-", 1)
        parameters.update(configuration=configuration, trainer=trainer, budget=run.budget)
    else:
        parameters.update(backbone=run.backbone, variant=run.variant, progress=False)
    if run.shots is not None:
        parameters["shots"] = run.shots
    execute(NOTEBOOK_OF_METHOD[run.method], folder / "notebook.ipynb", parameters)
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
    return execute("90_report.ipynb", output, {"results_dir": str(results_dir), "profile": profile,
                                                "readme": str(readme) if readme else None})
