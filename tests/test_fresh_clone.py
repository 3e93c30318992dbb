"""The main job on a fresh clone: after `make setup`, `make reproduce-list` needs no third command
(the OpenKBP conversion is a prerequisite) and, with every committed run complete, lists none."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import REPO


@pytest.mark.slow
def test_reproduce_list_on_a_fresh_clone_converts_the_data_and_lists_no_run(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)], check=True)
    (clone / ".venv").symlink_to(REPO / ".venv")  # `make setup`'s environment, not rebuilt here
    environment = {**os.environ, "PYTHONPATH": str(clone), "FEWSAM_CONVERTED": str(tmp_path / "converted")}
    environment.pop("MAKEFLAGS", None)
    # -o: take the installed environment as up to date (the clone's files are newer than its stamp).
    result = subprocess.run(
        ["make", "-o", ".venv/.fewsam-installed", "reproduce-list", "PROFILE=cpu"],
        cwd=clone,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "converted" / "openkbp_hn_ct" / "conversion.json").exists()
    listed = [line for line in result.stdout.splitlines() if line.startswith("fewsam run")]
    assert listed == [] and "the lines above are the ones not complete" in result.stdout
    assert "every run of profile cpu is complete" in result.stdout
