"""Sweep ordering (jobs of one model back to back, each model loaded once) and dry runs, through the CLI."""

import pandas as pd
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from hydra_plugins.runner_sweeper.ordered_sweeper import ModelOrderedSweeper
from tests.conftest import run_cli


def test_model_axis_varies_slowest():
    overrides = OverridesParser.create().parse_overrides(
        ["scheduler=ddim,euler", "guidance=3,7", "model=tiny-sd,tiny-ddpm", "precision=fp32"])
    jobs = ModelOrderedSweeper.split_arguments(overrides, None)[0]
    assert [j[0] for j in jobs] == ["model=tiny-sd"] * 4 + ["model=tiny-ddpm"] * 4
    assert jobs[0] == ["model=tiny-sd", "precision=fp32", "scheduler=ddim", "guidance=3"]
    assert [j[2:] for j in jobs[:4]] == [["scheduler=ddim", "guidance=3"], ["scheduler=ddim", "guidance=7"],
                                         ["scheduler=euler", "guidance=3"], ["scheduler=euler", "guidance=7"]]


@pytest.mark.slow
def test_sweep_over_models_and_schedulers_loads_each_model_once(tmp_path):
    # the model axis comes last on the command line: Hydra's basic sweeper would alternate the models
    result = run_cli("-m", "scheduler=ddim,euler", "model=tiny-sd,tiny-ddpm", "steps=2", "sampling.progress=false",
                     "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(tmp_path / "sweep" / "results.parquet").sort_values("job_num")
    assert list(df["model"]) == ["tiny-sd", "tiny-sd", "tiny-ddpm", "tiny-ddpm"]
    assert list(df["scheduler"]) == ["ddim", "euler", "ddim", "euler"]
    assert list(df["model_cached"]) == [False, True, False, True]  # exactly two loads
    assert (df.loc[df["model_cached"], "time_load_s"] == 0).all()

    # a dry run of a bigger sweep over the same models: listed and estimated from those rows, nothing written
    before = sorted(p for p in tmp_path.rglob("*"))
    dry = run_cli("-m", "scheduler=ddim,euler,lms", "model=tiny-sd,tiny-ddpm", "steps=4", "seed=[0,1]", "dry_run=true",
                  "dry_run_results=sweep", "hydra.sweep.dir=dry", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert sorted(p for p in tmp_path.rglob("*")) == before
    lines = dry.stdout.strip().splitlines()
    assert lines[0].startswith("dry run: 6 job(s); nothing runs")
    jobs = [line.split() for line in lines[2:-1]]
    assert [j[0] for j in jobs] == ["0", "1", "2", "3", "4", "5"]
    assert all(j[1] == "2" and j[2] == "4" for j in jobs)  # 2 images, 4 steps each
    assert [j[4] for j in jobs] == ["model=tiny-sd"] * 3 + ["model=tiny-ddpm"] * 3
    estimates = [float(j[3]) for j in jobs]  # every job has history: same model, device and dtype
    assert all(e > 0 for e in estimates)
    assert estimates[0] > estimates[1]  # the first job of a model carries its load time
    assert lines[-1].startswith("total: 12 image(s), about ")


@pytest.mark.slow
def test_single_run_dry_run_writes_nothing(tmp_path):
    result = run_cli("dry_run=true", "seed=[1,2,3]", "steps=7", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "total: 3 image(s)" in result.stdout and "?" in result.stdout  # no earlier results here
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_dry_run_lists_bad_points_without_stopping(tmp_path):
    result = run_cli("-m", "steps=2,0", "dry_run=true", "dry_run_results=nowhere", "hydra.sweep.dir=dry", cwd=tmp_path)
    assert result.returncode == 2, result.stderr  # every point is listed, and the exit says the sweep is not ready
    assert "error: steps=0 is not allowed" in result.stdout
    assert not (tmp_path / "dry").exists()
