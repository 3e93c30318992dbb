"""``fewsam bench``: our own hot steps, candidates side by side in one process, as ratios.

The machines this runs on are shared and noisy, so candidates of one step are timed interleaved
(A B C A B C ...) and compared by medians within the same run; absolute seconds from separate runs
are not comparable. Each row also says how far a candidate's output is from the fp32 eager
reference (cosine and max abs difference), so a fast path is only a winner within a tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import io
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .. import paths
from ..hardware import cpu_flags, native_bf16

Candidate = Callable[[], torch.Tensor]


@dataclass
class Row:
    step: str  # what is timed, e.g. "encoder", "decoder train step (2 slices, 5 tasks)"
    candidate: str
    backbone: str
    seconds: float  # median per item (slice or step)
    speedup: float  # baseline median / this median, measured in the same run
    cosine: float | None  # to the baseline's output
    max_abs_diff: float | None
    note: str = ""
    gflop: float = float("nan")  # work per item, counted on the step's first candidate (the roofline)


def host_kind() -> str:
    """A short name of this kind of machine for ``results/benchmarks/<host-kind>.csv``: the processor,
    its widest vector unit, bf16 support and the torch threads (a result holds for that kind only)."""
    if torch.cuda.is_available():
        return "gpu-" + torch.cuda.get_device_name(0).lower().replace(" ", "-")
    flags = cpu_flags()
    model = (
        next(
            (
                line.partition(":")[2]
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if flags
        else platform.processor()
    )
    vendor = "amd" if "AMD" in model else "intel" if "Intel" in model else platform.machine()
    vector = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "novector"
    bf16 = "-bf16" if native_bf16() else ""
    return f"cpu-{vendor}-{vector}{bf16}-{torch.get_num_threads()}threads"


def interleaved(candidates: dict[str, Candidate], repeats: int, progress: bool = True) -> dict[str, list[float]]:
    """Wall seconds of each candidate, run in turn ``repeats`` times after one warm-up round."""
    for run in candidates.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in tqdm(range(repeats), desc="interleaved rounds", unit="round", disable=not progress):
        for name, run in candidates.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return times


def similarity(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    reference, other = reference.float().flatten(), other.float().flatten()
    cosine = torch.nn.functional.cosine_similarity(reference, other, dim=0)
    return float(cosine), float((reference - other).abs().max())


def rows_of(
    step: str,
    backbone: str,
    times: dict[str, list[float]],
    outputs: dict[str, torch.Tensor],
    per_item: int = 1,
    notes: dict[str, str] | None = None,
    gflop: float = float("nan"),
) -> list[Row]:
    """Rows with medians per item and ratios against the first candidate (the baseline)."""
    names = list(times)
    baseline = statistics.median(times[names[0]])
    rows = []
    for name in names:
        median = statistics.median(times[name])
        cosine, difference = similarity(outputs[names[0]], outputs[name]) if name in outputs else (None, None)
        rows.append(
            Row(
                step,
                name,
                backbone,
                median / per_item,
                baseline / median,
                cosine,
                difference,
                (notes or {}).get(name, ""),
                gflop,
            )
        )
    return rows


def matmul_peak(dtype: torch.dtype, size: int = 4096, repeats: int = 3) -> float:
    """Measured GFLOP/s of a square matmul (the machine's practical peak for that precision)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def counted_flops(run: Callable[[], object]) -> float:
    """FLOPs of one call of ``run`` (forward, and backward where it has one), by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


def encoder_flops(encoder: torch.nn.Module, batch: torch.Tensor) -> float:
    """FLOPs of one encoder pass per slice."""

    def forward() -> None:
        with torch.inference_mode():
            encoder(batch)

    return counted_flops(forward) / len(batch)


# --- encoder candidates ---------------------------------------------------------------------------


def encoder_candidates(
    encoder: torch.nn.Module, batch: torch.Tensor, workdir: Path
) -> tuple[dict[str, Candidate], dict[str, str]]:
    """Every encoder path that can run here; the notes say why one could not."""
    candidates: dict[str, Candidate] = {}
    notes: dict[str, str] = {}

    def eager() -> torch.Tensor:
        with torch.inference_mode():
            return encoder(batch)

    def bf16() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return encoder(batch).float()

    channels_last = batch.contiguous(memory_format=torch.channels_last)

    def fp32_channels_last() -> torch.Tensor:
        with torch.inference_mode():
            return encoder(channels_last)

    candidates["fp32 eager"] = eager
    candidates["fp32 eager, channels-last input"] = fp32_channels_last
    if native_bf16():
        candidates["bf16 autocast"] = bf16
    else:
        notes["bf16 autocast"] = "skipped: this CPU has no native bf16 (AVX512-BF16 or AMX); torch emulates it"
    builders = {
        "openvino fp32": lambda: _openvino(encoder, batch, "f32"),
        "onnxruntime fp32": lambda: _onnxruntime(encoder, batch, workdir),
        "torch.compile fp32": lambda: _compiled(encoder, batch),
    }
    if native_bf16():
        builders["openvino bf16"] = lambda: _openvino(encoder, batch, "bf16")
    for name, build in builders.items():
        try:
            candidates[name] = build()
        except Exception as error:  # an optional runtime missing or failing on this model
            notes[name] = f"skipped: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return candidates, notes


def _compiled(encoder: torch.nn.Module, batch: torch.Tensor) -> Candidate:
    compiled = torch.compile(encoder)
    with torch.inference_mode():
        compiled(batch)  # compiles here, not inside the timed rounds

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return compiled(batch)

    return run


def _openvino(encoder: torch.nn.Module, batch: torch.Tensor, precision: str) -> Candidate:
    from ..encoders.runtimes import openvino_compile, openvino_convert

    compiled = openvino_compile(openvino_convert(encoder, batch), precision)
    array = batch.numpy()

    def run() -> torch.Tensor:
        return torch.from_numpy(np.asarray(compiled(array)[0]))

    return run


def _onnxruntime(encoder: torch.nn.Module, batch: torch.Tensor, workdir: Path) -> Candidate:
    import onnxruntime

    path = workdir / "encoder.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (batch,), str(path), input_names=["image"], output_names=["embedding"], dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    array = batch.numpy()

    def run() -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"image": array})[0])

    return run


def bench_encoder(backbone: str, repeats: int, progress: bool = True) -> tuple[list[Row], dict[str, float]]:
    """Encoder rows for one backbone (one real slice per call) and its roofline figures."""
    from ..encoders.backbones import load_backbone

    loaded = load_backbone(backbone)
    grey = real_slices(1)[0]
    batch = loaded.prepare(grey)[None]
    with tempfile.TemporaryDirectory() as workdir:
        candidates, notes = encoder_candidates(loaded.model.image_encoder, batch, Path(workdir))
        times = interleaved(candidates, repeats, progress)
        outputs = {name: run() for name, run in candidates.items()}
    gflop = encoder_flops(loaded.model.image_encoder, batch) / 1e9
    rows = rows_of("encoder, 1 slice", backbone, times, outputs, notes=notes, gflop=gflop)
    rows += [
        Row("encoder, 1 slice", name, backbone, float("nan"), float("nan"), None, None, note)
        for name, note in notes.items()
    ]
    return rows, {"gflop_per_slice": gflop}


def real_slices(count: int) -> list[np.ndarray]:
    """Grey slices of the first hippocampus test case that show the anatomy (real input sizes)."""
    from ..data.manifest import load_manifest
    from ..data.volumes import grey_slices, load_case, take_slice

    manifest = load_manifest(paths.REPO_ROOT / "data_manifests" / "msd_hippocampus.yaml")
    volume = load_case(manifest, manifest.case_ids("test")[0])
    axis = manifest.slice_axis
    shown = [i for i in range(volume.shape[axis]) if take_slice(volume.label, axis, i).any()]
    middle = len(shown) // 2
    return grey_slices(manifest, volume, shown[middle - count // 2 : middle - count // 2 + count])


# --- decoder candidates ---------------------------------------------------------------------------


def bench_decoder(backbone: str, tasks: int, slices: int, repeats: int, progress: bool = True) -> list[Row]:
    """Decoder training step (``slices`` slices, ``tasks`` tasks) and inference per slice: one call per
    slice (the method before this benchmark) against one call for all, in fp32 and under bf16."""
    from ..encoders.backbones import load_backbone
    from ..methods.fewshot import decode, segmentation_loss
    from ..methods.sam_decoding import decode_many

    model = load_backbone(backbone).model
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(slices, 256, 64, 64, generator=generator) * 0.1
    tokens = torch.randn(tasks, 1, 256, generator=generator)
    shape = (35, 51)
    targets = (torch.rand(slices, tasks, *shape, generator=generator) > 0.8).float()

    def train_step(batched: bool, bf16: bool, compiled: bool = False) -> Candidate:
        decoder = copy.deepcopy(model.mask_decoder).train().requires_grad_(True)
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=0.0)  # lr 0: every step sees the same weights
        forward = torch.compile(decoder) if compiled else decoder

        def run() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if batched:
                    logits, _ = decode_many(forward, model, embeddings, tokens.repeat(slices, 1, 1), [shape] * slices)
                else:
                    logits = [decode(forward, model, embedding, tokens, shape) for embedding in embeddings]
                loss = sum(segmentation_loss(x.reshape(tasks, *shape).float(), t) for x, t in zip(logits, targets))
            optimizer.zero_grad(set_to_none=True)
            (loss / slices).backward()
            optimizer.step()
            # A parameter the loss does not reach has no gradient in eager mode and a zero one compiled.
            return torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in decoder.parameters()]
            )

        return run

    def inference(batched: bool, bf16: bool, compiled: bool = False) -> Candidate:
        decoder = openvino_decoder(model, tasks) if compiled else model.mask_decoder

        def run() -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if batched:
                    logits, _ = decode_many(decoder, model, embeddings, tokens.repeat(slices, 1, 1), [shape] * slices)
                    return torch.stack([x.reshape(tasks, *shape) for x in logits]).float()
                return torch.stack([decode(decoder, model, e, tokens, shape) for e in embeddings]).float()

        return run

    rows = []
    for step, make, per_item in (
        (f"decoder train step ({slices} slices, {tasks} tasks)", train_step, 1),
        (f"decoder inference per slice ({tasks} tasks)", inference, slices),
    ):
        notes: dict[str, str] = {}
        candidates = {
            "one call per slice, fp32": make(False, False),
            "one call per step, fp32": make(True, False),
            "one call per step, fp32, 1 thread": single_thread(make(True, False)),
        }
        compiled = "torch.compile" if make is train_step else "OpenVINO"
        name = f"one call per slice, fp32, {compiled}"
        try:  # compiled once here, outside the timed rounds
            started = time.perf_counter()
            candidates[name] = warmed(make(False, False, compiled=True))
            notes[name] = f"first call (compiling) {time.perf_counter() - started:.0f} s, again per new shape"
        except Exception as error:  # a runtime missing or failing on this graph
            notes[name] = f"skipped: {type(error).__name__}: {str(error)[:160]}"
        if native_bf16():
            candidates["one call per slice, bf16"] = make(False, True)
            candidates["one call per step, bf16"] = make(True, True)
        times = interleaved(candidates, repeats, progress)
        outputs = {name: run() for name, run in candidates.items()}
        gflop = counted_flops(candidates["one call per slice, fp32"]) / per_item / 1e9
        rows += rows_of(step, backbone, times, outputs, per_item=per_item, notes=notes, gflop=gflop)
        rows += [
            Row(step, name, backbone, np.nan, np.nan, None, None, note)
            for name, note in notes.items()
            if name not in candidates
        ]
    return rows


def warmed(run: Candidate) -> Candidate:
    """``run`` after one call (a compiling candidate compiles in it)."""
    run()
    return run


def openvino_decoder(model: torch.nn.Module, tasks: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """SAM's mask decoder converted to OpenVINO fp32 for ``tasks`` prompt sets, called like the decoder."""
    from ..encoders.runtimes import openvino_compile, openvino_convert
    from ..methods.sam_decoding import no_mask_prompt

    decoder, image_pe = model.mask_decoder, model.prompt_encoder.get_dense_pe()

    class Single(torch.nn.Module):
        def forward(self, embedding, sparse, dense):
            return decoder(embedding, image_pe, sparse, dense, False)

    example = (torch.zeros(1, 256, 64, 64), torch.zeros(tasks, 1, 256), no_mask_prompt(model, tasks))
    compiled = openvino_compile(openvino_convert(Single().eval(), example))

    def call(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output):
        inputs = (image_embeddings, sparse_prompt_embeddings, dense_prompt_embeddings)
        outputs = compiled(tuple(tensor.numpy() for tensor in inputs))
        return torch.from_numpy(outputs[0].copy()), torch.from_numpy(outputs[1].copy())

    return call


def single_thread(run: Candidate) -> Candidate:
    """``run`` on one torch thread (the machine's other core free for a second run beside it)."""

    def on_one_thread() -> torch.Tensor:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run()
        finally:
            torch.set_num_threads(threads)

    return on_one_thread


def bench_nnunet_step(
    repeats: int, batch: int = 32, patch: tuple[int, int] = (64, 48), progress: bool = True
) -> list[Row]:
    """One nnU-Net 2d training iteration (forward, nnU-Net's Dice + CE loss with deep supervision,
    backward, SGD step) in fp32 against the bf16 trainer's forward under autocast
    (``nnUNetTrainer_fewsam5epochsBatch32Bf16``): nnU-Net's plain 2d U-Net for a hippocampus-sized
    patch (5 stages, 32 to 256 features), batch 32 as in the cpu profile."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    torch.manual_seed(0)
    stages = 5
    network = PlainConvUNet(
        1,
        stages,
        [min(32 * 2**i, 256) for i in range(stages)],
        torch.nn.Conv2d,
        3,
        [1] + [2] * (stages - 1),
        2,
        3,
        2,
        True,
        torch.nn.InstanceNorm2d,
        {"eps": 1e-5, "affine": True},
        None,
        None,
        torch.nn.LeakyReLU,
        {"inplace": True},
        deep_supervision=True,
    )
    weights = [1 / 2**i for i in range(stages - 1)]
    loss = DeepSupervisionWrapper(
        DC_and_CE_loss(
            {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
            {},
            1,
            1,
            dice_class=MemoryEfficientSoftDiceLoss,
        ),
        [w / sum(weights) for w in weights],
    )
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(batch, 1, *patch, generator=generator)
    target = torch.randint(0, 3, (batch, 1, *patch), generator=generator)
    targets = [torch.nn.functional.interpolate(target.float(), scale_factor=1 / 2**i).long() for i in range(stages - 1)]
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0, momentum=0.99, nesterov=True)  # lr 0: same weights

    def step(bf16: bool) -> Candidate:
        def run() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                outputs = network(data)
            value = loss([o.float() for o in outputs], targets)
            value.backward()
            optimizer.step()
            return outputs[0].detach().float()

        return run

    name = f"nnU-Net 2d train step (batch {batch}, {patch[0]}x{patch[1]})"
    candidates = {"fp32": step(False)}
    if native_bf16():
        candidates["bf16 autocast forward"] = step(True)
    outputs = {candidate: run() for candidate, run in candidates.items()}
    gflop = counted_flops(candidates["fp32"]) / 1e9
    rows = rows_of(name, "none", interleaved(candidates, repeats, progress), outputs, gflop=gflop)
    if not native_bf16():  # emulated bf16 took 13x the fp32 step here (108 s against 8.4 s on one thread)
        note = "skipped: this CPU has no native bf16 (AVX512-BF16 or AMX); torch emulates it"
        rows.append(Row(name, "bf16 autocast forward", "none", np.nan, np.nan, None, None, note))
    return rows


def run_benchmarks(
    backbones: list[str], repeats: int = 5, output: str | Path | None = None, progress: bool = True
) -> tuple[pd.DataFrame, Path]:
    """Every benchmark row for ``backbones``, written to ``results/benchmarks/<host-kind>.{csv,md}``."""
    rows: list[Row] = []
    roofline: dict[str, dict[str, float]] = {}
    for backbone in backbones:
        encoder_rows, figures = bench_encoder(backbone, repeats, progress)
        rows += encoder_rows
        roofline[backbone] = figures
        for tasks in (2, 5):
            rows += bench_decoder(backbone, tasks, slices=2, repeats=repeats, progress=progress)
    rows += bench_nnunet_step(repeats, progress=progress)
    # Emulated bf16 (no AVX512-BF16/AMX) runs a 4096² matmul for minutes and is no peak to compare with.
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16) if native_bf16() else np.nan}
    frame = pd.DataFrame([asdict(row) for row in rows])
    # The roofline of every step: its counted work per item over its time, against the matmul peaks.
    gflops_per_second = frame.gflop / frame.seconds
    frame["percent_of_fp32_peak"] = 100 * gflops_per_second / peaks["fp32"]
    frame["percent_of_bf16_peak"] = 100 * gflops_per_second / peaks["bf16"]
    folder = Path(output) if output else paths.REPO_ROOT / "results" / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    name = host_kind()
    frame.to_csv(folder / f"{name}.csv", index=False, float_format="%.5g")
    bf16_peak = f"{peaks['bf16']:.0f} GFLOP/s" if np.isfinite(peaks["bf16"]) else "not native on this CPU"
    flops = ", ".join(f"{b} {f['gflop_per_slice']:.1f} GFLOP/slice" for b, f in roofline.items())
    text = (
        f"<!-- generated by fewsam bench; do not edit -->\n\n# Benchmarks on {name}\n\n"
        f"{torch.get_num_threads()} torch threads; measured matmul peak (4096²): fp32 {peaks['fp32']:.0f} GFLOP/s, "
        f"bf16 {bf16_peak}; encoder work: {flops}. Candidates of one step are timed "
        f"interleaved in one process ({repeats} rounds after a warm-up); speed-up is against the step's first "
        f"row, measured in the same run.\n\n" + frame.to_markdown(index=False, floatfmt=".4g") + "\n"
    )
    (folder / f"{name}.md").write_text(text)
    if output is None:
        refresh_docs(folder)
    return frame, folder / f"{name}.md"


# --- accuracy of the encoder paths on the smoke runs -----------------------------------------------

ACCURACY_BAR = 0.005  # largest change of a mean IoU (per dataset, method, task, level) a default path may make
# The smoke runs that decode every scored slice from its embedding: SAM prompted by boxes and the
# few-shot decoder. (The within-volume track reuses both; its few-shot variant trains a location
# head for 600 steps, too long for a check run once per path.)
ACCURACY_METHODS = ("sam_prompting", "fewshot")


def accuracy_table(summary: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Mean IoUs of the ``ACCURACY_METHODS`` rows of a summary, one column per encoder path, each
    path's difference to torch-fp32-eager, and each path's largest |difference|."""
    from ..encoders.runtimes import TORCH_FP32_EAGER

    iou = summary[(summary.metric == "iou") & summary.method.isin(ACCURACY_METHODS)]
    table = iou.pivot_table(index=["dataset", "method", "task", "level"], columns="encoder_path", values="mean")
    others = [column for column in table.columns if column != TORCH_FP32_EAGER]
    for other in others:
        table[f"{other} - {TORCH_FP32_EAGER}"] = table[other] - table[TORCH_FP32_EAGER]
    worst = {other: float(table[f"{other} - {TORCH_FP32_EAGER}"].abs().max()) for other in others}
    return table.reset_index(), worst


def encoder_accuracy(scratch: str | Path, output: str | Path | None = None, progress: bool = True) -> Path:
    """The smoke profile's SAM runs once per CPU encoder path, into ``scratch`` (complete runs are kept),
    and each mean IoU against torch-fp32-eager: ``results/benchmarks/<host-kind>-encoder-accuracy.{csv,md}``."""
    import yaml

    from ..bench.evaluate import evaluate, planned_folder
    from ..bench.profiles import PROFILE_DIR, load_profile
    from ..bench.reproduce import is_complete
    from ..bench.runs import summarize
    from ..encoders.runtimes import ENCODER_PATHS, TORCH_FP32_EAGER

    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((PROFILE_DIR / "smoke.yaml").read_text())
    runnable = [p for p in ENCODER_PATHS.values() if "cpu" in p.devices and (native_bf16() or not p.needs_native_bf16)]
    for path in runnable:
        profile_file = scratch / f"smoke-{path.name}.yaml"
        profile_file.write_text(yaml.safe_dump({**raw, "encoder_path": path.name}, sort_keys=False))
        for run in load_profile(profile_file).runs():
            if run.method in ACCURACY_METHODS and not is_complete(planned_folder(run, scratch / "results")):
                evaluate(run, results_dir=scratch / "results", progress=progress)
    table, worst = accuracy_table(summarize(scratch / "results"))
    folder = Path(output) if output else paths.REPO_ROOT / "results" / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{host_kind()}-encoder-accuracy"
    table.to_csv(folder / f"{name}.csv", index=False, float_format="%.5g")
    verdicts = "; ".join(
        f"{other}: largest |change| {change:.4f} ({'within' if change <= ACCURACY_BAR else 'OUTSIDE'} the bar)"
        for other, change in worst.items()
    )
    text = (
        "<!-- generated by fewsam bench --accuracy; do not edit -->\n\n"
        f"# Encoder paths on the smoke runs, {host_kind()}\n\n"
        "Mean IoU of every SAM box and few-shot run of the smoke profile (slice and volume level), made once per "
        "encoder path "
        "(each path has cache entries of its own); the bar is a change of at most "
        f"{ACCURACY_BAR} against {TORCH_FP32_EAGER}. "
        f"{verdicts}.\n\n" + table.to_markdown(index=False, floatfmt=".4f") + "\n"
    )
    (folder / f"{name}.md").write_text(text)
    if output is None:
        refresh_docs(folder)
    return folder / f"{name}.md"


DOCS = paths.REPO_ROOT / "docs" / "performance.md"


def refresh_docs(folder: Path) -> None:
    """The generated block of ``docs/performance.md``: every committed benchmark table, by host kind."""
    from ..report.benchmark import replace_block

    tables = []
    for table in sorted(folder.glob("*.md")):
        body = table.read_text().split("\n", 2)[2].replace("# ", "### ", 1)
        tables.append(body.strip())
    DOCS.write_text(replace_block(DOCS.read_text(), "benchmarks", "\n\n".join(tables) + "\n"))
