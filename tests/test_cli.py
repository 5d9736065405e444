"""The CLI as users type it (subprocesses): the main job, the used-by sweep, experiments, refusals."""

import hashlib
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, SCHEDULER_OPTIONS, run_cli


@pytest.mark.slow
def test_main_job_writes_image_rows_schedule_and_config(tmp_path):
    result = run_cli(f"hydra.run.dir={tmp_path / 'run'}", "device=cpu", cwd=tmp_path)  # CPU columns asserted below
    assert result.returncode == 0, result.stderr
    job = tmp_path / "run"
    rows = pd.read_parquet(job / "rows.parquet")
    assert len(rows) == 1
    row = rows.iloc[0]
    assert (row.status, row.model, row.scheduler, row.seed, row.device, row.precision) == ("ok", "digits-sd", "default", 0, "cpu", "auto")
    png = job / row.image_path
    assert hashlib.sha256(png.read_bytes()).hexdigest() == row.image_sha256
    text = Image.open(png).text
    assert "Seed: 0" in text["parameters"] and "Steps: 20" in text["parameters"] and "Sampler: default" in text["parameters"]
    schedule = pd.read_csv(job / "schedule.csv")
    from diffusers import PNDMScheduler  # digits-sd's own scheduler (as SD 1.x's): PLMS calls the model 21 times in 20 steps

    reference = PNDMScheduler.from_pretrained(REPO / "runner/models/digits-sd", subfolder="scheduler")
    reference.set_timesteps(20)
    assert list(schedule.timestep) == [float(t) for t in reference.timesteps]
    assert list(schedule.columns[:3]) == ["step", "timestep", "sigma"]
    assert schedule.sigma.iloc[0] > schedule.sigma.iloc[-1] > 0  # noise decreases along the schedule
    assert "digits-sd" in (job / ".hydra" / "config.yaml").read_text()
    assert row.torch_version and row.diffusers_version and row.transformers_version and row.model_revision


@pytest.mark.slow
def test_used_by_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "scheduler=ddpm,unipc,lms", "guidance=3,7.5", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[3/6] scheduler=unipc guidance=3" in result.stdout + result.stderr
    table = pd.read_parquet(sweep / "results.parquet")
    assert len(table) == 6 and (table.status == "ok").all()
    assert set(zip(table.scheduler, table.guidance)) == {(s, g) for s in ("ddpm", "unipc", "lms") for g in (3.0, 7.5)}
    assert len(set(table.image_sha256)) == 6
    assert sorted(table.model_cached) == [False] + [True] * 5  # the model loads once per process
    for job in range(6):  # each job wrote its own rows and schedule
        assert len(pd.read_parquet(sweep / str(job) / "rows.parquet")) == 1
        assert (sweep / str(job) / "schedule.csv").is_file()
    assert len(pd.read_csv(sweep / "results.csv")) == 6
    # the default model's metric: guidance and scheduler change how well the image follows the prompt
    adherence = table.set_index(["scheduler", "guidance"])["prompt_adherence"]
    assert adherence.notna().all() and adherence.nunique() > 1
    assert adherence.groupby(level="guidance").mean().nunique() > 1
    assert adherence.groupby(level="scheduler").mean().nunique() > 1

    import runner.results

    loaded = runner.results.load(sweep)
    assert len(loaded) == 6 and set(loaded.sweep) == {"sweep"}
    assert all(p.startswith(str(sweep.resolve())) for p in loaded.image_path)


@pytest.mark.slow
def test_experiment_by_name(tmp_path):
    sweep = tmp_path / "ladder"
    result = run_cli("-m", "experiment=guidance_ladder", "seed=0", "steps=4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_parquet(sweep / "results.parquet")
    assert sorted(table.guidance) == [1, 2, 3, 5, 7.5, 10, 12]
    assert set(table.scheduler) == {"dpmpp_2m"}


@pytest.mark.slow
def test_bad_value_is_one_clear_line_and_writes_nothing(tmp_path):
    result = run_cli("guidance=-1", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: guidance=-1 is not allowed: a number >= 0 (<= 1 turns classifier-free guidance off)"]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_bad_value_in_a_sweep_fails_only_that_point(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "guidance=3,-1", "steps=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    table = pd.read_parquet(sweep / "results.parquet").sort_values("job_num")
    assert list(table.status) == ["ok", "failed"]
    assert table.error.iloc[1] == "guidance=-1 is not allowed: a number >= 0 (<= 1 turns classifier-free guidance off)"


def probe_cli(*flags):
    """`python -m runner FLAGS` run in a fresh interpreter: its stdout, then the heavy libraries it imported."""
    probe = (f"import runpy, sys; sys.argv = ['runner', *{list(flags)!r}]\n"
             "try:\n    runpy.run_module('runner', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('HEAVY:', sorted(m for m in ('torch', 'diffusers', 'transformers', 'wandb') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_cfg_imports_no_heavy_libraries():
    out = probe_cli("--cfg", "job")
    assert "prompt: a handwritten digit seven" in out and "HEAVY: []" in out


@pytest.mark.slow
def test_help_lists_every_group_with_its_options_and_imports_no_heavy_libraries():
    """README, Configuration: `python -m runner --help` lists the groups (and prints the config), in an instant."""
    out = probe_cli("--help")
    assert "prompt: a handwritten digit seven" in out and "HEAVY: []" in out
    listed = dict(line.split(": ", 1) for line in out.split("== Configuration groups ==")[1]
                  .split("== Config ==")[0].splitlines() if ": " in line)
    assert listed["scheduler"].split(", ") == sorted(SCHEDULER_OPTIONS)
    assert listed["precision"].split(", ") == ["auto", "bf16", "fp16", "fp32"]
    assert {"digits-sd", "digits-ddpm", "tiny-sd", "tiny-ddpm", "sd-v1-5"} <= set(listed["model"].split(", "))
    assert {"scheduler_shootout", "guidance_ladder", "steps_ladder"} <= set(listed["experiment"].split(", "))
    assert listed["sampling"] == "default"
