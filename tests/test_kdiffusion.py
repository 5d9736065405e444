"""The k-diffusion backend: each k_* option draws what k-diffusion's own sampler draws when called by hand on the
same wrapped model, noise and sigmas (the way A1111 calls it), and counts its model evaluations.

Bound: max pixel difference <= 1/255 on CPU fp32 (tiny-sd; one on tiny-sdxl). The hand-made side uses the
pipeline's own text encoding and UNet, k-diffusion's DiscreteEpsDDPMDenoiser and sigma builders, and the seed's
generator: nothing from the runner but the loader of k-diffusion's two files.
"""

import importlib.util
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import K_SAMPLERS, assert_same_image, compose_config, read_png, run_job_in
from runner import embedded_model_path

pytestmark = pytest.mark.skipif(importlib.util.find_spec("k_diffusion") is None,
                                reason="k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1")

STEPS, GUIDANCE, SEED = 5, 7.5, 11
PROMPT, NEGATIVE = "a red cube on a table", "blurry"
# option → (k-diffusion function, the noise its steps draw, model evaluations at STEPS steps), from the table
# written by hand in conftest (K_SAMPLERS)
OPTIONS = {option: (function, noise, calls * (STEPS - 1) + 1) for option, (function, noise, calls) in K_SAMPLERS.items()}


def to_uint8(images):
    return ((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")


@pytest.fixture(scope="module")
def k():
    from runner.ksampling import k_diffusion

    return k_diffusion()


@pytest.fixture(scope="module")
def sd_pipe():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(embedded_model_path("tiny-sd"), safety_checker=None,
                                                   requires_safety_checker=False, use_safetensors=True)


def by_hand(k, unet, alphas_cumprod, conditioning, shape, function, noise, seeds, sigmas=None, **unet_kwargs):
    """k-diffusion as A1111 calls it: CFG around the network, wrapped as a discrete eps model; Karras sigmas between
    the model's extremes; x = noise * sigma_max; ancestral noise from the seed's generator, SDE noise from Brownian
    trees seeded with the seeds."""
    sampling, external = k
    cond, uncond = conditioning

    def cfg(x, t):
        eps = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond]),
                   **unet_kwargs).sample
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + GUIDANCE * (eps_cond - eps_uncond)

    model = external.DiscreteEpsDDPMDenoiser(cfg, alphas_cumprod, quantize=False)
    if sigmas is None:
        sigmas = sampling.get_sigmas_karras(STEPS, model.sigma_min.item(), model.sigma_max.item())
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    x = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators]) * sigmas[0]
    extra = {}
    if noise == "generator":
        extra["noise_sampler"] = lambda *_: torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators])
    elif noise == "brownian":
        extra["noise_sampler"] = sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(),
                                                                   seed=list(seeds))
    with torch.no_grad():
        return getattr(sampling, function)(model, x, sigmas, disable=True, **extra)


def sd_by_hand(k, pipe, option, seeds=(SEED,), sigmas=None):
    function, noise, _ = OPTIONS[option]
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        n = len(seeds)
        latents = by_hand(k, pipe.unet, pipe.scheduler.alphas_cumprod, (cond.repeat(n, 1, 1), uncond.repeat(n, 1, 1)),
                          (n, 4, 8, 8), function, noise, seeds, sigmas)
        return to_uint8(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample)


def ours(tmp_path, *overrides):
    rows = run_job_in(tmp_path, f"prompt='{PROMPT}'", f"negative_prompt={NEGATIVE}", f"guidance={GUIDANCE}",
                      f"steps={STEPS}", *overrides)
    assert all(r["status"] == "ok" for r in rows), rows[0].get("error")
    return [read_png(tmp_path / r["image_path"]) for r in rows], rows


@pytest.mark.parametrize("option", OPTIONS)
def test_matches_k_diffusion_called_by_hand(option, k, sd_pipe, tmp_path):
    (image,), (row,) = ours(tmp_path, "model=tiny-sd", f"scheduler={option}", f"seed={SEED}")
    assert_same_image(image, sd_by_hand(k, sd_pipe, option)[0])
    assert row["nfe"] == OPTIONS[option][2]
    assert row["unet_evals"] == 2 * row["nfe"]  # classifier-free guidance: two rows per evaluation
    # the recorded schedule is the Karras sigmas the sampler walked, with the timesteps the UNet saw
    sampling, external = k
    model = external.DiscreteEpsDDPMDenoiser(None, sd_pipe.scheduler.alphas_cumprod, quantize=False)
    sigmas = sampling.get_sigmas_karras(STEPS, model.sigma_min.item(), model.sigma_max.item())
    schedule = pd.read_csv(tmp_path / "schedule.csv")
    assert np.allclose(schedule["sigma"], sigmas[:-1].numpy())
    assert np.allclose(schedule["timestep"], model.sigma_to_t(sigmas[:-1]).numpy(), atol=1e-3)


@pytest.mark.parametrize("option", ["k_euler_a", "k_dpmpp_2m_sde"])
def test_seed_in_a_batch_equals_that_seed_alone(option, k, sd_pipe, tmp_path):
    """Per-image noise: ancestral steps draw from each image's generator, SDE steps from its own Brownian tree."""
    images, _ = ours(tmp_path, "model=tiny-sd", f"scheduler={option}", "seed=[3,4]")
    by_hand_images = sd_by_hand(k, sd_pipe, option, seeds=(3, 4))
    alone = sd_by_hand(k, sd_pipe, option, seeds=(4,))
    for ours_image, theirs_image in zip(images, by_hand_images):
        assert_same_image(ours_image, theirs_image)
    assert_same_image(images[1], alone[0])
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 10


@pytest.mark.parametrize("schedule, builder", [("exponential", "get_sigmas_exponential"),
                                               ("polyexponential", "get_sigmas_polyexponential")])
def test_schedule_axis_picks_the_k_sigma_builder(schedule, builder, k, sd_pipe, tmp_path):
    sampling, external = k
    model = external.DiscreteEpsDDPMDenoiser(None, sd_pipe.scheduler.alphas_cumprod, quantize=False)
    sigmas = getattr(sampling, builder)(STEPS, model.sigma_min.item(), model.sigma_max.item())
    (image,), _ = ours(tmp_path, "model=tiny-sd", "scheduler=k_dpmpp_2m", f"schedule={schedule}", f"seed={SEED}")
    assert_same_image(image, sd_by_hand(k, sd_pipe, "k_dpmpp_2m", sigmas=sigmas)[0])
    assert np.allclose(pd.read_csv(tmp_path / "schedule.csv")["sigma"], sigmas[:-1].numpy())


def test_ays_and_custom_sigmas_are_walked_as_given(k, sd_pipe, tmp_path):
    ays = torch.tensor([14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0])
    (image,), _ = ours(tmp_path / "ays", "model=tiny-sd", "scheduler=k_euler", "schedule=ays", "steps=10",
                       f"seed={SEED}")
    assert_same_image(image, sd_by_hand(k, sd_pipe, "k_euler", sigmas=ays)[0])
    custom = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.1, 0.0])
    (image,), _ = ours(tmp_path / "custom", "model=tiny-sd", "scheduler=k_euler",
                       "schedule.sigmas=[10.0,3.0,1.0,0.3,0.1,0.0]", f"seed={SEED}")
    assert_same_image(image, sd_by_hand(k, sd_pipe, "k_euler", sigmas=custom)[0])


def test_sdxl_matches_k_diffusion_called_by_hand(k, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    (image,), (row,) = ours(tmp_path, "model=tiny-sdxl", "scheduler=k_dpmpp_2m", f"seed={SEED}", "negative_prompt=''")
    pipe = StableDiffusionXLPipeline.from_pretrained(embedded_model_path("tiny-sdxl"), use_safetensors=True,
                                                     add_watermarker=False)
    with torch.no_grad():
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=True)
        time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=cond.dtype)
        added = {"text_embeds": torch.cat([uncond_pooled, pooled]), "time_ids": time_ids}
        latents = by_hand(k, pipe.unet, pipe.scheduler.alphas_cumprod, (cond, uncond), (1, 4, 8, 8),
                          "sample_dpmpp_2m", None, (SEED,), added_cond_kwargs=added)
        theirs = to_uint8(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample)
    assert_same_image(image, theirs[0])
    assert (row["nfe"], row["unet_evals"]) == (STEPS, 2 * STEPS)


@pytest.mark.slow
def test_loading_k_diffusion_imports_neither_its_package_nor_torchvision(k):
    import subprocess

    code = ("import sys; from runner.ksampling import k_diffusion; sampling, external = k_diffusion(); "
            "assert callable(sampling.sample_dpmpp_2m) and external.DiscreteEpsDDPMDenoiser; "
            "print('k_diffusion' in sys.modules, 'torchvision' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("overrides, message", [
    (("model=tiny-ddpm", "scheduler=k_euler"), "scheduler='k_euler' is not allowed: k-diffusion samplers run on "
     "stable-diffusion and sdxl models; this model is unconditional: one of ddim, ddpm"),
    (("model=tiny-sd3", "scheduler=k_euler"), "scheduler='k_euler' is not allowed: k-diffusion samplers run on"),
    (("model=tiny-sd", "scheduler=k_euler", "schedule=beta"), "schedule='beta' is not allowed: one of default, "
     "karras, exponential, polyexponential, ays with a k-diffusion sampler"),
    (("model=tiny-sd", "scheduler=k_euler", "schedule.timesteps=[999,500]", "steps=2"),
     "schedule.timesteps=[999, 500] is not allowed: null with a k-diffusion sampler: it walks sigmas"),
    (("model=tiny-sd", "scheduler=k_euler", "scheduler.kwargs.use_karras_sigmas=true"),
     "scheduler.kwargs.use_karras_sigmas=True is not allowed: null with a k-diffusion sampler"),
    (("model=tiny-sd", "scheduler=k_euler", "scheduler.sampler=sample_dpm_fast"),
     "scheduler.sampler='sample_dpm_fast' is not allowed: one of k-diffusion's sample_euler"),
    (("model=tiny-sd", "scheduler=euler", "schedule=polyexponential"), "schedule='polyexponential' is not "
     "allowed: a k-diffusion sigma builder: for the k_* scheduler options only (k_dpm_2, k_dpmpp_2m"),
    (("model=tiny-sd", "scheduler=k_euler", "init_image=README.md"), "init_image='README.md' is not allowed: null "
     "with a k-diffusion sampler"),
])
def test_refusals_are_one_line(overrides, message):
    from runner.checks import ConfigError
    from runner.spec import make_spec

    with pytest.raises(ConfigError) as error:
        make_spec(compose_config(*overrides))
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)
