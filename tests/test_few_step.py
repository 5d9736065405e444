"""Few-step models in the SD family: LCM (LCMScheduler, guidance as a UNet input), TCD (TCDScheduler, gamma =
sampling.eta) and Turbo-style runs (trailing spacing, guidance 0, 1-4 steps), each against the diffusers pipeline.

Bound: max pixel difference <= 1/255 on CPU fp32. The LCM-style model is tiny-sd with `time_cond_proj_dim` set in its
UNet config and the UNet re-initialised with torch.manual_seed(0), built in a temp dir.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_same_image, compose_config, read_png, run_job_in, to_uint8
from runner import embedded_model_path

PROMPT, SEED = "a red cube on a table", 5


@pytest.fixture(scope="module")
def lcm_model(tmp_path_factory):
    """tiny-sd with an LCM-style UNet: `time_cond_proj_dim` (the guidance embedding's width) in its config."""
    from diffusers import UNet2DConditionModel

    path = tmp_path_factory.mktemp("tiny-lcm") / "tiny-lcm"
    shutil.copytree(embedded_model_path("tiny-sd"), path)
    config = json.loads((path / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 32})
    unet.save_pretrained(path / "unet", safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def lcm_components(lcm_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(lcm_model, safety_checker=None, requires_safety_checker=False,
                                                   use_safetensors=True)
    assert pipe.unet.config.time_cond_proj_dim == 32
    return {k: v for k, v in pipe.components.items() if k != "scheduler"}, pipe.scheduler.config


def ours(tmp_path, *overrides):
    rows = run_job_in(tmp_path, f"seed={SEED}", f"prompt='{PROMPT}'", *overrides)
    assert all(r["status"] == "ok" for r in rows), rows[0].get("error")
    return read_png(tmp_path / rows[0]["image_path"]), rows[0]


@pytest.mark.parametrize("steps, guidance", [(4, 8.5), (2, 1.0)])
def test_lcm_matches_latent_consistency_pipeline(steps, guidance, lcm_model, lcm_components, tmp_path):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    image, row = ours(tmp_path, "model=tiny-sd", f"model.name_or_path={lcm_model}", "scheduler=lcm",
                      f"steps={steps}", f"guidance={guidance}")
    modules, scheduler_config = lcm_components
    pipe = LatentConsistencyModelPipeline(**modules, scheduler=LCMScheduler.from_config(scheduler_config),
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                  generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]
    assert_same_image(image, to_uint8(theirs))
    assert row["nfe"] == row["unet_evals"] == steps  # guidance is an input: no unconditional pass


@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_tcd_matches_stable_diffusion_pipeline(gamma, lcm_model, lcm_components, tmp_path):
    """TCD through StableDiffusionPipeline on the LCM-style UNet: also the pipeline's own timestep_cond path."""
    from diffusers import StableDiffusionPipeline, TCDScheduler

    image, row = ours(tmp_path, "model=tiny-sd", f"model.name_or_path={lcm_model}", "scheduler=tcd", "steps=4",
                      "guidance=3", f"sampling.eta={gamma}")
    modules, scheduler_config = lcm_components
    pipe = StableDiffusionPipeline(**modules, scheduler=TCDScheduler.from_config(scheduler_config),
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, num_inference_steps=4, guidance_scale=3.0, eta=gamma, height=64, width=64,
                  generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]
    assert_same_image(image, to_uint8(theirs))
    assert row["nfe"] == row["unet_evals"] == 4


def test_tcd_gamma_is_sampling_eta(lcm_model, tmp_path):
    deterministic, _ = ours(tmp_path / "0", "model=tiny-sd", f"model.name_or_path={lcm_model}", "scheduler=tcd",
                            "steps=4", "sampling.eta=0")
    stochastic, _ = ours(tmp_path / "1", "model=tiny-sd", f"model.name_or_path={lcm_model}", "scheduler=tcd",
                         "steps=4", "sampling.eta=0.5")
    assert np.abs(deterministic.astype(int) - stochastic.astype(int)).max() > 1


def test_guidance_reaches_an_embedded_unet(lcm_model, tmp_path):
    low, _ = ours(tmp_path / "low", "model=tiny-sd", f"model.name_or_path={lcm_model}", "scheduler=lcm", "steps=2",
                  "guidance=1.5")
    high, _ = ours(tmp_path / "high", "model=tiny-sd", f"model.name_or_path={lcm_model}", "scheduler=lcm", "steps=2",
                   "guidance=9")
    assert np.abs(low.astype(int) - high.astype(int)).max() > 1


def test_negative_prompt_on_an_embedded_unet_is_refused(lcm_model):
    from runner.checks import ConfigError
    from runner.spec import make_spec

    with pytest.raises(ConfigError) as error:
        make_spec(compose_config("model=tiny-sd", f"model.name_or_path={lcm_model}", "negative_prompt=blurry"))
    assert str(error.value).startswith("negative_prompt='blurry' is not allowed: '' for this model: its UNet takes "
                                       "guidance as an embedding")
    make_spec(compose_config("model=tiny-sd", "negative_prompt=blurry"))  # a plain UNet takes one


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_turbo_style_run_matches_the_pipeline(steps, tmp_path):
    """SD-Turbo's recipe: Euler ancestral, trailing spacing (the one step at t=999), no guidance."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    image, row = ours(tmp_path, "model=tiny-sd", "scheduler=euler_a", "scheduler.kwargs.timestep_spacing=trailing",
                      "guidance=0", f"steps={steps}")
    pipe = StableDiffusionPipeline.from_pretrained(embedded_model_path("tiny-sd"), safety_checker=None,
                                                   requires_safety_checker=False, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    theirs = pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, height=64, width=64,
                  generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]
    assert_same_image(image, to_uint8(theirs))
    assert row["nfe"] == row["unet_evals"] == steps


# Every VP option's diffusers scheduler at 1 step (checked with diffusers 0.42: none fails outright; the
# multistep solvers take a first-order step, Heun has no second evaluation after the last).
ONE_STEP_OPTIONS = ["ddpm", "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras",
                    "unipc", "lcm", "tcd"]


@pytest.mark.parametrize("option", ONE_STEP_OPTIONS)
def test_every_scheduler_runs_one_step_from_the_top(option, tmp_path):
    import pandas as pd

    _, row = ours(tmp_path, "model=tiny-sd", f"scheduler={option}", "scheduler.kwargs.timestep_spacing=trailing",
                  "guidance=0", "steps=1")
    assert row["nfe"] == 1
    assert pd.read_csv(tmp_path / "schedule.csv")["timestep"].iloc[0] == 999


@pytest.mark.parametrize("option", ["ddim", "euler", "heun", "lms"])
def test_one_leading_step_is_refused(option):
    from runner.checks import ConfigError
    from runner.spec import make_spec

    with pytest.raises(ConfigError) as error:
        make_spec(compose_config("model=tiny-sd", f"scheduler={option}", "steps=1"))
    assert str(error.value).startswith(f"steps=1 is not allowed: not with scheduler={option} and "
                                       "timestep_spacing='leading': its one model call is at t=1 of 1000")
    assert "\n" not in str(error.value)
