"""``fewsam bench``'s machinery: interleaved timing, ratios within one run, and candidates that
compute what today's path computes."""

from __future__ import annotations

import pytest
import torch

from fewsam_lib.bench.speed import (
    accuracy_table,
    counted_flops,
    host_kind,
    interleaved,
    native_bf16,
    openvino_decoder,
    rows_of,
)
from fewsam_lib.methods.fewshot import decode
from fewsam_lib.methods.sam_decoding import decode_many


def test_candidates_run_in_turn_and_are_compared_with_the_first_in_the_same_run():
    calls = []

    def candidate(name, value):
        def run():
            calls.append(name)
            return torch.full((4,), value)

        return run

    candidates = {"today": candidate("today", 1.0), "same": candidate("same", 1.0), "other": candidate("other", -1.0)}
    times = interleaved(candidates, repeats=3, progress=False)
    assert calls == ["today", "same", "other"] * 4  # a warm-up round, then three interleaved rounds
    rows = rows_of("step", "toy", times, {name: run() for name, run in candidates.items()}, notes={"x": "y"})
    assert [row.candidate for row in rows] == ["today", "same", "other"] and rows[0].speedup == 1.0
    assert rows[1].cosine == 1.0 and rows[1].max_abs_diff == 0.0 and rows[2].cosine == -1.0
    assert host_kind().startswith(("cpu-", "gpu-")) and ("-bf16-" in host_kind()) == native_bf16()


def test_one_decoder_call_for_several_slices_gives_each_slice_s_own_logits(mobile_sam):
    model = mobile_sam.model
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(3, 256, 64, 64, generator=generator) * 0.1
    tokens = torch.randn(2, 1, 256, generator=generator)
    shapes = [(35, 51), (35, 51), (36, 50)]
    with torch.inference_mode():
        alone = [decode(model.mask_decoder, model, e, tokens, s) for e, s in zip(embeddings, shapes)]
        together, _ = decode_many(model.mask_decoder, model, embeddings, tokens.repeat(3, 1, 1), shapes)
    for one, batched in zip(alone, together):
        assert batched.shape == (2, 1, *one.shape[1:])
        torch.testing.assert_close(batched[:, 0], one, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(alone[0], alone[1])  # the slices' own embeddings made the difference


def test_the_openvino_decoder_candidate_computes_what_the_torch_decoder_computes(mobile_sam):
    model = mobile_sam.model
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(256, 64, 64, generator=generator) * 0.1
    tokens = torch.randn(2, 1, 256, generator=generator)
    with torch.inference_mode():
        reference = decode(model.mask_decoder, model, embedding, tokens, (35, 51))
        converted = decode(openvino_decoder(model, 2), model, embedding, tokens, (35, 51))
    assert converted.shape == reference.shape == (2, 35, 51)
    assert float((converted - reference).abs().max()) < 1e-3


def test_the_nnunet_step_is_timed_in_fp32_and_bf16_only_where_the_cpu_has_native_bf16():
    from fewsam_lib.bench.speed import bench_nnunet_step

    fp32, bf16 = bench_nnunet_step(repeats=1, batch=2, patch=(32, 32), progress=False)
    assert (fp32.candidate, fp32.speedup, fp32.seconds > 0) == ("fp32", 1.0, True)
    assert fp32.gflop > 0  # the step's work, counted on fp32 (the roofline)
    assert bf16.candidate == "bf16 autocast forward"
    if native_bf16():
        assert bf16.seconds > 0 and bf16.cosine > 0.99 and bf16.gflop == fp32.gflop
    else:
        assert bf16.note.startswith("skipped: this CPU has no native bf16")


def test_the_roofline_counts_a_step_s_work_forward_and_backward():
    layer = torch.nn.Linear(64, 32, bias=False)
    inputs = torch.randn(8, 64, requires_grad=True)
    forward = counted_flops(lambda: layer(inputs))
    assert forward == 2 * 8 * 64 * 32
    # backward: the gradients of the input and of the weight, one matrix product each
    assert counted_flops(lambda: layer(inputs).sum().backward()) == 3 * forward


def test_the_accuracy_table_compares_encoder_paths_of_the_sam_runs_only():
    """Runs without an image encoder (interpolation, nnU-Net) have no path; they once showed up as
    a nameless path that could never be within the bar."""
    import pandas as pd

    def row(method, path, mean, task="a"):
        return {"dataset": "d", "method": method, "task": task, "level": "slice", "metric": "iou",
                "encoder_path": path, "mean": mean}  # fmt: skip

    summary = pd.DataFrame(
        [
            row("sam_prompting", "torch-fp32-eager", 0.700),
            row("sam_prompting", "openvino-fp32", 0.701),
            row("sam_prompting", "openvino-bf16", 0.690),
            row("fewshot", "torch-fp32-eager", 0.500),
            row("fewshot", "openvino-fp32", 0.500),
            row("fewshot", "openvino-bf16", 0.530),
            row("within_volume", "", 0.900, task="b"),
        ]
    )
    table, worst = accuracy_table(summary)
    assert set(worst) == {"openvino-fp32", "openvino-bf16"}
    assert worst["openvino-fp32"] == pytest.approx(0.001) and worst["openvino-bf16"] == pytest.approx(0.030)
    assert set(table.method) == {"sam_prompting", "fewshot"} and "" not in table.columns
