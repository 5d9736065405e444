"""Config → checked spec: every bad value is refused here, before any weight is loaded.

Nothing downstream of `make_spec` sees OmegaConf: the spec holds plain Python values.
"""

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runner import families
from runner.checks import ConfigError, as_int, as_list, as_number, fail
from runner.metrics import METRICS
from runner.precision import DTYPES as TORCH_DTYPES
from runner.schedulers import ALLOWED_SCHEDULERS, K_BACKEND, check_k_backend, check_schedule, check_single_step

MAX_SEED = 2**63 - 1
MAX_STEPS = 10_000  # far beyond any sampler's use (1000 training timesteps), far below an overflow
MAX_SIDE = 16_384  # pixels per side; the area has its own budget (MAX_PIXELS)
# Pixels per image: 4096x4096 (SD at 512x512 is 1/64 of it). Larger sizes were refused only by the allocator, after
# the model loaded; attention memory grows with the square of the pixels.
MAX_PIXELS = 4096 * 4096
# Beyond these the loop's numbers overflow to NaN (guidance=1e30 drew all-NaN latents and a black PNG recorded as
# ok); the bounds sit far above any useful setting.
MAX_GUIDANCE = 100.0
MAX_ETA = 1.0  # DDIM's eta: 0 deterministic, 1 DDPM-like; above 1 its noise term asks for a negative variance
MAX_SHIFT = 100.0
DEVICES = "auto | cpu | cuda | cuda:N"
DTYPES = ("auto", *TORCH_DTYPES)  # precision.dtype: auto, or a name runner.precision maps to torch


# The only classes a config may name with `_target_` (Hydra instantiates hydra.callbacks itself).
ALLOWED_TARGETS = frozenset({"runner.callbacks.SweepResults"})


def refuse_non_finite(config, where: str = "") -> None:
    """inf or NaN anywhere in the config is refused: no setting means it, and it silently draws NaN images."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else []
    for key, value in items:
        path = f"{where}.{key}" if where else str(key)
        if isinstance(value, float) and not math.isfinite(value):
            fail(path, value, "a finite number")
        refuse_non_finite(value, path)


def at_most(key: str, value: float, high: float, allowed: str) -> float:
    if value > high:
        fail(key, value, allowed)
    return value


def refuse_unknown_targets(config: dict, where: str = "") -> None:
    """Raise ConfigError for any `_target_` outside ALLOWED_TARGETS: instantiating one can run arbitrary code."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else []
    for key, value in items:
        path = f"{where}.{key}" if where else str(key)
        if key == "_target_" and value not in ALLOWED_TARGETS:
            fail(path, value, "only " + ", ".join(sorted(ALLOWED_TARGETS)) + " may be instantiated from a config")
        refuse_unknown_targets(value, path)


@dataclass(frozen=True)
class ModelInfo:
    """What the model's small JSON files say, read without loading any weights."""

    family: families.Family
    size_multiple: int  # height/width must be multiples of it (the VAE's latent scale, or the UNet's downsampling)
    default_size: int
    revision: str | None  # the hub commit where known
    index_path: str
    pipeline_config: dict  # model_index.json's settings beside its components (force_zeros_for_empty_prompt ...)
    scheduler_config: dict  # the model's scheduler_config.json
    facts: dict  # Family.facts: what the family's checks need from the component configs
    components: tuple[str, ...]  # the components model_index.json names (not null)


@dataclass(frozen=True)
class Spec:
    model: str
    name_or_path: str
    revision: str | None
    vae: str | None
    allow_pickle: bool
    family: str  # runner.families: which module draws it
    model_revision: str | None
    scheduler: str
    scheduler_class: str | None
    scheduler_kwargs: dict
    precision: str
    dtype: str
    device: str
    steps: int
    guidance: float
    seeds: tuple[int, ...]
    prompts: tuple[str, ...]
    negative_prompt: str
    height: int
    width: int
    batch_size: int
    eta: float
    progress: bool
    init_image: str | None
    strength: float
    metric: str | None = None  # runner.metrics: digits | clip | None
    clip_model: str | None = None
    precision_options: dict = field(default_factory=dict)  # runner.precision: tf32, channels_last, compile ...
    family_options: dict = field(default_factory=dict)  # the family's own config node (Family.options_key)
    pipeline_config: dict = field(default_factory=dict)  # model_index.json's settings beside its components
    schedule: str = "default"  # the spacing axis (conf/schedule); karras/exponential/beta are in scheduler_kwargs
    schedule_timesteps: tuple | None = None  # custom timesteps for set_timesteps (runner.sampling.set_schedule)
    schedule_sigmas: tuple | None = None  # custom sigmas, ending with the final one
    model_facts: dict = field(default_factory=dict)  # Family.facts (e.g. guidance_embedded)
    model_components: tuple = ()  # the components model_index.json names: an optional one (SD3's T5) may be absent
    scheduler_backend: str = "diffusers"  # or k-diffusion (runner.ksampling)
    k_sampler: dict = field(default_factory=dict)  # k-diffusion: sampler, noise_sampler, quantize
    shift: float | None = None  # a flow model's static shift as swept (null: the model's own); in scheduler_kwargs


def resolve_device(device: str) -> str:
    import torch  # lazy: only when a run really starts

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            fail("device", device, "no CUDA device is visible here; use device=cpu or device=auto")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            fail("device", device, f"only {torch.cuda.device_count()} CUDA device(s) are visible")
        return device
    fail("device", device, DEVICES)


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype not in DTYPES:
        fail("precision.dtype", dtype, " | ".join(DTYPES))
    if dtype == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if dtype == "fp16" and device == "cpu":
        fail("precision", dtype, "fp16 runs on CUDA only; on CPU use precision=fp32 (or precision=auto)")
    return dtype


def _read_json(name_or_path: str, revision: str | None, filename: str) -> tuple[dict, str]:
    """A small JSON file of a model: from a local directory, else from the hub (or its offline cache)."""
    if Path(name_or_path).is_dir():
        path = Path(name_or_path) / filename
        if not path.is_file():
            raise FileNotFoundError(path)
        return json.loads(path.read_text()), str(path)
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(name_or_path, filename, revision=revision)
    return json.loads(Path(path).read_text()), path


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not os.path.isabs(name)


def read_model_info(name_or_path: str, revision: str | None, vae: str | None) -> ModelInfo:
    """Family, size rules and hub commit of a model, from model_index.json and the configs beside it."""
    key = "model.name_or_path"
    if not Path(name_or_path).is_dir():
        if Path(name_or_path).exists():
            fail(key, name_or_path, "a directory in diffusers layout (with model_index.json) or a hub id")
        if not _looks_like_hub_id(name_or_path):
            fail(key, name_or_path, "this directory does not exist; give a diffusers directory or a hub id 'org/name'")
    try:
        index, index_path = _read_json(name_or_path, revision, "model_index.json")
    except ValueError:  # json's decode error is a ValueError
        fail(key, name_or_path, "its model_index.json is not valid JSON; save the model again with save_pretrained()")
    except Exception as err:
        if Path(name_or_path).is_dir():
            fail(key, name_or_path, "the directory has no model_index.json; save the model with save_pretrained()")
        offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") else ""
        fail(key, name_or_path, f"could not read its model_index.json from the hub or its local cache{offline}: "
             f"{type(err).__name__}; download the model once with network, or give a local directory")
    if not isinstance(index, dict):
        fail(key, name_or_path, "its model_index.json is not a JSON object; save the model again with save_pretrained()")
    family = families.recognise(index)
    if family is None:
        components = ", ".join(f"{k}={v}" for k, v in families.component_classes(index).items())
        fail(key, name_or_path, f"its pipeline ({index.get('_class_name')}: {components}) is not a supported family; "
             f"supported: {families.supported()}")

    def read_config(subfolder: str) -> dict:
        if subfolder == "vae" and vae:  # model.vae: another VAE, a directory or hub id of its own
            return _read_json(vae, None, "config.json")[0]
        return _read_json(name_or_path, revision, f"{subfolder}/config.json")[0]

    try:
        multiple, default_size = family.size_rule(read_config)
        facts = family.facts(read_config)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        fail(key, name_or_path, f"its component configs lack what {family.pipeline} needs to size an image "
             f"({type(err).__name__}: {err}); save the model again with save_pretrained()")
    pipeline_config = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    try:
        scheduler_config = _read_json(name_or_path, revision, "scheduler/scheduler_config.json")[0]
    except Exception:
        fail(key, name_or_path, "it has no readable scheduler/scheduler_config.json; save the model with save_pretrained()")
    return ModelInfo(family, multiple, default_size, _hub_commit(index_path) or _local_fingerprint(name_or_path),
                     index_path, pipeline_config, scheduler_config, facts,
                     tuple(families.component_classes(index)))


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")


def check_local_weights(directory: Path, allow_pickle: bool, key: str = "model.name_or_path") -> None:
    """Refuse pickle-only weights (unless allowed) and safetensors files whose size disagrees with their own header
    (truncated or corrupt), reading only headers: no weights load."""
    folders = [directory / f for f in WEIGHT_FOLDERS if (directory / f).is_dir()] or [directory]
    for folder in folders:
        safetensors = sorted(folder.glob("*.safetensors"))
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not safetensors and pickles and not allow_pickle:
            fail(key, str(directory), f"{folder.name}/ has only pickle weights ({pickles[0].name}), which can run code "
                  "when loaded; convert them to safetensors, or set model.allow_pickle=true if you trust the files")
        for path in safetensors:
            problem = _safetensors_problem(path)
            if problem:
                fail(key, str(directory), f"{path.relative_to(directory)} is {problem}; download or save it again")


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if header_size <= 0 or 8 + header_size > size:
                return f"corrupt ({size} bytes, header length {header_size})"
            header = json.loads(f.read(header_size))
    except (ValueError, UnicodeDecodeError):
        return "corrupt (its header is not valid JSON)"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return "corrupt (its header does not describe tensors)"
    if size != 8 + header_size + end:
        return f"truncated or corrupt ({size} bytes on disk, its header describes {8 + header_size + end})"
    return None


def _hub_commit(path: str) -> str | None:
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def _local_fingerprint(directory: str) -> str | None:
    """For a local model dir: a hash of its configs and of each weight file's name and size (cheap for any size)."""
    if not Path(directory).is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            digest.update(f"{path.relative_to(directory)}:{path.stat().st_size}".encode())
            if path.suffix in (".json", ".txt"):
                digest.update(path.read_bytes())
    return "local-" + digest.hexdigest()[:16]


def scheduler_kwargs(name: str, class_name: str | None, kwargs: dict, family, model_scheduler: dict, shift) -> dict:
    """The scheduler option checked against the model's kind (VP or flow matching), with a swept `shift` (flow
    models only) put where its class reads it: `shift` for the FlowMatch classes, `flow_shift` for the solvers
    with use_flow_sigmas."""
    from runner.schedulers import is_flow, options_of_kind

    if class_name is not None and is_flow(class_name, kwargs) != family.flow:
        kind = "flow-matching" if family.flow else "VP (DDPM-style)"
        fail("scheduler", name, f"this {family.name} model needs a {kind} scheduler: one of "
             + ", ".join(options_of_kind(family.flow)))
    if shift is None:
        return kwargs
    as_number("shift", shift, 0, "a number > 0 (the static timestep shift of a flow-matching schedule), or null")
    if not 0 < shift <= MAX_SHIFT:
        fail("shift", shift, f"a number in (0, {MAX_SHIFT:g}] (the static timestep shift of a flow-matching "
             "schedule), or null")
    if model_scheduler.get("use_dynamic_shifting"):
        fail("shift", shift, "null: this model shifts its schedule by the image size (use_dynamic_shifting); the "
             "mu it used is in every row (shift_mu)")
    return {**kwargs, ("flow_shift" if kwargs.get("use_flow_sigmas") else "shift"): float(shift)}


def make_spec(cfg: DictConfig, model_files: dict | None = None) -> Spec:
    """Check every value of a composed config and return the plain spec a job runs from. `model_files`: a dict
    that keeps what the model's files said between calls (a dry run checks thousands of points of a few models)."""
    # 1. nothing to instantiate outside the allow-list; plain values from here on
    refuse_unknown_targets(OmegaConf.to_container(cfg, resolve=False))
    c = OmegaConf.to_container(cfg, resolve=True)
    model, sched, prec, sampling = c["model"], c["scheduler"], c["precision"], c["sampling"]
    # 2. what to draw: steps, guidance, seeds, prompts, eta, img2img, device and dtype names
    drawing = check_drawing(c)
    # 3. the model's files (read once per model in a dry run), then the sizes they allow
    info = checked_model_info(model, model_files)
    sizes = check_size(c, info)
    # 4. the scheduler, its backend and schedule, as the model's family takes them
    family = info.family
    scheduler = check_scheduler(c, sched, family, info, drawing["steps"])
    if not family.conditional:  # no text encoder: prompts would only duplicate images and mislabel rows
        drawing.update(prompts=[""], negative_prompt="")
    # 5. scoring, device, precision options; then the family's own checks of the whole spec
    metric, clip_model = check_metric(model)
    device = resolve_device(c["device"])
    from runner.precision import check_options

    spec = Spec(
        model=model["name"], name_or_path=model["name_or_path"], revision=model.get("revision"), vae=model.get("vae"),
        allow_pickle=bool(model.get("allow_pickle")), family=family.name, model_revision=info.revision,
        scheduler=sched["name"], scheduler_class=sched["class_name"], scheduler_kwargs=scheduler["kwargs"],
        precision=prec["name"], dtype=resolve_dtype(prec["dtype"], device), device=device,
        steps=drawing["steps"], guidance=drawing["guidance"], seeds=tuple(drawing["seeds"]),
        prompts=tuple(drawing["prompts"]), negative_prompt=drawing["negative_prompt"],
        height=sizes["height"], width=sizes["width"], batch_size=drawing["batch_size"], eta=drawing["eta"],
        progress=bool(sampling["progress"]), init_image=drawing["init_image"], strength=drawing["strength"],
        precision_options=check_options(prec, device, family), metric=metric, clip_model=clip_model,
        family_options=dict(c.get(family.options_key) or {}) if family.options_key else {},
        pipeline_config=info.pipeline_config, schedule=scheduler["schedule"],
        schedule_timesteps=scheduler["schedule_timesteps"], schedule_sigmas=scheduler["schedule_sigmas"],
        model_facts=info.facts, model_components=info.components,
        scheduler_backend=scheduler["backend"], k_sampler=scheduler["k_sampler"],
        shift=None if c.get("shift") is None else float(c["shift"]),
    )
    family.check(spec)
    return spec


def check_drawing(c: dict) -> dict:
    """The values that say what to draw and how, each refused (key, value, what is allowed) when out of range."""
    sampling, prec = c["sampling"], c["precision"]
    steps = as_int("steps", c["steps"], 1, MAX_STEPS, f"an integer >= 1, at most {MAX_STEPS}")
    refuse_non_finite({k: v for k, v in c.items() if k != "hydra"})
    guidance = as_number("guidance", c["guidance"], 0, "a number >= 0 (<= 1 turns classifier-free guidance off)")
    at_most("guidance", guidance, MAX_GUIDANCE, f"a number in 0..{MAX_GUIDANCE:g} (larger scales overflow to NaN)")
    seeds = as_list(c["seed"])
    if not seeds:
        fail("seed", c["seed"], "an integer in 0..2^63-1 or a non-empty list of them")
    for s in seeds:
        as_int("seed", s, 0, MAX_SEED, "an integer in 0..2^63-1 or a non-empty list of them")
    prompts = as_list(c["prompt"])
    if not prompts or not all(isinstance(p, str) for p in prompts):
        fail("prompt", c["prompt"], "a string or a non-empty list of strings")
    negative_prompt = c["negative_prompt"] or ""
    if not isinstance(negative_prompt, str):
        fail("negative_prompt", negative_prompt, "a string")
    batch_size = as_int("sampling.batch_size", sampling["batch_size"], 1, None, "an integer >= 1")
    eta = at_most("sampling.eta", as_number("sampling.eta", sampling["eta"], 0, "a number >= 0"), MAX_ETA,
                  f"a number in 0..{MAX_ETA:g} (0: deterministic DDIM, 1: DDPM-like noise)")
    class_name = c["scheduler"]["class_name"]
    if class_name is not None and class_name not in ALLOWED_SCHEDULERS:
        fail("scheduler.class_name", class_name, "one of " + ", ".join(sorted(ALLOWED_SCHEDULERS)))
    strength = as_number("strength", c["strength"], 0, "a number in (0, 1]")
    if not 0 < strength <= 1:
        fail("strength", strength, "a number in (0, 1]")
    init_image = c["init_image"]
    if init_image is not None and not Path(init_image).is_file():
        fail("init_image", init_image, "an existing image file (PNG, JPEG ...)")
    if not isinstance(c["device"], str):
        fail("device", c["device"], DEVICES)
    dtype = prec["dtype"]
    if dtype not in DTYPES:
        fail("precision.dtype", dtype, " | ".join(DTYPES))
    if dtype == "fp16" and c["device"] == "cpu":
        resolve_dtype(dtype, "cpu")
    return dict(steps=steps, guidance=guidance, seeds=seeds, prompts=prompts, negative_prompt=negative_prompt,
                batch_size=batch_size, eta=eta, strength=strength, init_image=init_image)


def checked_model_info(model: dict, model_files: dict | None) -> ModelInfo:
    """What the model's files say (kept in `model_files` when given); local weights are checked on the first read."""
    files_key = (model["name_or_path"], model.get("revision"), model.get("vae"), bool(model.get("allow_pickle")))
    info = (model_files or {}).get(files_key) or read_model_info(model["name_or_path"], model.get("revision"),
                                                                 model.get("vae"))
    if files_key not in (model_files or {}):
        for key, path in (("model.name_or_path", model["name_or_path"]), ("model.vae", model.get("vae"))):
            if path and Path(path).is_dir():
                check_local_weights(Path(path), bool(model.get("allow_pickle")), key)
    if model_files is not None:
        model_files[files_key] = info
    return info


def check_size(c: dict, info: ModelInfo) -> dict:
    """height and width: the model's native size when unset, a multiple of its latent scale, within memory."""
    sizes = {}
    for key in ("height", "width"):
        value = c[key]
        if value is None:
            value = info.default_size
        as_int(key, value, 1, MAX_SIDE, f"a positive multiple of {info.size_multiple} (the model's latent scale), "
               f"at most {MAX_SIDE}")
        if value % info.size_multiple:
            fail(key, value, f"a positive multiple of {info.size_multiple} (the model's latent scale)")
        sizes[key] = value
    if sizes["height"] * sizes["width"] > MAX_PIXELS:
        raise ConfigError(f"height x width={sizes['height']}x{sizes['width']} is not allowed: at most {MAX_PIXELS} "
                          f"pixels per image (4096x4096); the latents and activations of larger images do not fit "
                          "in memory")
    return sizes


def check_scheduler(c: dict, sched: dict, family, info: ModelInfo, steps: int) -> dict:
    """The scheduler's kwargs as the family takes them, its backend (diffusers or k-diffusion) and its schedule."""
    class_name = sched["class_name"]
    kwargs = {k: v for k, v in (sched.get("kwargs") or {}).items() if v is not None}
    kwargs = scheduler_kwargs(sched["name"], class_name, kwargs, family, info.scheduler_config, c.get("shift"))
    schedule = c.get("schedule") or {"name": "default"}  # configs saved before the axis existed
    backend = sched.get("backend", "diffusers")
    if backend not in ("diffusers", K_BACKEND):
        fail("scheduler.backend", backend, f"diffusers or {K_BACKEND}")
    k_sampler = check_k_backend(sched, kwargs, family, info.scheduler_config) if backend == K_BACKEND else {}
    kwargs, schedule_timesteps, schedule_sigmas = check_schedule(
        schedule, sched["name"], class_name, kwargs, family, info.scheduler_config, steps, backend)
    if steps == 1 and not family.flow and backend == "diffusers":
        check_single_step(sched["name"], class_name, kwargs, info.scheduler_config, schedule_timesteps,
                          schedule_sigmas)
    return dict(kwargs=kwargs, backend=backend, k_sampler=k_sampler, schedule=schedule["name"],
                schedule_timesteps=schedule_timesteps, schedule_sigmas=schedule_sigmas)


def check_metric(model: dict) -> tuple:
    metric, clip_model = model.get("metric"), model.get("clip_model")
    if metric is not None and metric not in METRICS:
        fail("model.metric", metric, " | ".join(METRICS) + " | null")
    if metric == "clip" and not clip_model:
        fail("model.clip_model", clip_model, "a hub id or local directory of CLIP weights (model.metric=clip)")
    return metric, clip_model
