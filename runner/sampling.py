"""The pieces every family's denoising loop shares (runner/families/*.py holds the loops themselves).

Pure functions of modules, a scheduler and per-image CPU generators. They know nothing of files, tables or W&B.
"""

import inspect
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


def latent_scale(vae_config) -> int:
    """How many pixels one latent covers per side, from the VAE's config (8 for Stable Diffusion)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def to_uint8(images: torch.Tensor):
    """[-1, 1] NCHW → uint8 NHWC, rounded as diffusers' image processor does. NaN or inf (an overflow, e.g. fp16)
    would become a black image recorded as ok: it raises instead, failing the point."""
    if not torch.isfinite(images).all():
        raise FloatingPointError("the image is not finite (NaN or inf): the sampling overflowed; try fp32 or a "
                                 "smaller guidance")
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


def timed(timer, name):
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
        with timed(timer, "step"):
            with timed(timer, "unet"):
                noise_pred = predict_noise(latents, t)
            if tally is not None:
                tally.add(passes)
            with timed(timer, "scheduler"):
                latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
    return latents
