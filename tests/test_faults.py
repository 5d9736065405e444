"""Faults, bad input and scale, second round (issue 15): every case has its test here."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import compose_config, run_cli
from runner import embedded_model_path
from runner.checks import ConfigError
from runner.spec import make_spec


def one_error_line(result) -> str:
    """The single `error:` line a refused command prints (and nothing else on stderr)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


@pytest.fixture
def model_copy(tmp_path):
    target = tmp_path / "model"
    shutil.copytree(embedded_model_path("tiny-sd"), target)
    return target


# ------------------------------------------------------------------ 10. errors users meet: one line, exit 2

@pytest.mark.parametrize("override,expected", [
    ("scheduler=nosuch", "error: scheduler=nosuch is not allowed: one of ddim, ddpm, default,"),
    ("model=nosuch", "error: model=nosuch is not allowed: one of ddpm-cat-256, digits-ddpm, digits-sd,"),
    ("guidence=3", "error: guidence=3 is not allowed: guidence is not a config key (did you mean guidance?"),
])
def test_unknown_option_or_key_is_one_line_and_exit_2(override, expected, tmp_path):
    line = one_error_line(run_cli(override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path))
    assert line.startswith(expected)
    assert not (tmp_path / "run").exists()


def test_an_unknown_option_in_a_sweep_is_one_line_before_any_job(tmp_path):
    line = one_error_line(run_cli("-m", "scheduler=ddim,unpic", "steps=1", f"hydra.sweep.dir={tmp_path / 's'}",
                                  cwd=tmp_path))
    assert line.startswith("error: scheduler=unpic is not allowed: one of ") and line.endswith("(did you mean unipc?)")
    assert not list((tmp_path / "s").glob("*/rows.parquet"))


def test_an_added_top_level_key_the_runner_does_not_read_warns(tmp_path):
    result = run_cli("+guidence=3", "steps=0", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert "warning: +guidence is not a key the runner reads; it is only recorded in the config (did you mean " \
           "guidance?)" in result.stderr.splitlines()
    assert result.returncode == 2  # steps=0: refused after the warning


@pytest.mark.parametrize("content,problem", [("{not json", "is not valid JSON"), ("[1, 2]", "is not a JSON object")])
def test_an_invalid_model_index_is_reported_as_invalid_not_missing(model_copy, content, problem):
    (model_copy / "model_index.json").write_text(content)
    with pytest.raises(ConfigError, match=problem):
        make_spec(compose_config(f"model.name_or_path={model_copy}"))


# ------------------------------------------------------------------ 12. dry runs and empty sweeps

def test_a_dry_run_with_a_refused_value_exits_2(tmp_path):
    single = run_cli("steps=0", "dry_run=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert single.returncode == 2 and "error: steps=0 is not allowed" in single.stdout
    assert single.stderr.strip().splitlines()[-1].startswith("error: 1 of 1 job(s) would be refused")
    sweep = run_cli("-m", "steps=1,0", "dry_run=true", f"hydra.sweep.dir={tmp_path / 'dry'}", cwd=tmp_path)
    assert sweep.returncode == 2 and "error: 1 of 2 job(s) would be refused" in sweep.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "dry").exists()


@pytest.mark.parametrize("empty", ["seed=range(0,0)", "steps=range(5,1)"])
def test_an_empty_sweep_is_one_line_and_exit_2(empty, tmp_path):
    line = one_error_line(run_cli("-m", empty, "guidance=3,4", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path))
    assert line == f"error: {empty} is not allowed: a sweep over no values runs no job; give at least one value"
    assert not (tmp_path / "s").exists()
