"""The W&B workspace built in code (runner/loggers/wandb_workspace.py), checked without network: the object is
built and validated by wandb-workspaces' own pydantic models, down to the view it would save."""

import subprocess
import sys

import pytest

from tests.conftest import fake_sweep

pytest.importorskip("wandb_workspaces.workspaces", reason="needs the workspaces extra (pip install -e '.[workspaces]')")


def panels_by_type(view: dict) -> dict[str, list[dict]]:
    found = {}
    for section in view["spec"]["section"]["panelBankConfig"]["sections"]:
        for panel in section["panels"]:
            found.setdefault(panel["viewType"], []).append(panel["config"])
    return found


def test_workspace_is_built_and_validated_by_the_librarys_models():
    from wandb_workspaces.workspaces import Workspace, internal

    from runner.loggers.wandb_workspace import build_workspace

    workspace = build_workspace("me", "diffusion-runner", "2026-12-01_10-00-00_123", ["prompt_adherence"], 12)
    assert isinstance(workspace, Workspace)
    # The view the library would upsert: its pydantic wire models build it, and validate it again from JSON.
    view = workspace._to_model()
    spec = internal.View.model_validate(view.model_dump(by_alias=True)).model_dump(by_alias=True, exclude_none=True)
    runset = spec["spec"]["section"]["runSets"][0]
    assert runset["grouping"] == [{"section": "config", "name": "scheduler.value.name"}]  # grouped by scheduler.name
    assert [(f["key"]["name"], f["value"]) for f in runset["filters"]["filters"]] == [
        ("group", "2026-12-01_10-00-00_123"), ("jobType", "job")]  # the sweep's job runs, not its summary run
    panels = panels_by_type(spec)
    (sigma,) = panels["Run History Line Plot"]
    assert (sigma["xAxis"], sigma["metrics"], sigma["yLogScale"]) == ("schedule/step", ["schedule/sigma"], True)
    assert panels["Media Browser"][0]["mediaKeys"] == ["images"]
    bars = {tuple(b["metrics"]): b["groupBy"] for b in panels["Bar Chart"]}
    assert bars == {("time_denoise_s",): "scheduler.value.name", ("images_per_s",): "scheduler.value.name",
                    ("prompt_adherence",): "scheduler.value.name"}
    (parallel,) = panels["Parallel Coordinates Plot"]
    assert [c["accessor"] for c in parallel["columns"]] == ["config:steps.value", "config:guidance.value",
                                                            "summary:time_denoise_s", "summary:prompt_adherence"]
    assert spec["spec"]["section"]["settings"]["maxRuns"] == 12  # every job of the sweep, not W&B's default 10


def run_workspace_cli(*args, cwd):
    import os

    return subprocess.run([sys.executable, "-m", "runner.wandb_workspace", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, WANDB_MODE="offline"))


def test_offline_it_prints_what_it_would_create(tmp_path):
    sweep = fake_sweep(tmp_path / "my-sweep")
    result = run_workspace_cli(sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("W&B is offline (or --dry-run): nothing saved. It would create:")
    assert "workspace 'sweep my-sweep' in <your entity>/diffusion-runner" in out
    assert "runs: Metric(\"Group\") == 'my-sweep' and Metric(\"JobType\") == 'job'" in out
    assert "grouped by: scheduler.name" in out
    assert "LinePlot 'sigma by step': x=schedule/step, y=['schedule/sigma'], log_y=True" in out
    assert "MediaBrowser 'images': media_keys=['images']" in out
    assert "columns=['steps', 'guidance', 'time_denoise_s']" in out  # the fake sweep has no quality metric


def test_a_path_that_is_no_sweep_is_one_line_and_exit_2(tmp_path):
    result = run_workspace_cli(tmp_path / "nope", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: sweep=") and len(result.stderr.strip().splitlines()) == 1
