"""Load a model's components through `from_pretrained`, safely, once per process; the family says which.

The cache key is what changes the weights or the modules (model, VAE, revision, dtype, device, and the precision
options that rebuild modules: channels_last, compile, attention, VAE slicing/tiling, CPU offload); the scheduler
is not part of it, since every job builds its own from the model's scheduler config.
"""

from runner.families import Components, by_name

_CACHE: dict[tuple, Components] = {}


class ModelLoadError(RuntimeError):
    """The weights could not be loaded: the message says which file and what to do."""


def load_components(spec) -> tuple[Components, bool]:
    """The model's components, and whether they came from this process's cache."""
    from runner.precision import apply_options, cache_key

    key = (spec.name_or_path, spec.revision, spec.vae, spec.dtype, spec.device, spec.allow_pickle,
           cache_key(spec.precision_options))
    if key in _CACHE:
        return _CACHE[key], True
    _CACHE.clear()  # one model in memory at a time: sweeps run jobs of one model back to back (hydra_plugins/runner_sweeper)
    components = _load(spec)
    _CACHE[key] = apply_options(components, spec.precision_options, spec.device) if spec.precision_options else components
    return _CACHE[key], False


def clear_cache() -> None:
    _CACHE.clear()


def _load(spec) -> Components:
    import diffusers
    import transformers

    for library in (diffusers, transformers):  # our own progress bar and warnings say what matters
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    # Any scheduler class reads scheduler/scheduler_config.json the same way; the job picks the class later.
    scheduler_config = dict(diffusers.DDPMScheduler.load_config(spec.name_or_path, subfolder="scheduler",
                                                                revision=spec.revision))
    return by_name(spec.family).load(loader(spec), scheduler_config)


def loader(spec):
    """`load(cls, subfolder)` for the family: never trust_remote_code; pickle weights (.bin/.ckpt) only when the
    config opts in (model.allow_pickle); models in the run's dtype, on its device, in eval mode."""
    from runner.precision import torch_dtype

    # None: safetensors where present, pickle only where it is all there is (and the config opted in)
    safetensors_only = True if not spec.allow_pickle else None

    def load(cls, subfolder, optional=False):
        if optional and subfolder not in spec.model_components:  # model_index.json leaves it out (or null)
            return None
        is_model = hasattr(cls, "eval")  # models, not tokenizers
        path, folder = (spec.vae, None) if subfolder == "vae" and spec.vae else (spec.name_or_path, subfolder)
        options = dict(subfolder=folder, revision=None if spec.vae and subfolder == "vae" else spec.revision)
        if is_model:
            options.update(torch_dtype=torch_dtype(spec.dtype), use_safetensors=safetensors_only)
        try:
            component = cls.from_pretrained(path, **options)
        except Exception as err:
            hint = ("" if spec.allow_pickle else
                    " If this model has only .bin/.ckpt (pickle) weights and you trust it, set model.allow_pickle=true.")
            raise ModelLoadError(f"could not load {folder or 'vae'} of {path}: {type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''}.{hint}") from err
        return component.to(spec.device).eval() if is_model else component

    return load
