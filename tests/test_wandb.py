"""W&B logging with the real wandb in offline mode, read back from what it wrote."""

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager, suppress

import pandas as pd
import pytest

from conftest import CORES, run_cli
from runner.loggers.wandb import flatten, resolve_mode, run_id, scrub
from wandb_records import read_run

SENTINELS = {"WANDB_API_KEY": "sentinel0wandb0key0123456789abcdef0123456789", "HF_TOKEN": "hf_sentinel0token0abcdef",
             "HUGGING_FACE_HUB_TOKEN": "hf_sentinel0token1abcdef"}


LOGGER_PROCESS_LINE = "W&B: runs are written by a logger process"
TAGS = ["paper-a", "v2"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    # torch on fewer threads than cores: a core is free, so a logger process writes the runs beside the sampling
    tmp = tmp_path_factory.mktemp("wandb")
    sweep = tmp / "sweep"
    result = run_cli("-m", "scheduler=ddpm,unipc", "guidance=3,7.5", "seed=[0,1]", "steps=5", "wandb.mode=offline",
                     f"wandb.tags=[{','.join(TAGS)}]", "device=cpu", f"hydra.sweep.dir={sweep}", cwd=tmp,
                     env=dict(SENTINELS, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert (LOGGER_PROCESS_LINE in result.stdout + result.stderr) == (CORES > 1)
    runs = {}
    for run_dir in sorted((sweep / "wandb").glob("offline-run-*")):
        logged = read_run(run_dir)
        logged["dir"] = run_dir
        runs[logged["run"].display_name] = logged
    return sweep, runs


def job_rows(sweep_dir, scheduler, guidance):
    table = pd.read_parquet(sweep_dir / "results.parquet")
    return table[(table.scheduler == scheduler) & (table.guidance == guidance)]


@pytest.mark.slow
def test_one_run_per_job_grouped_by_sweep_plus_a_summary(sweep):
    sweep_dir, runs = sweep
    assert set(runs) == {"scheduler=ddpm guidance=3", "scheduler=ddpm guidance=7.5", "scheduler=unipc guidance=3",
                         "scheduler=unipc guidance=7.5", "sweep-summary"}
    assert {r["run"].run_group for r in runs.values()} == {sweep_dir.name}
    assert runs["sweep-summary"]["run"].job_type == "sweep-summary"
    assert {r["run"].job_type for name, r in runs.items() if name != "sweep-summary"} == {"job"}


@pytest.mark.slow
def test_tags_are_the_model_the_scheduler_and_wandb_tags(sweep):
    _, runs = sweep
    assert list(runs["scheduler=unipc guidance=3"]["run"].tags) == [*TAGS, "digits-sd", "unipc"]
    assert list(runs["sweep-summary"]["run"].tags) == TAGS


@pytest.mark.slow
def test_env_keys_say_what_the_job_ran_on(sweep):
    import diffusers
    import torch
    import transformers

    sweep_dir, runs = sweep
    config = runs["scheduler=ddpm guidance=7.5"]["config"]
    row = job_rows(sweep_dir, "ddpm", 7.5).iloc[0]
    env = {k: v for k, v in config.items() if k.startswith("env.")}
    expected = {"env.torch_version": torch.__version__, "env.diffusers_version": diffusers.__version__,
                "env.transformers_version": transformers.__version__, "env.python_version": sys.version.split()[0],
                "env.cuda_version": "", "env.gpu": "", "env.gpu_driver": "", "env.device": "cpu", "env.dtype": "fp32",
                "env.model_revision": row.model_revision}
    assert {k: env.get(k) for k in expected} == expected
    assert "env.hostname" not in env  # a run's page may be shared beyond the machine's users


@pytest.mark.slow
def test_config_is_flattened_to_dot_keys(sweep):
    _, runs = sweep
    config = runs["scheduler=unipc guidance=7.5"]["config"]
    assert config["scheduler.name"] == "unipc" and config["guidance"] == 7.5 and config["steps"] == 5
    assert config["model.name"] == "digits-sd" and config["precision.dtype"] == "auto" and config["seed"] == [0, 1]
    assert "model.name_or_path" in config and "scheduler" not in config  # no nested objects leaked in
    assert all(not isinstance(v, dict) for k, v in config.items() if k != "_wandb")  # _wandb: W&B's own


@pytest.mark.slow
def test_images_are_our_png_files_with_captions(sweep):
    sweep_dir, runs = sweep
    logged = runs["scheduler=ddpm guidance=3"]
    media = sorted((logged["dir"] / "files" / "media" / "images").glob("*.png"))
    rows = job_rows(sweep_dir, "ddpm", 3)
    assert len(media) == 2
    # the very bytes we wrote (no second PNG encode)
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in media} == set(rows.image_sha256)
    captions = next(h["images/captions"] for h in logged["history"] if "images/captions" in h)
    assert captions == [f"seed={s} scheduler=ddpm steps=5 guidance=3.0 prompt={p!r}"
                                  for s, p in zip(rows.seed, rows.prompt)]


@pytest.mark.slow
def test_sigma_schedule_as_step_metric_and_table(sweep):
    sweep_dir, runs = sweep
    logged = runs["scheduler=unipc guidance=3"]
    points = [h for h in logged["history"] if "schedule/sigma" in h]
    job = job_rows(sweep_dir, "unipc", 3).job_dir.iloc[0]
    schedule = pd.read_csv(sweep_dir / job / "schedule.csv")  # job_dir: absolute, or relative to the sweep
    assert [p["schedule/step"] for p in points] == list(schedule.step)
    assert [p["schedule/sigma"] for p in points] == pytest.approx(list(schedule.sigma))
    table_file = next((logged["dir"] / "files" / "media" / "table").glob("schedule_table_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["step", "timestep", "sigma", "log_snr"] and len(table["data"]) == len(schedule)


@pytest.mark.slow
def test_timings_status_and_metrics_in_the_summary(sweep):
    sweep_dir, runs = sweep
    summary = runs["scheduler=ddpm guidance=7.5"]["summary"]
    assert summary["status"] == "ok" and summary["images"] == 2
    assert summary["time_total_s"] > 0 and "time_denoise_s" in summary and "time_unet_s" in summary
    rows = job_rows(sweep_dir, "ddpm", 7.5)  # the default model is digits-sd: its metric, averaged over the job
    assert summary["prompt_adherence"] == pytest.approx(rows["prompt_adherence"].mean())
    assert summary["class_confidence"] == pytest.approx(rows["class_confidence"].mean())
    assert "clip_score" not in summary and "mem_cuda_peak_allocated_mb" not in summary  # not measured here
    table = pd.read_parquet(sweep_dir / "results.parquet")
    assert (table["time_log_s"] > 0).all() and len(runs) == 5  # each row says what its job's logging cost


@pytest.mark.slow
def test_sweep_summary_has_the_results_table_with_images_and_the_grid(sweep):
    sweep_dir, runs = sweep
    logged = runs["sweep-summary"]
    table = json.loads(next((logged["dir"] / "files" / "media" / "table").glob("results_*.table.json")).read_text())
    assert len(table["data"]) == 8 and table["columns"][-1] == "image"
    # W&B's in-run copy names the media ("Image"); the images themselves are staged for upload in the sweep dir
    assert [row[-1] for row in table["data"]] == ["Image"] * 8
    staged = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (sweep_dir / "wandb" / "data").rglob("*")
              if p.is_file() and p.read_bytes()[:4] == b"\x89PNG"}
    assert set(pd.read_parquet(sweep_dir / "results.parquet").image_sha256) <= staged
    assert any(p.name.startswith("grid_") for p in (logged["dir"] / "files" / "media" / "images").glob("*.png"))
    assert logged["summary"]["images_ok"] == 8


@pytest.mark.slow
def test_no_secret_reaches_any_file_the_sweep_wrote(sweep):
    sweep_dir, _ = sweep
    files = [p for p in sweep_dir.rglob("*") if p.is_file()]
    assert len(files) > 30
    for path in files:
        data = path.read_bytes()
        for secret in SENTINELS.values():
            assert secret.encode() not in data, f"{secret} leaked into {path}"


@pytest.mark.slow
def test_time_log_s_reports_the_logging_cost_per_image(sweep):
    sweep_dir, _ = sweep
    table = pd.read_parquet(sweep_dir / "results.parquet")
    assert (table.time_log_s > 0).all()


def test_mode_auto_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled" and resolve_mode("offline") == "offline"


def test_mode_auto_is_online_with_wandb_logins_netrc_entry(monkeypatch, tmp_path):
    """`wandb login` stores the key in ~/.netrc: with it, and no WANDB_API_KEY, `auto` logs online."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine example.org\n  login someone\n  password x\n")
    netrc.chmod(0o600)
    assert resolve_mode("auto") == "offline"  # a netrc without W&B's entry
    netrc.write_text(netrc.read_text() + f"machine api.wandb.ai\n  login user\n  password {'k' * 40}\n")
    assert resolve_mode("auto") == "online"


def test_flatten_and_scrub_leave_secrets_out():
    flat = flatten({"model": {"name": "m", "hf_token": "x"}, "wandb": {"api_key": "y"}, "guidance": 3})
    assert flat == {"model.name": "m", "guidance": 3}
    assert scrub("+wandb.api_key=abc guidance=3 +hf_token=def") == "+wandb.api_key=*** guidance=3 +hf_token=***"


@contextmanager
def server_that_never_answers():
    """A local TCP port that accepts connections and never sends a byte: an online W&B init to it hangs.
    Yields the list of connections accepted so far and the request lines read from them."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted, requests = [], []

    def read_request_line(connection):
        with suppress(OSError), connection.makefile("rb") as stream:
            requests.append(stream.readline().decode(errors="replace").strip())

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed
                return
            threading.Thread(target=read_request_line, args=(accepted[-1],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1], accepted, requests
    finally:
        server.close()
        for connection in accepted:
            connection.close()


@pytest.mark.slow
def test_online_init_that_hangs_falls_back_to_offline_after_the_timeout(tmp_path):
    # A configured key makes `auto` pick online; the server takes the connection and never answers, so the init
    # can only end by its timeout: then the run goes offline, with one warning line.
    with server_that_never_answers() as (port, accepted, requests):
        result = run_cli(f"hydra.run.dir={tmp_path / 'run'}", "steps=2", "wandb.init_timeout_s=3",
                         "sampling.progress=false", cwd=tmp_path, timeout=240,
                         env={"WANDB_MODE": None, "WANDB_BASE_URL": f"http://127.0.0.1:{port}", **SENTINELS})
        assert accepted, "the online init never reached the server"
    # The SDK's own usage analytics are off: its exporter posted here twice more (a probe, then a flush at exit) and
    # the process waited out their 10 s HTTP timeouts. The one post left is W&B's service process's, capped at 2 s.
    assert len([r for r in requests if "/otel/" in r]) <= 1, requests
    assert result.returncode == 0, result.stderr
    output = (result.stdout + result.stderr).splitlines()
    warnings = [line for line in output if "W&B" in line or "warn" in line.lower()]
    assert len(warnings) == 1 and "online init failed" in warnings[0] and "logging offline instead" in warnings[0]
    logged = [read_run(d) for d in (tmp_path / "run" / "wandb").glob("offline-run-*")]
    assert len(logged) == 1 and logged[0]["summary"]["status"] == "ok"
    assert (pd.read_parquet(tmp_path / "run" / "rows.parquet").status == "ok").all()


@pytest.mark.slow
def test_a_wandb_error_never_fails_the_job(tmp_path):
    # a file where W&B makes its run directory: wandb itself raises (NotADirectoryError) inside the logger
    run = tmp_path / "run"
    run.mkdir()
    (run / "wandb").write_text("not a directory")
    result = run_cli(f"hydra.run.dir={run}", "steps=2", "wandb.mode=offline", "sampling.progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "W&B" in line]
    assert len(warnings) == 1 and warnings[0].startswith("W&B: could not log this job (NotADirectoryError")
    rows = pd.read_parquet(run / "rows.parquet")
    assert list(rows.status) == ["ok"] and (run / rows.image_path.iloc[0]).is_file()


@pytest.mark.slow
def test_sweep_logs_in_line_where_torch_takes_every_core_a_failed_job_run_says_so_and_a_rerun_resumes_it(tmp_path):
    # No core free: a logger process would stall torch's threads, so each job writes its run itself. Job 0 fails on
    # purpose the first time. (One sweep run twice checks both: each CLI run costs seconds of imports and W&B's start.)
    sweep = tmp_path / "sweep"
    args = ("-m", "scheduler=ddim,euler", "steps=2", "wandb.mode=offline", "device=cpu",  # a GPU frees a core
            "sampling.progress=false", f"hydra.sweep.dir={sweep}")
    first = run_cli(*args, cwd=tmp_path, env={"OMP_NUM_THREADS": str(CORES), "RUNNER_FAULT": "0:error"})
    assert first.returncode == 1
    assert LOGGER_PROCESS_LINE not in first.stdout + first.stderr
    failed, = [d for d in (sweep / "wandb").glob("offline-run-*")
               if read_run(d)["run"].display_name == "scheduler=ddim"]
    summary = read_run(failed)["summary"]
    assert summary["status"] == "failed" and summary["images"] == 0
    assert "fault injected by RUNNER_FAULT" in summary["error"]
    # requeued (SLURM) or resumed by hand: the same job dir and config, so the same W&B run, resumed; the job that
    # finished is skipped, and its run not written twice
    again = run_cli(*args, cwd=tmp_path, env={"OMP_NUM_THREADS": str(CORES), "RUNNER_FAULT": None})
    assert again.returncode == 0, again.stderr
    assert LOGGER_PROCESS_LINE not in again.stdout + again.stderr
    runs = {d: read_run(d) for d in (sweep / "wandb").glob("offline-run-*")}
    names = Counter(r["run"].display_name for r in runs.values())
    assert names == {"scheduler=ddim": 2, "scheduler=euler": 1, "sweep-summary": 2}  # a summary per sweep run
    job_runs = {d: r for d, r in runs.items() if r["run"].display_name == "scheduler=ddim"}
    assert len({r["run"].run_id for r in job_runs.values()}) == 1
    resumed = next(r for d, r in job_runs.items() if d != failed)
    assert resumed["summary"]["status"] == "ok" and resumed["summary"]["images"] == 1
    row = pd.read_parquet(sweep / "0" / "rows.parquet").iloc[0]
    assert resumed["run"].run_id == run_id(row.job_dir, row.config_hash)
    assert (pd.read_parquet(sweep / "results.parquet").time_log_s > 0).all()


def test_a_dead_logger_process_is_a_warning_not_a_hang(caplog):
    from runner.loggers.wandb import LoggerProcess

    logger = LoggerProcess()
    logger.process.kill()
    logger.process.join()
    logger.submit("log_sweep", {"mode": "offline"}, "/nonexistent", None, None)
    logger.close()  # returns: the call it was waiting for can no longer come
    assert logger.pending == 0 and "the logger process died; 1 call(s) not made" in caplog.text


@pytest.mark.slow
def test_a_killed_sweep_leaves_no_logger_process_behind_and_its_runs_written(tmp_path):
    if CORES < 2:
        pytest.skip("one core: no logger process")
    sweep_dir = tmp_path / "sweep"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "runner", "-m", "seed=0,1,2,3,4,5,6,7", "wandb.mode=offline", "device=cpu",
         "sampling.progress=false", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    found = None
    for line in sweep.stdout:
        found = found or re.search(r"logger process \(pid (\d+)\)", line)
        if found and "[3/8]" in line:  # a few jobs later: the logger process is busy with their runs
            break
    assert found, "the sweep never started a logger process"
    sweep.send_signal(signal.SIGSTOP)  # held still while we count the jobs it handed to the logger
    # A job hands its rows to the logger, then writes them: every job with rows was handed, and at most one more
    done = sorted(int(rows.parent.name) for rows in sweep_dir.glob("*/rows.parquet"))
    assert done[:2] == [0, 1]
    sweep.kill()  # no atexit, no callback: only the logger process itself can notice
    sweep.wait()
    logger_pid, deadline = int(found.group(1)), time.time() + 60
    while process_alive(logger_pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not process_alive(logger_pid)
    written = {run["run"].display_name: run for run in map(read_run, (sweep_dir / "wandb").glob("offline-run-*"))}
    handed = {f"seed={job}" for job in done}
    assert handed <= set(written) <= handed | {f"seed={done[-1] + 1}"}  # each handed run written, and whole
    assert all(run["summary"]["status"] == "ok" and run["summary"]["images"] == 1 for run in written.values())


def process_alive(pid: int) -> bool:
    try:
        state = next(line for line in open(f"/proc/{pid}/status") if line.startswith("State:"))
    except FileNotFoundError:
        return False
    return "zombie" not in state
