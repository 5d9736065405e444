"""Scheduler names → diffusers classes (an allow-list), and the sigma schedule a run records."""

ALLOWED_SCHEDULERS = frozenset({
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler",
})


def build_scheduler(model_config: dict, class_name: str | None, kwargs: dict):
    """A fresh scheduler from the model's own scheduler config, so betas and prediction type carry over.

    `class_name=None` keeps the class the model was saved with. Only allow-listed diffusers classes are built.
    """
    import diffusers

    class_name = class_name or model_config["_class_name"]
    if class_name not in ALLOWED_SCHEDULERS:
        raise ValueError(f"scheduler class {class_name!r} is not allowed; allowed: {', '.join(sorted(ALLOWED_SCHEDULERS))}")
    return getattr(diffusers, class_name).from_config(model_config, **kwargs)


def sigma_from_alphas_cumprod(alphas_cumprod):
    """sigma = sqrt((1 - ᾱ) / ᾱ): the noise level of a DDPM-style state in the variance-exploding view
    (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", eq. 6 / table 1)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigma_schedule(scheduler) -> list[dict]:
    """(step, timestep, sigma) for every model call of a scheduler after `set_timesteps`.

    Sigma-based schedulers report their own `sigmas`; the others get the equivalent sigma of each timestep,
    from `alphas_cumprod` (interpolated, since Karras-spaced timesteps are fractional).
    """
    import numpy as np

    timesteps = scheduler.timesteps.float().cpu().numpy()
    own = getattr(scheduler, "sigmas", None)
    if own is not None and len(own) >= len(timesteps):
        sigmas, source = np.asarray(own.float().cpu())[: len(timesteps)], "scheduler"
    else:
        equivalent = sigma_from_alphas_cumprod(scheduler.alphas_cumprod.double().cpu().numpy())
        sigmas, source = np.interp(timesteps, np.arange(len(equivalent)), equivalent), "alphas_cumprod"
    return [{"step": i, "timestep": float(t), "sigma": float(s), "sigma_source": source}
            for i, (t, s) in enumerate(zip(timesteps, sigmas))]
