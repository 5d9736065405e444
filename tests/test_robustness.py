"""Faults and bad input: nothing finished is lost, nothing unfinished is counted."""

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import compose_config, run_cli, run_job_in, small_disk
from runner.checks import ConfigError
from runner.spec import make_spec


@pytest.mark.slow
def test_truncated_weights_are_refused_before_loading(model_copy, tmp_path):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ConfigError, match=r"unet/diffusion_pytorch_model.safetensors is truncated or corrupt"):
        make_spec(compose_config(f"model.name_or_path={model_copy}"))
    result = run_cli(f"model.name_or_path={model_copy}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: model.name_or_path=") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_corrupt_header_is_refused(model_copy):
    weights = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"garbage!"
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="vae/diffusion_pytorch_model.safetensors is corrupt"):
        make_spec(compose_config(f"model.name_or_path={model_copy}"))


def test_pickle_only_weights_need_the_explicit_opt_in(model_copy, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_copy / "unet")
    (model_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(model_copy / "unet", safe_serialization=False)
    assert (model_copy / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ConfigError, match="unet/ has only pickle weights .* model.allow_pickle=true"):
        make_spec(compose_config(f"model.name_or_path={model_copy}"))
    rows = run_job_in(tmp_path / "run", f"model.name_or_path={model_copy}", "model.allow_pickle=true", "steps=2")
    assert rows[0]["status"] == "ok", rows[0]["error"]


def test_a_prompt_past_the_token_limit_warns_with_the_count(tmp_path, caplog):
    long_prompt = "a " * 80  # 80 one-character words + start/end tokens > 77
    with caplog.at_level(logging.WARNING, logger="runner"):
        rows = run_job_in(tmp_path, "model=tiny-sd", f"prompt='{long_prompt}'", "steps=2")
    assert rows[0]["status"] == "ok"
    assert "prompt is 5 token(s) longer than the tokenizer's limit of 77; they are dropped" in caplog.text


@pytest.mark.slow
def test_config_with_a_forbidden_target_is_refused_before_it_runs(tmp_path):
    # builtins.open, not os.system: Hydra 1.3 already refuses os.system itself, but would call open(marker, "w")
    marker = tmp_path / "PWNED"
    callback = ("+hydra.callbacks.evil._target_=builtins.open", f"+hydra.callbacks.evil.file={marker}",
                "+hydra.callbacks.evil.mode=w")
    for overrides in (callback, ("+anything._target_=builtins.open", f"+anything.file={marker}", "steps=1")):
        result = run_cli(*overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
        assert result.returncode == 2
        assert "_target_='builtins.open' is not allowed" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "run").exists()


# `python -m runner ARGS` with Hydra's clock stopped at one second: its `${now:...}` resolver reads this datetime
FROZEN_CLOCK = """
import runpy, sys
from datetime import datetime

import hydra.core.utils


class Frozen(datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 2, 3, 4, 5)


hydra.core.utils.datetime = Frozen
sys.argv = ["runner", *sys.argv[1:]]
runpy.run_module("runner", run_name="__main__", alter_sys=True)
"""


# Two sweeps of the same three points, started at once under that clock, each failing its point 1 its own way (an OOM
# before sampling; a full disk where the point writes its first image): these two processes serve three tests.
FAULTY_SWEEP = ("-m", "scheduler=ddpm,unipc,lms", "steps=3")
FAULT_MESSAGES = {"oom": "OutOfMemoryError: CUDA out of memory", "enospc": "No space left on device"}


@pytest.fixture(scope="module")
def faulty_sweeps(tmp_path_factory):
    """{fault: (the ended process, its stdout and stderr, its sweep dir)}; read only (copy a sweep to resume it)."""
    cwd = tmp_path_factory.mktemp("faulty_sweeps")
    started = {}
    for fault in FAULT_MESSAGES:
        with open(cwd / f"{fault}.log", "w") as log:  # a file, not a pipe: neither process waits on a full pipe
            started[fault] = subprocess.Popen([sys.executable, "-c", FROZEN_CLOCK, *FAULTY_SWEEP], cwd=cwd,
                                              env=dict(os.environ, HF_HUB_OFFLINE="1", RUNNER_FAULT=f"1:{fault}"),
                                              stdout=log, stderr=subprocess.STDOUT)
    try:
        for process in started.values():
            process.wait(timeout=300)
    finally:  # one that hangs is not left running
        for process in started.values():
            if process.poll() is None:
                process.kill()
    sweeps = cwd / "results" / "sweeps"
    return {fault: (p, (cwd / f"{fault}.log").read_text(), sweeps / f"2026-01-02_03-04-05_{p.pid}")
            for fault, p in started.items()}


@pytest.mark.slow
def test_two_sweeps_started_in_the_same_second_get_their_own_dirs(faulty_sweeps):
    sweeps = sorted(next(iter(faulty_sweeps.values()))[2].parent.iterdir())
    assert [s.name for s in sweeps] == sorted(f"2026-01-02_03-04-05_{p.pid}" for p, _, _ in faulty_sweeps.values())
    for fault, (process, output, sweep) in faulty_sweeps.items():  # each its own three rows, failed its own way
        assert process.returncode == 1, output[-3000:]
        table = pd.read_parquet(sweep / "results.parquet").sort_values("job_num")
        assert list(table.scheduler) == ["ddpm", "unipc", "lms"] and list(table.status) == ["ok", "failed", "ok"]
        assert FAULT_MESSAGES[fault] in table.error.iloc[1]


@pytest.mark.slow
def test_a_failing_point_is_recorded_and_a_resume_runs_only_it(faulty_sweeps, tmp_path):
    failed, output, drawn = faulty_sweeps["oom"]
    assert failed.returncode == 1
    assert "failed: scheduler=unipc steps=3: OutOfMemoryError: CUDA out of memory" in output
    table = pd.read_parquet(drawn / "results.parquet")
    assert list(table.sort_values("job_num").status) == ["ok", "failed", "ok"]
    assert "OutOfMemoryError: CUDA out of memory" in table.set_index("scheduler").error["unipc"]
    traceback = (drawn / "1" / "error.txt").read_text()  # the failed point's traceback, in its job dir
    assert traceback.startswith("Traceback") and "OutOfMemoryError: CUDA out of memory" in traceback
    assert not (drawn / "0" / "error.txt").exists()

    sweep = tmp_path / "sweep"  # resumed in a copy: the other tests read the sweep as the fault left it
    shutil.copytree(drawn, sweep)
    first_png = next((sweep / "0" / "images").glob("*.png"))
    mtime = first_png.stat().st_mtime_ns
    resumed = run_cli(*FAULTY_SWEEP, f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={"RUNNER_FAULT": None})
    assert resumed.returncode == 0, resumed.stderr
    assert (resumed.stdout + resumed.stderr).count("already done") == 2
    table = pd.read_parquet(sweep / "results.parquet")
    assert len(table) == 3 and (table.status == "ok").all()
    assert first_png.stat().st_mtime_ns == mtime  # finished points untouched


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["exit-in-import", "exit-in-load"])
def test_an_exit_during_a_library_import_ends_the_job_as_an_exit_not_a_failed_point(tmp_path, fault):
    # submitit's preemption handler requeues the SLURM job, then calls sys.exit; landing while an import creates a
    # class, that exit comes out of Python 3.11 as a RuntimeError. Recorded as a failed point, the requeued job's
    # result would never be waited for; as an exit, the process stops with no rows for the point.
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "scheduler=ddpm,unipc", "steps=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                     env={"RUNNER_FAULT": f"1:{fault}"})
    assert result.returncode == 255  # sys.exit(-1)
    assert (sweep / "0" / "rows.parquet").is_file() and not (sweep / "1" / "rows.parquet").exists()
    assert "Error calling __set_name__" not in result.stdout + result.stderr


@pytest.mark.slow
def test_a_full_disk_fails_the_point_and_keeps_earlier_rows(faulty_sweeps):
    result, _, sweep = faulty_sweeps["enospc"]
    assert result.returncode == 1
    table = pd.read_parquet(sweep / "results.parquet").sort_values("job_num")
    assert list(table.status) == ["ok", "failed", "ok"]
    assert "No space left on device" in table.error.iloc[1]
    assert not list((sweep / "1" / "images").glob("*.png")) if (sweep / "1" / "images").exists() else True
    assert len(pd.read_parquet(sweep / "0" / "rows.parquet")) == 1  # earlier rows intact


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_atomic_write_on_a_really_full_filesystem_keeps_the_old_file(tmp_path):
    from runner.record import atomic_write_bytes

    with small_disk(tmp_path / "disk", "64k") as disk:
        atomic_write_bytes(disk / "rows.parquet", b"old rows")
        with pytest.raises(OSError, match="No space left"):
            atomic_write_bytes(disk / "rows.parquet", b"x" * 200_000)
        assert (disk / "rows.parquet").read_bytes() == b"old rows"
        assert [p.name for p in disk.iterdir()] == ["rows.parquet"]  # no temp file left behind


def fill(disk: Path) -> Path:
    """Write one file until the filesystem has no byte left; returns it (delete it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_a_really_full_disk_fails_the_point_and_leaves_earlier_files_intact(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        earlier = run_job_in(disk / "0", "model=tiny-sd", "steps=2", "seed=[0,1]")
        assert [r["status"] for r in earlier] == ["ok", "ok"]
        files = {p: p.read_bytes() for p in (disk / "0").rglob("*") if p.is_file()}
        filler = fill(disk)

        rows = run_job_in(disk / "1", "model=tiny-sd", "steps=2", "seed=[0,1]")
        assert [r["status"] for r in rows] == ["failed", "failed"]
        assert all("No space left on device" in r["error"] for r in rows)
        assert {p: p.read_bytes() for p in (disk / "0").rglob("*") if p.is_file()} == files  # intact
        assert not [p for p in disk.rglob("*") if p.is_file() and p.name.endswith(".tmp")]  # no half-written file
        assert not list((disk / "1").glob("images/*.png"))

        filler.unlink()  # space again: the point runs
        assert [r["status"] for r in run_job_in(disk / "1", "model=tiny-sd", "steps=2", "seed=[0,1]")] == ["ok"] * 2


@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume_gives_exactly_the_right_rows(tmp_path):
    sweep = tmp_path / "sweep"
    # one image per batch: the PNGs land one by one, so the kill can fall inside a job (an image takes tenths of a
    # second at 20 steps; the poll below looks every 10 ms)
    args = [sys.executable, "-m", "runner", "-m", "scheduler=ddpm,unipc,lms,euler", "seed=[0,1]", "steps=20",
            "sampling.batch_size=1", "sampling.progress=false", "device=cpu", f"hydra.sweep.dir={sweep}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list(sweep.glob("*/images/*.png"))) < 3:
        ended = process.poll() is not None
        if ended or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"the sweep drew fewer than 3 images before it {'ended' if ended else 'timed out'}")
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL  # killed mid-sweep, not finished
    # nothing torn under a final name: every PNG and parquet that exists reads whole
    drawn = {png: (png.stat().st_mtime_ns, png.read_bytes()) for png in sweep.glob("*/images/*.png")}
    for png in drawn:
        Image.open(png).load()
    for parquet in sweep.rglob("*.parquet"):
        pd.read_parquet(parquet)
    assert not (sweep / "results.parquet").exists()
    cut_short = [png for png in drawn if not (png.parent.parent / "rows.parquet").exists()]
    assert cut_short, "the kill fell between jobs: no job was cut short"

    resumed = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "already drawn for this config: kept" in resumed.stdout + resumed.stderr
    table = pd.read_parquet(sweep / "results.parquet")
    assert len(table) == 8 and (table.status == "ok").all()
    assert sorted(zip(table.scheduler, table.seed)) == sorted((s, i) for s in ("ddpm", "unipc", "lms", "euler") for i in (0, 1))
    for png, (mtime, data) in drawn.items():  # kept, not drawn again: neither rewritten nor changed
        assert png.stat().st_mtime_ns == mtime and png.read_bytes() == data, png
    assert len(set(table.image_sha256)) == 8
