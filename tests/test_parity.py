"""The correctness contract: our loops give the images of diffusers' own pipelines, for every scheduler option.

Bound: max pixel difference <= 1/255 on CPU fp32, images compared as the uint8 PNGs we write.
"""

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_same_image, compose_config, read_png, run_job_in, scheduler_for, to_uint8
from runner import embedded_model_path

SCHEDULERS = ["default", "ddpm", "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]
STEPS = 8


@pytest.fixture(scope="module")
def sd_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(embedded_model_path("tiny-sd"), safety_checker=None,
                                                   requires_safety_checker=False, use_safetensors=True)
    pipe.model_scheduler_config = pipe.scheduler.config  # the tests swap schedulers; options start from this one
    return pipe


@pytest.fixture(scope="module")
def ddpm_pipe():
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(embedded_model_path("tiny-ddpm"), use_safetensors=True)
    pipe.model_scheduler_config = pipe.scheduler.config
    return pipe


def ours(tmp_path, *overrides):
    """Our images, on tiny-sd unless a model is named (the pipelines above load the tiny models)."""
    if not any(o.startswith("model=") for o in overrides):
        overrides = ("model=tiny-sd", *overrides)
    rows = run_job_in(tmp_path, *overrides)
    assert all(r["status"] == "ok" for r in rows), rows[0].get("error")
    return [read_png(Path(tmp_path) / r["image_path"]) for r in rows]


@pytest.mark.parametrize("option", SCHEDULERS)
def test_text_to_image_matches_stable_diffusion_pipeline(option, sd_pipe, tmp_path):
    prompt, negative, seed = "a red cube on a table", "blurry", 11
    image, = ours(tmp_path, f"scheduler={option}", f"steps={STEPS}", "guidance=7.5", f"seed={seed}",
                  f"prompt='{prompt}'", f"negative_prompt={negative}")
    sd_pipe.scheduler = scheduler_for(sd_pipe, option)
    theirs = sd_pipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.5, height=64,
                     width=64, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    assert_same_image(image, to_uint8(theirs))


def test_guidance_one_has_no_unconditional_pass(sd_pipe, tmp_path):
    image, = ours(tmp_path, "steps=6", "guidance=1", "seed=2", "negative_prompt=anything")
    sd_pipe.scheduler = scheduler_for(sd_pipe, "default")
    theirs = sd_pipe(compose_config().prompt, num_inference_steps=6, guidance_scale=1.0, height=64, width=64,
                     generator=torch.Generator("cpu").manual_seed(2), output_type="np").images[0]
    assert_same_image(image, to_uint8(theirs))


@pytest.mark.parametrize("option", ["ddim", "euler_a", "dpmpp_2m", "lms", "heun"])
def test_img2img_matches_img2img_pipeline(option, sd_pipe, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    gradient = np.linspace(0, 255, 64, dtype=np.uint8)
    init = Image.fromarray(np.stack([np.tile(gradient, (64, 1)), np.tile(gradient[:, None], (1, 64)),
                                     np.full((64, 64), 90, np.uint8)], -1))
    init.save(tmp_path / "init.png")
    image, = ours(tmp_path / "run", f"scheduler={option}", "steps=10", "strength=0.6", "seed=5",
                  f"init_image={tmp_path / 'init.png'}", "prompt=a cat")
    pipe = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    pipe.scheduler = scheduler_for(sd_pipe, option)
    theirs = pipe("a cat", image=init, strength=0.6, num_inference_steps=10, guidance_scale=7.5,
                  generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    assert_same_image(image, to_uint8(theirs))


def no_generator_step(scheduler):
    """DDPMPipeline passes `generator=` to every step; deterministic schedulers whose step lacks it get it dropped."""
    if "generator" not in inspect.signature(scheduler.step).parameters:
        step = scheduler.step
        scheduler.step = lambda *args, generator=None, **kwargs: step(*args, **kwargs)
    return scheduler


def ddpm_pipeline_with_sigma_scaling(pipe, steps, generator):
    """DDPMPipeline.__call__'s recipe plus the two lines every other diffusers pipeline adds for sigma-based
    schedulers (init_noise_sigma, scale_model_input), which DDPMPipeline itself omits."""
    from diffusers.utils.torch_utils import randn_tensor

    unet, scheduler = pipe.unet, pipe.scheduler
    image = randn_tensor((1, unet.config.in_channels, 32, 32), generator=generator, dtype=unet.dtype)
    scheduler.set_timesteps(steps)
    image = image * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = unet(scheduler.scale_model_input(image, t), t).sample
        image = scheduler.step(model_output, t, image, generator=generator).prev_sample
    return (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()[0]


@pytest.mark.parametrize("option", SCHEDULERS)
def test_unconditional_matches_ddpm_pipeline(option, ddpm_pipe, tmp_path):
    seed = 7
    image, = ours(tmp_path, "model=tiny-ddpm", f"scheduler={option}", f"steps={STEPS}", f"seed={seed}")
    ddpm_pipe.scheduler = no_generator_step(scheduler_for(ddpm_pipe, option))
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        if float(ddpm_pipe.scheduler.init_noise_sigma) == 1.0:  # DDPMPipeline is right for these as it is
            theirs = ddpm_pipe(generator=generator, num_inference_steps=STEPS, output_type="np").images[0]
        else:
            theirs = ddpm_pipeline_with_sigma_scaling(ddpm_pipe, STEPS, generator)
    assert_same_image(image, to_uint8(theirs))


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-ddpm"])
def test_seed_in_a_batch_equals_that_seed_alone(model, tmp_path):
    # euler_a: stochastic steps, so this also checks that each image's generator feeds its own steps
    batch = ours(tmp_path / "batch", f"model={model}", "scheduler=euler_a", "steps=6", "seed=[3,4,5]")
    alone = ours(tmp_path / "alone", f"model={model}", "scheduler=euler_a", "steps=6", "seed=4")
    assert len(batch) == 3
    assert_same_image(batch[1], alone[0])
    assert np.abs(batch[0].astype(int) - batch[1].astype(int)).max() > 10  # different seeds, different images


def test_prompt_list_batches_prompts_by_seeds_and_respects_batch_size(tmp_path):
    rows = run_job_in(tmp_path / "grid", "model=tiny-sd", "steps=5", "prompt=[a cat,a dog]", "seed=[1,2]", "sampling.batch_size=3")
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a cat", 1), ("a cat", 2), ("a dog", 1), ("a dog", 2)]
    alone, = ours(tmp_path / "alone", "steps=5", "prompt=a dog", "seed=2")
    assert_same_image(read_png(tmp_path / "grid" / rows[3]["image_path"]), alone)
