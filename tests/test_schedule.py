"""The schedule axis (conf/schedule): each spacing draws the pipeline's image on the schedulers that take it, the
recorded schedule is the one the loop used, and what cannot run is refused with one line.

Bound: max pixel difference <= 1/255 on CPU fp32 (tiny-sd, tiny-sdxl).
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SCHEDULER_OPTIONS, SPACINGS, assert_same_image, compose_config, read_png, run_cli, run_job_in
from runner import embedded_model_path

STEPS = 5
PROMPT, NEGATIVE, SEED = "a red cube on a table", "blurry", 11
# The spacings' kwargs and the options that take them, written by hand in conftest (not read from conf/).
TAKERS = {option: SCHEDULER_OPTIONS[option] for option in ("euler", "heun", "lms", "unipc", "dpmpp_2m")}
# AYS lists as diffusers ships them (diffusers.schedulers.AysSchedules), copied so that a wrong pick shows.
AYS_SD_TIMESTEPS = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
AYS_SD_SIGMAS = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0]
AYS_SDXL_SIGMAS = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.38, 0.234, 0.113, 0.0]


@pytest.fixture(scope="module")
def sd_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(embedded_model_path("tiny-sd"), safety_checker=None,
                                                   requires_safety_checker=False, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.model_scheduler_config = pipe.scheduler.config
    return pipe


def ours(tmp_path, *overrides):
    rows = run_job_in(tmp_path, "model=tiny-sd", f"seed={SEED}", f"prompt='{PROMPT}'", f"negative_prompt={NEGATIVE}",
                      *overrides)
    assert all(r["status"] == "ok" for r in rows), rows[0].get("error")
    return read_png(tmp_path / rows[0]["image_path"]), rows[0], pd.read_csv(tmp_path / "schedule.csv")


def theirs(pipe, class_name, kwargs, steps=STEPS, **call):
    import diffusers

    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.model_scheduler_config, **kwargs)
    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=None if call else steps, guidance_scale=7.5,
                 generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **call).images[0]
    return (image * 255).round().astype("uint8")


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("option", TAKERS)
def test_spacing_matches_the_pipeline_with_its_kwarg(spacing, option, sd_pipe, tmp_path):
    image, row, schedule = ours(tmp_path, f"scheduler={option}", f"schedule={spacing}", f"steps={STEPS}")
    class_name, kwargs = TAKERS[option]
    assert_same_image(image, theirs(sd_pipe, class_name, {**kwargs, SPACINGS[spacing]: True}))
    assert row["schedule"] == spacing
    # the recorded schedule is the one the pipeline's scheduler walked
    assert np.allclose(schedule["timestep"], sd_pipe.scheduler.timesteps.float().numpy())
    assert np.allclose(schedule["sigma"], sd_pipe.scheduler.sigmas[:len(schedule)].numpy(), rtol=1e-6)


def test_spacing_changes_the_schedule(tmp_path):
    _, _, default = ours(tmp_path / "default", "scheduler=euler", f"steps={STEPS}")
    _, _, karras = ours(tmp_path / "karras", "scheduler=euler", "schedule=karras", f"steps={STEPS}")
    assert not np.allclose(default["sigma"], karras["sigma"])


def test_karras_axis_equals_the_karras_option(tmp_path):
    """README: scheduler=dpmpp_2m schedule=karras is scheduler=dpmpp_2m_karras."""
    axis, _, axis_schedule = ours(tmp_path / "axis", "scheduler=dpmpp_2m", "schedule=karras", f"steps={STEPS}")
    option, _, option_schedule = ours(tmp_path / "option", "scheduler=dpmpp_2m_karras", f"steps={STEPS}")
    assert np.array_equal(axis, option)
    assert np.allclose(axis_schedule["sigma"], option_schedule["sigma"])


@pytest.mark.parametrize("option, argument", [("euler", "sigmas"), ("dpmpp_2m", "timesteps"), ("heun", "timesteps"),
                                              ("ddpm", "timesteps")])
def test_ays_matches_the_pipeline_given_the_list(option, argument, sd_pipe, tmp_path):
    image, _, schedule = ours(tmp_path, f"scheduler={option}", "schedule=ays", "steps=10")
    class_name, kwargs = TAKERS.get(option, ("DDPMScheduler", {}))
    given = AYS_SD_SIGMAS if argument == "sigmas" else AYS_SD_TIMESTEPS
    assert_same_image(image, theirs(sd_pipe, class_name, kwargs, **{argument: given}))
    assert np.allclose(schedule["timestep"], sd_pipe.scheduler.timesteps.float().numpy())
    if argument == "timesteps":  # Heun walks each timestep twice
        assert list(dict.fromkeys(schedule["timestep"].round().astype(int))) == AYS_SD_TIMESTEPS
    else:
        assert np.allclose(schedule["sigma"], AYS_SD_SIGMAS[:-1])


def test_ays_other_step_counts_interpolate_the_sigmas_log_linearly(tmp_path):
    _, _, schedule = ours(tmp_path, "scheduler=euler", "schedule=ays", "steps=19")
    sigmas = schedule["sigma"].to_numpy()
    assert len(sigmas) == 19
    # every second sigma of 19 steps is one of the 10 published ones (log-linear interpolation halfway between)
    assert np.allclose(sigmas[::2], AYS_SD_SIGMAS[:-1], rtol=1e-4)
    assert np.allclose(sigmas[1::2], np.sqrt(np.array(AYS_SD_SIGMAS[:-2]) * AYS_SD_SIGMAS[1:-1]), rtol=1e-4)


@pytest.mark.parametrize("overrides, argument, values", [
    (("scheduler=ddpm", "schedule.timesteps=[999,700,400,100]", "steps=4"), "timesteps", [999, 700, 400, 100]),
    (("scheduler=euler", "schedule.sigmas=[12.0,4.0,1.5,0.5,0.0]", "steps=4"), "sigmas", [12.0, 4.0, 1.5, 0.5, 0.0]),
])
def test_custom_lists_match_the_pipeline(overrides, argument, values, sd_pipe, tmp_path):
    image, _, schedule = ours(tmp_path, *overrides)
    class_name = "DDPMScheduler" if argument == "timesteps" else "EulerDiscreteScheduler"
    assert_same_image(image, theirs(sd_pipe, class_name, {}, **{argument: values}))
    if argument == "timesteps":
        assert schedule["timestep"].tolist() == values
    else:
        assert np.allclose(schedule["sigma"], values[:-1])


def test_ays_on_sdxl_takes_the_sdxl_list(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    rows = run_job_in(tmp_path, "model=tiny-sdxl", "scheduler=euler", "schedule=ays", "steps=10", "seed=3",
                      f"prompt='{PROMPT}'", "guidance=5")
    assert rows[0]["status"] == "ok", rows[0]["error"]
    pipe = StableDiffusionXLPipeline.from_pretrained(embedded_model_path("tiny-sdxl"), use_safetensors=True,
                                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    image = pipe(PROMPT, sigmas=AYS_SDXL_SIGMAS, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3),
                 output_type="np").images[0]
    assert_same_image(read_png(tmp_path / rows[0]["image_path"]), (image * 255).round().astype("uint8"))
    schedule = pd.read_csv(tmp_path / "schedule.csv")
    assert np.allclose(schedule["sigma"], AYS_SDXL_SIGMAS[:-1])


def test_custom_timesteps_on_an_unconditional_model_are_recorded(tmp_path):
    rows = run_job_in(tmp_path, "model=tiny-ddpm", "scheduler=ddpm",
                      "schedule.timesteps=[900,500,100]", "steps=3")
    assert rows[0]["status"] == "ok", rows[0]["error"]
    assert pd.read_csv(tmp_path / "schedule.csv")["timestep"].tolist() == [900, 500, 100]


@pytest.mark.parametrize("overrides, message", [
    (("scheduler=ddim", "schedule=karras"),
     "schedule='karras' is not allowed: scheduler=ddim (DDIMScheduler) has no use_karras_sigmas; the scheduler "
     "options that take it: dpmpp_2m, dpmpp_2m_karras, euler, heun, lms, unipc"),
    (("scheduler=euler_a", "schedule=beta"), "schedule='beta' is not allowed: scheduler=euler_a"),
    (("scheduler=dpmpp_2m_karras", "schedule=exponential"),
     "schedule='exponential' is not allowed: scheduler=dpmpp_2m_karras (DPMSolverMultistepScheduler) already sets "
     "use_karras_sigmas=true"),
    (("scheduler=dpmpp_2m_karras", "schedule=ays", "steps=10"), "schedule='ays' is not allowed: scheduler="
     "dpmpp_2m_karras (DPMSolverMultistepScheduler) sets use_karras_sigmas=true"),
    (("scheduler=unipc", "schedule=ays", "steps=10"), "schedule='ays' is not allowed: scheduler=unipc "
     "(UniPCMultistepScheduler) takes neither AYS sigmas nor timesteps"),
    (("scheduler=dpmpp_2m", "schedule=ays", "steps=6"), "steps=6 is not allowed: 10 with schedule=ays on "
     "scheduler=dpmpp_2m (DPMSolverMultistepScheduler): it takes the published 10-step timesteps only; the options "
     "that take AYS sigmas, interpolated to any step count: euler"),
    (("model=tiny-ddpm", "scheduler=euler", "schedule=ays"), "schedule='ays' is not allowed: Align-Your-Steps lists "
     "exist for Stable Diffusion 1.5 and SDXL models only; this model is unconditional"),
    (("model=tiny-sd3", "schedule=ays"), "schedule='ays' is not allowed: a list of timesteps or sigmas is for VP"),
    (("scheduler=ddpm", "schedule.timesteps=[999,500,100]"),
     "steps=20 is not allowed: 3, the number of steps that schedule.timesteps gives"),
    (("scheduler=ddpm", "schedule.timesteps=[100,500]", "steps=2"), "schedule.timesteps=[100, 500] is not allowed: "
     "a decreasing list of integers in 0..999, one per step"),
    (("scheduler=dpmpp_2m", "schedule.sigmas=[14.0,1.0,0.0]", "steps=2"), "schedule.sigmas=[14.0, 1.0, 0.0] is not "
     "allowed: scheduler=dpmpp_2m (DPMSolverMultistepScheduler) refuses it (its set_timesteps takes no sigmas=); "
     "the scheduler options that take sigmas=: euler"),
    (("scheduler=euler", "schedule=karras", "schedule.sigmas=[14.0,1.0,0.0]", "steps=2"),
     "schedule.sigmas=[14.0, 1.0, 0.0] is not allowed: null with schedule=karras"),
    (("scheduler=ddpm", "schedule.timesteps=[999,1]", "schedule.sigmas=[14.0,1.0,0.0]", "steps=2"),
     "schedule.sigmas=[14.0, 1.0, 0.0] is not allowed: null when schedule.timesteps is set"),
])
def test_refusals_are_one_line(overrides, message):
    from runner.checks import ConfigError
    from runner.spec import make_spec

    model = () if any(o.startswith("model=") for o in overrides) else ("model=tiny-sd",)
    with pytest.raises(ConfigError) as error:
        make_spec(compose_config(*model, *overrides))
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_cli_refuses_a_spacing_the_scheduler_lacks_with_exit_2(tmp_path):
    result = run_cli("scheduler=ddim", "schedule=karras", "model=tiny-sd", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: schedule='karras' is not allowed")
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.slow
def test_sdxl_sweep_over_schedulers_backends_and_spacings_runs_offline_with_costs(tmp_path):
    """The issue's acceptance command: diffusers and k-diffusion samplers × default and Karras spacing on tiny-sdxl."""
    result = run_cli("-m", "model=tiny-sdxl", "scheduler=euler,dpmpp_2m,k_dpmpp_2m", "schedule=default,karras",
                     "sampling.progress=false", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(tmp_path / "sweep" / "results.parquet")
    assert sorted(zip(df["scheduler"], df["schedule"])) == sorted(
        (s, p) for s in ("euler", "dpmpp_2m", "k_dpmpp_2m") for p in ("default", "karras"))
    assert (df["status"] == "ok").all()
    assert (df["nfe"] == 20).all() and (df["unet_evals"] == 40).all()  # 20 steps, CFG pairs
    sweep = tmp_path / "sweep"  # the sweep table holds job dirs relative to the sweep
    sigmas = {(r.scheduler, r.schedule): tuple(pd.read_csv(sweep / Path(r.job_dir) / "schedule.csv")["sigma"].round(4))
              for r in df.itertuples()}
    assert sigmas[("euler", "default")] != sigmas[("euler", "karras")]  # the spacing reached the scheduler
    assert sigmas[("k_dpmpp_2m", "default")] == sigmas[("k_dpmpp_2m", "karras")]  # k's default is Karras
