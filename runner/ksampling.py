"""The k-diffusion backend: k-diffusion's own sampler functions (what A1111 and ComfyUI run) on our models.

The model is wrapped as k-diffusion wraps a CompVis Stable Diffusion: `DiscreteEpsDDPMDenoiser` (or
`DiscreteVDDPMDenoiser` for v-prediction) over the model's `alphas_cumprod`, with classifier-free guidance around
the wrapped network. The sigmas come from k-diffusion's builders, picked by the schedule axis (default and karras:
`get_sigmas_karras`, as A1111's "Karras"; exponential; polyexponential), or are given (ays, schedule.sigmas).

Seeds: the initial noise is drawn from each image's own generator (as in the diffusers backend), times sigma_max;
ancestral samplers draw each step's fresh noise from the same generators; the SDE samplers get a Brownian tree per
image seeded with the image's seed, as A1111 seeds them. So a seed means the same thing in both backends.

Only k_diffusion/sampling.py and external.py are used. They are loaded by file path from the installed
`k-diffusion` distribution, without running the package's __init__ (which imports its training and evaluation code,
and through utils.py torchvision, which breaks a CPU-only torch); the one helper they take from utils.py,
`append_dims`, is given to them here.
"""

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass

import torch

INSTALL = "pip install --no-deps k-diffusion==0.1.1.post1 (and pip install -e '.[kdiffusion]' for its imports)"
PACKAGE = "runner_k_diffusion"  # where the two files live in sys.modules: never shadows a real k_diffusion


def append_dims(x, target_dims):
    """Trailing singleton dims up to `target_dims` (what sampling.py and external.py use from k_diffusion.utils)."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def k_diffusion():
    """(sampling, external): k-diffusion's two modules, loaded once by file path."""
    if PACKAGE + ".external" in sys.modules:
        return sys.modules[PACKAGE + ".sampling"], sys.modules[PACKAGE + ".external"]
    found = importlib.util.find_spec("k_diffusion")  # finds the package without importing it
    if found is None or not found.submodule_search_locations:
        raise ImportError(f"the k-diffusion backend needs the k-diffusion package: {INSTALL}")
    package = types.ModuleType(PACKAGE)
    package.__path__ = list(found.submodule_search_locations)
    utils = types.ModuleType(PACKAGE + ".utils")
    utils.append_dims = append_dims
    package.utils = utils
    sys.modules[PACKAGE], sys.modules[PACKAGE + ".utils"] = package, utils
    try:
        sampling = importlib.import_module(PACKAGE + ".sampling")
        external = importlib.import_module(PACKAGE + ".external")
    except ImportError as err:
        for name in (PACKAGE, PACKAGE + ".utils", PACKAGE + ".sampling"):
            sys.modules.pop(name, None)
        raise ImportError(f"k-diffusion's sampling.py needs {err.name}: {INSTALL}") from err
    return sampling, external


def installed() -> bool:
    return importlib.util.find_spec("k_diffusion") is not None


# schedule axis option → k-diffusion's sigma builder (ays and custom sigmas come as a list instead)
BUILDERS = {"default": "get_sigmas_karras", "karras": "get_sigmas_karras", "exponential": "get_sigmas_exponential",
            "polyexponential": "get_sigmas_polyexponential"}
NOISE_SAMPLERS = (None, "generators", "brownian_tree")


@dataclass
class KScheduler:
    """The k backend's stand-in for a diffusers scheduler: the sampler to run, the model's `alphas_cumprod` and
    prediction type (from the model's own scheduler config), and after `set_timesteps` the sigmas the sampler
    walks with the timesteps the network sees at each of them (what runner.schedulers.sigma_schedule records)."""

    sampler: str
    spacing: str
    alphas_cumprod: torch.Tensor
    prediction_type: str
    noise_sampler: str | None = None
    quantize: bool = False
    backend: str = "k-diffusion"
    order: int = 1
    sigmas: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None

    def model_sigmas(self) -> torch.Tensor:
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None):
        sampling, external = k_diffusion()
        table = external.DiscreteSchedule(self.model_sigmas().float(), self.quantize)
        if sigmas is not None:
            self.sigmas = torch.tensor(sigmas, dtype=torch.float32)
        else:
            build = getattr(sampling, BUILDERS[self.spacing])
            self.sigmas = build(num_inference_steps, float(table.sigma_min), float(table.sigma_max))
        self.sigmas = self.sigmas.to(device or "cpu")
        self.timesteps = table.to(self.sigmas.device).sigma_to_t(self.sigmas[:-1])

    @property
    def init_noise_sigma(self):
        return self.sigmas[0]


def build(model_scheduler, spec) -> KScheduler:
    """The KScheduler of a checked spec; `model_scheduler` is the model's own diffusers scheduler (with the run's
    beta_schedule / prediction_type kwargs), read for its alphas_cumprod and prediction type."""
    options = spec.k_sampler
    return KScheduler(sampler=options["sampler"], spacing=spec.schedule if spec.schedule in BUILDERS else "default",
                      alphas_cumprod=model_scheduler.alphas_cumprod.clone(),
                      prediction_type=model_scheduler.config.prediction_type,
                      noise_sampler=options.get("noise_sampler"), quantize=bool(options.get("quantize")))


def is_k(scheduler) -> bool:
    return getattr(scheduler, "backend", None) == "k-diffusion"


def sample(scheduler: KScheduler, spec, network, shape, generators, device, dtype, timer, tally, passes: int):
    """Run k-diffusion's sampler on `network(model_input, t)` (the guided eps or v prediction for scaled input
    rows, CFG inside), from per-image noise; returns the final latents. Every wrapped call counts in `tally`.
    The sampler's own arithmetic runs in float32 whatever the network's dtype (the noise is drawn in the run's
    dtype, as the diffusers backend draws it)."""
    from diffusers.utils.torch_utils import randn_tensor

    from runner.sampling import set_schedule, timed

    sampling, external = k_diffusion()
    set_schedule(scheduler, spec, device)
    sigmas = scheduler.sigmas.to(device)

    def counted(model_input, t):
        with timed(timer, "unet"):
            out = network(model_input.to(dtype), t)
        if tally is not None:
            tally.add(passes)
        return out.float()

    wrapper = external.DiscreteVDDPMDenoiser if scheduler.prediction_type == "v_prediction" else \
        external.DiscreteEpsDDPMDenoiser
    model = wrapper(counted, scheduler.alphas_cumprod.to(device, torch.float32), quantize=scheduler.quantize)
    x = randn_tensor(shape, generator=generators, device=torch.device(device), dtype=dtype).float() * sigmas[0]
    extra = {}
    if scheduler.noise_sampler == "generators":
        extra["noise_sampler"] = lambda sigma, sigma_next: randn_tensor(
            shape, generator=generators, device=torch.device(device), dtype=dtype).float()
    elif scheduler.noise_sampler == "brownian_tree":
        positive = sigmas[sigmas > 0]
        extra["noise_sampler"] = sampling.BrownianTreeNoiseSampler(
            x, positive.min(), sigmas.max(), seed=[g.initial_seed() for g in generators])
    steps = StepClock(timer)
    x = getattr(sampling, scheduler.sampler)(model, x, sigmas, callback=steps.callback,
                                             disable=not spec.progress, **extra)
    steps.close()
    return x.to(dtype)


class StepClock:
    """`step` laps for the run's timings. A k sampler calls back once per step, after the step's first model call;
    each lap runs from one such call back to the next (the first from the start, the last to the end), so there is
    one lap per step and they add up to the whole loop."""

    def __init__(self, timer):
        self.timer, self.span = timer, None
        self._open()

    def _open(self):
        if self.timer is not None:
            self.span = self.timer("step")
            self.span.__enter__()

    def callback(self, info):
        if info["i"] > 0 and self.span is not None:
            self.span.__exit__(None, None, None)
            self._open()

    def close(self):
        if self.span is not None:
            self.span.__exit__(None, None, None)
            self.span = None
