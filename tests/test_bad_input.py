"""Bad input on the real CLI: one line naming the file or option and the problem, before any
expensive work, and nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from conftest import HIPPOCAMPUS_MANIFEST, write_manifest

from fewsam_lib.cli import main


def _fails(capsys, arguments: list[str], *expected: str) -> str:
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    for text in expected:
        assert text in error
    return error


@pytest.mark.parametrize("key, where", [("modalty", None), ("uper", "intensity")])
def test_an_unknown_manifest_key_is_refused_by_validate(mini_dataset, tmp_path, capsys, key, where):
    root, case_ids = mini_dataset
    path = write_manifest(tmp_path / "mini.yaml", root, case_ids)
    raw = yaml.safe_load(path.read_text())
    (raw[where] if where else raw)[key] = 1
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", "--quiet", str(path)]) == 1
    assert f"unknown key '{key}'" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command",
    [
        ["validate", "{}"],
        ["embed", "{}", "--backbone", "mobile_sam"],
        ["run", "prompting", "{}", "--backbone", "mobile_sam", "--no-notebook"],
    ],
)
def test_a_manifest_path_that_is_a_folder_is_one_line(tmp_path, capsys, command):
    assert main([part.format(tmp_path) for part in command]) in (1, 2)
    captured = capsys.readouterr()
    assert "is a folder, not a manifest file" in captured.out + captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_segment_refuses_a_schedule_without_steps(tmp_path, capsys, steps):
    with pytest.raises(SystemExit) as exit_code:
        main(
            ["segment", "--query", "q.nii.gz", "--out", str(tmp_path / "o.nii.gz"), "--model", "m.pt", "--steps", steps]
        )
    assert exit_code.value.code == 2 and "--steps: must be at least 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_embed_refuses_a_negative_case_count(capsys):
    with pytest.raises(SystemExit):
        main(["embed", str(HIPPOCAMPUS_MANIFEST), "--backbone", "mobile_sam", "--cases", "-51"])
    assert "--cases: must be at least 1, got -51" in capsys.readouterr().err


def read_only(monkeypatch, folder):
    """``folder`` as a read-only mount looks to fewsam (permissions alone do not stop root, who runs CI)."""
    from fewsam_lib import paths

    real_access = os.access
    monkeypatch.setattr(
        paths.os,
        "access",
        lambda path, mode: False if Path(path) == folder and mode & os.W_OK else real_access(path, mode),
    )


def test_segment_output_problems_are_found_before_any_work(hippocampus, tmp_path, capsys, monkeypatch):
    query = str(hippocampus.case(hippocampus.case_ids("test")[0]).image)
    base = ["segment", "--query", query, "--model", str(tmp_path / "missing.pt")]
    _fails(capsys, [*base, "--out", str(tmp_path / "prediction")], "--out", "must end in .nii.gz or .nii")
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(monkeypatch, locked)
    _fails(capsys, [*base, "--out", str(locked / "out.nii.gz")], "--out", "is not writable")
    train = ["segment", "--query", query, "--support", query, "--support-labels", query]
    _fails(
        capsys,
        [*train, "--out", str(tmp_path / "o.nii.gz"), "--save-model", str(locked / "sub" / "m.pt")],
        "--save-model",
        "is not writable",
    )
    _fails(capsys, [*base, "--out", str(tmp_path / "out" / "o.nii.gz")], "no such few-shot model file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked"]  # no partial file, no folder made


def test_a_device_the_machine_lacks_is_one_line(hippocampus, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    query = str(hippocampus.case(hippocampus.case_ids("test")[0]).image)
    _fails(
        capsys,
        ["segment", "--query", query, "--out", str(tmp_path / "o.nii.gz"), "--model", "m.pt", "--device", "cuda"],
        "--device cuda: no CUDA GPU",
    )
    _fails(
        capsys,
        [
            "run",
            "prompting",
            str(HIPPOCAMPUS_MANIFEST),
            "--backbone",
            "mobile_sam",
            "--no-notebook",
            "--device",
            "cuda:0",
            "--results",
            str(tmp_path / "r"),
        ],
        "no CUDA GPU",
    )
    assert not (tmp_path / "r").exists()


def test_a_cache_folder_that_is_a_file_or_read_only_is_one_line(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(monkeypatch, locked)
    _fails(
        capsys,
        ["embed", str(HIPPOCAMPUS_MANIFEST), "--backbone", "mobile_sam", "--cache", str(locked)],
        "embedding cache",
        "is not writable",
    )
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    _fails(
        capsys,
        [
            "embed",
            str(HIPPOCAMPUS_MANIFEST),
            "--backbone",
            "mobile_sam",
            "--cases",
            "1",
            "--cache",
            str(blocker / "inner"),
        ],
        "embedding cache",
        "is a file, not a folder",
    )


@pytest.mark.parametrize("every_case", [False, True])
def test_a_case_whose_label_volume_is_empty_is_named_by_validate(mini_dataset, tmp_path, capsys, every_case):
    import nibabel as nib
    import numpy as np

    root, case_ids = mini_dataset
    label_file = root / "labels" / f"{case_ids[0]}.nii.gz"
    label = nib.load(label_file)
    nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine, label.header), label_file)
    extra = {"every_case_shows_every_task": True} if every_case else {}
    path = write_manifest(tmp_path / "mini.yaml", root, case_ids, **extra)
    assert main(["validate", "--quiet", str(path)]) == (1 if every_case else 0)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if case_ids[0] in line)
    assert line.startswith("PROBLEM" if every_case else "WARNING") and "no labelled voxel at all" in line


def test_weights_verify_passes_without_the_optional_checkpoints_and_names_a_damaged_one(tmp_path, capsys, monkeypatch):
    import shutil

    from fewsam_lib.encoders.weights import installed_path

    for variable in ("FEWSAM_SAM_VIT_B_CHECKPOINT", "FEWSAM_SAM_VIT_L_CHECKPOINT", "FEWSAM_SAM_VIT_H_CHECKPOINT"):
        monkeypatch.delenv(variable, raising=False)
    folder = tmp_path / "weights"
    folder.mkdir()
    for name in ("mobile_sam", "lite_medsam"):
        shutil.copy(installed_path(name), folder / installed_path(name).name)
    monkeypatch.setenv("FEWSAM_WEIGHTS", str(folder))
    assert main(["weights", "verify"]) == 0
    assert "sam_vit_h: absent (optional)" in capsys.readouterr().out
    assert main(["weights", "verify", "sam_vit_b"]) == 1  # asked for by name: its absence fails
    capsys.readouterr()
    damaged = folder / installed_path("mobile_sam").name
    damaged.write_bytes(damaged.read_bytes()[:-10] + b"0123456789")
    assert main(["weights", "list"]) == 0
    listed = capsys.readouterr().out
    assert "mobile_sam   DAMAGED" in listed and "sha256 mismatch" in listed and "lite_medsam  verified" in listed
    assert main(["weights", "verify"]) == 1
