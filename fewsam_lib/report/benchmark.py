"""The benchmark report (``notebooks/90_report.ipynb``): tables and figures from ``results/runs`` only.

Everything here is recomputed from the run folders (``run.json``, ``metrics.csv``, predictions);
an incomplete run folder is an error that names it, never silently left out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .. import paths
from ..bench.runs import GROUP_COLUMNS, IncompleteRun, collect_metrics, run_folders, summarize
from ..data.manifest import load_manifest
from ..data.volumes import grey_slices, load_case, take_slice
from ..errors import FewsamError
from ..methods.base import get_method
from ..methods.nnunet import LOG_FILE, PLATEAU_GAIN, last_fifth_gain, nnunet_log_curve, training_precision
from .drawing import draw_labels, show_slice
from .figures import prompting_figure

REPORT_TABLES = (
    "main_table.csv",
    "main_table.md",
    "headline.md",
    "headline_table.md",
    "cost_table.csv",
    "cost_table.md",
    "ablation.csv",
    "ablation.md",
    "nnunet_schedules.md",
    "within_volume.csv",
    "within_volume.md",
)
# The within-volume track's quality bar compares at these steps (every 8th and every 16th slice).
WITHIN_VOLUME_BAR_STEPS = (8, 16)
LEVEL_TITLES = {"slice": "per slice (slices that contain the task)", "volume": "per volume (whole 3D label map)"}


def run_index(results_dir: str | Path, profile: str | list[str] | None = None) -> pd.DataFrame:
    """One row per run folder of ``profile`` (a name, several, or None: every profile): what it is,
    its label budget and its costs (from ``run.json``). An incomplete one among them is an error."""
    wanted = None if profile is None else {profile} if isinstance(profile, str) else set(profile)
    rows, incomplete = [], []
    for folder in run_folders(results_dir):
        meta = json.loads((folder / "run.json").read_text())
        if wanted is not None and meta.get("profile") not in wanted:
            continue
        if meta.get("status") != "complete":
            incomplete.append(str(folder))
            continue
        timings, cache = meta.get("timings_s", {}), meta.get("cache", {})
        budget = meta.get("label_budget", {}).get("name")
        method = get_method(meta["method"])
        rows.append(
            {
                "folder": str(folder),
                "dataset": meta["dataset"],
                "method": meta["method"],
                "role": method.report_role,
                "variant": meta["variant"],
                "backbone": meta["backbone"],
                "shots": meta.get("shots"),
                "seed": meta["seed"],
                "profile": meta["profile"],
                "budget": budget,
                "labelled_slices": method.labelled_slices(meta),
                "cache_hits": cache.get("hits"),
                "cache_misses": cache.get("misses"),
                "encode_s": cache.get("encode_seconds"),
                **{f"{k}_s": v for k, v in timings.items()},
            }
        )
    if incomplete:
        raise IncompleteRun(
            "the report needs complete runs; incomplete run folder(s): "
            + "; ".join(incomplete)
            + " (finish them with `make reproduce` or remove them)"
        )
    if not rows:
        raise FewsamError(f"{results_dir}: no complete runs" + (f" of profile {profile}" if profile else ""))
    return pd.DataFrame(rows)


def method_label(method: str, variant: str, shots, budget: str | None = None) -> str:
    """The report's name for a row: the registered method's label."""
    shots = None if shots is None or str(shots) in ("", "nan", "None", "<NA>") else int(float(shots))
    return get_method(method).label(variant, shots, budget)


def _method_order(row: pd.Series) -> tuple:
    method = get_method(row["method"])
    shots = float(row["shots"]) if str(row["shots"]) not in ("", "nan", "None", "<NA>") else 0.0
    return (method.rank, method.variant_order(row["variant"]), shots, row["variant"])


def with_roles(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each row's ``role`` (see :attr:`Method.report_role`)."""
    return frame.assign(role=[get_method(name).report_role for name in frame.method])


def _references(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of prompted methods with one of the method's reference variants (SAM one point, box)."""
    prompted = frame[frame.role == "prompted"]
    keep = [
        variant in get_method(method).reference_variants for method, variant in zip(prompted.method, prompted.variant)
    ]
    return prompted[keep]


def labelled_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's rows with a readable method label and their sort order."""
    frame = with_roles(summary)
    frame["shots"] = frame["shots"].map(lambda v: "" if pd.isna(v) or v == "" else str(int(float(v))))
    frame["budget"] = [r.label_budget if r.role == "supervised" else None for r in frame.itertuples()]
    frame["label"] = [method_label(r.method, r.variant, r.shots or None, r.budget) for r in frame.itertuples()]
    frame["order"] = frame.apply(_method_order, axis=1)
    return frame.sort_values(["dataset", "level", "task", "order", "backbone"]).reset_index(drop=True)


def main_table(summary: pd.DataFrame) -> pd.DataFrame:
    """IoU and Dice per dataset, level, task and method (one row per cell of the paper-like table)."""
    frame = labelled_summary(summary[summary.metric.isin(["iou", "dice"])])
    table = frame.pivot_table(
        index=["dataset", "level", "task", "order", "label", "backbone"],
        columns="metric",
        values=["mean", "std", "ci95_low", "ci95_high", "n", "seeds"],
        aggfunc="first",
    )
    table.columns = [f"{metric}_{stat}" for stat, metric in table.columns]
    return table.reset_index().drop(columns="order")


def main_table_markdown(table: pd.DataFrame) -> str:
    lines = ["<!-- generated by fewsam_lib.report from results/runs; do not edit -->", ""]
    for (dataset, level), part in table.groupby(["dataset", "level"], sort=True):
        shown = pd.DataFrame({"task": part.task, "method": part.label, "backbone": part.backbone})
        for metric in ("iou", "dice"):
            shown[metric.replace("iou", "IoU").replace("dice", "Dice")] = [
                f"{m:.3f} ± {s:.3f} [{lo:.3f}, {hi:.3f}]"
                for m, s, lo, hi in zip(
                    part[f"{metric}_mean"],
                    part[f"{metric}_std"].fillna(0),
                    part[f"{metric}_ci95_low"],
                    part[f"{metric}_ci95_high"],
                )
            ]
        shown["n (seeds)"] = [f"{int(n)} ({int(k)})" for n, k in zip(part.iou_n, part.iou_seeds)]
        lines += [f"### {dataset} — {LEVEL_TITLES.get(level, level)}", "", shown.to_markdown(index=False), ""]
    lines.append("IoU and Dice: mean ± std [95% bootstrap CI of the mean] over slices (or volumes) and seeds.")
    return "\n".join(lines) + "\n"


def ablation_table(summary: pd.DataFrame, profiles: list[str]) -> pd.DataFrame:
    """Few-shot variants beside the SAM box reference, per dataset, split, task, backbone and shots:
    slice IoU and volume Dice means, validation runs (where variants are chosen) and test runs.

    ``summary`` holds every profile's rows; ``profiles`` are the ones shown (e.g. validation, cpu).
    """
    from ..bench.profiles import load_profile

    wanted = summary[summary.profile.isin(profiles) & summary.metric.isin(["iou", "dice"])]
    wanted = wanted[(wanted.method == "fewshot") | ((wanted.method == "sam_prompting") & (wanted.variant == "box"))]
    wanted = wanted[
        ((wanted.level == "slice") & (wanted.metric == "iou"))
        | ((wanted.level == "volume") & (wanted.metric == "dice"))
    ]
    if wanted.empty:
        return pd.DataFrame(columns=["dataset", "split", "profile", "label", "variant", "backbone", "shots", "task"])
    frame = labelled_summary(wanted)
    frame["split"] = frame.profile.map({name: load_profile(name).evaluate_on for name in profiles})
    frame["value"] = frame.level + "_" + frame.metric
    table = frame.pivot_table(
        index=["dataset", "split", "profile", "order", "label", "variant", "backbone", "shots", "task"],
        columns="value",
        values="mean",
        aggfunc="first",
    ).reset_index()
    table = table.sort_values(
        ["dataset", "split", "order", "backbone", "task"], ascending=[True, False, True, True, True]
    )
    return table.drop(columns="order").reset_index(drop=True)


def ablation_markdown(table: pd.DataFrame) -> str:
    """One table per dataset: a row per split and method, a column per task (slice IoU / volume Dice)."""
    lines = ["<!-- generated by fewsam_lib.report from results/runs; do not edit -->", ""]
    for dataset, part in table.groupby("dataset", sort=True):
        cells = part.assign(cell=[f"{iou:.3f} / {dice:.3f}" for iou, dice in zip(part.slice_iou, part.volume_dice)])
        keys = ["split", "label", "backbone"]
        wide = cells.pivot_table(index=keys, columns="task", values="cell", aggfunc="first")
        means = part.groupby(keys)[["slice_iou", "volume_dice"]].mean()
        wide["mean"] = [f"{iou:.3f} / {dice:.3f}" for iou, dice in zip(means.slice_iou, means.volume_dice)]
        wide = wide.reindex(pd.MultiIndex.from_frame(part.drop_duplicates(keys)[keys]))  # the table's order
        lines += [f"### {dataset}", "", wide.reset_index().to_markdown(index=False), ""]
    lines.append(
        "Slice IoU (slices that contain the task) / volume Dice, means over cases and seeds. Validation rows score "
        "validation cases carved from the training split (the `validation` profile) and choose the variants; test "
        "rows are the benchmark's."
    )
    return "\n".join(lines) + "\n"


def validation_ranking(table: pd.DataFrame) -> pd.DataFrame:
    """Few-shot variants ranked on validation, from :func:`ablation_table`: the mean over tasks of
    each (dataset, shots) cell, then the mean over the cells. Only variants with every cell that any
    variant has are ranked (``complete``); the others follow, unranked (``rank`` 0)."""
    columns = ["rank", "variant", "cells", "slice_iou", "volume_dice", "complete"]
    part = table[(table.split == "validation") & table.label.str.startswith("few-shot")]
    if part.empty:
        return pd.DataFrame(columns=columns)
    cells = part.groupby(["variant", "dataset", "shots"])[["slice_iou", "volume_dice"]].mean().reset_index()
    needed = len(cells.drop_duplicates(["dataset", "shots"]))
    ranking = cells.groupby("variant").agg(
        cells=("dataset", "size"), slice_iou=("slice_iou", "mean"), volume_dice=("volume_dice", "mean")
    )
    ranking["complete"] = ranking.cells == needed
    ranking = ranking.reset_index().sort_values(["complete", "slice_iou"], ascending=False, ignore_index=True)
    ranking["rank"] = np.where(ranking.complete, np.arange(1, len(ranking) + 1), 0)
    return ranking[columns]


def ranking_markdown(ranking: pd.DataFrame) -> str:
    if ranking.empty:
        return ""
    needed = int(ranking.cells.max())
    shown = ranking.assign(
        rank=[str(rank) if rank else "—" for rank in ranking["rank"]],
        cells=[f"{cells} of {needed}" for cells in ranking.cells],
    ).drop(columns="complete")
    return "\n".join(
        [
            "### Few-shot variants ranked on validation",
            "",
            shown.to_markdown(index=False, floatfmt=".3f"),
            "",
            "Mean over the (dataset, shots) cells of the validation runs of each cell's task-mean slice IoU "
            "(volume Dice beside it); a variant missing a cell is not ranked. The first is the default variant "
            "(`FewShot.default_variant`, checked by a test; docs/results.md).",
            "",
        ]
    )


def default_variant_of(method: str) -> str:
    """The variant a method's figure and headline show (the few-shot one is chosen on validation)."""
    return get_method(method).default_variant


def shown_fewshot(rows: pd.DataFrame) -> pd.DataFrame:
    """The few-shot rows of :func:`labelled_summary` that headlines show: the default variant's, or,
    where it has no run, the first variant's in the report's order (a profile without it)."""
    learnt = rows[rows.role == "few_shot"]
    if learnt.empty:
        return learnt
    default = learnt[learnt.variant == learnt.method.map(default_variant_of)]
    return default if len(default) else learnt[learnt.variant == learnt.sort_values("order").variant.iloc[0]]


def headline_table(summary: pd.DataFrame, backbone: str | None = None) -> str:
    """The README's compact table: per dataset and task, slice IoU / volume Dice of each prompted
    method's reference variants, few-shot with the most shots (default variant) and each supervised
    label budget, on ``backbone`` (default: the one most few-shot runs used)."""
    frame = labelled_summary(summary[summary.metric.isin(["iou", "dice"])])
    fewshot = frame[frame.role == "few_shot"]
    if fewshot.empty:
        return "No few-shot run yet.\n"
    if backbone not in set(fewshot.backbone):
        backbone = fewshot.backbone.value_counts().sort_index().idxmax()
    frame = frame[(frame.backbone == backbone) | (frame.backbone == "none")]
    picked = []
    for (_dataset, _task), part in frame.groupby(["dataset", "task"], sort=True):
        picked.append(_references(part))
        learnt = shown_fewshot(part)
        if len(learnt):
            picked.append(learnt[learnt.shots.astype(int) == learnt.shots.astype(int).max()])
        picked.append(part[part.role == "supervised"])
    chosen = pd.concat(picked)
    cells = chosen.assign(
        value=[f"{m:.2f}" for m in chosen["mean"]],
        column=chosen.label.str.replace(r" \(\d+ slices, ", " (", regex=True),
    )
    iou = cells[(cells.metric == "iou") & (cells.level == "slice")]
    dice = cells[(cells.metric == "dice") & (cells.level == "volume")].set_index(["dataset", "task", "column"]).value
    order = list(dict.fromkeys(iou.sort_values("order").column))
    rows = []
    for (dataset, task), part in iou.groupby(["dataset", "task"], sort=True):
        values = dict(zip(part.column, part.value))
        rows.append(
            {
                "dataset": dataset,
                "task": task,
                **{
                    column: f"{values[column]} / {dice.get((dataset, task, column), '–')}" if column in values else "–"
                    for column in order
                },
            }
        )
    variants = ", ".join(f"`{name}`" for name in sorted(set(chosen[chosen.role == "few_shot"].variant)))
    return (
        f"Slice IoU / volume Dice, profile means; SAM-based rows with `{backbone}`; few-shot at its largest\n"
        f"shot count ({variants}: the variant ranked first on validation, where it has runs);\n"
        "nnU-Net per label budget. Every row with its 95% CI:\n"
        "[results/tables/main_table.md](results/tables/main_table.md).\n\n"
        + pd.DataFrame(rows).to_markdown(index=False)
        + "\n"
    )


def first_backbone(profile: str | None) -> str | None:
    """The first backbone a profile lists for its few-shot method (the README table's)."""
    if profile is None:
        return None
    from ..bench.profiles import load_profile
    from ..methods.base import registered_methods

    chosen = load_profile(profile)
    for method in registered_methods():
        if method.report_role == "few_shot" and chosen.backbones(method.name):
            return chosen.backbones(method.name)[0]
    return None


def readable_log_ticks(ticks: set[int], min_ratio: float = 1.2) -> list[int]:
    """Ticks for a log axis, dropping any within ``min_ratio`` of the previous one (40 and 42
    would print on top of each other)."""
    shown: list[int] = []
    for tick in sorted(ticks):
        if not shown or tick >= shown[-1] * min_ratio:
            shown.append(tick)
    return shown


def _finish_panels(figure: plt.Figure, axes: np.ndarray, used: int) -> None:
    """Blank the unused panels, one legend below them all (each label once), and the layout."""
    for ax in axes.ravel()[used:]:
        ax.axis("off")
    handles = {}
    for ax in axes.ravel():
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    # As many columns (up to 3) as the longest label fits across the figure at this font size
    # (about 0.06 in per character), and room below the panels for the legend's rows.
    longest = max((len(label) for label in handles), default=0)
    columns = max(1, min(3, int(figure.get_figwidth() // (0.06 * longest + 0.6))))
    rows = -(-len(handles) // columns)
    figure.legend(list(handles.values()), list(handles), loc="lower center", ncol=columns, fontsize=7)
    figure.tight_layout(rect=(0, (0.3 + 0.16 * rows) / figure.get_figheight(), 1, 1))


def label_efficiency_figure(summary: pd.DataFrame, index: pd.DataFrame) -> plt.Figure:
    """Slice-level IoU against labelled training slices, one panel per dataset and task.

    Few-shot (:func:`shown_fewshot`: the variant ranked first on validation): one curve per backbone
    at the mean number of distinct labelled slices of its collections; nnU-Net: points at the
    labelled slices of their budgets; SAM one point and box: horizontal references (they need a
    prompt on every test slice instead of training labels).
    """
    iou = labelled_summary(summary[(summary.metric == "iou") & (summary.level == "slice")])
    panels = iou[["dataset", "task"]].drop_duplicates().values.tolist()
    columns = min(len(panels), 3)
    figure, axes = plt.subplots(
        -(-len(panels) // columns),
        columns,
        figsize=(4.6 * columns, 3.6 * -(-len(panels) // columns)),
        squeeze=False,
        sharey=True,
    )
    colours = dict(zip(sorted(iou.backbone.unique()), sns.color_palette("deep")))
    slices_of = (
        index[index.role == "few_shot"].groupby(["dataset", "backbone", "variant", "shots"]).labelled_slices.mean()
    )
    for ax, (dataset, task) in zip(axes.ravel(), panels):
        part = iou[(iou.dataset == dataset) & (iou.task == task)]
        ticks: set[int] = set()
        for (backbone, variant), line in shown_fewshot(part).groupby(["backbone", "variant"]):
            line = line.assign(x=[slices_of.get((dataset, backbone, variant, int(s)), np.nan) for s in line.shots])
            line = line.sort_values("x")
            ticks |= {round(x) for x in line.x if np.isfinite(x)}
            ax.errorbar(
                line.x,
                line["mean"],
                yerr=[line["mean"] - line.ci95_low, line.ci95_high - line["mean"]],
                marker="o",
                color=colours[backbone],
                capsize=2,
                label=f"few-shot ({variant}) · {backbone}",
            )
        for row in part[part.role == "supervised"].itertuples():
            ticks.add(int(row.shots))
            ax.errorbar(
                [int(row.shots)],
                [row.mean],
                yerr=[[row.mean - row.ci95_low], [row.ci95_high - row.mean]],
                marker="s",
                color="black",
                capsize=2,
                linestyle="none",
                # the slice count is the point's x tick; one legend entry serves every dataset
                label=method_label(row.method, row.variant, None, row.budget),
                markerfacecolor="black" if row.budget == "full" else "white",
            )
        for row in _references(part).itertuples():
            first = row.variant == get_method(row.method).reference_variants[0]
            ax.axhline(
                row.mean,
                color=colours[row.backbone],
                linestyle=":" if first else "--",
                linewidth=1,
                label=f"{row.label} · {row.backbone}",
            )
        ax.set_xscale("log")
        shown = readable_log_ticks(ticks)
        ax.set_xticks(shown, [str(t) for t in shown], fontsize=7)
        ax.minorticks_off()
        ax.set(
            title=f"{dataset} · {task}",
            xlabel="labelled training slices",
            ylabel="IoU (slices with the task)",
            ylim=(0, 1),
        )
    _finish_panels(figure, axes, len(panels))
    return figure


def within_volume_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The within-volume track: Dice of the unlabelled slices (slices holding the task) and of the
    unlabelled part of each volume, per dataset, task, method, backbone and labelling step k."""
    frame = with_roles(summary)
    frame = frame[(frame.role == "within_volume") & (frame.metric == "dice")]
    columns = ["dataset", "task", "label", "variant", "backbone", "k", "slice_dice", "volume_dice", "n_slices"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame = frame.assign(
        k=frame.shots.astype(float).astype(int),
        label=[method_label(r.method, r.variant, None) for r in frame.itertuples()],
    )
    table = frame.pivot_table(
        index=["dataset", "task", "label", "variant", "backbone", "k"], columns="level", values=["mean", "n"]
    )
    table.columns = [f"{level}_{'dice' if stat == 'mean' else 'n'}" for stat, level in table.columns]
    table = table.reset_index().rename(columns={"slice_n": "n_slices"})
    return table[columns]


def _fewshot_label(variant: str) -> bool:
    return variant.startswith("fewshot_")


def within_volume_verdicts(table: pd.DataFrame) -> list[str]:
    """Per dataset, task and bar step: does the best few-shot method beat copying and interpolation?"""
    sentences = []
    for (dataset, task, k), part in table[table.k.isin(WITHIN_VOLUME_BAR_STEPS)].groupby(["dataset", "task", "k"]):
        few = part[part.variant.map(_fewshot_label)]
        baselines = part[part.variant.isin(["nearest_slice", "interpolation"])]
        if few.empty or baselines.empty:
            sentences.append(f"{dataset} · {task} · k={k}: no few-shot run to compare yet")
            continue
        best, rival = few.loc[few.slice_dice.idxmax()], baselines.loc[baselines.slice_dice.idxmax()]
        # compared as printed, so that a verdict never says "beats" between two equal numbers
        ours, theirs = round(best.slice_dice, 3), round(rival.slice_dice, 3)
        verb = "beats" if ours > theirs else "is level with (does not beat)" if ours == theirs else "does not beat"
        sentences.append(
            f"{dataset} · {task} · k={k}: {best.label} ({best.backbone}) {ours:.3f} {verb} {rival.label} {theirs:.3f}"
        )
    return sentences


def within_volume_markdown(table: pd.DataFrame) -> str:
    lines = ["<!-- generated by fewsam_lib.report from results/runs; do not edit -->", ""]
    if table.empty:
        return "\n".join(lines + ["No within-volume runs in this profile."]) + "\n"
    for dataset, part in table.groupby("dataset", sort=True):
        for level, title in (
            ("slice_dice", "Dice of unlabelled slices that hold the task"),
            ("volume_dice", "Dice of the unlabelled part of each volume"),
        ):
            shown = part.pivot_table(index=["task", "label", "backbone"], columns="k", values=level, sort=False)
            # sort=False keeps the rows' order, and would keep k's first-seen order too
            shown = shown[sorted(shown.columns)]
            shown.columns = [f"k={k}" for k in shown.columns]
            shown = shown.reset_index().rename(columns={"label": "method"})
            shown = shown.astype(object).where(shown.notna(), None)  # tabulate's missingval takes None, not NaN
            lines += [
                f"### {dataset} — {title}",
                "",
                shown.to_markdown(index=False, floatfmt=".3f", missingval="—"),
                "",
            ]
    lines += [
        "Every k-th slice of each test volume labelled (first slice seeded); only the other slices "
        "are scored. Mean over slices (or volumes); — where the profile runs a method at fewer k.",
        "",
        "Quality bar (the best few-shot method against "
        "the better of nearest-slice copying and interpolation, slice Dice):",
        "",
    ]
    lines += [f"- {sentence}" for sentence in within_volume_verdicts(table)]
    return "\n".join(lines) + "\n"


def within_volume_figure(table: pd.DataFrame) -> plt.Figure | None:
    """Dice of unlabelled slices against the labelling step k: one panel per dataset and task, one
    line per method and backbone."""
    if table.empty:
        return None
    panels = table[["dataset", "task"]].drop_duplicates().values.tolist()
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.4 * rows), squeeze=False, sharey=True)
    methods = sorted(set(zip(table.label, table.backbone)))
    colours = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    for ax, (dataset, task) in zip(axes.ravel(), panels):
        part = table[(table.dataset == dataset) & (table.task == task)]
        for (label, backbone), line in part.groupby(["label", "backbone"]):
            line = line.sort_values("k")
            name = label if backbone == "none" else f"{label} · {backbone}"
            ax.plot(line.k, line.slice_dice, marker="o", color=colours[(label, backbone)], label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(part.k.unique()), [str(k) for k in sorted(part.k.unique())])
        ax.minorticks_off()
        ax.set(
            title=f"{dataset} · {task}",
            xlabel="every k-th slice labelled",
            ylabel="Dice (unlabelled slices)",
            ylim=(0, 1),
        )
    _finish_panels(figure, axes, len(panels))
    return figure


def _cell(summary: pd.DataFrame, **keys) -> pd.Series | None:
    rows = summary
    for key, value in keys.items():
        rows = rows[rows[key] == value]
    return rows.iloc[0] if len(rows) else None


def headline_sentences(summary: pd.DataFrame) -> list[str]:
    """Per dataset, task and backbone: few-shot (most shots) against each prompted reference on the
    same slices (the first also as a relative gain, as the paper states it) and each supervised budget."""
    iou = labelled_summary(summary[summary.metric == "iou"])
    sentences = []
    for (dataset, task), part in iou.groupby(["dataset", "task"], sort=True):
        slices = part[part.level == "slice"]
        fewshot = shown_fewshot(slices)
        if fewshot.empty:
            sentences.append(f"{dataset} · {task}: no few-shot run yet.")
            continue
        supervised = slices[slices.role == "supervised"]
        for backbone, runs in fewshot.groupby("backbone"):
            best_shots = max(int(s) for s in runs.shots)
            few = runs[runs.shots == str(best_shots)].iloc[0]
            seeds = f"{few.seeds} seed{'s' if few.seeds != 1 else ''}"
            text = (
                f"{dataset} · {task} · {backbone}: few-shot `{few.variant}` ({best_shots} shots, {seeds}) "
                f"IoU {few['mean']:.3f}"
            )
            references = _references(slices[slices.backbone == backbone]).sort_values("order")
            for position, row in enumerate(references.itertuples()):
                text += f"; {row.label} {row.mean:.3f}"
                if position == 0:
                    relative = (few["mean"] / row.mean - 1) * 100 if row.mean > 0 else np.inf
                    text += f" (few-shot {relative:+.0f}%; paper about +50%)"
                else:
                    text += f" ({_compared(row.mean, few['mean'])} few-shot)"
            if references.empty:
                text += " (no prompted baseline for this backbone)"
            for row in supervised.itertuples():
                text += f"; {row.label} {row.mean:.3f} ({_compared(row.mean, few['mean'])} few-shot)"
            sentences.append(text + ".")
    return sentences


def _compared(value: float, reference: float) -> str:
    """``value`` beside ``reference`` as the sentences print them (three decimals)."""
    gap = round(value, 3) - round(reference, 3)
    if abs(gap) < 5e-4:
        return "level with"
    return f"{abs(gap):.3f} IoU {'above' if gap > 0 else 'below'}"


def cost_table(index: pd.DataFrame) -> pd.DataFrame:
    """Measured costs per method and backbone (means over runs; seconds unless named otherwise)."""
    frame = index.copy()
    frame["label"] = [method_label(r.method, r.variant, r.shots, r.budget) for r in frame.itertuples()]
    frame["encoder_s_per_slice"] = frame.encode_s / frame.cache_misses.where(frame.cache_misses > 0)
    columns = {
        "encoder_s_per_slice": "encoder s/slice (misses)",
        "cache_hits": "cache hits",
        "cache_misses": "cache misses",
        "train_s": "decoder / nnU-Net training",
        "decode_s": "prompted decoding",
        "predict_s": "prediction",
        "plan_and_preprocess_s": "nnU-Net plan + preprocess",
        "total_s": "run total",
    }
    present = [c for c in columns if c in frame]
    frame["order"] = frame.apply(_method_order, axis=1)
    frame = frame.sort_values(["dataset", "order", "backbone"])
    groups = frame.groupby(["dataset", "label", "backbone"], sort=False)
    table = groups[present].mean().reset_index()
    table.insert(3, "runs", groups.size().to_numpy())
    # What reproducing costs from a cold cache: every run's total, per dataset and for the profile.
    totals = [
        {
            "dataset": dataset,
            "label": "every run (sum)",
            "backbone": "",
            "runs": len(part),
            "total_s": part.total_s.sum(),
        }
        for dataset, part in frame.groupby("dataset", sort=True)
    ]
    totals.append(
        {
            "dataset": "all",
            "label": "profile total (sum)",
            "backbone": "",
            "runs": len(frame),
            "total_s": frame.total_s.sum(),
        }
    )
    table = pd.concat([table, pd.DataFrame(totals)], ignore_index=True)
    return table.rename(columns=columns)


def schedule_searches(results_dir: str | Path) -> dict[str, str]:
    """Per dataset, what its committed nnU-Net schedule search (profile ``schedule``) found on the
    carved validation cases: the epoch its moving-average pseudo Dice plateaued at, or that it had
    not within the epochs the search could spend. A search still running is not read."""
    found = {}
    for folder in run_folders(results_dir):
        meta = json.loads((folder / "run.json").read_text())
        if (meta.get("profile"), meta.get("method"), meta.get("status")) != ("schedule", "nnunet", "complete"):
            continue
        training = meta.get("nnunet_training", {})
        seconds, plateau = training.get("epoch_seconds") or [], training.get("plateau_epoch")
        found[meta["dataset"]] = (
            f"plateau after {plateau} epochs"
            if plateau is not None
            else f"no plateau in {len(seconds)} epochs ({sum(seconds) / 3600:.1f} h)"
        )
    return found


def nnunet_schedule_table(index: pd.DataFrame, searches: dict[str, str] | None = None) -> pd.DataFrame:
    """Per nnU-Net run: the schedule it ran (from ``run.json``), whether its moving-average pseudo
    Dice had stopped rising (gain over the last fifth of the epochs below PLATEAU_GAIN), and what
    its dataset's schedule search found on validation cases (``searches``, per dataset)."""
    rows = []
    for run in index[index.method == "nnunet"].itertuples():
        meta = json.loads((Path(run.folder) / "run.json").read_text())
        training = meta.get("nnunet_training", {})
        curve = nnunet_log_curve(run.folder) if (Path(run.folder) / LOG_FILE).exists() else None
        ema = curve.ema_pseudo_dice.dropna().to_numpy() if curve is not None else np.array([])
        gain = last_fifth_gain(ema) if len(ema) else np.nan
        rows.append(
            {
                "dataset": run.dataset,
                "label": method_label(run.method, run.variant, run.shots, run.budget),
                "trainer": run.variant.partition("-")[2],
                "epochs": max(len(training.get("epoch_seconds") or []), len(curve) if curve is not None else 0),
                # nnU-Net's debug.json, where these come from, holds them as strings.
                "iterations per epoch": _integer(training.get("num_iterations_per_epoch")),
                "batch": _integer(training.get("batch_size")),
                "precision": training_precision(run.folder),
                "final pseudo Dice": float(curve.pseudo_dice.iloc[-1]) if curve is not None and len(curve) else np.nan,
                "moving average": float(ema[-1]) if len(ema) else np.nan,
                "its gain, last fifth": gain,
                "plateau": "—" if np.isnan(gain) else "yes" if gain < PLATEAU_GAIN else "no",
                "validation search": (searches or {}).get(run.dataset, "none"),
            }
        )
    return pd.DataFrame(rows)


def _integer(value: Any) -> int | None:
    return int(value) if value is not None and str(value).isdigit() else None


def nnunet_schedule_markdown(schedules: pd.DataFrame) -> str:
    if schedules.empty:
        return "No nnU-Net run.\n"
    shown = schedules.astype(object).where(schedules.notna(), None)
    return (
        shown.to_markdown(index=False, floatfmt=".3f", missingval="—") + "\n\n"
        "Pseudo Dice: nnU-Net's own, on patches of the volumes it validates on after each epoch. These runs "
        "train fold `all`, so it validates on its own training volumes: the column says whether training had "
        f"stopped gaining (moving average up by less than {PLATEAU_GAIN} over the last fifth of the epochs), "
        "not how it generalises. Validation search: what the dataset's schedule search (profile `schedule`: "
        "fold 0, validating on cases carved from the training split, until the curve plateaus or the search "
        "trainer's time limit is spent, 2.5 h of epochs where it sets one) "
        "found; a row whose search found no plateau is a truncated reference, not a trained one.\n"
    )


def cost_table_markdown(costs: pd.DataFrame) -> str:
    shown = costs.astype(object).where(costs.notna(), None)  # tabulate prints None as its missingval
    return (
        shown.to_markdown(index=False, floatfmt=".2f", missingval="—") + "\n\n"
        "Seconds, means over runs. —: the run had no such step, or did it in an earlier call (a warm cache "
        "encodes nothing; an nnU-Net run that resumed after planning). Run total: the wall time of the call "
        "that completed the run; nnU-Net training that began in an earlier call is the sum of its epochs' "
        "times, counted in the training column only. The sums add the run totals: what the runs cost as "
        "they were made (each cache warm or cold as it was then).\n"
    )


def qualitative_grid(
    results_dir: str | Path, index: pd.DataFrame, metrics: pd.DataFrame, dataset: str, picks: int = 3
) -> plt.Figure:
    """The same slices for every method: the worst, median and best slice by IoU averaged over the
    tasks and the runs shown (few-shot with most shots, seed 0, first backbone; SAM with one point and
    with a box on that backbone; nnU-Net), with each run's prediction."""
    runs = index[index.dataset == dataset]
    fewshot = runs[runs.role == "few_shot"].sort_values(["shots", "backbone", "seed"], ascending=[False, True, True])
    reference = fewshot.iloc[0] if len(fewshot) else runs.iloc[0]
    shown = [reference]
    others = runs[runs.folder != reference.folder]
    for candidates in (_references(others[others.backbone == reference.backbone]), others[others.role == "supervised"]):
        shown += [row for _, row in candidates.sort_values(["method", "variant", "shots"]).iterrows()]
    slice_rows = metrics[(metrics.dataset == dataset) & (metrics.level == "slice")]
    chosen = representative_slices(pd.concat([_rows_of_run(slice_rows, run) for run in shown]), picks)
    manifest = load_manifest(
        paths.REPO_ROOT / json.loads(Path(reference.folder, "run.json").read_text())["parameters"]["manifest"]
    )
    figure, axes = plt.subplots(
        len(chosen), 2 + len(shown), figsize=(2.3 * (2 + len(shown)), 2.5 * len(chosen)), squeeze=False
    )
    for row_axes, (_, pick) in zip(axes, chosen.iterrows()):
        volume = load_case(manifest, pick.case_id)
        index_ = int(pick.slice_index)
        truth = take_slice(volume.label, manifest.slice_axis, index_)
        grey = grey_slices(manifest, volume, [index_])[0]
        predictions = [
            take_slice(
                volume.read_on_canonical_grid(Path(run.folder) / "predictions" / f"{pick.case_id}.nii.gz"),
                manifest.slice_axis,
                index_,
            )
            for run in shown
        ]
        crop = zoom_window(grey, [truth, *predictions])
        planar = manifest.planar
        show_slice(row_axes[0], grey[crop], f"{pick.case_id} slice {index_}", planar)
        show_slice(row_axes[1], grey[crop], "ground truth", planar)
        draw_labels(row_axes[1], truth[crop], manifest.tasks, planar)
        for ax, run, predicted in zip(row_axes[2:], shown, predictions):
            label = method_label(run.method, run.variant, run.shots, run.budget)
            show_slice(ax, grey[crop], f"{label}\n{run.backbone}" if run.backbone != "none" else label, planar)
            draw_labels(ax, predicted[crop], manifest.tasks, planar)
    figure.suptitle(
        f"{dataset}: worst, median and best slice by IoU averaged over the runs shown; every column is one run",
        fontsize=9,
    )
    figure.tight_layout()
    return figure


def representative_slices(slice_rows: pd.DataFrame, picks: int = 3) -> pd.DataFrame:
    """``picks`` slices spread from worst to best by mean IoU of the rows given (ties: by case, slice).

    Averaged over several runs, so that one run that is wrong everywhere (every slice tied at 0)
    does not make the choice arbitrary.
    """
    per_slice = slice_rows.groupby(["case_id", "slice_index"]).iou.mean().reset_index()
    per_slice = per_slice.sort_values(["iou", "case_id", "slice_index"]).reset_index(drop=True)
    return per_slice.iloc[np.unique(np.linspace(0, len(per_slice) - 1, picks).round().astype(int))]


def _rows_of_run(rows: pd.DataFrame, run: pd.Series) -> pd.DataFrame:
    shots = pd.to_numeric(rows.shots).fillna(-1)
    return rows[
        (rows.method == run.method)
        & (rows.variant == run.variant)
        & (rows.backbone == run.backbone)
        & (rows.seed == run.seed)
        & (shots == (-1 if pd.isna(run.shots) else run.shots))
    ]


def zoom_window(
    grey: np.ndarray, label_slices: list[np.ndarray], min_side: int = 48, margin: int = 4
) -> tuple[slice, slice]:
    """A window around every label drawn (truth and predictions), at least ``min_side`` pixels a
    side, cut to the body where that leaves ``min_side``: CT organs cover a few pixels of a mostly
    empty 128x128 slice, and some OpenKBP slices hold a few dozen pixels of CT around a contour."""
    body = grey > 0
    labelled = np.any([label > 0 for label in label_slices], axis=0)
    rows, columns = np.nonzero(labelled if labelled.any() else body)
    if not len(rows):
        return slice(None), slice(None)
    body_rows, body_columns = np.nonzero(body | labelled)

    def span(low: int, high: int, size: int, body_low: int, body_high: int) -> slice:
        width = min(max(high - low + 1 + 2 * margin, min_side), size)
        start = min(max((low + high + 1 - width) // 2, 0), size - width)
        in_body = slice(max(start, body_low), min(start + width, body_high + 1))
        return in_body if in_body.stop - in_body.start >= min(min_side, size) else slice(start, start + width)

    return (
        span(rows.min(), rows.max(), grey.shape[0], body_rows.min(), body_rows.max()),
        span(columns.min(), columns.max(), grey.shape[1], body_columns.min(), body_columns.max()),
    )


def replace_block(text: str, name: str, content: str) -> str:
    """Replace what lies between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``."""
    pattern = re.compile(rf"(<!-- report:{name} -->\n).*?(<!-- /report:{name} -->)", re.S)
    if not pattern.search(text):
        raise FewsamError(f"no <!-- report:{name} --> ... <!-- /report:{name} --> block to fill")
    return pattern.sub(lambda m: m.group(1) + content.rstrip("\n") + "\n" + m.group(2), text)


def check_one_encoder_path(summary: pd.DataFrame) -> None:
    """Refuse to report a row whose runs were encoded by different encoder paths: their numbers may
    differ for a reason no table column shows."""
    keys = [column for column in GROUP_COLUMNS if column != "encoder_path"]
    paths_per_row = summary.groupby(keys, dropna=False).encoder_path.unique()
    mixed = paths_per_row[paths_per_row.map(len) > 1]
    if len(mixed):
        (dataset, task, method, variant, backbone, *_), found = next(iter(mixed.items()))
        raise FewsamError(
            f"{len(mixed)} report rows mix runs of different encoder paths, e.g. {dataset} {task} {method} "
            f"{variant} {backbone}: {', '.join(sorted(found))}; report one profile whose runs share a path "
            "(profile key encoder_path), or remove the other runs"
        )


def write_report(
    results_dir: str | Path | None = None, profile: str | None = "cpu", readme: str | Path | None = None
) -> dict[str, Path]:
    """Every table and figure of the report under ``results/tables`` and ``results/figures``.

    ``readme``: also refresh the README's generated results blocks.
    """
    results_dir = Path(results_dir or paths.REPO_ROOT / "results")
    every_run = run_index(results_dir, profile)  # refuses an incomplete run of this profile
    # Another profile's run may be in progress (a schedule search beside the report): skipped, not fatal.
    everything = summarize(results_dir)
    summary = everything[everything.profile == profile] if profile is not None else everything
    check_one_encoder_path(summary)
    # The within-volume track has a table and figure of its own, apart from the cross-subject ones.
    tracked = (with_roles(summary).role == "within_volume").to_numpy()
    summary, within = summary[~tracked], summary[tracked]
    index = every_run[every_run.role != "within_volume"]
    metrics = collect_metrics(results_dir)
    tables, figures = results_dir / "tables", results_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    table = main_table(summary)
    table.to_csv(tables / "main_table.csv", index=False, float_format="%.4f")
    (tables / "main_table.md").write_text(main_table_markdown(table))
    headline = "\n".join(f"- {sentence}" for sentence in headline_sentences(summary)) + "\n"
    (tables / "headline.md").write_text(headline)
    compact = headline_table(summary, first_backbone(profile))
    (tables / "headline_table.md").write_text(compact)
    costs = cost_table(index)
    costs.to_csv(tables / "cost_table.csv", index=False, float_format="%.3f")
    (tables / "cost_table.md").write_text(cost_table_markdown(costs))
    shown_profiles = sorted({"validation", profile}) if profile is not None else sorted(set(everything.profile))
    ablation = ablation_table(everything, shown_profiles)
    ablation.to_csv(tables / "ablation.csv", index=False, float_format="%.4f")
    (tables / "ablation.md").write_text(
        ablation_markdown(ablation) + "\n" + ranking_markdown(validation_ranking(ablation))
    )
    schedules = nnunet_schedule_table(index, schedule_searches(results_dir))
    (tables / "nnunet_schedules.md").write_text(nnunet_schedule_markdown(schedules))
    track = within_volume_table(within)
    track.to_csv(tables / "within_volume.csv", index=False, float_format="%.4f")
    (tables / "within_volume.md").write_text(within_volume_markdown(track))
    written.update({name: tables / name for name in REPORT_TABLES})
    figure = within_volume_figure(track)
    if figure is not None:
        figure.savefig(figures / "within_volume.png", dpi=110)
        plt.close(figure)
        written["within_volume.png"] = figures / "within_volume.png"

    figure = prompting_figure(with_roles(summary))
    if figure is not None:
        figure.savefig(figures / "prompting_iou.png", dpi=130)
        plt.close(figure)
        written["prompting_iou.png"] = figures / "prompting_iou.png"
    figure = label_efficiency_figure(summary, index)
    figure.savefig(figures / "label_efficiency.png", dpi=120)
    plt.close(figure)
    written["label_efficiency.png"] = figures / "label_efficiency.png"
    for dataset in sorted(index.dataset.unique()):
        figure = qualitative_grid(results_dir, index, metrics, dataset)
        name = f"qualitative_{dataset}.png"
        figure.savefig(figures / name, dpi=100)
        plt.close(figure)
        written[name] = figures / name

    if readme is not None:
        readme = Path(readme)
        text = replace_block(readme.read_text(), "headline_table", compact)
        # The front door keeps the table's backbone; headline.md has every backbone.
        table_backbone = f" · {first_backbone(profile)}: "
        shown = [line for line in headline.splitlines() if table_backbone in line] or headline.splitlines()
        text = replace_block(text, "headline", "\n".join(shown) + "\n")
        readme.write_text(text)
    return written
