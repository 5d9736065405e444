"""The correctness contract: our loops give the images of diffusers' own pipelines, for every scheduler option.

Bound: max pixel difference <= 1/255 on CPU fp32, images compared as the uint8 PNGs we write.
"""

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (VP_SCHEDULERS, assert_same_image, compose_config, read_png, run_job_in, scheduler_for, to_uint8,
                      unet_rows)
from runner import embedded_model_path

SCHEDULERS = list(VP_SCHEDULERS)  # every option for Stable Diffusion and DDPM models
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


def unet_batch_rows():
    """unet_rows of the UNet the runner draws tiny-sd with (its cached components)."""
    from runner.components import load_components
    from runner.spec import make_spec

    return unet_rows(load_components(make_spec(compose_config("model=tiny-sd", "device=cpu")))[0].denoiser)


@pytest.mark.parametrize("guidance", [1, 0.5, 0])
def test_guidance_at_most_one_runs_no_unconditional_pass(guidance, sd_pipe, tmp_path):
    # At guidance 1, eps_u + 1 * (eps_c - eps_u) = eps_c: the image alone cannot tell whether an unconditional pass
    # ran, so count the UNet's batch rows. Below 1 the pipeline also runs the conditional pass alone.
    with unet_batch_rows() as rows:
        image, = ours(tmp_path, "steps=6", f"guidance={guidance}", "seed=2", "negative_prompt=anything")
    assert rows and set(rows) == {1}  # one image, one row per UNet call: no unconditional row beside it
    sd_pipe.scheduler = scheduler_for(sd_pipe, "default")
    theirs = sd_pipe(compose_config().prompt, negative_prompt="anything", num_inference_steps=6,
                     guidance_scale=guidance, height=64, width=64, generator=torch.Generator("cpu").manual_seed(2),
                     output_type="np").images[0]
    assert_same_image(image, to_uint8(theirs))


def test_guidance_above_one_runs_both_passes_in_one_batch(tmp_path):
    with unet_batch_rows() as rows:
        ours(tmp_path, "steps=3", "guidance=1.5", "seed=[2,3]")
    assert rows and set(rows) == {4}  # two images, each with its conditional and unconditional row


def test_eta_adds_ddim_noise_as_the_pipeline_does(sd_pipe, tmp_path):
    seed, prompt = 4, "a red cube on a table"
    deterministic, = ours(tmp_path / "eta0", "scheduler=ddim", "steps=6", f"seed={seed}", f"prompt='{prompt}'")
    noisy, = ours(tmp_path / "eta1", "scheduler=ddim", "steps=6", f"seed={seed}", f"prompt='{prompt}'",
                  "sampling.eta=1")
    assert np.abs(noisy.astype(int) - deterministic.astype(int)).max() > 10
    sd_pipe.scheduler = scheduler_for(sd_pipe, "ddim")
    theirs = sd_pipe(prompt, num_inference_steps=6, guidance_scale=7.5, height=64, width=64, eta=1.0,
                     generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    assert_same_image(noisy, to_uint8(theirs))


LONG_PROMPT = "a red cube on a wooden table beside a blue sphere, soft light " * 2  # 100 tiny-sd tokens (letters)


# (overrides, the pipeline call's own arguments, the scheduler's kwargs beyond the option's)
VARIANTS = {
    "trailing_spacing": (["scheduler=ddim", "scheduler.kwargs.timestep_spacing=trailing"], {},
                         {"timestep_spacing": "trailing"}),
    "v_prediction": (["scheduler=euler", "scheduler.kwargs.prediction_type=v_prediction"], {},
                     {"prediction_type": "v_prediction"}),
    "karras_and_offset": (["scheduler=dpmpp_2m", "scheduler.kwargs.use_karras_sigmas=true",
                           "scheduler.kwargs.steps_offset=0"], {}, {"use_karras_sigmas": True, "steps_offset": 0}),
    "non_native_size": (["height=48", "width=80"], {"height": 48, "width": 80}, {}),
    "prompt_past_77_tokens": ([], {"prompt": LONG_PROMPT}, {}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_overrides_match_the_pipeline_called_likewise(variant, sd_pipe, tmp_path):
    overrides, call, scheduler_kwargs = VARIANTS[variant]
    call = {"prompt": "a red cube", "height": 64, "width": 64, **call}
    option = next((o.split("=")[1] for o in overrides if o.startswith("scheduler=")), "default")
    image, = ours(tmp_path, *overrides, "steps=6", "seed=9", f"prompt='{call['prompt']}'")
    sd_pipe.scheduler = scheduler_for(sd_pipe, option, **scheduler_kwargs)
    theirs = sd_pipe(**call, num_inference_steps=6, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(9),
                     output_type="np").images[0]
    assert image.shape == (call["height"], call["width"], 3)
    assert_same_image(image, to_uint8(theirs))


def test_a_seed_list_matches_the_pipeline_with_a_generator_list(sd_pipe, tmp_path):
    # euler_a draws noise at every step: the pipeline hands the list to the scheduler, each image its own generator
    batch = ours(tmp_path, "scheduler=euler_a", "steps=6", "seed=[3,4]", "prompt='a red cube'")
    sd_pipe.scheduler = scheduler_for(sd_pipe, "euler_a")
    theirs = sd_pipe("a red cube", num_images_per_prompt=2, num_inference_steps=6, guidance_scale=7.5, height=64,
                     width=64, generator=[torch.Generator("cpu").manual_seed(s) for s in (3, 4)],
                     output_type="np").images
    for image, their_image in zip(batch, theirs, strict=True):
        assert_same_image(image, to_uint8(their_image))


@pytest.mark.slow
def test_euler_a_draws_ddpm_images_and_euler_draws_ddim_images(tmp_path):
    """README: Euler a draws DDPM's images (1/255), Euler draws DDIM's (2/255): on digits-sd, 20 steps, guidance 7.5."""
    def images(option):
        return ours(tmp_path / option, "model=digits-sd", f"scheduler={option}", "steps=20", "seed=[0,1,2]",
                    "prompt=[a handwritten digit three,a handwritten digit eight]")

    def max_difference(a, b):
        return max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(a, b, strict=True))

    assert max_difference(images("euler_a"), images("ddpm")) <= 1
    assert max_difference(images("euler"), images("ddim")) <= 2


IMG2IMG = [(option, 0.6, "") for option in SCHEDULERS] + [("default", 0.3, ""), ("euler_a", 1.0, ""),
                                                          ("dpmpp_2m_karras", 0.6, "blurry")]


@pytest.mark.parametrize("option,strength,negative", IMG2IMG)
def test_img2img_matches_img2img_pipeline(option, strength, negative, sd_pipe, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    gradient = np.linspace(0, 255, 64, dtype=np.uint8)
    init = Image.fromarray(np.stack([np.tile(gradient, (64, 1)), np.tile(gradient[:, None], (1, 64)),
                                     np.full((64, 64), 90, np.uint8)], -1))
    init.save(tmp_path / "init.png")
    image, = ours(tmp_path / "run", f"scheduler={option}", "steps=10", f"strength={strength}", "seed=5",
                  f"init_image={tmp_path / 'init.png'}", "prompt=a cat", f"negative_prompt='{negative}'")
    pipe = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    pipe.scheduler = scheduler_for(sd_pipe, option)
    theirs = pipe("a cat", image=init, strength=strength, negative_prompt=negative or None, num_inference_steps=10,
                  guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
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
