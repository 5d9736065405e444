import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import run_cli


def run_reproduce(*args, cwd):
    return subprocess.run([sys.executable, "-m", "runner.reproduce", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_reproduce_a_moved_sweep_from_elsewhere(small_sweep, tmp_path):
    moved = tmp_path / "archive" / "sweep"
    shutil.copytree(small_sweep, moved)  # results moved after the run: only paths inside the run are used
    (tmp_path / "cwd").mkdir()
    result = run_reproduce(moved, "--out", tmp_path / "again", cwd=tmp_path / "cwd")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("  identical images/") == 8
    assert "4/4 job(s) reproduced identically" in result.stdout and "warning" not in result.stdout
    new_rows = pd.read_parquet(tmp_path / "again" / "3" / "rows.parquet")
    old_rows = pd.read_parquet(small_sweep / "3" / "rows.parquet")
    assert list(new_rows["image_sha256"]) == list(old_rows["image_sha256"])
    assert list(new_rows["config_hash"]) == list(old_rows["config_hash"])


@pytest.mark.slow
def test_reproduce_reports_differences_and_environment(small_sweep, tmp_path):
    job = tmp_path / "job"
    shutil.copytree(small_sweep / "0", job)
    pixels = np.asarray(Image.open(job / "images" / "001_seed1.png")).copy()
    pixels[0, 0] = 255 - pixels[0, 0]  # one changed pixel in a saved image
    Image.fromarray(pixels).save(job / "images" / "001_seed1.png")
    rows = pd.read_parquet(job / "rows.parquet")
    rows["torch_version"] = "1.0.0"  # recorded by another install
    rows.to_parquet(job / "rows.parquet")

    result = run_reproduce(job, cwd=tmp_path)  # README: default out results/reproduce/<time>/ where it is run
    assert result.returncode == 1, result.stdout + result.stderr
    out, = (tmp_path / "results" / "reproduce").iterdir()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+", out.name)  # <time>_<pid>
    new_rows = pd.read_parquet(out / "rows.parquet")  # the redrawn images are the recorded ones, not the edited one
    assert list(new_rows["image_sha256"]) == list(rows["image_sha256"])
    assert all((out / p).is_file() for p in new_rows["image_path"])
    lines = result.stdout.splitlines()
    assert "  identical images/000_seed0.png" in "\n".join(lines)
    differs = next(line for line in lines if line.startswith("  DIFFERS images/001_seed1.png"))
    assert "max pixel difference" in differs and "PSNR" in differs
    assert "no longer matches the sha256 recorded" in differs
    assert any(line.startswith("  warning: torch_version was 1.0.0, now ") for line in lines)
    assert "0/1 job(s) reproduced identically" in result.stdout


@pytest.mark.slow
def test_reproduce_bad_path(tmp_path):
    result = run_reproduce(tmp_path / "missing", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: path={str(tmp_path / 'missing')!r} is not allowed: a job dir or a sweep dir"


@pytest.mark.slow
@pytest.mark.parametrize("path_form", ["absolute", "relative"])
def test_plain_hydra_reruns_a_saved_job_config(small_sweep, tmp_path, path_form):
    job = small_sweep / "1"
    saved = OmegaConf.load(job / ".hydra" / "config.yaml")
    assert saved.hydra.callbacks.sweep_results._target_ == "runner.callbacks.SweepResults"
    # as the README shows it: a path relative to where the user stands
    config_path = str(job / ".hydra") if path_form == "absolute" else os.path.relpath(job / ".hydra", tmp_path)
    result = run_cli("--config-path", config_path, "--config-name", "config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (new_job,) = (tmp_path / "results" / "runs").iterdir()  # our run dir, not Hydra's default outputs/
    new_rows, old_rows = pd.read_parquet(new_job / "rows.parquet"), pd.read_parquet(job / "rows.parquet")
    assert list(new_rows["image_sha256"]) == list(old_rows["image_sha256"])
    assert list(new_rows["config_hash"]) == list(old_rows["config_hash"])
    assert list(new_rows["config"]) == list(old_rows["config"])
    assert '"steps": 4' in old_rows["config"].iloc[0] and "${" not in old_rows["config"].iloc[0]  # resolved
    assert (new_job / ".hydra" / "config.yaml").read_text() == (job / ".hydra" / "config.yaml").read_text()
