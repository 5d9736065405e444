"""Scheduler names → diffusers classes (an allow-list), and the sigma schedule a run records."""

ALLOWED_SCHEDULERS = frozenset({
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler", "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler", "LCMScheduler", "TCDScheduler",
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
        if "sampler" in option:  # a k-diffusion option: VP models only
            fits = not flow
        else:
            fits = option.get("class_name") is None or is_flow(option["class_name"], option.get("kwargs") or {}) == flow
        if fits:
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


# The k-diffusion backend (conf/scheduler/k_*.yaml, runner.ksampling): its sampler functions, each with the noise
# its steps draw: none (deterministic), fresh noise from each image's generator (ancestral), or a Brownian tree
# seeded with each image's seed (the SDE samplers, as A1111 seeds them).
K_BACKEND = "k-diffusion"
K_SAMPLERS = {"sample_euler": None, "sample_heun": None, "sample_dpm_2": None, "sample_lms": None,
              "sample_dpmpp_2m": None, "sample_euler_ancestral": "generators", "sample_dpm_2_ancestral": "generators",
              "sample_dpmpp_2s_ancestral": "generators", "sample_dpmpp_sde": "brownian_tree",
              "sample_dpmpp_2m_sde": "brownian_tree", "sample_dpmpp_3m_sde": "brownian_tree"}
# the k samplers that evaluate the model twice per step (all steps but the last, which is an Euler step to sigma 0)
K_TWO_CALLS = frozenset({"sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_sde",
                         "sample_dpmpp_2s_ancestral"})
K_FAMILIES = ("stable-diffusion", "sdxl")
K_SCHEDULES = ("default", "karras", "exponential", "polyexponential", "ays")  # default = karras, as A1111 names it
K_ONLY_SCHEDULES = ("polyexponential",)
K_KWARGS = ("beta_schedule", "prediction_type")  # the only scheduler.kwargs that reach k: they shape the model's sigmas
K_INSTALL = "pip install --no-deps k-diffusion==0.1.1.post1 (its imports come with pip install -e '.[kdiffusion]')"


def k_options() -> list[str]:
    from omegaconf import OmegaConf

    from runner import CONF_DIR

    return [p.stem for p in sorted((CONF_DIR / "scheduler").glob("*.yaml")) if "sampler" in OmegaConf.load(p)]


def check_k_backend(option: dict, kwargs: dict, family, model_config: dict) -> dict:
    """A k-diffusion scheduler option checked: the family runs it, the sampler is allow-listed, no scheduler kwarg
    that it would ignore is set, and the package is installed. Returns spec.k_sampler."""
    import importlib.util

    from runner.checks import fail

    name, sampler = option.get("name"), option.get("sampler")
    if family.name not in K_FAMILIES:
        fail("scheduler", name, f"k-diffusion samplers run on {' and '.join(K_FAMILIES)} models; this model is "
             f"{family.name}: one of " + ", ".join(o for o in options_of_kind(family.flow) if o not in k_options()))
    if sampler not in K_SAMPLERS:
        fail("scheduler.sampler", sampler, "one of k-diffusion's " + ", ".join(K_SAMPLERS))
    for key, value in kwargs.items():
        if key not in K_KWARGS:
            fail(f"scheduler.kwargs.{key}", value, "null with a k-diffusion sampler: its sigmas come from the "
                 "schedule axis (schedule=karras|exponential|polyexponential|ays, schedule.sigmas=[...])")
    prediction = kwargs.get("prediction_type") or model_config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        fail("scheduler.kwargs.prediction_type", prediction, "epsilon or v_prediction with a k-diffusion sampler "
             "(DiscreteEpsDDPMDenoiser, DiscreteVDDPMDenoiser)")
    if importlib.util.find_spec("k_diffusion") is None:
        fail("scheduler", name, f"the k-diffusion backend needs the k-diffusion package here: {K_INSTALL}")
    return {"sampler": sampler, "noise_sampler": K_SAMPLERS[sampler], "quantize": bool(option.get("quantize"))}


def check_k_schedule(name: str, sigmas, timesteps, family, steps: int) -> tuple | None:
    """The schedule axis for a k-diffusion sampler: a sigma builder (None: runner.ksampling builds them), or the
    sigmas list it walks (ays, schedule.sigmas)."""
    from runner.checks import fail

    if name not in K_SCHEDULES:
        fail("schedule", name, "one of " + ", ".join(K_SCHEDULES) + " with a k-diffusion sampler (k-diffusion 0.1.1 "
             "has no beta builder); the diffusers options that take it: "
             + ", ".join(scheduler_options_where(lambda c, _: takes_kwarg(c, SPACING_KWARGS[name]), family.flow))
             if name in SPACING_KWARGS else "one of " + ", ".join(K_SCHEDULES))
    if timesteps is not None:
        fail("schedule.timesteps", timesteps, "null with a k-diffusion sampler: it walks sigmas; give "
             "schedule.sigmas=[...]")
    if sigmas is not None:
        return tuple(check_custom_list("sigmas", sigmas, steps, 1000))
    if name == "ays":
        if family.name not in AYS_LISTS:
            fail("schedule", name, "Align-Your-Steps lists exist for Stable Diffusion 1.5 and SDXL models only; "
                 f"this model is {family.name}")
        return tuple(ays_sigmas(family.name, steps))
    return None


# The schedule axis (conf/schedule/*.yaml): spacings that diffusers' schedulers build themselves from one kwarg.
SPACING_KWARGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}
# Align Your Steps lists (diffusers' AysSchedules) by model family: the families they were optimised for.
AYS_LISTS = {"stable-diffusion": "StableDiffusion", "sdxl": "StableDiffusionXL"}


def schedule_options() -> list[str]:
    from runner import CONF_DIR

    return sorted(path.stem for path in (CONF_DIR / "schedule").glob("*.yaml"))


def scheduler_class(class_name: str | None, model_config: dict):
    import diffusers

    return getattr(diffusers, class_name or model_config["_class_name"])


def takes_kwarg(class_name: str, key: str) -> bool:
    """Whether a scheduler class has `key` in its constructor (from_config drops unknown keys without a word)."""
    import inspect

    return key in inspect.signature(scheduler_class(class_name, {}).__init__).parameters


def list_refusal(model_config: dict, class_name: str | None, kwargs: dict, steps: int, argument: str, values) -> str:
    """Why a fresh scheduler (no weights: milliseconds) refuses `set_timesteps(argument=values)`, or '' when it
    takes it. The signature is not enough: UniPC takes sigmas= on flow sigmas only, and says so by raising."""
    import inspect

    from diffusers.utils import logging as diffusers_logging

    from runner.sampling import apply_schedule

    if argument not in inspect.signature(scheduler_class(class_name, model_config).set_timesteps).parameters:
        return f"its set_timesteps takes no {argument}="
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # a trial, not the run: the run's own set_timesteps warns where it must
    try:
        apply_schedule(build_scheduler(model_config, class_name, kwargs), steps, **{argument: values})
    except (ValueError, TypeError) as err:
        return str(err)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return ""


def scheduler_options_where(accepts, flow: bool) -> list[str]:
    """The scheduler options of a kind (VP or flow) for which `accepts(class_name, kwargs)` holds: for messages.
    The model's own class (option `default`) is left out: it is not known without a model."""
    from omegaconf import OmegaConf

    from runner import CONF_DIR

    names = []
    for path in sorted((CONF_DIR / "scheduler").glob("*.yaml")):
        option = OmegaConf.to_container(OmegaConf.load(path))
        class_name, kwargs = option.get("class_name"), {k: v for k, v in (option.get("kwargs") or {}).items() if v}
        if class_name in ALLOWED_SCHEDULERS and is_flow(class_name, kwargs) == flow and accepts(class_name, kwargs):
            names.append(path.stem)
    return names


def ays_sigmas(family_name: str, steps: int) -> list[float]:
    """The AYS sigmas for `steps` steps, ending with 0. The published lists have 10 steps; other counts interpolate
    the non-zero sigmas log-linearly, as ComfyUI's AlignYourStepsScheduler (`loglinear_interp`)."""
    import numpy as np
    from diffusers.schedulers import AysSchedules

    published = AysSchedules[AYS_LISTS[family_name] + "Sigmas"]
    levels = np.array(published[:-1], dtype=np.float64)
    if steps == len(levels):
        return list(published)
    new = np.exp(np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(levels)), np.log(levels[::-1])))[::-1]
    return [*map(float, new), 0.0]


def ays_timesteps(family_name: str) -> list[int]:
    from diffusers.schedulers import AysSchedules

    return list(AysSchedules[AYS_LISTS[family_name] + "Timesteps"])


def check_schedule(option: dict, scheduler_name: str, class_name: str | None, kwargs: dict, family,
                   model_config: dict, steps: int, backend: str = "diffusers"
                   ) -> tuple[dict, tuple | None, tuple | None]:
    """The schedule axis checked against the scheduler, with runner.checks.fail for what cannot run. Returns the
    scheduler kwargs with the spacing's own kwarg added, and the custom timesteps or sigmas (or None) that
    runner.sampling.set_schedule passes to set_timesteps. A scheduler that cannot take a spacing is refused,
    never drawn with its default spacing instead."""
    from runner.checks import fail

    name, timesteps, sigmas = option.get("name"), option.get("timesteps"), option.get("sigmas")
    if name not in schedule_options():
        fail("schedule.name", name, "one of " + ", ".join(schedule_options()))
    if name != "default" and (timesteps is not None or sigmas is not None):
        fail("schedule.timesteps" if timesteps is not None else "schedule.sigmas", timesteps or sigmas,
             f"null with schedule={name} (a list replaces the spacing); a custom list goes with schedule=default")
    if backend == K_BACKEND:
        return kwargs, None, check_k_schedule(name, sigmas, timesteps, family, steps)
    if name in K_ONLY_SCHEDULES:
        fail("schedule", name, "a k-diffusion sigma builder: for the k_* scheduler options only ("
             + ", ".join(k_options()) + ")")
    class_name_used = class_name or model_config["_class_name"]
    label = f"scheduler={scheduler_name} ({class_name_used})"
    spacing_set = [k for k in SPACING_KWARGS.values() if kwargs.get(k)]
    if name in SPACING_KWARGS:
        key = SPACING_KWARGS[name]
        if not takes_kwarg(class_name_used, key):
            fail("schedule", name, f"{label} has no {key}; the scheduler options that take it: "
                 + ", ".join(scheduler_options_where(lambda c, _: takes_kwarg(c, key), family.flow)))
        if [k for k in spacing_set if k != key]:
            fail("schedule", name, f"{label} already sets {spacing_set[0]}=true; use schedule=default with it")
        return {**kwargs, key: True}, None, None
    if name == "default" and timesteps is None and sigmas is None:
        return kwargs, None, None
    # From here on a list replaces the scheduler's own spacing: ays, or a custom one.
    if spacing_set:
        fail("schedule", name, f"{label} sets {spacing_set[0]}=true, which a list of timesteps or sigmas replaces; "
             "pick a scheduler option without it (dpmpp_2m rather than dpmpp_2m_karras)")
    if family.flow:
        fail("schedule", name, f"a list of timesteps or sigmas is for VP (DDPM-style) models; this {family.name} "
             "model's sigmas come from its pipeline's recipe (shift, mu)")

    def takers(argument, values):
        return ", ".join(scheduler_options_where(
            lambda c, kw: not list_refusal(model_config, c, kw, steps, argument, values), False))

    if name == "ays":
        if family.name not in AYS_LISTS:
            fail("schedule", name, "Align-Your-Steps lists exist for Stable Diffusion 1.5 and SDXL models only; "
                 f"this model is {family.name}")
        # Sigmas where the scheduler takes them (any step count); else the published timesteps (10 steps only).
        sigmas = ays_sigmas(family.name, steps)
        if not list_refusal(model_config, class_name, kwargs, steps, "sigmas", sigmas):
            return kwargs, None, tuple(sigmas)
        timesteps = ays_timesteps(family.name)
        why = list_refusal(model_config, class_name, kwargs, steps, "timesteps", timesteps)
        if why:
            fail("schedule", name, f"{label} takes neither AYS sigmas nor timesteps ({why}); the scheduler options "
                 "that take them: " + ", ".join(dict.fromkeys(takers("sigmas", sigmas).split(", ")
                                                             + takers("timesteps", timesteps).split(", "))))
        if steps != len(timesteps):
            fail("steps", steps, f"{len(timesteps)} with schedule=ays on {label}: it takes the published "
                 f"{len(timesteps)}-step timesteps only; the options that take AYS sigmas, interpolated to any "
                 f"step count: {takers('sigmas', sigmas)}")
        return kwargs, tuple(timesteps), None
    if timesteps is not None and sigmas is not None:
        fail("schedule.sigmas", sigmas, "null when schedule.timesteps is set: one custom list")
    argument = "timesteps" if timesteps is not None else "sigmas"
    values = check_custom_list(argument, timesteps if timesteps is not None else sigmas, steps,
                               model_config.get("num_train_timesteps", 1000))
    why = list_refusal(model_config, class_name, kwargs, steps, argument, values)
    if why:
        fail(f"schedule.{argument}", values, f"{label} refuses it ({why}); the scheduler options that take "
             f"{argument}=: {takers(argument, values)}")
    values = tuple(values)
    return kwargs, (values if argument == "timesteps" else None), (values if argument == "sigmas" else None)


def check_custom_list(argument: str, values, steps: int, train_steps: int) -> list:
    """A custom timesteps list (integers in 0..train_steps-1, decreasing, one per step) or sigmas list (decreasing
    non-negative numbers, one per step plus the final sigma)."""
    from runner.checks import fail

    key = f"schedule.{argument}"
    if argument == "timesteps":
        what = f"a decreasing list of integers in 0..{train_steps - 1}, one per step"
        if not isinstance(values, list) or not values or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < train_steps for v in values):
            fail(key, values, what)
        count = len(values)
    else:
        what = "a decreasing list of numbers >= 0, one per step and the final sigma (usually 0)"
        if not isinstance(values, list) or len(values) < 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values):
            fail(key, values, what)
        count = len(values) - 1
    if any(a <= b for a, b in zip(values, values[1:])):
        fail(key, values, what)
    if count != steps:
        fail("steps", steps, f"{count}, the number of steps that {key} gives")
    return values


def check_single_step(scheduler_name: str, class_name: str | None, kwargs: dict, model_config: dict, timesteps,
                      sigmas) -> None:
    """At steps=1 the one model call must start from the top of the schedule. With `leading` spacing (SD's own)
    most schedulers put their single timestep at t=1: the model is told that pure noise is an almost clean image,
    and the image comes out as noise. (No diffusers scheduler fails outright at 1 step: the multistep solvers
    take a first-order step; this is the combination that cannot work.)"""
    from runner.checks import fail
    from runner.sampling import apply_schedule

    scheduler = build_scheduler(model_config, class_name, kwargs)
    apply_schedule(scheduler, 1, timesteps, sigmas)
    first, total = float(scheduler.timesteps[0]), scheduler.config.num_train_timesteps
    if first < total / 2:
        spacing = scheduler.config.get("timestep_spacing", "?")
        fail("steps", 1, f"not with scheduler={scheduler_name} and timestep_spacing={spacing!r}: its one model call "
             f"is at t={first:g} of {total}, so the image comes out as noise; set "
             "scheduler.kwargs.timestep_spacing=trailing (as SD-Turbo) or use steps >= 2")
