"""Executing the numbered notebooks with papermill; executed copies land beside the results they made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import paths
from .errors import FewsamError
from .manifest import load_manifest
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


def run_prompting_notebook(manifest: str, backbone: str, variant: str, seed: int = 0, profile: str = "smoke",
                           results_dir: str | Path | None = None) -> Path:
    """``10_sam_prompting.ipynb`` for one run; returns the run folder (with ``notebook.ipynb`` in it)."""
    results_dir = Path(results_dir) if results_dir else default_results_dir()
    spec = RunSpec(load_manifest(manifest).dataset, "sam_prompting", variant, backbone, seed, profile)
    folder = spec.folder(results_dir)
    execute("10_sam_prompting.ipynb", folder / "notebook.ipynb",
            {"manifest": str(manifest), "backbone": backbone, "variant": variant, "seed": seed, "profile": profile,
             "results_dir": str(results_dir), "progress": False})
    return folder


def run_dataset_overview(manifest: str, results_dir: str | Path | None = None) -> Path:
    """``00_dataset_overview.ipynb`` for one manifest, saved under ``results/datasets/<dataset>/``."""
    results_dir = Path(results_dir) if results_dir else default_results_dir()
    dataset = load_manifest(manifest).dataset
    output = results_dir / "datasets" / dataset / "00_dataset_overview.ipynb"
    return execute("00_dataset_overview.ipynb", output, {"manifest": str(manifest)})
