"""What the flow-matching families (SD3, Flux) share: noise levels, the schedule call, 2×2 latent packing, decoding.

Flow matching (rectified flow) draws x_sigma = (1 - sigma) * x0 + sigma * noise with sigma in [0, 1] and learns the
velocity noise - x0 (Lipman et al. 2023, "Flow Matching for Generative Modeling"; Liu et al. 2023, "Flow Straight
and Fast"; Esser et al. 2024, "Scaling Rectified Flow Transformers", the SD3 paper). Pure, small functions.
"""

import inspect
import math

import torch


def log_snr_vp(sigma: float) -> float:
    """log SNR of a variance-exploding noise level, x = x0 + sigma * noise: SNR = 1 / sigma² (Karras et al. 2022,
    table 1; the VP/DDPM schedules map onto it through sigma = sqrt((1 - ᾱ) / ᾱ))."""
    return -2 * math.log(sigma)


def log_snr_flow(sigma: float) -> float:
    """log SNR of a rectified-flow noise level, x = (1 - sigma) * x0 + sigma * noise: SNR = ((1 - sigma) / sigma)²
    (Esser et al. 2024, section 3: lambda_t = log(a_t² / b_t²) with a_t = 1 - t, b_t = t)."""
    return 2 * math.log((1 - sigma) / sigma)


def apply_model_shift(scheduler, model_config: dict, given_kwargs: dict) -> None:
    """FlowMatchEuler/Heun read the model's `shift`; DPMSolverMultistep and UniPC (use_flow_sigmas) read their own
    `flow_shift`, which a model's config does not carry. Unless the run sets flow_shift, it is the model's shift.
    (Set here, not in the config they are built from, where FlowMatchEuler would warn of an unknown key.)"""
    if "flow_shift" in scheduler.config and "flow_shift" not in given_kwargs and "shift" in model_config:
        scheduler.register_to_config(flow_shift=model_config["shift"])


def dynamic_mu(scheduler_config, image_seq_len: int, max_shift_default: float) -> float:
    """Resolution-dependent shift: `mu` grows linearly with the number of image tokens, from base_shift at
    base_image_seq_len to max_shift at max_image_seq_len (diffusers' `calculate_shift`, from Flux; the defaults
    are the pipelines': FluxPipeline's max_shift is 1.15, StableDiffusion3Pipeline's 1.16)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    get = scheduler_config.get
    return calculate_shift(image_seq_len, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                           get("base_shift", 0.5), get("max_shift", max_shift_default))


def set_shifted_schedule(scheduler, model_config: dict, spec, image_tokens: int, max_shift_default: float,
                         sigmas=None) -> None:
    """The schedule a flow family's loop walks: the model's shift (apply_model_shift), and `mu` from the image's
    token count where the scheduler's config asks for dynamic shifting, kept as `scheduler.runner_mu` for the
    record."""
    mu = None
    apply_model_shift(scheduler, model_config, spec.scheduler_kwargs)
    if scheduler.config.get("use_dynamic_shifting", None):
        mu = dynamic_mu(scheduler.config, image_tokens, max_shift_default)
    set_timesteps(scheduler, spec.steps, spec.device, sigmas=sigmas, mu=mu)
    scheduler.runner_mu = mu


def accepts(scheduler, argument: str) -> bool:
    return argument in inspect.signature(scheduler.set_timesteps).parameters


def set_timesteps(scheduler, steps: int, device, sigmas=None, mu=None) -> None:
    """`scheduler.set_timesteps` as the pipelines' `retrieve_timesteps` calls it: custom `sigmas` replace the step
    count, `mu` goes along only when given. A scheduler that cannot take them is a config error, not a crash."""
    from runner.checks import ConfigError

    for argument, value in (("sigmas", sigmas), ("mu", mu)):
        if value is not None and not accepts(scheduler, argument):
            name = type(scheduler).__name__
            raise ConfigError(f"scheduler={name!r} is not allowed: this model's pipeline passes `{argument}=` to "
                              f"set_timesteps, which {name} does not take")
    kwargs = {"mu": mu} if mu is not None else {}
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
    else:
        scheduler.set_timesteps(steps, device=device, **kwargs)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2 · W/2, 4C): each 2×2 patch one token, as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height`×`width` (FluxPipeline._unpack_latents)."""
    b, _, channels = latents.shape
    latents = latents.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, height, width)


def latent_image_ids(rows: int, cols: int, device, dtype) -> torch.Tensor:
    """(rows · cols, 3) positions of the packed tokens for the transformer's RoPE: (0, row, col), as
    FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents → [-1, 1] images. SD3 and Flux VAEs normalise with a shift as well as a scale."""
    shift = vae.config.shift_factor or 0.0
    # The precision options may keep the VAE in another dtype than the denoiser.
    latents = (latents / vae.config.scaling_factor + shift).to(vae.dtype)
    return vae.decode(latents, return_dict=False)[0]
