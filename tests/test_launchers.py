"""A sweep past one process, through Hydra's launchers on real engines: joblib workers, submitit_local, and a real
single-node SLURM cluster (started here as root; skipped with the reason when slurm-wlm/munge are missing)."""

import os
import re
import subprocess
import sys
import time

import pandas as pd
import pytest
from conftest import run_cli
from slurm_cluster import SlurmCluster, missing_reason

from runner.loggers.wandb import run_id

SWEEP = ["scheduler=ddpm,unipc,lms", "guidance=3,7.5"]
SMALL = ["steps=4", "sampling.progress=false", "device=cpu"]


def sweep(tmp_path, *args, env=None, timeout=300):
    """Run `python -m runner -m ARGS` into tmp_path/sweep; returns (process, results.parquet as a DataFrame)."""
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("-m", *args, *SMALL, f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, pd.read_parquet(sweep_dir / "results.parquet")


def assert_each_point_once(df, points):
    """Every sweep point has exactly one ok row with its own image, and nothing else is in the table."""
    assert sorted(zip(df["scheduler"], df["guidance"])) == sorted(points)
    assert (df["status"] == "ok").all(), df["error"].tolist()
    assert df["image_path"].is_unique and df["job_dir"].is_unique


@pytest.mark.slow
def test_joblib_two_cpu_workers_each_row_once_and_each_worker_pinned(tmp_path):
    # Two visible "GPUs" on a CPU box: the workers still claim one id each (the pinning is what is tested; device=cpu).
    _, df = sweep(tmp_path, "hydra/launcher=gpus", *SWEEP, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert_each_point_once(df, [(s, g) for s in ("ddpm", "unipc", "lms") for g in (3.0, 7.5)])
    workers = df.groupby("worker_pid")
    assert workers.ngroups == 2  # n_jobs = number of visible GPUs
    assert sorted(workers["cuda_visible_devices"].unique().map(tuple)) == [("0",), ("1",)]
    # each worker loaded the model once and kept it for its later jobs
    assert workers["model_cached"].apply(lambda cached: (~cached).sum()).tolist() == [1, 1]


@pytest.mark.slow
def test_joblib_without_gpus_runs_two_processes(tmp_path):
    proc, df = sweep(tmp_path, "hydra/launcher=gpus", "scheduler=ddpm,unipc", env={"CUDA_VISIBLE_DEVICES": ""})
    assert "n_jobs=2" in proc.stderr + proc.stdout
    assert_each_point_once(df, [("ddpm", 7.5), ("unipc", 7.5)])
    assert (df["cuda_visible_devices"] == "").all()  # nothing pinned on CPU


@pytest.mark.slow
def test_submitit_local_sweep_completes_with_all_rows(tmp_path):
    _, df = sweep(tmp_path, "hydra/launcher=local", "scheduler=ddpm,unipc")
    assert_each_point_once(df, [("ddpm", 7.5), ("unipc", 7.5)])
    assert df["worker_pid"].nunique() == 2  # one process per job
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))


def test_job_run_id_is_fixed_by_job_dir_and_config():
    job = {"job_dir": "/results/sweeps/s/0", "config_hash": "abc"}
    assert run_id(**job) == run_id(**dict(job))  # a requeued job: same id, its W&B run resumes
    assert run_id(**job) != run_id(**dict(job, job_dir="/results/sweeps/s/1"))
    assert run_id(**job) != run_id(**dict(job, config_hash="abd"))
    assert re.fullmatch(r"[0-9a-f]{32}", run_id(**job))


@pytest.fixture(scope="session")
def slurm():
    reason = missing_reason()
    if reason:
        pytest.skip(f"no SLURM cluster: {reason}")
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# This box has no GPU and little memory: the preset's GPU/memory requests are dropped, one CPU per job.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=null",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"]


@pytest.mark.slow
def test_slurm_sweep_is_one_job_array_with_every_row_a_preempted_job_is_requeued_and_a_resubmit_skips_finished_jobs(
        tmp_path, slurm):
    # One sweep serves both checks (each SLURM job pays its own library imports): two jobs of three images, submitted
    # as one job array. Job 0 (30 steps: slow enough to be caught drawing) is preempted; job 1 (4 steps) runs beside it.
    sweep_dir = tmp_path / "sweep"
    args = [sys.executable, "-m", "runner", "-m", *SLURM, "hydra.launcher.timeout_min=30", "steps=30,4", "seed=[0,1,2]",
            "sampling.batch_size=1", "sampling.progress=false", "device=cpu", f"hydra.sweep.dir={sweep_dir}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", **slurm.env)
    submit = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job_log = sweep_dir / "0" / "runner.log"
    deadline = time.monotonic() + 120
    # the job is drawing its images: its first PNG is written, two are to come. (Not merely started: a signal that
    # lands while it still imports its libraries can interrupt class creation, and the job fails instead.)
    while not any(sweep_dir.glob("0/images/*.png")):
        assert submit.poll() is None and time.monotonic() < deadline, submit.stdout.read() if submit.poll() else "slow"
        time.sleep(0.05)
    # squeue lists the array's tasks as <array id>_<job num>: job 0's is the one preempted
    job_id = next(t for t in slurm.run("squeue", "-h", "-o", "%i", check=True).stdout.split() if t.endswith("_0"))
    # what a preemption sends (submitit's own Job._interrupt): SIGTERM, then its requeue signal USR2
    slurm.run("scancel", job_id, "--signal", "SIGTERM", check=True)
    slurm.run("scancel", job_id, "--signal", "USR2", check=True)
    output, _ = submit.communicate(timeout=240)
    assert submit.returncode == 0, output[-3000:]

    # every row, once, ok: each job's three images
    first = pd.read_parquet(sweep_dir / "results.parquet")
    assert sorted(zip(first["steps"], first["seed"])) == [(n, s) for n in (4, 30) for s in (0, 1, 2)]
    assert (first["status"] == "ok").all(), first["error"].tolist()
    assert first["image_path"].is_unique and first.groupby("job_dir")["steps"].nunique().tolist() == [1, 1]
    resolved = sweep_dir.resolve()  # job_dir: absolute, or relative to the sweep
    assert all((resolved / row_job).resolve().parent == resolved for row_job in first["job_dir"])
    # one job array: every job ran as SLURM task <array id>_<job num>
    logs = sorted(p.name for p in (sweep_dir / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and len({name.split("_")[0] for name in logs}) == 1, logs
    # job 0 was preempted and requeued into the same job dir
    submitit_log = next((sweep_dir / ".submitit" / job_id).glob("*_log.out")).read_text()
    assert "this job is preempted" in submitit_log and f"Requeued job {job_id}" in submitit_log, submitit_log
    assert job_log.read_text().count("[1/2]") == 2  # started, preempted, started again in the same job dir
    png_times = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/images/*.png")}
    assert len(png_times) == 6

    # submitting the same sweep again (what a requeue of a finished job amounts to): nothing is drawn twice
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [(sweep_dir / job / "runner.log").read_text().count("already done") for job in "01"] == [1, 1]
    second = pd.read_parquet(sweep_dir / "results.parquet")
    assert sorted(zip(second["image_path"], second["image_sha256"])) == sorted(zip(first["image_path"],
                                                                                    first["image_sha256"]))
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/images/*.png")} == png_times
