"""Figures and small tables for the notebooks; every function reads saved results or the manifest."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..bench.runs import METRICS, load_run, manifest_of
from ..data.manifest import Manifest
from ..data.volumes import (
    Volume,
    grey_slices,
    load_case,
    normalise_intensity,
    slice_table,
    take_slice,
    task_voxels_per_slice,
)
from ..methods.base import get_method
from ..methods.nnunet import nnunet_log_curve
from .drawing import TASK_COLOURS, draw_contour, draw_labels, show_slice


def metric_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and n of every metric per level and task."""
    return metrics.groupby(["level", "task"])[METRICS].agg(["mean", "std", "count"]).round(3)


def run_examples(run_folder: str | Path, examples: int = 3) -> plt.Figure:
    """Image, ground truth and prediction on the worst, median and best scored slices of a run.

    A method may draw more on each prediction (prompting: the prompt that produced it).
    """
    meta, metrics = load_run(run_folder)
    manifest = manifest_of(meta)
    method = get_method(meta["method"])
    rows = metrics[metrics.level == "slice"].sort_values(["dice", "case_id", "slice_index"]).reset_index(drop=True)
    picks = rows.iloc[np.unique(np.linspace(0, len(rows) - 1, examples).round().astype(int))]
    figure, axes = plt.subplots(len(picks), 3, figsize=(7.5, 2.6 * len(picks)), squeeze=False)
    for row_axes, (_, row) in zip(axes, picks.iterrows()):
        volume = load_case(manifest, row.case_id)
        grey = grey_slices(manifest, volume, [row.slice_index])[0]
        gt = take_slice(volume.label, manifest.slice_axis, row.slice_index)
        predicted = volume.read_on_canonical_grid(Path(run_folder) / "predictions" / f"{row.case_id}.nii.gz")
        pred = take_slice(predicted, manifest.slice_axis, row.slice_index)
        value = manifest.label_of(row.task)
        planar = manifest.planar
        show_slice(row_axes[0], grey, f"{row.case_id} slice {row.slice_index}", planar)
        show_slice(row_axes[1], grey, "ground truth", planar)
        draw_labels(row_axes[1], gt, manifest.tasks, planar)
        show_slice(row_axes[2], grey, f"{row.task}: Dice {row.dice:.2f}", planar)
        draw_labels(row_axes[2], pred, manifest.tasks, planar)
        draw_contour(row_axes[2], gt == value, planar)
        method.draw_example(row_axes[2], meta, row.case_id, int(row.slice_index), gt == value, value, planar)
    shots = f" · {meta['shots']} shots" if meta.get("shots") is not None else ""
    figure.suptitle(
        f"{meta['backbone']} · {meta['method']} {meta['variant']}{shots} · seed {meta['seed']} · {meta['profile']}",
        fontsize=9,
    )
    figure.tight_layout()
    return figure


def collection_figure(run_folder: str | Path, limit: int = 10) -> plt.Figure:
    """The few-shot collection of a run: its labelled support slices (at most ``limit``)."""
    meta, _ = load_run(run_folder)
    manifest = manifest_of(meta)
    slices = meta["collection"]["slices"][:limit]
    columns = min(5, len(slices))
    rows = -(-len(slices) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    volumes: dict[str, Volume] = {}
    for ax, support in zip(axes.ravel(), slices):
        case_id, index = support["case_id"], support["slice_index"]
        volume = volumes.setdefault(case_id, load_case(manifest, case_id))
        planar = manifest.planar
        show_slice(ax, grey_slices(manifest, volume, [index])[0], f"{case_id} slice {index}", planar)
        draw_labels(ax, take_slice(volume.label, manifest.slice_axis, index), manifest.tasks, planar)
    total = len(meta["collection"]["slices"])
    figure.suptitle(
        f"few-shot collection: {meta['shots']} slices per task, seed {meta['seed']} "
        f"({total} distinct slices{'' if total <= limit else f', first {limit} shown'})",
        fontsize=9,
    )
    figure.tight_layout()
    return figure


def training_curve(run_folder: str | Path) -> plt.Figure:
    """Training loss per step, with a 10-step running mean."""
    curve = pd.read_csv(Path(run_folder) / "training_curve.csv")
    if "stage" not in curve:  # runs before the location head trained only the decoder
        curve["stage"] = "decoder"
    stages = list(dict.fromkeys(curve.stage))
    figure, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        part = curve[curve.stage == stage]
        ax.plot(part.step, part.loss, color="0.75", linewidth=0.8, label="per step")
        ax.plot(part.step, part.loss.rolling(10, min_periods=1).mean(), color="C0", label="running mean (10)")
        location = stage == "location"
        ax.set(
            xlabel="step",
            ylabel="class-weighted CE + soft Dice" if location else "BCE + soft Dice loss",
            title="location head training" if location else "decoder training",
        )
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def nnunet_training_curve(run_folder: str | Path) -> plt.Figure:
    """Train/validation loss and pseudo Dice per epoch, read from nnU-Net's own training log."""
    curve = nnunet_log_curve(run_folder)
    figure, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(9, 3))
    for column in ("train_loss", "val_loss"):
        if column in curve:
            loss_ax.plot(curve.epoch, curve[column], marker="o", label=column)
    loss_ax.set(xlabel="epoch", ylabel="loss (nnU-Net: Dice + CE)", title="nnU-Net training")
    loss_ax.legend(fontsize=8)
    dice_ax.plot(curve.epoch, curve.pseudo_dice, marker="o", color="C2", label="pseudo Dice")
    dice_ax.plot(curve.epoch, curve.ema_pseudo_dice, color="C2", alpha=0.5, label="moving average (nnU-Net's)")
    dice_ax.set(xlabel="epoch", ylabel="mean pseudo Dice (validation patches)", ylim=(0, 1))
    dice_ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def empty_slice_behaviour(run_folder: str | Path) -> pd.DataFrame:
    """Per task: on slices without the task, how often the method still predicted it.

    The few-shot method segments every slice, so it must also say "nothing here".
    """
    meta, metrics = load_run(run_folder)
    manifest = manifest_of(meta)
    axis = manifest.slice_axis
    counts = {task: [0, 0] for task in manifest.task_names}
    for case_id in metrics.case_id.unique():
        volume = load_case(manifest, case_id, image=False)
        predicted = volume.read_on_canonical_grid(Path(run_folder) / "predictions" / f"{case_id}.nii.gz")
        for value, task in manifest.tasks.items():
            truth = task_voxels_per_slice(volume.label == value, axis, {1: task})[task].to_numpy()
            found = task_voxels_per_slice(predicted == value, axis, {1: task})[task].to_numpy()
            counts[task][0] += int((truth == 0).sum())
            counts[task][1] += int(((truth == 0) & (found > 0)).sum())
    return pd.DataFrame(
        [
            {
                "task": task,
                "slices_without_task": n,
                "predicted_anyway": wrong,
                "false_positive_rate": round(wrong / n, 3) if n else np.nan,
            }
            for task, (n, wrong) in counts.items()
        ]
    )


def split_summary(manifest: Manifest) -> pd.DataFrame:
    return pd.DataFrame(
        {"split": ["train", "test"], "cases": [len(manifest.split["train"]), len(manifest.split["test"])]}
    )


def slice_counts(manifest: Manifest, table: pd.DataFrame) -> pd.DataFrame:
    """Per split and task: volumes (and how many annotate the task), slices, slices containing the
    task, mean labelled voxels per such slice."""
    split_of = {case: name for name, ids in manifest.split.items() for case in ids}
    table = table.assign(split=table.case_id.map(split_of))
    rows = []
    for split, part in table.groupby("split"):
        cases = part.case_id.unique()
        for task in manifest.task_names:
            present = part[part[task] > 0]
            annotated = sum(task in manifest.annotated_tasks(case).values() for case in cases)
            rows.append(
                {
                    "split": split,
                    "task": task,
                    "cases": len(cases),
                    "cases_annotated": annotated,
                    "slices": len(part),
                    "slices_with_task": len(present),
                    "mean_voxels_per_slice": round(present[task].mean(), 1),
                }
            )
    return pd.DataFrame(rows)


def intensity_histograms(manifest: Manifest, case_ids: list[str]) -> plt.Figure:
    """Raw and normalised intensity histograms of a few cases (voxels above the volume's minimum,
    i.e. without MR zero padding or CT air; a seeded sample of at most 50,000 per case)."""
    figure, (raw_ax, grey_ax) = plt.subplots(1, 2, figsize=(9, 3))
    rng = np.random.default_rng(0)
    for case_id in case_ids:
        volume = load_case(manifest, case_id, label=False)
        foreground = np.flatnonzero(volume.image.ravel() > volume.image.min())
        sample = rng.choice(foreground, size=min(foreground.size, 50_000), replace=False)
        sns.kdeplot(volume.image.ravel()[sample], ax=raw_ax, label=case_id, linewidth=1)
        grey = normalise_intensity(volume.image, manifest.intensity)
        sns.kdeplot(grey.ravel()[sample], ax=grey_ax, linewidth=1)
    raw_ax.set(title="raw intensities (above the volume minimum)", xlabel="value")
    grey_ax.set(title=f"after intensity handling ({manifest.intensity.mode})", xlabel="grey level", xlim=(0, 255))
    raw_ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def example_overlays(manifest: Manifest, case_ids: list[str]) -> plt.Figure:
    """The slice with the most labelled voxels of each case, with its ground truth."""
    figure, axes = plt.subplots(1, len(case_ids), figsize=(2.6 * len(case_ids), 2.8), squeeze=False)
    table = slice_table(manifest, case_ids)
    for ax, case_id in zip(axes[0], case_ids):
        rows = table[table.case_id == case_id]
        index = int(rows.slice_index.iloc[int(np.argmax(rows[manifest.task_names].sum(axis=1)))])
        volume = load_case(manifest, case_id)
        grey = grey_slices(manifest, volume, [index])[0]
        planar = manifest.planar
        show_slice(ax, grey, f"{case_id} slice {index}", planar)
        draw_labels(ax, take_slice(volume.label, manifest.slice_axis, index), manifest.tasks, planar)
    handles = [plt.matplotlib.patches.Patch(color=c, label=t) for c, t in zip(TASK_COLOURS, manifest.task_names)]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    return figure


def prompting_figure(summary: pd.DataFrame) -> plt.Figure | None:
    """Slice-level IoU of every prompting run: mean with its 95% bootstrap interval, per task."""
    rows = summary[(summary.role == "prompted") & (summary.metric == "iou") & (summary.level == "slice")]
    if rows.empty:
        return None
    tasks = sorted(rows.task.unique())
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.4), squeeze=False, sharey=True)
    backbones = sorted(rows.backbone.unique())
    for ax, task in zip(axes[0], tasks):
        part = rows[rows.task == task]
        variants = sorted(part.variant.unique())
        width = 0.8 / len(backbones)
        for offset, (colour, backbone) in enumerate(zip(sns.color_palette("deep"), backbones)):
            cells = part[part.backbone == backbone].set_index("variant").reindex(variants)
            x = np.arange(len(variants)) + (offset - (len(backbones) - 1) / 2) * width
            ax.bar(x, cells["mean"], width, color=colour, label=backbone)
            ax.errorbar(
                x,
                cells["mean"],
                yerr=[cells["mean"] - cells.ci95_low, cells.ci95_high - cells["mean"]],
                fmt="none",
                ecolor="black",
                elinewidth=0.8,
                capsize=2,
            )
        ax.set_xticks(np.arange(len(variants)), variants, rotation=30, ha="right")
        ax.set(title=f"{rows.dataset.iloc[0]} · {task}", ylim=(0, 1), ylabel="IoU (slices with the task)")
    axes[0][-1].legend(fontsize=8)
    profile = ", ".join(sorted(rows.profile.unique()))
    figure.suptitle(f"SAM prompting baselines (profile {profile}; mean and 95% bootstrap CI)", fontsize=9)
    figure.tight_layout()
    return figure
