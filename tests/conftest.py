import contextlib
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

# Tests never touch the network: hub ids must resolve from the local cache or fail clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# W&B off unless a test turns it on (wandb.mode=offline): it would slow every CLI test
os.environ.setdefault("WANDB_MODE", "disabled")
# `python -m runner` processes on one torch thread unless a test sets another count: the embedded models are tiny, one
# thread draws them as fast, and two threads on two cores spin and stall whenever anything runs beside them (W&B's
# service, a logger process, SLURM's daemons): 3-4x slower. Tests about threads and cores set OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import runner  # noqa: E402  (registers the config resolvers)

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = runner.CONF_DIR
CORES = len(os.sched_getaffinity(0))  # the cores this process may run on (a W&B logger process needs a spare one)


def compose_config(*overrides, hydra_config=False):
    """The config a user's command line composes, through Hydra's compose API."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


# The scheduler options as the README names them, option → (diffusers class, kwargs), written here by hand: the
# tests' oracle must not read conf/scheduler/*.yaml, or a wrong class or kwarg there would be copied into it.
# None: the class the model was saved with. Every option in conf/scheduler must be here (test_config checks it).
VP_SCHEDULERS = {
    "default": (None, {}),
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS, as the original Stable Diffusion samples
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# Flow matching (SD3, Flux): the pipelines' own sampler, and the multistep solvers on flow sigmas.
FLOW_SCHEDULERS = {
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow_euler_sde": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "flow_dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                      "use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "flow_unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}
# Few-step samplers (README, Few-step models): LCM, and TCD (its gamma is sampling.eta, a step argument).
FEW_STEP_SCHEDULERS = {
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
# k-diffusion's sampler functions (README, k-diffusion samplers): option → (function, the noise its steps draw: none,
# each image's generator or a Brownian tree seeded with its seed; model calls per step but the last, which is one).
K_SAMPLERS = {
    "k_euler": ("sample_euler", None, 1),
    "k_euler_a": ("sample_euler_ancestral", "generator", 1),
    "k_heun": ("sample_heun", None, 2),
    "k_dpm_2": ("sample_dpm_2", None, 2),
    "k_lms": ("sample_lms", None, 1),
    "k_dpmpp_2m": ("sample_dpmpp_2m", None, 1),
    "k_dpmpp_sde": ("sample_dpmpp_sde", "brownian", 2),
    "k_dpmpp_2m_sde": ("sample_dpmpp_2m_sde", "brownian", 1),
    "k_dpmpp_3m_sde": ("sample_dpmpp_3m_sde", "brownian", 1),
}
# The schedule axis (README, Sigma spacing): the kwarg a diffusers scheduler gets for each spacing.
SPACINGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}
# Every option; a k-diffusion option is given the model's own scheduler (its alphas_cumprod and prediction type).
SCHEDULER_OPTIONS = {**VP_SCHEDULERS, **FEW_STEP_SCHEDULERS, **FLOW_SCHEDULERS, **{k: (None, {}) for k in K_SAMPLERS}}


def scheduler_by_hand(model_config: dict, option: str, **overrides):
    """The option's scheduler as a user builds it with diffusers (SCHEDULER_OPTIONS), from a model's config."""
    import diffusers

    class_name, kwargs = SCHEDULER_OPTIONS[option]
    return getattr(diffusers, class_name or model_config["_class_name"]).from_config(model_config,
                                                                                     **{**kwargs, **overrides})


def scheduler_for(pipe, option, **overrides):
    """The option's scheduler for a pipeline, from the model's own scheduler config (saved on the pipe)."""
    return scheduler_by_hand(pipe.model_scheduler_config, option, **overrides)


@contextmanager
def unet_rows(unet):
    """The batch rows of every forward pass of `unet` while inside, as a list (a CFG pair shows as two per image)."""
    rows = []
    handle = unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        yield rows
    finally:
        handle.remove()


def run_cli(*args, cwd, timeout=300, env=None):
    """`python -m runner ARGS` as a user types it."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    full_env = {k: v for k, v in full_env.items() if v is not None}  # env={"X": None} unsets X
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def run_job_in(tmp_path, *overrides):
    """Compose, check and run one job into tmp_path (no CLI); returns its rows. On the CPU unless a `device=` is
    given: the tests compare fp32 pixels and CPU columns, which a GPU box's device=auto would change."""
    from runner.context import standalone
    from runner.draw import draw
    from runner.spec import make_spec

    if not any(o.startswith("device=") for o in overrides):
        overrides = (*overrides, "device=cpu")
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


@pytest.fixture
def model_copy(tmp_path):
    """A copy of tiny-sd to break (weights, configs) without touching the embedded one."""
    import shutil

    from runner import embedded_model_path

    target = tmp_path / "model"
    shutil.copytree(embedded_model_path("tiny-sd"), target)
    return target


def read_png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """In-process drawing on one CPU thread: the embedded models are tiny, one thread is as fast (README, Performance),
    and on a CPU shared with other work several threads are many times slower. `python -m runner` subprocesses take
    OMP_NUM_THREADS (1 unless the environment or a test sets it; above)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory) -> Path:
    """A real 4-job sweep made through the CLI (ddim, euler_a × 2, 4 steps, seeds [0,1]) on the default model: shared,
    never modified. (Not plain euler: on digits-sd it draws DDIM's very images, Euler being DDIM in sigma form.)"""
    sweep = tmp_path_factory.mktemp("small_sweep") / "sweep"
    result = run_cli("-m", "scheduler=ddim,euler_a", "steps=2,4", "seed=[0,1]", "sampling.progress=false", "device=cpu",
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
