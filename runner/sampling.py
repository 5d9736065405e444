"""The denoising loops: one per model family, as the diffusers tutorials deconstruct the pipelines.

Pure functions of components, a scheduler and per-image CPU generators. They know nothing of files, tables
or W&B. Given the same inputs they reproduce `DDPMPipeline`, `StableDiffusionPipeline` and
`StableDiffusionImg2ImgPipeline` (see tests/test_parity.py).
"""

import inspect
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm


def latent_scale(vae) -> int:
    """How many pixels one latent covers per side, from the VAE config (8 for Stable Diffusion)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def to_uint8(images: torch.Tensor):
    """[-1, 1] NCHW → uint8 NHWC, rounded as diffusers' image processor does."""
    images = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return (images * 255).round().astype("uint8")


def step_kwargs(scheduler, generators, eta: float) -> dict:
    """The per-image generators (and eta) go to the schedulers whose step is stochastic and accepts them."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


def tokens_dropped(tokenizer, prompt: str) -> int:
    """How many tokens of a prompt fall past the tokenizer's limit (they are truncated)."""
    return max(0, len(tokenizer(prompt).input_ids) - tokenizer.model_max_length)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """CLIP hidden states, padded to the tokenizer's `model_max_length` and truncated."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    device = text_encoder.device
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].to(text_encoder.dtype)


def img2img_start(steps: int, strength: float, order: int) -> int:
    """Index of the first timestep img2img runs: `strength` of the schedule runs, counted from its end."""
    return (steps - min(int(steps * strength), steps)) * order


def _timed(timer, name):
    return timer(name) if timer is not None else nullcontext()


@dataclass
class Tally:
    """Model evaluations per image, counted where they happen: `nfe` counts evaluations of the guided model (a
    classifier-free-guidance pair is one, as sampler papers count), `forward` the network's forward passes (a
    CFG pair is two)."""

    nfe: int = 0
    forward: int = 0

    def add(self, passes: int) -> None:
        self.nfe += 1
        self.forward += passes


def denoise(scheduler, latents, timesteps, predict_noise, extra, progress, timer, tally=None, passes=1):
    """The loop every family shares: predict, then let the scheduler step; `passes` forward passes per call."""
    for t in tqdm(timesteps, desc="denoising", leave=False, disable=not progress):
        with _timed(timer, "step"):
            with _timed(timer, "unet"):
                noise_pred = predict_noise(latents, t)
            if tally is not None:
                tally.add(passes)
            with _timed(timer, "scheduler"):
                latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
    return latents


@torch.no_grad()
def sample_unconditional(unet, scheduler, generators, height, width, steps, eta=0.0, progress=True, timer=None):
    """Pixel-space DDPM sampling (Ho et al. 2020), as DDPMPipeline, for a batch with one generator per image."""
    # 1. noise, one image per generator
    shape = (len(generators), unet.config.in_channels, height, width)
    images = randn_tensor(shape, generator=generators, device=unet.device, dtype=unet.dtype)
    # 2. the schedule; sigma-based schedulers start from a wider noise and scale the model input
    scheduler.set_timesteps(steps)
    images = images * scheduler.init_noise_sigma

    # 3. denoise
    def predict_noise(x, t):
        return unet(scheduler.scale_model_input(x, t), t).sample

    images = denoise(scheduler, images, scheduler.timesteps, predict_noise, step_kwargs(scheduler, generators, eta),
                      progress, timer)
    # 4. to pixels
    return to_uint8(images), images


@torch.no_grad()
def sample_text_to_image(unet, vae, scheduler, cond_embeds, uncond_embeds, generators, height, width, steps, guidance,
                         eta=0.0, progress=True, timer=None, init_image=None, strength=1.0):
    """Latent diffusion with classifier-free guidance, as StableDiffusionPipeline.

    `cond_embeds`/`uncond_embeds` hold one row per image. With `init_image` (a [-1, 1] tensor of shape
    (1, 3, H, W)) it is img2img, as StableDiffusionImg2ImgPipeline: the image is encoded, noised to the
    timestep that `strength` picks, and only the remaining steps run.
    """
    # The embeddings sit on the execution device, also under model CPU offload (where unet.device says "cpu").
    device, dtype = cond_embeds.device, cond_embeds.dtype
    use_cfg = guidance > 1 and unet.config.time_cond_proj_dim is None
    # 1. the schedule first: init_noise_sigma and img2img's start depend on it
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    # 2. latents: pure noise, or the init image encoded and noised
    if init_image is None:
        shape = (len(generators), unet.config.in_channels, height // latent_scale(vae), width // latent_scale(vae))
        latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype) * scheduler.init_noise_sigma
    else:
        start = img2img_start(steps, strength, scheduler.order)
        timesteps = timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        with _timed(timer, "vae_encode"):
            posterior = vae.encode(init_image.to(device=device, dtype=dtype)).latent_dist
        clean = torch.cat([posterior.sample(generator=g) for g in generators]) * vae.config.scaling_factor
        noise = randn_tensor(clean.shape, generator=generators, device=device, dtype=dtype)
        latents = scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(generators)))
    embeds = torch.cat([uncond_embeds, cond_embeds]) if use_cfg else cond_embeds

    # 3. denoise: eps_u + w * (eps_c - eps_u)
    def predict_noise(x, t):
        model_input = scheduler.scale_model_input(torch.cat([x, x]) if use_cfg else x, t)
        noise_pred = unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if not use_cfg:
            return noise_pred
        noise_uncond, noise_cond = noise_pred.chunk(2)
        return noise_uncond + guidance * (noise_cond - noise_uncond)

    latents = denoise(scheduler, latents, timesteps, predict_noise, step_kwargs(scheduler, generators, eta),
                       progress, timer)
    # 4. decode
    with _timed(timer, "vae_decode"):
        images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return to_uint8(images), latents
