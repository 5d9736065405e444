"""Scheduler names → diffusers classes (an allow-list), and the sigma schedule a run records."""

ALLOWED_SCHEDULERS = frozenset({
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler", "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
})


def is_flow(class_name: str, kwargs: dict) -> bool:
    """Whether a scheduler walks flow-matching sigmas in [0, 1] (the FlowMatch classes, and the multistep solvers
    with use_flow_sigmas) rather than a VP (DDPM-style) schedule."""
    return class_name.startswith("FlowMatch") or bool(kwargs.get("use_flow_sigmas"))


def options_of_kind(flow: bool) -> list[str]:
    """The scheduler options (conf/scheduler/*.yaml) that fit a VP model, or a flow-matching one: for messages."""
    from omegaconf import OmegaConf

    from runner import CONF_DIR

    names = []
    for path in sorted((CONF_DIR / "scheduler").glob("*.yaml")):
        option = OmegaConf.to_container(OmegaConf.load(path))
        if option.get("class_name") is None or is_flow(option["class_name"], option.get("kwargs") or {}) == flow:
            names.append(path.stem)
    return names


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


def sigma_schedule(scheduler, flow: bool = False) -> list[dict]:
    """(step, timestep, sigma, log_snr) for every model call of a scheduler after `set_timesteps`.

    Sigma-based schedulers report their own `sigmas`; the others get the equivalent sigma of each timestep,
    from `alphas_cumprod` (interpolated, since Karras-spaced timesteps are fractional). `log_snr` puts VP and
    flow schedules on one axis: -2 log sigma for VP sigmas (Karras et al. 2022, table 1), 2 log((1 - sigma) /
    sigma) for flow sigmas (Esser et al. 2024, section 3); -inf at pure noise.
    """
    import numpy as np

    timesteps = scheduler.timesteps.float().cpu().numpy()
    own = getattr(scheduler, "sigmas", None)
    if own is not None and len(own) >= len(timesteps):
        sigmas, source = np.asarray(own.float().cpu())[: len(timesteps)], "scheduler"
    else:
        equivalent = sigma_from_alphas_cumprod(scheduler.alphas_cumprod.double().cpu().numpy())
        sigmas, source = np.interp(timesteps, np.arange(len(equivalent)), equivalent), "alphas_cumprod"
    sigmas = sigmas.astype("float64")
    with np.errstate(divide="ignore"):
        log_snr = 2 * np.log((1 - sigmas) / sigmas) if flow else -2 * np.log(sigmas)
    return [{"step": i, "timestep": float(t), "sigma": float(s), "log_snr": float(snr), "sigma_source": source}
            for i, (t, s, snr) in enumerate(zip(timesteps, sigmas, log_snr))]
