"""The embedding cache with the real MobileSAM encoder on real hippocampus slices."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_manifest

from fewsam_lib import paths
from fewsam_lib.bench import metrics
from fewsam_lib.cli import main
from fewsam_lib.encoders import cache as cache_module
from fewsam_lib.encoders import runtimes
from fewsam_lib.encoders.cache import EmbeddingCache
from fewsam_lib.encoders.runtimes import (
    TOLERANCE,
    TORCH_FP32_EAGER,
    default_encoder_path,
    get_encoder_path,
    openvino_folder,
)
from fewsam_lib.errors import FewsamError
from fewsam_lib.hardware import native_bf16

FP16_TOLERANCE = 1e-3  # embeddings are stored as float16 (measured max error ~2.4e-4)


@pytest.fixture
def cache(tmp_path, mobile_sam):
    return EmbeddingCache(mobile_sam, root=tmp_path / "cache")


def _refuse_to_load(monkeypatch):
    def load_backbone(*args, **kwargs):
        raise AssertionError("the encoder was needed although every slice should be cached")

    monkeypatch.setattr(cache_module, "load_backbone", load_backbone)


def test_second_pass_is_all_hits_without_loading_a_model(cache, mobile_sam, hippocampus_slices, monkeypatch):
    slices = hippocampus_slices[:2]
    first = cache.get_many(slices, progress=False)
    assert (cache.stats.hits, cache.stats.misses) == (0, 2)
    with torch.inference_mode():
        direct = mobile_sam.model.image_encoder(torch.stack([mobile_sam.prepare(s) for s in slices]))
    assert torch.allclose(first, direct, atol=FP16_TOLERANCE)

    _refuse_to_load(monkeypatch)
    again = EmbeddingCache("mobile_sam", root=cache.root)  # a new process would start like this
    second = again.get_many(slices, progress=False)
    assert (again.stats.hits, again.stats.misses, again.stats.corrupt) == (2, 0, 0)
    assert torch.equal(first, second)
    assert len(again.entries()) == 2


def test_edited_slice_misses(cache, hippocampus_slices):
    original = hippocampus_slices[0]
    cache.get(original)
    edited = original.copy()
    edited[10, 10] += 1.0
    assert original in cache and edited not in cache
    cache.get(edited)
    assert cache.stats.misses == 2 and cache.stats.hits == 0
    assert cache.key(original) != cache.key(edited)


def test_key_covers_backbone_and_preprocessing(tmp_path, hippocampus_slices):
    grey = hippocampus_slices[0]
    mobile = EmbeddingCache("mobile_sam", root=tmp_path)
    lite = EmbeddingCache("lite_medsam", root=tmp_path)
    assert mobile.key(grey) != lite.key(grey)
    assert mobile.key(grey) != mobile.key(grey.T.copy())  # same pixels, other shape


def test_openvino_fp32_matches_torch_fp32_within_its_tolerance(mobile_sam, hippocampus_slices, tmp_path):
    """The accuracy check of the fast fp32 path: OpenVINO fp32 against torch eager on real slices."""
    batch = torch.stack([mobile_sam.prepare(s) for s in hippocampus_slices[:2]])
    reference = get_encoder_path(TORCH_FP32_EAGER).build(mobile_sam, tmp_path)(batch)
    fast = get_encoder_path("openvino-fp32").build(mobile_sam, paths.converted_encoders_root())(batch)
    assert fast.shape == reference.shape == (2, 256, 64, 64)
    assert float((fast - reference).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("native", [False, True])
def test_the_default_path_is_openvino_fp32_on_every_cpu(native, monkeypatch):
    """openvino-bf16 is faster where bf16 is native but missed the smoke runs' accuracy bar."""
    monkeypatch.setattr(runtimes, "native_bf16", lambda: native)
    assert default_encoder_path("cpu") == "openvino-fp32" and default_encoder_path("cuda") == TORCH_FP32_EAGER


def test_a_bf16_path_is_refused_on_a_cpu_without_native_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(runtimes, "native_bf16", lambda: False)
    with pytest.raises(FewsamError, match="openvino-bf16 needs a CPU that computes bf16 natively.*use openvino-fp32"):
        EmbeddingCache("mobile_sam", root=tmp_path, encoder_path="openvino-bf16")


@pytest.mark.skipif(not native_bf16(), reason="this CPU does not compute bf16 natively (AVX512-BF16 or AMX)")
def test_openvino_bf16_keeps_the_embeddings_and_the_box_masks(mobile_sam, hippocampus, tmp_path):
    """bf16 changes the embeddings by ~1e-2 (measured max 0.02 for MobileSAM); what counts is the
    segmentation: SAM's box masks on real slices from bf16 embeddings against fp32 eager."""
    from fewsam_lib.data.volumes import load_case, normalise_intensity, take_slice
    from fewsam_lib.methods.prompting import bounding_box, box_prompt_tokens
    from fewsam_lib.methods.sam_decoding import decode_masks

    volume = load_case(hippocampus, hippocampus.case_ids("test")[0])
    grey, axis = normalise_intensity(volume.image, hippocampus.intensity), hippocampus.slice_axis
    indices = [i for i in range(grey.shape[axis]) if (take_slice(volume.label, axis, i) == 1).sum() > 20][:3]
    labels = {i: take_slice(volume.label, axis, i) for i in indices}
    batch = torch.stack([mobile_sam.prepare(take_slice(grey, axis, i)) for i in indices])
    reference = get_encoder_path(TORCH_FP32_EAGER).build(mobile_sam, tmp_path)(batch)
    fast = get_encoder_path("openvino-bf16").build(mobile_sam, paths.converted_encoders_root())(batch)
    cosine = torch.nn.functional.cosine_similarity(fast.flatten(1), reference.flatten(1)).min()
    assert cosine > 0.999
    model = mobile_sam.model
    for index, embeddings in zip(indices, zip(reference, fast)):
        box, shape = bounding_box(labels[index] == 1)[None], labels[index].shape
        masks = []
        for embedding in embeddings:
            with torch.inference_mode():
                sparse, dense = box_prompt_tokens(model, box, shape)
                logits, _ = decode_masks(model.mask_decoder, model, embedding, sparse, dense, shape)
            masks.append((logits[0, 0] > 0).numpy())
        overlap, _ = metrics.overlap(masks[0], masks[1])
        assert overlap > 0.97, f"slice {index}: box masks from bf16 and fp32 embeddings overlap {overlap:.3f}"


def test_the_converted_encoder_is_made_once_and_reused(mobile_sam, monkeypatch):
    get_encoder_path("openvino-fp32").build(mobile_sam, paths.converted_encoders_root())  # converts if missing
    assert (openvino_folder(mobile_sam, paths.converted_encoders_root()) / "encoder.xml").exists()

    def convert_again(*args):
        raise AssertionError("converted although a converted encoder was in place")

    monkeypatch.setattr(runtimes, "_convert", convert_again)
    get_encoder_path("openvino-fp32").build(mobile_sam, paths.converted_encoders_root())


def test_a_damaged_converted_encoder_is_converted_again(mobile_sam, hippocampus_slices, tmp_path, monkeypatch, caplog):
    good = openvino_folder(mobile_sam, paths.converted_encoders_root())
    get_encoder_path("openvino-fp32").build(mobile_sam, paths.converted_encoders_root())  # converts if missing
    damaged = openvino_folder(mobile_sam, tmp_path)
    shutil.copytree(good, damaged)
    (damaged / "encoder.bin").write_bytes((damaged / "encoder.bin").read_bytes()[:1000])  # truncated
    converted = []

    def convert(backbone, folder):  # a copy of the good conversion stands in for tracing again (~16 s)
        converted.append(folder)
        shutil.copytree(good, folder)

    monkeypatch.setattr(runtimes, "_convert", convert)
    batch = mobile_sam.prepare(hippocampus_slices[0])[None]
    embedding = get_encoder_path("openvino-fp32").build(mobile_sam, tmp_path)(batch)
    assert converted == [damaged] and "cannot be read" in caplog.text and str(damaged) in caplog.text
    assert embedding.shape == (1, 256, 64, 64)


def test_key_covers_the_encoder_path_and_keeps_the_keys_made_before_paths(tmp_path, hippocampus_slices):
    grey = hippocampus_slices[0]
    default = EmbeddingCache("mobile_sam", root=tmp_path)
    reference = EmbeddingCache("mobile_sam", root=tmp_path, encoder_path=TORCH_FP32_EAGER)
    assert default.encoder_path == "openvino-fp32" and default.key(grey) != reference.key(grey)
    # The key of torch-fp32-eager entries, as every cache before encoder paths computed it.
    spec = reference.spec
    prefix = {"backbone": spec.name, "checkpoint_sha256": spec.checkpoint.sha256, "preprocessing": spec.preprocessing()}
    digest = hashlib.sha256(json.dumps(prefix, sort_keys=True).encode())
    pixels = np.ascontiguousarray(grey, dtype=np.float32)
    digest.update(repr(pixels.shape).encode())
    digest.update(pixels.tobytes())
    assert reference.key(grey) == digest.hexdigest()
    assert reference.provenance()["encoder_path"] == TORCH_FP32_EAGER


def test_an_encoder_path_that_cannot_run_on_the_device_is_refused(tmp_path):
    with pytest.raises(FewsamError, match="openvino-fp32 runs on cpu, not cuda"):
        EmbeddingCache("mobile_sam", root=tmp_path, device="cuda", encoder_path="openvino-fp32")
    with pytest.raises(FewsamError, match="unknown encoder path 'onnx'"):
        EmbeddingCache("mobile_sam", root=tmp_path, encoder_path="onnx")


@pytest.mark.parametrize("damage", ["truncate", "flip payload byte", "garbage", "permuted shape"])
def test_damaged_entry_is_detected_and_recomputed(damage, cache, hippocampus_slices, caplog):
    grey = hippocampus_slices[1]
    reference = cache.get(grey)
    path = cache.path_for(cache.key(grey))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip payload byte":
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "permuted shape":  # same size, so only the shape can tell
        text = bytes(data).replace(b'"shape": [256, 64, 64]', b'"shape": [64, 256, 64]')
        assert text != bytes(data)
        path.write_bytes(text)
    else:
        path.write_bytes(b"not an embedding")
    recomputed = cache.get(grey)
    assert cache.stats.corrupt == 1 and cache.stats.misses == 2
    assert "damaged entry" in caplog.text and str(path) in caplog.text
    assert torch.allclose(recomputed, reference, atol=FP16_TOLERANCE)
    assert cache.get(grey) is not None and cache.stats.hits == 1  # the rewritten entry reads back


def test_interrupted_write_leaves_nothing(cache, hippocampus_slices, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.get(hippocampus_slices[2])
    assert cache.entries() == [] and cache.leftover_partials() == []


def test_killed_writer_leaves_no_entry(tmp_path, hippocampus_slices):
    """A process killed mid-write (no cleanup runs) leaves at most an ignored partial file."""
    grey_path = tmp_path / "slice.npy"
    np.save(grey_path, hippocampus_slices[3])
    script = textwrap.dedent(f"""
        import os, numpy as np, torch
        from fewsam_lib.encoders.cache import EmbeddingCache
        cache = EmbeddingCache("mobile_sam", root=r"{tmp_path / "cache"}")
        grey = np.load(r"{grey_path}")
        os.fsync = lambda fd: os._exit(9)   # die after the bytes are written, before the rename
        cache._write(cache.key(grey), torch.zeros(256, 64, 64, dtype=torch.float16), grey.shape)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    cache = EmbeddingCache("mobile_sam", root=tmp_path / "cache")
    assert cache.entries() == [] and len(cache.leftover_partials()) == 1
    assert hippocampus_slices[3] not in cache


def test_identical_slices_in_one_call_are_encoded_once(cache, hippocampus_slices):
    grey = hippocampus_slices[0]
    embeddings = cache.get_many([grey, grey.copy(), grey], progress=False)
    assert cache.stats.misses == 1 and len(cache.entries()) == 1
    assert torch.equal(embeddings[0], embeddings[2])


def test_embed_command_fills_then_only_hits(tmp_path, hippocampus, capsys):
    """``fewsam embed`` on a real case cut to three axial slices: a rerun encodes nothing."""
    case = hippocampus.case(hippocampus.case_ids("test")[0])
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for source, folder in ((case.image, "images"), (case.label, "labels")):
        volume = nib.load(source)
        middle = volume.shape[2] // 2
        cropped = np.asarray(volume.dataobj)[:, :, middle - 1 : middle + 2]
        nib.save(nib.Nifti1Image(cropped, volume.affine, volume.header), root / folder / source.name)
    manifest = write_manifest(tmp_path / "three_slices.yaml", root, [case.case_id, case.case_id])
    command = [
        "embed",
        str(manifest),
        "--backbone",
        "lite_medsam",
        "--split",
        "test",
        "--cache",
        str(tmp_path / "cache"),
        "--quiet",
    ]
    assert main(command) == 0
    assert "3 slices" in (out := capsys.readouterr().out) and "0 hits, 3 misses" in out
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "3 hits, 0 misses" in out and "nothing to encode" in out
