import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Tests never touch the network: hub ids must resolve from the local cache or fail clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# W&B off unless a test turns it on (wandb.mode=offline): it would slow every CLI test
os.environ.setdefault("WANDB_MODE", "disabled")

import runner  # noqa: E402  (registers the config resolvers)

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = runner.CONF_DIR
CORES = len(os.sched_getaffinity(0))  # the cores this process may run on (a W&B logger process needs a spare one)


def compose_config(*overrides, hydra_config=False):
    """The config a user's command line composes, through Hydra's compose API."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


def scheduler_for(pipe, option):
    """The option's diffusers class and kwargs, built by diffusers itself (independently of runner.schedulers)."""
    import diffusers

    cfg = compose_config(f"scheduler={option}").scheduler
    kwargs = {k: v for k, v in cfg.kwargs.items() if v is not None}
    cls = getattr(diffusers, cfg.class_name or pipe.model_scheduler_config["_class_name"])
    return cls.from_config(pipe.model_scheduler_config, **kwargs)


def run_cli(*args, cwd, timeout=300, env=None):
    """`python -m runner ARGS` as a user types it."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    full_env = {k: v for k, v in full_env.items() if v is not None}  # env={"X": None} unsets X
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def run_job_in(tmp_path, *overrides):
    """Compose, check and run one job into tmp_path (no CLI); returns its rows."""
    from runner.context import standalone
    from runner.draw import draw
    from runner.spec import make_spec

    cfg = compose_config(*overrides, "sampling.progress=false")
    return draw(make_spec(cfg), Path(tmp_path), standalone(cfg, tmp_path, " ".join(overrides)))


def assert_same_image(ours: np.ndarray, theirs: np.ndarray):
    """The parity bound: uint8 images equal within 1/255 per pixel."""
    assert ours.shape == theirs.shape
    diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
    assert diff <= 1, f"max pixel difference {diff}/255"


def to_uint8(images: np.ndarray) -> np.ndarray:
    """A pipeline's `output_type="np"` images ([0, 1] floats) as the uint8 the PNGs hold."""
    return (images * 255).round().astype("uint8")


@contextlib.contextmanager
def small_disk(directory: Path, size: str):
    """A real filesystem of `size` (a tmpfs; root only) mounted at `directory`, so that a disk fills for real."""
    directory.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)]).returncode != 0:
        pytest.skip("tmpfs mount refused here")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)])


def read_png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def compose():
    return compose_config


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory) -> Path:
    """A real 4-job sweep made through the CLI (ddim, euler_a × 2, 4 steps, seeds [0,1]) on the default model: shared,
    never modified. (Not plain euler: on digits-sd it draws DDIM's very images, Euler being DDIM in sigma form.)"""
    sweep = tmp_path_factory.mktemp("small_sweep") / "sweep"
    result = run_cli("-m", "scheduler=ddim,euler_a", "steps=2,4", "seed=[0,1]", "sampling.progress=false",
                     f"hydra.sweep.dir={sweep}", cwd=sweep.parent)
    assert result.returncode == 0, result.stderr
    return sweep


def fake_sweep(sweep: Path, schedulers=("ddim", "euler"), steps=(2, 4), seeds=(0, 1)) -> Path:
    """A sweep dir as a sweep leaves it, without a model: one job dir per scheduler and steps, each with a small
    PNG per seed (fewer steps, further from the seed's picture) and its rows.parquet. No results table."""
    from runner.jobdir import ROWS_FILE
    from runner.record import save_image, write_table

    for job_num, (scheduler, n_steps) in enumerate((s, n) for s in schedulers for n in steps):
        job_dir = sweep / str(job_num)
        rows = []
        for index, seed in enumerate(seeds):
            picture = np.random.default_rng(seed).integers(0, 256, (16, 16, 3))
            noise = np.random.default_rng(job_num * 100 + seed).integers(-64, 65, (16, 16, 3)) // n_steps
            row = dict(model="fake", scheduler=scheduler, steps=n_steps, guidance=7.5, seed=seed, prompt="a cat",
                       height=16, width=16, job_dir=str(job_dir.resolve()), sweep_dir=str(sweep.resolve()),
                       job_num=job_num, overrides=f"scheduler={scheduler} steps={n_steps}", config_hash="fake",
                       latent_path="", time_total_s=1.0, time_denoise_s=0.5, status="ok", error="")
            image = np.clip(picture + noise, 0, 255).astype(np.uint8)
            row["image_path"], row["image_sha256"] = save_image(job_dir, f"{index:03d}_seed{seed}", image, row)
            rows.append(row)
        write_table(job_dir / ROWS_FILE, rows)
    return sweep
