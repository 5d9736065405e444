"""The pieces every family's denoising loop shares (runner/families/*.py holds the loops themselves).

Pure functions of modules, a scheduler and per-image CPU generators. They know nothing of files, tables or W&B.
"""

import inspect
import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

log = logging.getLogger("runner")


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


def warn_truncated(tokenizer, prompts, limit: int | None = None) -> None:
    """The pipelines truncate prompts past a tokenizer's limit; say so once per prompt, as they do."""
    limit = limit or tokenizer.model_max_length
    for prompt in dict.fromkeys(prompts):
        dropped = len(tokenizer(prompt).input_ids) - limit
        if dropped > 0:
            log.warning(f"  prompt is {dropped} token(s) longer than the tokenizer's limit of {limit}; "
                        f"they are dropped: {prompt[:60]!r}…")


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """CLIP hidden states, padded to the tokenizer's `model_max_length` and truncated."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    device = text_encoder.device
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].to(text_encoder.dtype)


def set_schedule(scheduler, spec, device=None) -> None:
    """`scheduler.set_timesteps` for a run: its custom timesteps or sigmas where the schedule axis gave them
    (schedule=ays, schedule.timesteps=[...], schedule.sigmas=[...]; the spec checked that the scheduler takes them),
    else its step count. Every family sets its schedule here, so the recorded schedule is the one the loop used."""
    apply_schedule(scheduler, spec.steps, getattr(spec, "schedule_timesteps", None),
                   getattr(spec, "schedule_sigmas", None), device)


def apply_schedule(scheduler, steps: int, timesteps=None, sigmas=None, device=None) -> None:
    """As the pipelines' `retrieve_timesteps`: a custom list replaces the step count."""
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps), device=device)
    elif sigmas is not None:
        scheduler.set_timesteps(sigmas=list(sigmas), device=device)
    else:
        scheduler.set_timesteps(steps, device=device)


def img2img_start(steps: int, strength: float, order: int) -> int:
    """Index of the first timestep img2img runs: `strength` of the schedule runs, counted from its end."""
    return (steps - min(int(steps * strength), steps)) * order


def timed(timer, name):
    return timer(name) if timer is not None else nullcontext()


def guidance_embedding(w, dim: int):
    """The guidance-scale embedding of guidance-distilled UNets (`time_cond_proj_dim`: LCM, Turbo-style), as the
    pipelines' get_guidance_scale_embedding: sinusoidal features of 1000 * w, in fp32 (the caller casts)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = (w * 1000.0).float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def guidance_condition(unet, guidance: float, rows: int, device, dtype):
    """`timestep_cond` for a UNet that takes guidance as an input, else None. Every diffusers pipeline (SD, SDXL and
    LatentConsistencyModelPipeline alike) embeds w = guidance - 1: the Imagen CFG form eps_u + g (eps_c - eps_u) is
    the LCM paper's eps_c + w (eps_c - eps_u) with w = g - 1."""
    if unet.config.time_cond_proj_dim is None:
        return None
    w = torch.tensor(guidance - 1).repeat(rows)
    return guidance_embedding(w, unet.config.time_cond_proj_dim).to(device=device, dtype=dtype)


def uses_cfg(denoiser, guidance) -> bool:
    """Whether a batch runs an unconditional pass beside the conditional one, as the pipelines decide: guidance > 1,
    or any image's where each image has its own (a fused sweep's batch, runner.fused: a tuple, one scale per image);
    a UNet with `time_cond_proj_dim` (LCM-style, guidance-distilled) takes guidance as an embedding instead."""
    guided = max(guidance) > 1 if isinstance(guidance, tuple) else guidance > 1
    return guided and getattr(denoiser.config, "time_cond_proj_dim", None) is None


def combine_cfg(noise_pred, guidance, adjust=None):
    """The classifier-free guidance combination eps_u + w (eps_c - eps_u) of a batch's [uncond; cond] prediction,
    then `adjust(guided, eps_c)` if given (SDXL's guidance rescale). With one scale per image (a tuple: a fused
    sweep's batch, runner.fused), each row takes its own w, and a row whose w <= 1 takes eps_c as it is: its point,
    drawn alone, runs no unconditional pass."""
    noise_uncond, noise_cond = noise_pred.chunk(2)
    if isinstance(guidance, tuple):
        w = torch.tensor(guidance, dtype=noise_pred.dtype, device=noise_pred.device)
        w = w.view(-1, *[1] * (noise_pred.ndim - 1))
    else:
        w = guidance
    guided = noise_uncond + w * (noise_cond - noise_uncond)
    if adjust is not None:
        guided = adjust(guided, noise_cond)
    return torch.where(w > 1, guided, noise_cond) if isinstance(guidance, tuple) else guided


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


class PromptCache:
    """Text embeddings computed once per distinct prompt within a job, for every family: `encode(prompts)` returns
    a tuple of batch-first tensors (hidden states, pooled ...); calling the cache returns that tuple for any list
    of prompts, timed as `encode`."""

    def __init__(self, encode, timer):
        self.encode, self.timer, self.cache = encode, timer, {}

    def __call__(self, prompts: list[str]) -> tuple:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            with self.timer("encode"):
                encoded = self.encode(missing)
            self.cache.update({p: tuple(t[i] for t in encoded) for i, p in enumerate(missing)})
        return tuple(torch.stack(parts) for parts in zip(*(self.cache[p] for p in prompts)))
