"""The nnU-Net baseline, run by nnunetv2 itself: export a manifest's training split as an nnU-Net
raw dataset, and match nnU-Net's label budget to the few-shot method's.

Budgets: ``full`` (every training volume), ``matched`` (whole training volumes, taken in a seeded
random order until together they hold at least as many slices that contain a task as the few-shot
collection; both counts are reported) and ``same_slices`` (the collection's own volumes with only
its slices labelled and every other voxel nnU-Net's ``ignore`` label, so that nnU-Net and few-shot
learn from identical labels).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import numpy as np
import pandas as pd

from .. import paths
from ..data.collection import draw_collection
from ..data.manifest import Manifest
from ..data.volumes import Volume, load_case, slice_table
from ..errors import FewsamError
from .base import CasePrediction, Method, MethodRun, PlannedRun, RunContext, register_method

if TYPE_CHECKING:
    from ..bench.profiles import Profile

FILE_ENDING = ".nii.gz"
# nnU-Net picks its intensity normalisation from the channel name: "CT" means its CT scheme.
CHANNEL_NAMES = {"CT": "CT"}


@dataclass(frozen=True)
class Budget:
    """The training volumes nnU-Net gets, and how many labelled slices they hold."""

    name: str  # "full", "slices<N>seed<S>" or "sameslices<N>seed<S>"
    case_ids: tuple[str, ...]
    labelled_slices: int
    requested_slices: int | None
    # same_slices: per case, the labelled slice indices along the manifest's slice axis (canonical
    # grid); every other voxel is exported as ignore. None: whole volumes are labelled.
    labelled: dict[str, tuple[int, ...]] | None = None


def labelled_slice_counts(manifest: Manifest, case_ids: list[str], table: pd.DataFrame | None = None) -> pd.Series:
    """Slices that contain at least one task, per case."""
    table = table if table is not None else slice_table(manifest, case_ids)
    table = table[table.case_id.isin(case_ids)]
    counts = (table[manifest.task_names] > 0).any(axis=1).groupby(table.case_id).sum()
    return counts.reindex(case_ids, fill_value=0).astype(int)


def full_budget(manifest: Manifest, table: pd.DataFrame | None = None) -> Budget:
    case_ids = sorted(manifest.case_ids("train"))
    return Budget("full", tuple(case_ids), int(labelled_slice_counts(manifest, case_ids, table).sum()), None)


def matched_budget(manifest: Manifest, slices: int, seed: int, table: pd.DataFrame | None = None) -> Budget:
    """Whole training volumes, in an order drawn with ``seed``, until they hold ``slices`` labelled slices."""
    if slices < 1:
        raise FewsamError(f"a label budget needs at least 1 labelled slice, got {slices}")
    train = sorted(manifest.case_ids("train"))
    counts = labelled_slice_counts(manifest, train, table)
    chosen, total = [], 0
    for index in np.random.default_rng(seed).permutation(len(train)):
        if total >= slices:
            break
        chosen.append(train[index])
        total += int(counts[train[index]])
    if total < slices:
        raise FewsamError(
            f"{manifest.path}: the training split holds {total} labelled slices, fewer than the budget of {slices}"
        )
    return Budget(f"slices{slices}seed{seed}", tuple(sorted(chosen)), total, slices)


def same_slices_budget(manifest: Manifest, shots: int, seed: int, table: pd.DataFrame | None = None) -> Budget:
    """The few-shot collection of ``shots`` and ``seed`` as nnU-Net's training data: its volumes,
    labelled on its slices only."""
    collection = draw_collection(manifest, shots, seed, table)
    labelled: dict[str, list[int]] = {}
    for support in collection.slices:
        labelled.setdefault(support.case_id, []).append(support.slice_index)
    return Budget(
        f"sameslices{len(collection.slices)}seed{seed}",
        tuple(sorted(labelled)),
        len(collection.slices),
        len(collection.slices),
        {case_id: tuple(sorted(indices)) for case_id, indices in sorted(labelled.items())},
    )


def sparse_label(manifest: Manifest, case_id: str, slice_indices: tuple[int, ...]) -> tuple[Volume, np.ndarray]:
    """A case's canonical label with only ``slice_indices`` kept and every other voxel ignore."""
    volume = load_case(manifest, case_id, image=False)
    sparse = np.full(volume.label.shape, ignore_value(manifest), dtype=np.uint8)
    kept = [slice(None)] * 3
    kept[manifest.slice_axis] = list(slice_indices)
    sparse[tuple(kept)] = volume.label[tuple(kept)]
    return volume, sparse


def ignore_value(manifest: Manifest) -> int:
    """nnU-Net's ignore label must be the highest label value."""
    return max(manifest.tasks) + 1


def dataset_suffix(manifest: Manifest, budget: Budget, validation_curve: bool = False) -> str:
    """``msd_hippocampus`` + budget ``slices38seed0`` -> ``MsdHippocampusSlices38seed0``."""
    # A validation view trains on other cases than the test runs: its exports must not share a folder,
    # nor an export that also holds the validation cases for nnU-Net's own validation.
    split = "Validation" if manifest.evaluated_split == "validation" else ""
    curve = "Curve" if validation_curve else ""
    name = "".join(part.capitalize() for part in manifest.dataset.split("_"))
    return name + split + budget.name.capitalize() + curve


def dataset_folder_name(dataset_id: int, manifest: Manifest, budget: Budget, validation_curve: bool = False) -> str:
    if not 1 <= dataset_id <= 999:
        raise FewsamError(f"nnU-Net dataset ids run from 1 to 999, got {dataset_id}")
    return f"Dataset{dataset_id:03d}_{dataset_suffix(manifest, budget, validation_curve)}"


def export_raw_dataset(
    manifest: Manifest,
    budget: Budget,
    dataset_id: int,
    raw_root: Path | None = None,
    validation_cases: tuple[str, ...] = (),
) -> Path:
    """``Dataset<id>_<Name>/imagesTr, labelsTr, dataset.json`` in nnU-Net v2's raw format.

    Only the budget's training volumes are written, and in a validation view ``validation_cases``
    (carved from the training cases, fully labelled) for nnU-Net's own validation; the test split
    never enters. The folder is built beside its final name and renamed at the end, so a failed
    export leaves nothing behind.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    leaked = sorted(set(budget.case_ids) - set(manifest.case_ids("train")))
    if leaked:
        raise FewsamError(
            f"{manifest.path}: cases {leaked} are not in the training split; nnU-Net trains on training cases only"
        )
    if validation_cases and manifest.evaluated_split != "validation":
        raise FewsamError(f"{manifest.path}: nnU-Net validates on carved validation cases only, never on test cases")
    stray = sorted(set(validation_cases) - set(manifest.case_ids("test")))
    if stray:
        raise FewsamError(f"{manifest.path}: cases {stray} are not validation cases of this view")
    values = sorted(manifest.tasks)
    if values != list(range(1, len(values) + 1)):
        raise FewsamError(
            f"{manifest.path}: nnU-Net needs consecutive label values 1..{len(values)}, the manifest has {values}"
        )
    raw_root = Path(raw_root) if raw_root else paths.nnunet_roots()["raw"]
    target = raw_root / dataset_folder_name(dataset_id, manifest, budget, validation_curve=bool(validation_cases))
    others = [p for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p != target] if raw_root.exists() else []
    if others:
        raise FewsamError(f"nnU-Net dataset id {dataset_id} is taken by {others[0]}; choose another id")
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "imagesTr").mkdir(parents=True)
    (partial / "labelsTr").mkdir()
    labels = {"background": 0, **{name: value for value, name in manifest.tasks.items()}}
    if budget.labelled is not None:
        labels["ignore"] = ignore_value(manifest)
    for case_id in (*budget.case_ids, *validation_cases):
        case = manifest.case(case_id)
        shutil.copyfile(case.image, partial / "imagesTr" / f"{case_id}_0000{FILE_ENDING}")
        if budget.labelled is None or case_id in validation_cases:
            shutil.copyfile(case.label, partial / "labelsTr" / f"{case_id}{FILE_ENDING}")
        else:
            volume, sparse = sparse_label(manifest, case_id, budget.labelled[case_id])
            volume.save_on_original_grid(sparse, partial / "labelsTr" / f"{case_id}{FILE_ENDING}")
    generate_dataset_json(
        str(partial),
        channel_names={0: CHANNEL_NAMES.get(manifest.modality, manifest.modality)},
        labels=labels,
        num_training_cases=len(budget.case_ids) + len(validation_cases),
        file_ending=FILE_ENDING,
        dataset_name=target.name,
        description=f"fewsam export of {paths.display(manifest.path)} (sha256 {manifest.sha256[:12]}), "
        f"budget {budget.name}: {len(budget.case_ids)} volumes, {budget.labelled_slices} labelled slices",
        license="see the source dataset",
        converted_by="fewsam",
        fewsam_case_ids=list(budget.case_ids),
        fewsam_labelled_slices={case: list(indices) for case, indices in (budget.labelled or {}).items()} or None,
        fewsam_validation_case_ids=list(validation_cases) or None,
    )
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


# --- plan, train, predict with nnunetv2's console scripts -----------------------------------------

TRAINER_DIR = Path(__file__).resolve().parent / "nnunet_trainers"
FIRST_DATASET_ID = 500  # nnU-Net's own examples use low ids; stay clear of a user's datasets
PLANS = "nnUNetPlans"


def nnunet_environment(roots: dict[str, Path]) -> dict[str, str]:
    """The environment nnunetv2's scripts read their folders (and our trainers) from."""
    env = dict(os.environ)
    env.update({paths.NNUNET_VARIABLES[role]: str(folder) for role, folder in roots.items()})
    env["nnUNet_extTrainer"] = str(TRAINER_DIR)
    return env


def check_trainer(trainer: str, env: dict[str, str]) -> None:
    """Fail before any export or planning when nnunetv2 cannot find ``trainer`` (its own trainers,
    then the project's under ``nnUNet_extTrainer``), as ``nnUNetv2_train`` would much later."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with (
        mock.patch.dict(os.environ, {"nnUNet_extTrainer": env["nnUNet_extTrainer"]}),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            recursive_find_trainer_class_by_name(trainer)
        except RuntimeError:
            raise FewsamError(f"unknown nnU-Net trainer '{trainer}': not in nnunetv2 nor in {TRAINER_DIR}") from None


NNUNET_PROCESSES = str(min(2, os.cpu_count() or 1))  # worker processes of planning and preprocessing


def run_nnunet_command(arguments: list[str], log: Path, env: dict[str, str]) -> float:
    """Run one nnunetv2 console script, its output appended to ``log``; returns its wall time."""
    executable = Path(sys.executable).with_name(arguments[0])
    command = [str(executable) if executable.exists() else arguments[0], *arguments[1:]]
    started = time.perf_counter()
    with log.open("a") as stream:
        stream.write(f"$ {' '.join(command)}\n")
        stream.flush()
        try:
            result = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
        except OSError as error:
            raise FewsamError(f"cannot run {arguments[0]}: {error} (is nnunetv2 installed?)") from None
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        killed = " (killed: out of memory?)" if result.returncode in (-9, 137) else ""
        raise FewsamError(f"{arguments[0]} failed with exit code {result.returncode}{killed}; end of {log}:\n{tail}")
    return time.perf_counter() - started


def dataset_id_for(folder_suffix: str, raw_root: Path) -> int:
    """The id of an exported dataset with this name, or the first free id from FIRST_DATASET_ID."""
    taken = {}
    for folder in raw_root.glob("Dataset[0-9][0-9][0-9]_*") if raw_root.exists() else []:
        taken[int(folder.name[7:10])] = folder.name[11:]
    for dataset_id, suffix in taken.items():
        if suffix == folder_suffix:
            return dataset_id
    return next(i for i in range(FIRST_DATASET_ID, 1000) if i not in taken)


def budget_for(manifest: Manifest, budget: str, seed: int, profile: Profile) -> Budget:
    """``full`` (every training volume), or ``matched`` / ``same_slices`` sized by the profile's
    largest few-shot collection of the same seed."""
    if budget == "full":
        return full_budget(manifest)
    if budget in ("matched", "same_slices"):
        shots = max(profile.section("fewshot").shots or [0])
        if not shots:
            raise FewsamError(f"profile {profile.name} has no few-shot runs to match a label budget to")
        table = slice_table(manifest, manifest.case_ids("train"))  # read the label files once for both
        if budget == "same_slices":
            return same_slices_budget(manifest, shots, seed, table)
        return matched_budget(manifest, len(draw_collection(manifest, shots, seed, table).slices), seed, table)
    raise FewsamError(f"unknown nnU-Net label budget '{budget}' ({', '.join(BUDGETS)})")


def trained_model_folder(
    roots: dict[str, Path], dataset: str, configuration: str, trainer: str, plans: str = PLANS
) -> Path:
    return roots["results"] / dataset / f"{trainer}__{plans}__{configuration}"


def plans_name(target_spacing: tuple[float, ...] | None) -> str:
    """nnU-Net's plans identifier: its default, or one named after an overridden target spacing."""
    if target_spacing is None:
        return PLANS
    return f"{PLANS}_spacing" + "x".join(f"{value:g}" for value in target_spacing)


@dataclass(frozen=True)
class NnUNetVariant:
    """nnU-Net's configuration and trainer class; named ``<configuration>-<trainer>`` in run folders."""

    configuration: str
    trainer: str

    @property
    def name(self) -> str:
        return f"{self.configuration}-{self.trainer}"

    @classmethod
    def from_name(cls, name: str) -> NnUNetVariant:
        configuration, separator, trainer = name.partition("-")
        if not separator or not trainer:
            raise FewsamError(f"nnU-Net variant '{name}' is not <configuration>-<trainer>, e.g. 2d-nnUNetTrainer")
        if configuration not in CONFIGURATIONS:
            raise FewsamError(f"nnU-Net configuration '{configuration}' is not one of {', '.join(CONFIGURATIONS)}")
        return cls(configuration, trainer)

    def definition(self) -> dict[str, str]:
        return {"configuration": self.configuration, "trainer": self.trainer}


CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
BUDGETS = ("full", "matched", "same_slices")


@dataclass(frozen=True)
class NnUNetSection:
    """The ``nnunet`` section of a profile. ``trainers``: one list for every budget, or a list per
    budget (``{full: [...], matched: [...]}``)."""

    configurations: tuple[str, ...] = ()
    trainers: tuple[str, ...] | dict[str, list[str]] = ()
    budgets: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    disable_tta: bool = False  # predict without nnU-Net's mirroring (4x faster in 2d)
    # Train fold 0 of a split whose validation part is the view's carved validation cases, so that
    # nnU-Net's own pseudo-Dice curve is measured on held-out cases (the ``schedule`` profile); the
    # default trains fold ``all`` on the budget's volumes, validating on them.
    validation_curve: bool = False
    # nnU-Net's target spacing, one value per axis in nnU-Net's order (a 2D image: 999 first, then
    # rows and columns), instead of the median spacing it plans for (its -overwrite_target_spacing,
    # which the 2d configuration follows too). Coarser spacing = smaller images and patches.
    target_spacing: tuple[float, ...] | None = None

    def trainers_for(self, budget: str) -> list[str]:
        if isinstance(self.trainers, dict):
            return list(self.trainers.get(budget, []))
        return list(self.trainers)


class NnUNetRun(MethodRun):
    """Export, plan and preprocess, train and predict with nnunetv2; the loop scores like every other method.

    Reruns reuse what nnU-Net already finished (a preprocessed dataset, a final checkpoint) and
    continue an interrupted training from nnU-Net's latest checkpoint.
    """

    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        run, manifest = context.run, context.manifest
        self.variant = NNUNET.resolve_variant(run.variant, context.section)
        self.budget = budget_for(manifest, run.budget or "full", run.seed, context.profile)
        self.shots = self.budget.labelled_slices
        self.roots = paths.nnunet_roots()
        self.env = nnunet_environment(self.roots)
        check_trainer(self.variant.trainer, self.env)
        self.validation_curve = context.section.validation_curve
        if self.validation_curve and manifest.evaluated_split != "validation":
            raise FewsamError(
                f"profile {context.profile.name}: nnunet validation_curve needs evaluate_on: validation "
                f"(nnU-Net then validates on carved validation cases; the test split never enters)"
            )
        self.fold = "0" if self.validation_curve else "all"
        self.validation_cases = tuple(manifest.case_ids("test")) if self.validation_curve else ()
        suffix = dataset_suffix(manifest, self.budget, self.validation_curve)
        dataset_id = dataset_id_for(suffix, self.roots["raw"])
        self.dataset_id = dataset_id
        self.dataset = dataset_folder_name(dataset_id, manifest, self.budget, self.validation_curve)
        self.disable_tta = context.section.disable_tta
        spacing = context.section.target_spacing
        self.target_spacing = tuple(float(value) for value in spacing) if spacing else None
        self.plans = plans_name(self.target_spacing)

    def parameters(self) -> dict[str, Any]:
        return {
            "configuration": self.variant.configuration,
            "trainer": self.variant.trainer,
            "budget": self.context.run.budget or "full",
            "fold": self.fold,
            "test_time_mirroring": not self.disable_tta,
            **({"target_spacing": list(self.target_spacing)} if self.target_spacing else {}),
        }

    def provenance(self) -> dict[str, Any]:
        budget = self.budget
        return {
            "label_budget": {
                "name": budget.name,
                "volumes": len(budget.case_ids),
                "labelled_slices": budget.labelled_slices,
                "requested_slices": budget.requested_slices,
                "case_ids": list(budget.case_ids),
                **({"labelled": {case: list(ix) for case, ix in budget.labelled.items()}} if budget.labelled else {}),
            },
            "nnunet_dataset": self.dataset,
        }

    def prepare(self, writer: Any, case_ids: list[str]) -> None:
        manifest, roots, env, dataset = self.context.manifest, self.roots, self.env, self.dataset
        configuration, trainer = self.variant.configuration, self.variant.trainer
        dataset_id = str(self.dataset_id)
        plans = roots["preprocessed"] / dataset / f"{self.plans}.json"
        exported = roots["raw"] / dataset / "dataset.json"
        recorded = json.loads(exported.read_text()) if exported.exists() else {}
        if plans.exists() and (
            recorded.get("fewsam_case_ids") != list(self.budget.case_ids)
            or recorded.get("fewsam_validation_case_ids") != (list(self.validation_cases) or None)
        ):
            raise FewsamError(
                f"{roots['raw'] / dataset} was preprocessed from other volumes than budget "
                f"{self.budget.name} selects now (was the split changed?); remove it and its "
                f"nnUNet_preprocessed and nnUNet_results folders"
            )
        self.log = log = writer.folder / "nnunet_commands.log"
        log.write_text("")
        timings = self.timings
        plans_part = "" if self.plans == PLANS else f"{self.plans}_"
        preprocessed_marker = roots["preprocessed"] / dataset / f".fewsam_preprocessed_{plans_part}{configuration}"
        if not preprocessed_marker.exists():
            # nnU-Net writes its preprocessed cases one by one: a folder left by an interrupted call
            # holds some of them, so only the marker written after success counts as done.
            shutil.rmtree(roots["preprocessed"] / dataset / f"{self.plans}_{configuration}", ignore_errors=True)
            if not plans.exists():
                export_raw_dataset(manifest, self.budget, self.dataset_id, roots["raw"], self.validation_cases)
            timings["plan_and_preprocess"] = run_nnunet_command(
                [
                    "nnUNetv2_plan_and_preprocess",
                    "-d",
                    dataset_id,
                    "-c",
                    configuration,
                    "--verify_dataset_integrity",
                    "-np",
                    NNUNET_PROCESSES,
                    # The fingerprint's default is 8 processes, each importing torch: on 2 cores that
                    # doubled the whole call (74 s against 33 s on a 10-slice dataset; same fingerprint).
                    "-npfp",
                    NNUNET_PROCESSES,
                    *self.plans_options(),
                ],
                log,
                env,
            )
            preprocessed_marker.write_text(f"nnUNetv2_plan_and_preprocess -c {configuration} finished\n")
        if self.validation_curve:  # nnU-Net reads its folds from here; fold 0 is ours
            split = [{"train": list(self.budget.case_ids), "val": list(self.validation_cases)}]
            (roots["preprocessed"] / dataset / "splits_final.json").write_text(json.dumps(split, indent=1))
        self.fold_folder = (
            trained_model_folder(roots, dataset, configuration, trainer, self.plans) / f"fold_{self.fold}"
        )
        self.trained_from_scratch = False
        device = self.context.device
        if not (self.fold_folder / "checkpoint_final.pth").exists():
            resume = ["--c"] if (self.fold_folder / "checkpoint_latest.pth").exists() else []
            self.trained_from_scratch = not resume
            timings["train"] = run_nnunet_command(
                [
                    "nnUNetv2_train",
                    dataset_id,
                    configuration,
                    self.fold,
                    "-tr",
                    trainer,
                    "-p",
                    self.plans,
                    "-device",
                    device,
                    *resume,
                ],
                log,
                env,
            )
        self.inputs = inputs = roots["raw"].parent / "inference" / writer.spec.run_id
        shutil.rmtree(inputs, ignore_errors=True)
        (inputs / "imagesTs").mkdir(parents=True)
        for case_id in case_ids:
            shutil.copyfile(manifest.case(case_id).image, inputs / "imagesTs" / f"{case_id}_0000{FILE_ENDING}")
        timings["predict"] = run_nnunet_command(
            [
                "nnUNetv2_predict",
                "-i",
                str(inputs / "imagesTs"),
                "-o",
                str(inputs / "predicted"),
                "-d",
                dataset_id,
                "-c",
                configuration,
                "-tr",
                trainer,
                "-p",
                self.plans,
                "-f",
                self.fold,
                "-device",
                device,
                # 0 and 0: nnU-Net's sequential prediction, no worker processes to start (the same
                # predictions; an OpenKBP case took 39 s instead of 52 s with one worker each).
                "-npp",
                "0",
                "-nps",
                "0",
                *(["--disable_tta"] if self.disable_tta else []),
            ],
            log,
            env,
        )
        training = copy_training_record(self.fold_folder, writer.folder)
        if self.validation_curve and (writer.folder / LOG_FILE).exists():
            ema = nnunet_log_curve(writer.folder).ema_pseudo_dice.dropna().tolist()
            training["plateau_epoch"] = plateau_epoch(ema)
        if not self.trained_from_scratch:  # finished or begun by an earlier call: its time is in nnU-Net's logs
            timings["train"] = sum(training["epoch_seconds"])
        self.extra["nnunet_training"] = training

    def plans_options(self) -> list[str]:
        """nnUNetv2_plan_and_preprocess options for an overridden target spacing (none by default)."""
        if self.target_spacing is None:
            return []
        spacing = [f"{value:g}" for value in self.target_spacing]
        return ["-overwrite_target_spacing", *spacing, "-overwrite_plans_name", self.plans]

    def predict_case(self, volume: Volume, extent: range) -> CasePrediction:
        output = self.inputs / "predicted" / f"{volume.case_id}{FILE_ENDING}"
        if not output.exists():
            raise FewsamError(f"nnU-Net wrote no prediction for {volume.case_id} ({output}); see {self.log}")
        return CasePrediction(volume.read_on_canonical_grid(output))  # nnU-Net's own 2d plane, whole volume


class NnUNet(Method):
    name = "nnunet"
    command = "nnunet"
    description = "fully supervised nnU-Net v2 (nnunetv2's own planning, training and prediction)"
    section_key = "nnunet"
    section_type = NnUNetSection
    notebook = "30_nnunet.ipynb"
    rank = 2
    uses_backbone = False
    default_variant = "2d-nnUNetTrainer_fewsam5epochsBatch32"
    report_role = "supervised"

    def labelled_slices(self, meta: dict[str, Any]) -> int | None:
        return meta.get("shots")

    def variant_names(self) -> list[str]:
        return [f"{configuration}-<trainer>" for configuration in CONFIGURATIONS]

    def resolve_variant(self, name: str, section: NnUNetSection | None) -> NnUNetVariant:
        return NnUNetVariant.from_name(name)

    def add_run_options(self, parser: Any) -> None:
        parser.add_argument("--configuration", default="2d", choices=CONFIGURATIONS, help="nnU-Net's configuration")
        parser.add_argument(
            "--trainer",
            default=NnUNetVariant.from_name(self.default_variant).trainer,
            help="an nnU-Net trainer class (nnunetv2's own, or the project's in nnunet_trainers/)",
        )
        parser.add_argument(
            "--budget",
            default="full",
            choices=BUDGETS,
            help="every training volume; whole volumes holding as many labelled slices as the few-shot "
            "collection (matched); or exactly the collection's slices, every other voxel ignored (same_slices)",
        )

    def run_from_options(self, options: Any) -> PlannedRun:
        variant = NnUNetVariant(options.configuration, options.trainer).name
        return PlannedRun(
            self.name, options.manifest, "none", variant, options.seed, options.profile, budget=options.budget
        )

    def check_request(self, run: PlannedRun) -> None:
        if run.shots is not None:
            raise FewsamError(f"--shots is for fewshot runs (nnunet: --budget {' or '.join(BUDGETS)})")
        if run.budget not in BUDGETS:
            raise FewsamError(f"unknown nnU-Net label budget '{run.budget}' ({' or '.join(BUDGETS)})")
        NnUNetVariant.from_name(run.variant)

    def plan(self, manifest: str, section: NnUNetSection, backbones: list[str], profile: str) -> list[PlannedRun]:
        return [
            PlannedRun(
                self.name, manifest, "none", NnUNetVariant(configuration, trainer).name, seed, profile, budget=budget
            )
            for configuration in section.configurations
            for budget in section.budgets
            for trainer in section.trainers_for(budget)
            for seed in section.seeds
        ]

    def shots_of(self, run: PlannedRun, manifest: Manifest, profile: Profile) -> int | None:
        return budget_for(manifest, run.budget or "full", run.seed, profile).labelled_slices

    def start(self, context: RunContext) -> NnUNetRun:
        return NnUNetRun(context)

    def label(self, variant: str, shots: int | None, budget: str | None = None) -> str:
        # ``budget`` is the kind (a command line) or the recorded name ("slices40seed0", "sameslices38seed0").
        kind = (
            "full" if budget == "full" else "same slices" if budget and budget.startswith("same") else "matched budget"
        )
        slices = f"{int(shots)} slices, " if shots is not None else ""
        return f"nnU-Net {kind} ({slices}{NnUNetVariant.from_name(variant).configuration})"

    def command_options(self, run: PlannedRun) -> list[str]:
        variant = NnUNetVariant.from_name(run.variant)
        return ["--configuration", variant.configuration, "--trainer", variant.trainer, "--budget", run.budget]

    def notebook_parameters(self, run: PlannedRun) -> dict[str, Any]:
        variant = NnUNetVariant.from_name(run.variant)
        return {"configuration": variant.configuration, "trainer": variant.trainer, "budget": run.budget}


NNUNET = register_method(NnUNet())


def copy_training_record(fold_folder: Path, run_folder: Path) -> dict:
    """nnU-Net's training log and curve into the run folder; the schedule it actually ran and the
    wall time of each finished epoch."""
    # nnU-Net names its logs by an unpadded date: order them by time. An interrupted training that
    # resumed (--c) continues in a new log, so the run folder gets all of them, oldest first.
    logs = sorted(fold_folder.glob("training_log_*.txt"), key=lambda log: log.stat().st_mtime)
    texts = [log.read_text() for log in logs]
    if texts:
        (run_folder / LOG_FILE).write_text("".join(texts))
    if (fold_folder / "progress.png").exists():
        shutil.copyfile(fold_folder / "progress.png", run_folder / "nnunet_progress.png")
    debug = fold_folder / "debug.json"
    settings = json.loads(debug.read_text()) if debug.exists() else {}
    record = {
        key: settings.get(key)
        for key in ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "batch_size")
    }
    # Every epoch nnU-Net finished, over all its logs (an interrupted training continues in a new one).
    record["epoch_seconds"] = [
        float(seconds) for text in texts for seconds in re.findall(r"Epoch time: ([0-9.]+) s", text)
    ]
    plans = fold_folder.parent / "plans.json"  # the trained configuration's patch is not in debug.json
    configuration = settings.get("configuration_name")
    if plans.exists() and configuration:
        planned = json.loads(plans.read_text())["configurations"].get(configuration, {})
        record["patch_size"], record["spacing"] = planned.get("patch_size"), planned.get("spacing")
    return record


LOG_FILE = "nnunet_training_log.txt"  # nnU-Net's training log, copied into the run folder
BF16_LOG_LINE = "forward passes under bf16 autocast"  # what the project's bf16 trainers log

PLATEAU_GAIN = 0.01  # the nnU-Net issue's rule: the moving average gains less than this ...
PLATEAU_WINDOW = 0.2  # ... over the last fifth of the epochs
PLATEAU_MIN_EPOCHS = 10  # a window of at least two epochs


def training_precision(run_folder: str | Path) -> str:
    """``bf16`` where the run's nnU-Net log says its forward passes ran under bf16 autocast, else
    ``fp32`` (nnU-Net's own trainers on a CPU)."""
    log = Path(run_folder) / LOG_FILE
    return "bf16" if log.exists() and BF16_LOG_LINE in log.read_text() else "fp32"


def nnunet_log_curve(run_folder: str | Path) -> pd.DataFrame:
    """Per epoch from nnU-Net's own training log: ``train_loss``, ``val_loss``, ``pseudo_dice`` (mean
    over classes) and ``ema_pseudo_dice``, the moving average nnU-Net keeps its best checkpoint by
    (0.9 x the previous + 0.1 x the new value)."""
    rows, epoch = [], None
    for line in (Path(run_folder) / LOG_FILE).read_text().splitlines():
        _, _, message = line.partition(": ")
        words = message.split()
        if len(words) == 2 and words[0] == "Epoch" and words[1].isdigit():
            epoch = int(words[1])
            rows.append({"epoch": epoch})
        elif epoch is not None and len(words) == 2 and words[0] in ("train_loss", "val_loss"):
            rows[-1][words[0]] = float(words[1])
        elif epoch is not None and message.startswith("Pseudo dice"):
            values = [float(v) for v in re.findall(r"[-+]?\d*\.\d+(?:e[-+]?\d+)?", message)]
            rows[-1]["pseudo_dice"] = float(np.nanmean(values)) if values else np.nan
    curve = pd.DataFrame(rows, columns=["epoch", "train_loss", "val_loss", "pseudo_dice"])
    # an epoch cut short by an interruption is begun again in the next log: its last record counts
    curve = curve.drop_duplicates("epoch", keep="last").reset_index(drop=True)
    ema = []
    for value in curve.pseudo_dice:
        ema.append(value if not ema else 0.9 * ema[-1] + 0.1 * value)
    return curve.assign(ema_pseudo_dice=ema)


def last_fifth_gain(ema: list[float] | np.ndarray, window: float = PLATEAU_WINDOW) -> float:
    """What the moving average (one value per epoch) gained over the last ``window`` of the epochs
    (NaN with too few epochs to look back on)."""
    back = max(1, math.ceil(window * len(ema)))
    return float(ema[-1] - ema[-1 - back]) if len(ema) > back else float("nan")


def plateau_epoch(
    ema: list[float], gain: float = PLATEAU_GAIN, window: float = PLATEAU_WINDOW, least: int = PLATEAU_MIN_EPOCHS
) -> int | None:
    """The fewest epochs (at least ``least``) after which the EMA pseudo-Dice (one value per epoch)
    gained less than ``gain`` over the last ``window`` of the epochs; None if it never did."""
    for epochs in range(least, len(ema) + 1):
        if last_fifth_gain(ema[:epochs], window) < gain:
            return epochs
    return None
