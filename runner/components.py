"""Load a model family through `from_pretrained`, safely, once per process.

The cache key is what changes the weights or the modules (model, VAE, revision, dtype, device, and the precision
options that rebuild modules: channels_last, compile, attention, VAE slicing/tiling, CPU offload); the scheduler
is not part of it, since every job builds its own from the model's scheduler config.
"""

from dataclasses import dataclass, field
from typing import Any

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class ModelLoadError(RuntimeError):
    """The weights could not be loaded: the message says which file and what to do."""


@dataclass
class Components:
    family: str
    unet: Any
    scheduler_config: dict
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    warmed: set = field(default_factory=set)  # input shapes the UNet has already run (runner.precision.warm_up)


_CACHE: dict[tuple, Components] = {}


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def load_components(spec) -> tuple[Components, bool]:
    """The model's components, and whether they came from this process's cache."""
    from runner.precision import apply_options, cache_key

    key = (spec.name_or_path, spec.revision, spec.vae, spec.dtype, spec.device, spec.allow_pickle,
           cache_key(spec.precision_options))
    if key in _CACHE:
        return _CACHE[key], True
    _CACHE.clear()  # one model in memory at a time: sweeps run jobs of one model back to back (hydra_plugins/runner_sweeper)
    _CACHE[key] = apply_options(_load(spec), spec.precision_options, spec.device) if spec.precision_options else _load(spec)
    return _CACHE[key], False


def _load(spec) -> Components:
    import diffusers
    import transformers

    for library in (diffusers, transformers):  # our own progress bar and warnings say what matters
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    # Never trust_remote_code; pickle weights (.bin/.ckpt) only when the config opts in explicitly.
    # None: safetensors where present, pickle only where it is all there is (and the config opted in)
    safetensors_only = True if not spec.allow_pickle else None
    common = dict(revision=spec.revision, use_safetensors=safetensors_only)
    typed = dict(common, torch_dtype=torch_dtype(spec.dtype))

    def load(cls, subfolder, path=spec.name_or_path, **kw):
        try:
            return cls.from_pretrained(path, subfolder=subfolder, **kw)
        except Exception as err:
            hint = ("" if spec.allow_pickle else
                    " If this model has only .bin/.ckpt (pickle) weights and you trust it, set model.allow_pickle=true.")
            raise ModelLoadError(f"could not load {subfolder or 'vae'} of {path}: {type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''}.{hint}") from err

    # Any scheduler class reads scheduler/scheduler_config.json the same way; the job picks the class later.
    scheduler_config = dict(diffusers.DDPMScheduler.load_config(spec.name_or_path, subfolder="scheduler",
                                                                revision=spec.revision))
    if spec.family == "unconditional":
        unet = load(diffusers.UNet2DModel, "unet", **typed)
        return Components(spec.family, unet.to(spec.device).eval(), scheduler_config)

    unet = load(diffusers.UNet2DConditionModel, "unet", **typed)
    vae = (load(diffusers.AutoencoderKL, None, path=spec.vae, torch_dtype=typed["torch_dtype"], use_safetensors=safetensors_only)
           if spec.vae else load(diffusers.AutoencoderKL, "vae", **typed))
    text_encoder = load(transformers.CLIPTextModel, "text_encoder", **typed)
    tokenizer = load(transformers.CLIPTokenizer, "tokenizer", revision=spec.revision)
    return Components(spec.family, unet.to(spec.device).eval(), scheduler_config, vae=vae.to(spec.device).eval(),
                      text_encoder=text_encoder.to(spec.device).eval(), tokenizer=tokenizer)
