"""Faults, bad input and scale, second round (issue 15): every case has its test here."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import compose_config, run_cli, small_disk
from runner.checks import ConfigError
from runner.spec import make_spec


def one_error_line(result) -> str:
    """The single `error:` line a refused command prints (and nothing else on stderr)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


# The overrides conftest's small_sweep was drawn with: tests here resume it (a copy), so they run it again.
SMALL_SWEEP = ("scheduler=ddim,euler_a", "steps=2,4", "seed=[0,1]", "sampling.progress=false", "device=cpu")


# ------------------------------------------------------------------ 10. errors users meet: one line, exit 2

@pytest.mark.slow
@pytest.mark.parametrize("override,expected", [
    ("scheduler=nosuch", "error: scheduler=nosuch is not allowed: one of ddim, ddpm, default,"),
    ("model=nosuch", "error: model=nosuch is not allowed: one of ddpm-cat-256, digits-ddpm, digits-flow, "
                      "digits-sd,"),
    ("precision=nosuch", "error: precision=nosuch is not allowed: one of auto, bf16, fp16, fp32"),
    ("guidence=3", "error: guidence=3 is not allowed: guidence is not a config key (did you mean guidance?"),
])
def test_unknown_option_or_key_is_one_line_and_exit_2(override, expected, tmp_path):
    line = one_error_line(run_cli(override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path))
    assert line.startswith(expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_unknown_option_in_a_sweep_is_one_line_before_any_job(tmp_path):
    line = one_error_line(run_cli("-m", "scheduler=ddim,unpic", "steps=2", f"hydra.sweep.dir={tmp_path / 's'}",
                                  cwd=tmp_path))
    assert line.startswith("error: scheduler=unpic is not allowed: one of ") and line.endswith("(did you mean unipc?)")
    assert not list((tmp_path / "s").glob("*/rows.parquet"))


@pytest.mark.slow
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

@pytest.mark.slow
def test_a_dry_run_with_a_refused_value_exits_2(tmp_path):
    # (a sweep's dry run with refused values: test_a_dry_run_checks_each_point_as_hydra_composes_it)
    single = run_cli("steps=0", "dry_run=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert single.returncode == 2 and "error: steps=0 is not allowed" in single.stdout
    assert single.stderr.strip().splitlines()[-1].startswith("error: 1 of 1 job(s) would be refused")
    basic = run_cli("-m", "hydra/sweeper=basic", "steps=2,0", "dry_run=true", f"hydra.sweep.dir={tmp_path / 'dry'}",
                    cwd=tmp_path)  # Hydra's own sweeper launches the dry run job by job
    assert basic.returncode == 2 and "error: 1 of 1 job(s) would be refused" in basic.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "dry").exists()


@pytest.mark.slow
@pytest.mark.parametrize("empty", ["seed=range(0,0)", "steps=range(5,1)"])
def test_an_empty_sweep_is_one_line_and_exit_2(empty, tmp_path):
    line = one_error_line(run_cli("-m", empty, "guidance=3,4", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path))
    assert line == f"error: {empty} is not allowed: a sweep over no values runs no job; give at least one value"
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------ 1. one bad point never stops the sweep's table

def corrupt_model(model_dir: Path, case: str) -> None:
    """A model dir broken in one of the ways a careless copy or a hostile file breaks it."""
    if case == "model_index is a list":
        (model_dir / "model_index.json").write_text("[1, 2]")
    elif case == "unet config without sample_size":
        config = json.loads((model_dir / "unet" / "config.json").read_text())
        del config["sample_size"]
        (model_dir / "unet" / "config.json").write_text(json.dumps(config))
    else:  # a safetensors header that is valid JSON but not an object, or with string offsets
        weights = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
        header = b"[1, 2, 3]" if case == "safetensors header is a list" else \
            b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "x"]}}'
        weights.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)


MODEL_FAULTS = ["model_index is a list", "unet config without sample_size", "safetensors header is a list",
                "safetensors offsets are strings"]


@pytest.mark.slow
@pytest.mark.parametrize("case", MODEL_FAULTS)
def test_a_broken_model_dir_is_one_line_for_a_run(case, model_copy, tmp_path):
    corrupt_model(model_copy, case)
    line = one_error_line(run_cli(f"model.name_or_path={model_copy}", f"hydra.run.dir={tmp_path / 'run'}",
                                  cwd=tmp_path))
    assert line.startswith(f"error: model.name_or_path={str(model_copy)!r} is not allowed: ")
    assert not (tmp_path / "run").exists()


BAD_POINTS = [("seed", "18446744073709551616"), ("steps", "18446744073709551616"), ("height", str(2**63)),
              ("width", str(2**64))]


@pytest.mark.slow
@pytest.mark.parametrize("key,value", BAD_POINTS)
def test_a_huge_value_is_one_line_for_a_run(key, value, tmp_path):
    line = one_error_line(run_cli(f"{key}={value}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path))
    assert line.startswith(f"error: {key}={value} is not allowed: ")


@pytest.mark.slow
def test_every_bad_point_becomes_its_failed_row_and_the_table_is_still_written(model_copy, tmp_path):
    broken = []
    for case in MODEL_FAULTS:
        broken.append(tmp_path / case.replace(" ", "_"))
        shutil.copytree(model_copy, broken[-1])
        corrupt_model(broken[-1], case)
    sweep = tmp_path / "sweep"
    models = [str(model_copy), *map(str, broken)]
    result = run_cli("-m", "steps=2", "seed=0,18446744073709551616", f"model.name_or_path={','.join(models)}",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    table = pd.read_parquet(sweep / "results.parquet")
    assert len(table) == 10  # 5 models x 2 seeds: every point has its row
    assert list(table[table.status == "ok"].model_name_or_path) == [str(model_copy)]
    assert (sweep / "grid.png").is_file() and (sweep / "results.csv").is_file()
    for directory in broken:
        assert table[(table.model_name_or_path == str(directory)) & (table.seed == "0")].error.iloc[0].startswith(
            f"model.name_or_path={str(directory)!r} is not allowed: ")
    huge_seed = table[table.seed == "18446744073709551616"]
    assert len(huge_seed) == 5 and all(e.startswith("seed=18446744073709551616 is not allowed") for e in huge_seed.error)
    summary = [line for line in result.stdout.splitlines() if "  failed: " in line]  # the failure summary
    assert len(summary) == 9 and sum(": seed=18446744073709551616 is not allowed" in line for line in summary) == 5


@pytest.mark.slow
def test_huge_steps_and_sizes_fail_only_their_points(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "model=tiny-sd", f"steps=2,{2**64}", f"height=64,{2**63}", f"width=64,{2**64}",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    table = pd.read_parquet(sweep / "results.parquet")
    assert len(table) == 8 and (table.status == "ok").sum() == 1
    assert {e.split(" is not allowed")[0] for e in table[table.status != "ok"].error} == {
        f"steps={2**64}", f"height={2**63}", f"width={2**64}"}


# (a truncated rows file is redrawn on resume: test_a_resume_redraws_a_truncated_rows_file_and_writes_each_missing_...)


@pytest.mark.slow
def test_an_exception_outside_the_drawing_fails_only_its_point(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "model=tiny-sd", "steps=2", "seed=0,1,${oc.env:RUNNER_NO_SUCH_VARIABLE}",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={"RUNNER_FAULT": "1:crash"})
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert "raised" not in result.stderr  # no callback stumbled on the unresolvable override (Hydra warns then)
    assert (sweep / "sweep.json").is_file()
    table = pd.read_parquet(sweep / "results.parquet").sort_values("job_num")
    assert list(table.status) == ["ok", "failed", "failed"]
    assert table.error.iloc[1] == "RuntimeError: crash injected by RUNNER_FAULT"
    assert "crash injected" in (sweep / "1" / "error.txt").read_text()  # the traceback
    assert table.error.iloc[2].startswith("seed='${oc.env:RUNNER_NO_SUCH_VARIABLE}' is not allowed: it does not resolve")
    single = run_cli("seed=${oc.env:RUNNER_NO_SUCH_VARIABLE}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert one_error_line(single).startswith("error: seed='${oc.env:RUNNER_NO_SUCH_VARIABLE}' is not allowed: it does not resolve")


# ------------------------------------------------------------------ 4. NaN images are failed points, not ok

@pytest.mark.parametrize("override,key", [
    ("guidance=inf", "guidance"), ("guidance=1e30", "guidance"), ("guidance=nan", "guidance"),
    ("sampling.eta=inf", "sampling.eta"), ("sampling.eta=5", "sampling.eta"), ("strength=inf", "strength"),
    ("+scheduler.kwargs.beta_start=-inf", "scheduler.kwargs.beta_start"), ("shift=inf", "shift"),
])
def test_non_finite_and_absurd_numbers_are_refused(override, key):
    model = "model=tiny-sd3" if key == "shift" else "model=tiny-sd"
    with pytest.raises(ConfigError, match=rf"^{key}=.* is not allowed: "):
        make_spec(compose_config(model, override))


def test_non_finite_latents_fail_the_point_with_no_image(model_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("conv_out.bias"))
    tensors[name] = tensors[name] * float("nan")  # a broken checkpoint: the UNet's output is NaN
    save_file(tensors, weights)
    from conftest import run_job_in

    rows = run_job_in(tmp_path / "job", f"model.name_or_path={model_copy}", "steps=2")
    assert rows[0]["status"] == "failed" and "not finite (NaN or inf)" in rows[0]["error"]
    assert not list((tmp_path / "job").rglob("*.png"))


# ------------------------------------------------------------------ 13. image size within a pixel budget

@pytest.mark.slow
def test_an_image_too_large_for_memory_is_refused_before_loading(tmp_path):
    from runner.spec import MAX_PIXELS

    line = one_error_line(run_cli("height=100000", "width=100000", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path))
    assert line.startswith("error: height=100000 is not allowed: ") and "at most 16384" in line
    with pytest.raises(ConfigError, match=rf"^height x width=8192x4096 is not allowed: at most {MAX_PIXELS} pixels"):
        make_spec(compose_config("model=tiny-sd", "height=8192", "width=4096"))
    assert make_spec(compose_config("model=tiny-sd", "height=4096", "width=4096")).height == 4096


# ------------------------------------------------------------------ 3. a refusal or dry run removes only its own

def tree(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in sorted(directory.rglob("*"))}


@pytest.mark.slow
def test_a_refused_run_in_a_used_dir_removes_only_what_it_wrote(tmp_path):
    work = tmp_path / "D"
    (work / ".hydra").mkdir(parents=True)
    (work / "important.log").write_text("x\n")
    before = tree(work)
    result = run_cli("steps=0", "hydra.run.dir=.", cwd=work)
    assert result.returncode == 2
    assert tree(work) == before


@pytest.mark.slow
def test_dry_runs_leave_finished_jobs_reproducible(small_sweep, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(small_sweep, sweep)
    before = tree(sweep)
    single = run_cli("dry_run=true", f"hydra.run.dir={sweep / '0'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    basic = run_cli("-m", "hydra/sweeper=basic", "scheduler=ddim,euler_a", "steps=2,4", "seed=[0,1]",
                    "sampling.progress=false", "dry_run=true", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert basic.returncode == 0, basic.stderr
    assert tree(sweep) == before  # .hydra/ files, logs, multirun.yaml and the table all as they were


# ------------------------------------------------------------------ 5, 6. reproduce redraws, in a fresh place

def run_reproduce(*args, cwd, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "runner.reproduce", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, **(env or {})))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["a copy of the job", "the job itself", "inside the job"])
def test_reproduce_refuses_an_out_dir_that_is_not_fresh(where, small_sweep, tmp_path):
    job = tmp_path / "job"
    shutil.copytree(small_sweep / "0", job)
    out = {"a copy of the job": tmp_path / "out", "the job itself": job, "inside the job": job / "again"}[where]
    if where == "a copy of the job":
        shutil.copytree(job, out)  # matching images already there: kept, they would say "identical" unseen
    before = tree(tmp_path)
    line = one_error_line(run_reproduce(job, "--out", out, cwd=tmp_path))
    assert line.startswith(f"error: --out={str(out)!r} is not allowed: ")
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_reproduce_goes_on_past_a_job_it_cannot_rerun_and_redraws_the_rest_as_they_were_recorded(small_sweep,
                                                                                                 tmp_path):
    """One reproduce of one sweep (each process costs seconds of imports), a job per case: one whose config does not
    load (0) or fails today's check (1) is one line and the next job goes on; a job is redrawn on the CPU thread
    count it recorded, not this process's (2), and never with a value read from this machine's environment: the
    value the job recorded (2), or the job is refused when it recorded none (3)."""
    sweep = tmp_path / "sweep"
    shutil.copytree(small_sweep, sweep)
    (sweep / "0" / ".hydra" / "config.yaml").write_text("steps: [unclosed\n")
    config = (sweep / "1" / ".hydra" / "config.yaml").read_text()
    (sweep / "1" / ".hydra" / "config.yaml").write_text(config.replace("steps: 4", "steps: 0"))
    # a results tree from elsewhere, whose config would read the reproducing user's secret
    config = (sweep / "2" / ".hydra" / "config.yaml").read_text()
    assert "\nprompt: a handwritten digit seven\n" in config
    (sweep / "2" / ".hydra" / "config.yaml").write_text(
        config.replace("\nprompt: a handwritten digit seven\n", "\nprompt: ${oc.env:AWS_SECRET_ACCESS_KEY}\n"))
    config = (sweep / "3" / ".hydra" / "config.yaml").read_text()
    (sweep / "3" / ".hydra" / "config.yaml").write_text(config + "extra: ${oc.env:AWS_SECRET_ACCESS_KEY}\n")
    [threads] = set(pd.read_parquet(sweep / "2" / "rows.parquet").cpu_threads)
    other_threads = 1 if threads > 1 else 2  # reproduce's own count, not job 2's (torch takes at most the cores)
    out = tmp_path / "out"
    result = run_reproduce(sweep, "--out", out, cwd=tmp_path,
                           env={"AWS_SECRET_ACCESS_KEY": "aws0secret0sentinel", "OMP_NUM_THREADS": str(other_threads)})
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"{sweep / '0'}: could not be re-run: ") for line in lines)
    assert "  could not be re-run: steps=0 is not allowed: an integer >= 1, at most 10000" in lines
    assert sum(line.startswith("  identical images/") for line in lines) == 2  # job 2 still ran, and drew alike
    assert f"{sweep / '3'}: could not be re-run: extra='${{oc.env:AWS_SECRET_ACCESS_KEY}}' is not allowed: a value " \
           "written out" in result.stdout
    assert not (out / "3").exists()
    assert lines[-1] == "1/4 job(s) reproduced identically"
    assert "warning: cpu_threads" not in result.stdout
    assert list(pd.read_parquet(out / "2" / "rows.parquet").cpu_threads) == [threads, threads]
    for path in (p for p in out.rglob("*") if p.is_file()):
        assert b"aws0secret0sentinel" not in path.read_bytes(), path
    assert '"prompt": "a handwritten digit seven"' in (out / "2" / "images" / "000_seed0.png").read_bytes().decode(
        "latin-1")  # drawn with the prompt the job recorded


def test_reproduce_warns_when_the_thread_count_differs():
    from runner.reproduce import environment_warnings

    assert environment_warnings([{"cpu_threads": 1}], [{"cpu_threads": 2}]) == ["warning: cpu_threads was 1, now 2"]


# ------------------------------------------------------------------ 8. secrets typed into the config

TYPED_SECRETS = ("hunter2sentinel", "hf_typedsentinel0", "hf_typedsentinel1")


@pytest.mark.slow
def test_typed_secrets_reach_no_file_log_or_wandb_run(tmp_path):
    from wandb_records import read_run

    sweep = tmp_path / "sweep"
    result = run_cli("-m", "model=tiny-sd", "steps=2", f"+db_password={TYPED_SECRETS[0]}",
                     f"+model.hf_token={TYPED_SECRETS[1]},{TYPED_SECRETS[2]}", "wandb.mode=offline",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={"WANDB_MODE": None})
    assert result.returncode == 0, result.stderr
    files = [p for p in sweep.rglob("*") if p.is_file()]
    assert {"results.csv", "results.parquet", "runner.log", "rows.parquet", "overrides.yaml", "multirun.yaml"} <= {
        p.name for p in files}
    for path in files:
        for secret in TYPED_SECRETS:
            assert secret.encode() not in path.read_bytes(), f"{secret} leaked into {path}"
    for secret in TYPED_SECRETS:
        assert secret not in result.stdout + result.stderr
    table = pd.read_parquet(sweep / "results.parquet")
    assert sorted(table.name) == ["+model.hf_token=***", "+model.hf_token=***"]
    assert all('"db_password": "***"' in c and '"hf_token": "***"' in c for c in table.config)
    names = {read_run(d)["run"].display_name for d in (sweep / "wandb").glob("offline-run-*")}
    assert names == {"+model.hf_token=***", "sweep-summary"}
    assert len(set(table.config_hash)) == 1  # a secret never changes an image: both points hash the same


@pytest.mark.slow
def test_hydras_own_sweeper_leaves_no_typed_secret_in_multirun_yaml(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "hydra/sweeper=basic", "model=tiny-sd", "steps=2", f"+db_password={TYPED_SECRETS[0]}",
                     "wandb.mode=disabled", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "db_password: '***'" in (sweep / "multirun.yaml").read_text()
    for path in (p for p in sweep.rglob("*") if p.is_file()):
        assert TYPED_SECRETS[0].encode() not in path.read_bytes(), f"the secret leaked into {path}"


# (reproduce never reads the environment into new files: test_reproduce_goes_on_past_a_job_it_cannot_rerun_...)


# ------------------------------------------------------------------ 2. a sweep dir holds one sweep (or appended ones)

@pytest.mark.slow
def test_a_different_sweep_into_a_used_dir_is_refused_unless_appended(small_sweep, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(small_sweep, sweep)  # the first sweep: 4 jobs of 2 images
    before = tree(sweep)
    other = ("-m", "model=tiny-sd", "steps=2", "scheduler=lms", f"hydra.sweep.dir={sweep}")
    line = one_error_line(run_cli(*other, cwd=tmp_path))
    assert line == (f"error: hydra.sweep.dir={str(sweep)!r} is not allowed: it holds another sweep (scheduler=ddim,"
                    "euler_a steps=2,4 seed=[0,1] device=cpu); resume with the same overrides, use a new dir, or add "
                    "+append=true to add this sweep to it")
    assert tree(sweep) == before  # nothing written

    appended = run_cli(*other, "+append=true", cwd=tmp_path)
    assert appended.returncode == 0, appended.stderr
    assert "[1/1] model=tiny-sd steps=2 scheduler=lms" in appended.stdout
    assert all(tree(sweep)[k] == v for k, v in before.items() if k.startswith(("0/", "1/", "2/", "3/")))  # untouched
    table = pd.read_parquet(sweep / "results.parquet").sort_values("job_num")
    assert list(zip(table.job_num, table.scheduler)) == [(0, "ddim")] * 2 + [(1, "ddim")] * 2 + [(2, "euler_a")] * 2 \
        + [(3, "euler_a")] * 2 + [(4, "lms")]

    again = run_cli(*other, "+append=true", cwd=tmp_path)  # the appended sweep again: a resume, not a third sweep
    assert again.returncode == 0 and "already done" in again.stdout and not (sweep / "5").exists()
    resumed = run_cli("-m", *SMALL_SWEEP, f"hydra.sweep.dir={sweep}", "wandb.mode=disabled",
                      cwd=tmp_path)  # the first sweep again, with a setting that draws alike
    assert resumed.returncode == 0 and resumed.stdout.count("already done") == 4
    assert len(pd.read_parquet(sweep / "results.parquet")) == 9


@pytest.mark.slow
def test_a_live_sweep_holds_its_dir(tmp_path):
    import fcntl

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    with open(sweep / ".sweep.lock", "w") as held:  # as a sweep running in another process holds it
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        line = one_error_line(run_cli("-m", "model=tiny-sd", "steps=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path))
    assert line == (f"error: hydra.sweep.dir={str(sweep)!r} is not allowed: another sweep (pid 4242) is running in "
                    "it; wait for it to end, or use another dir")
    assert [p.name for p in sweep.iterdir()] == [".sweep.lock"]


@pytest.mark.slow
def test_a_parent_dir_as_sweep_dir_gathers_only_this_sweeps_jobs(tmp_path):
    from runner.record import write_table

    parent = tmp_path / "results"
    for job in ("sweeps/old/0", "sweeps/old/1", "runs/r1"):  # a results tree's earlier rows
        write_table(parent / job / "rows.parquet", [dict(model="earlier", status="ok", job_num=0, sweep_dir="")])
    line = one_error_line(run_cli("-m", "model=tiny-sd", "steps=2", f"hydra.sweep.dir={parent}", cwd=tmp_path))
    assert "it holds files that are not a sweep" in line
    result = run_cli("-m", "model=tiny-sd", "steps=2", f"hydra.sweep.dir={parent}", "+append=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_parquet(parent / "results.parquet")
    assert len(table) == 1 and list(table.model) == ["tiny-sd"]


# ------------------------------------------------------------------ 11. Ctrl-C: one line, exit 130, resumable

@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["hydra/launcher=basic", "hydra/launcher=gpus"])
def test_ctrl_c_is_one_line_exit_130_and_the_printed_command_resumes(launcher, tmp_path):
    import os
    import shlex
    import signal
    import subprocess
    import sys
    import time

    sweep = tmp_path / "sweep"
    args = ["-m", launcher, "model=tiny-sd", "scheduler=ddim,euler,lms", "steps=40", "seed=[0,1]",
            f"hydra.sweep.dir={sweep}"]
    process = subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.time() + 240
    while time.time() < deadline and not (sweep / "0" / "rows.parquet").is_file():
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr and "leaked" not in stderr  # (no resource-tracker warnings either)
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and " of 3 point(s) done; resume with: python -m runner " in last
    done = int(last.split()[1])
    assert done >= 1 and len(list(sweep.glob("*/rows.parquet"))) == done
    resume = shlex.split(last.split("resume with: ", 1)[1])
    assert resume[:3] == ["python", "-m", "runner"]
    resumed = run_cli(*resume[3:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    table = pd.read_parquet(sweep / "results.parquet")
    assert len(table) == 6 and (table.status == "ok").all()


# ------------------------------------------------------------------ 14. a dry run at scale streams its lines

@pytest.mark.slow
def test_a_dry_run_checks_each_point_as_hydra_composes_it(tmp_path):
    # group choices (model), values (steps, seed) and an added key, swept: each job's config must be its own
    result = run_cli("-m", "model=tiny-sd,digits-ddpm", "steps=3,0", "seed=[0,1],[2]",
                     "+scheduler.kwargs.clip_sample=true,false", "dry_run=true", "dry_run_results=nowhere",
                     f"hydra.sweep.dir={tmp_path / 'dry'}", cwd=tmp_path)
    assert result.returncode == 2 and "error: 8 of 16 job(s) would be refused" in result.stderr  # the steps=0 points
    jobs = [line.split() for line in result.stdout.splitlines()[2:-1]]
    assert len(jobs) == 16
    ok = [j for j in jobs if "error:" not in j]
    assert [(j[1], j[2]) for j in ok] == [("2", "3"), ("2", "3"), ("1", "3"), ("1", "3")] * 2
    assert sum("steps=0" in " ".join(j) and "error: steps=0 is not allowed" in " ".join(j) for j in jobs) == 8
    assert [j[4] for j in jobs] == ["model=tiny-sd"] * 8 + ["model=digits-ddpm"] * 8
    assert not (tmp_path / "dry").exists()


def test_a_dry_run_prints_each_point_before_it_checks_the_next():
    from runner.dry_run import report_lines

    def configs():  # as the sweeper hands them over: the next one is composed only when asked for
        yield compose_config("model=tiny-sd", "steps=3")
        raise RuntimeError("the second config was asked for before the first line was out")

    lines = report_lines([["steps=3"], ["steps=4"]], configs(), "nowhere", {})
    assert [next(lines) for _ in range(3)][2].split()[:3] == ["0", "1", "3"]
    with pytest.raises(RuntimeError, match="second config"):
        next(lines)


# ------------------------------------------------------------------ 15. W&B after faults

def offline_runs(sweep: Path) -> list[Path]:
    return sorted((sweep / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_a_resume_redraws_a_truncated_rows_file_and_writes_each_missing_wandb_run_once(small_sweep, tmp_path):
    """One resume of one sweep serves three faults (each `python -m runner` costs seconds of imports): a job whose
    rows file was cut short is drawn again, the W&B runs an earlier run never wrote are written, and an identical
    sweep started while the resume runs is refused, so no run is written twice."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from runner.jobdir import finished
    from wandb_records import read_run

    sweep = tmp_path / "sweep"
    shutil.copytree(small_sweep, sweep)  # drawn with W&B off: rows but no W&B run (as when the logger was killed)
    assert not offline_runs(sweep)
    rows = sweep / "0" / "rows.parquet"
    rows.write_bytes(rows.read_bytes()[:300])
    assert finished(sweep / "0", "any") is False
    args = ["-m", *SMALL_SWEEP, f"hydra.sweep.dir={sweep}", "wandb.mode=offline"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("WANDB_MODE", None)  # W&B on: conftest turns it off for the tests
    resume = subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    lock = sweep / ".sweep.lock"
    while time.time() < deadline and not (lock.is_file() and lock.read_text() == str(resume.pid)):
        time.sleep(0.05)
    os.kill(resume.pid, signal.SIGSTOP)  # paused while it holds the dir: the second surely starts meanwhile
    try:
        second = run_cli(*args, cwd=tmp_path, env={"WANDB_MODE": None})
    finally:
        os.kill(resume.pid, signal.SIGCONT)
    stdout, stderr = resume.communicate(timeout=300)
    assert resume.returncode == 0, stderr
    assert one_error_line(second) == (f"error: hydra.sweep.dir={str(sweep)!r} is not allowed: another sweep "
                                      f"(pid {resume.pid}) is running in it; wait for it to end, or use another dir")
    assert "2 of 2 image(s) already drawn for this config: kept" in stdout + stderr  # job 0, its rows redrawn
    assert len(pd.read_parquet(sweep / "results.parquet")) == 8
    assert stdout.count("already done") == 3
    assert stdout.count("W&B: writing this job's run, which an earlier run of the sweep never wrote") == 3
    job_runs = [r for r in map(read_run, offline_runs(sweep)) if r["run"].display_name != "sweep-summary"]
    assert sorted(r["run"].display_name for r in job_runs) == [  # job 0's run written as it was drawn again
        "scheduler=ddim steps=2", "scheduler=ddim steps=4", "scheduler=euler_a steps=2", "scheduler=euler_a steps=4"]
    assert all((sweep / str(n) / ".wandb_run").is_file() for n in range(4))
    again = run_cli(*args, cwd=tmp_path, env={"WANDB_MODE": None})
    assert again.returncode == 0 and "W&B: writing this job's run" not in again.stdout
    assert len([r for r in map(read_run, offline_runs(sweep)) if r["run"].display_name != "sweep-summary"]) == 4


@pytest.mark.slow
@pytest.mark.skipif(__import__("os").geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_a_full_disk_is_one_wandb_warning_and_leaves_no_half_written_run(tmp_path):
    from wandb_records import read_run

    sweep = tmp_path / "sweep"
    args = ("-m", "model=tiny-sd", "steps=2", "guidance=1,2,3,4,5,6", "sampling.progress=false",
            f"hydra.sweep.dir={sweep}")
    assert run_cli(*args, "wandb.mode=disabled", cwd=tmp_path).returncode == 0
    # only W&B's dir on the small disk: the resume writes the six runs there and nothing else (Hydra's files and
    # the rows stay on the big disk), so it is W&B that meets the full disk, every time
    with small_disk(sweep / "wandb", "200k"):
        result = run_cli(*args, "wandb.mode=offline", cwd=tmp_path, env={"WANDB_MODE": None})
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "Traceback" not in output and "Logging error" not in output
        assert output.count("W&B: the disk is full") == 1
        runs = offline_runs(sweep)
        assert 0 < len(runs) < 6  # some fitted, and the disk did fill
        markers = sorted(p.read_text() for p in sweep.glob("*/.wandb_run"))
        assert sorted(p.name.rsplit("-", 1)[1] for p in runs) == markers  # every run left is a finished one
        for run_dir in runs:
            assert read_run(run_dir)["run"].display_name.startswith("guidance=")


@pytest.mark.slow
@pytest.mark.skipif(__import__("os").geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_a_disk_too_full_for_hydra_is_one_error_line(tmp_path):
    with small_disk(tmp_path / "disk", "64k") as disk:
        result = run_cli("-m", "model=tiny-sd", "steps=2", "guidance=1,2,3,4,5,6", "wandb.mode=disabled",
                         "sampling.progress=false", f"hydra.sweep.dir={disk / 'sweep'}", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: the disk is full"), output


# ------------------------------------------------------------------ 16. a killed sweep leaves no worker behind

def children_of(pid: int) -> set[int]:
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.add(int(status.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/status").read_text().split("State:\t", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_the_workers_of_a_killed_parallel_sweep_exit(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    sweep = tmp_path / "sweep"
    parent = subprocess.Popen([sys.executable, "-m", "runner", "-m", "hydra/launcher=gpus", "model=tiny-sd",
                               "steps=300", "guidance=1,2,3,4,5,6", "sampling.progress=false",
                               f"hydra.sweep.dir={sweep}"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=""))
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not all((sweep / n / "runner.log").is_file() for n in ("0", "1")):
            time.sleep(0.1)  # both workers are drawing a job
        workers = {p for p in children_of(parent.pid)
                   if "LokyProcess" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")}
        assert len(workers) == 2
        os.kill(parent.pid, signal.SIGKILL)  # the parent alone, as an OOM killer or `kill -9` does
        parent.wait()
        deadline = time.time() + 60
        while time.time() < deadline and any(alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(alive(p) for p in workers)
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
