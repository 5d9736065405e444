"""Config → checked spec: every bad value is refused here, before any weight is loaded.

Nothing downstream of `make_spec` sees OmegaConf: the spec holds plain Python values.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runner.metrics import METRICS
from runner.schedulers import ALLOWED_SCHEDULERS

MAX_SEED = 2**63 - 1
DEVICES = "auto | cpu | cuda | cuda:N"
DTYPES = ("auto", "fp32", "fp16", "bf16")
FAMILIES = {
    "unconditional": "UNet2DModel + a scheduler, like DDPMPipeline",
    "text-to-image": "CLIPTokenizer + CLIPTextModel + UNet2DConditionModel + AutoencoderKL, like StableDiffusionPipeline",
}


# The only classes a config may name with `_target_` (Hydra instantiates hydra.callbacks itself).
ALLOWED_TARGETS = frozenset({"runner.callbacks.SweepResults"})


def refuse_unknown_targets(config: dict, where: str = "") -> None:
    """Raise ConfigError for any `_target_` outside ALLOWED_TARGETS: instantiating one can run arbitrary code."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else []
    for key, value in items:
        path = f"{where}.{key}" if where else str(key)
        if key == "_target_" and value not in ALLOWED_TARGETS:
            _fail(path, value, "only " + ", ".join(sorted(ALLOWED_TARGETS)) + " may be instantiated from a config")
        refuse_unknown_targets(value, path)


class ConfigError(ValueError):
    """A bad config value: the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class ModelInfo:
    """What the model's small JSON files say, read without loading any weights."""

    family: str
    size_multiple: int  # height/width must be multiples of it (the VAE's latent scale, or the UNet's downsampling)
    default_size: int
    revision: str | None  # the hub commit where known
    index_path: str


@dataclass(frozen=True)
class Spec:
    model: str
    name_or_path: str
    revision: str | None
    vae: str | None
    allow_pickle: bool
    family: str
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
    extras: dict = field(default_factory=dict)
    precision_options: dict = field(default_factory=dict)  # runner.precision: tf32, channels_last, compile ...

    def as_dict(self) -> dict:
        return asdict(self)


def _fail(key: str, value, allowed: str):
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _int(key, value, low=None, high=None, allowed=None):
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(key, value, allowed or "an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        _fail(key, value, allowed or f"an integer in {low}..{high}")
    return value


def _number(key, value, low, allowed):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < low:
        _fail(key, value, allowed)
    return float(value)


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def resolve_device(device: str) -> str:
    import torch  # lazy: only when a run really starts

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            _fail("device", device, "no CUDA device is visible here; use device=cpu or device=auto")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            _fail("device", device, f"only {torch.cuda.device_count()} CUDA device(s) are visible")
        return device
    _fail("device", device, DEVICES)


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype not in DTYPES:
        _fail("precision.dtype", dtype, " | ".join(DTYPES))
    if dtype == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if dtype == "fp16" and device == "cpu":
        _fail("precision", dtype, "fp16 runs on CUDA only; on CPU use precision=fp32 (or precision=auto)")
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
            _fail(key, name_or_path, "a directory in diffusers layout (with model_index.json) or a hub id")
        if not _looks_like_hub_id(name_or_path):
            _fail(key, name_or_path, "this directory does not exist; give a diffusers directory or a hub id 'org/name'")
    try:
        index, index_path = _read_json(name_or_path, revision, "model_index.json")
    except Exception as err:
        if Path(name_or_path).is_dir():
            _fail(key, name_or_path, "the directory has no model_index.json; save the model with save_pretrained()")
        offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") else ""
        _fail(key, name_or_path, f"could not read its model_index.json from the hub or its local cache{offline}: "
              f"{type(err).__name__}; download the model once with network, or give a local directory")
    family = _family(index)
    if family is None:
        components = ", ".join(f"{k}={v[1]}" for k, v in index.items() if isinstance(v, list) and v[1])
        _fail(key, name_or_path, f"its pipeline ({index.get('_class_name')}: {components}) is not a supported family; "
              "supported: " + "; ".join(f"{k} ({v})" for k, v in FAMILIES.items()))
    unet, _ = _read_json(name_or_path, revision, "unet/config.json")
    unet_size = unet["sample_size"] if isinstance(unet["sample_size"], int) else unet["sample_size"][0]
    if family == "text-to-image":
        vae_config = _read_json(vae, None, "config.json")[0] if vae else _read_json(name_or_path, revision, "vae/config.json")[0]
        scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
        default_size = unet_size * scale
    else:
        scale = 2 ** (len(unet["block_out_channels"]) - 1)
        default_size = unet_size
    return ModelInfo(family, scale, default_size, _hub_commit(index_path) or _local_fingerprint(name_or_path), index_path)


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
            _fail(key, str(directory), f"{folder.name}/ has only pickle weights ({pickles[0].name}), which can run code "
                  "when loaded; convert them to safetensors, or set model.allow_pickle=true if you trust the files")
        for path in safetensors:
            problem = _safetensors_problem(path)
            if problem:
                _fail(key, str(directory), f"{path.relative_to(directory)} is {problem}; download or save it again")


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
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_size + end:
        return f"truncated or corrupt ({size} bytes on disk, its header describes {8 + header_size + end})"
    return None


def _family(index: dict) -> str | None:
    classes = {k: v[1] for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[1]}
    if classes.get("unet") == "UNet2DModel" and set(classes) == {"unet", "scheduler"}:
        return "unconditional"
    wanted = {"tokenizer": "CLIPTokenizer", "text_encoder": "CLIPTextModel", "unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}
    optional = {"safety_checker", "feature_extractor", "image_encoder", "scheduler"}
    if all(classes.get(k, "").startswith(v) for k, v in wanted.items()) and set(classes) <= set(wanted) | optional:
        return "text-to-image"  # CLIPTokenizerFast counts as CLIPTokenizer
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


def make_spec(cfg: DictConfig) -> Spec:
    """Check every value of a composed config and return the plain spec a job runs from."""
    refuse_unknown_targets(OmegaConf.to_container(cfg, resolve=False))
    c = OmegaConf.to_container(cfg, resolve=True)
    model, sched, prec, sampling = c["model"], c["scheduler"], c["precision"], c["sampling"]

    steps = _int("steps", c["steps"], 1, None, "an integer >= 1")
    guidance = _number("guidance", c["guidance"], 0, "a number >= 0 (<= 1 turns classifier-free guidance off)")
    seeds = _as_list(c["seed"])
    if not seeds:
        _fail("seed", c["seed"], "an integer in 0..2^63-1 or a non-empty list of them")
    for s in seeds:
        _int("seed", s, 0, MAX_SEED, "an integer in 0..2^63-1 or a non-empty list of them")
    prompts = _as_list(c["prompt"])
    if not prompts or not all(isinstance(p, str) for p in prompts):
        _fail("prompt", c["prompt"], "a string or a non-empty list of strings")
    negative_prompt = c.get("negative_prompt") or ""
    if not isinstance(negative_prompt, str):
        _fail("negative_prompt", negative_prompt, "a string")
    batch_size = _int("sampling.batch_size", sampling["batch_size"], 1, None, "an integer >= 1")
    eta = _number("sampling.eta", sampling.get("eta", 0.0), 0, "a number >= 0")
    class_name = sched.get("class_name")
    if class_name is not None and class_name not in ALLOWED_SCHEDULERS:
        _fail("scheduler.class_name", class_name, "one of " + ", ".join(sorted(ALLOWED_SCHEDULERS)))
    kwargs = {k: v for k, v in (sched.get("kwargs") or {}).items() if v is not None}
    strength = _number("strength", c.get("strength", 0.8), 0, "a number in (0, 1]")
    if not 0 < strength <= 1:
        _fail("strength", strength, "a number in (0, 1]")
    init_image = c.get("init_image")
    if init_image is not None and not Path(init_image).is_file():
        _fail("init_image", init_image, "an existing image file (PNG, JPEG ...)")
    if not isinstance(c["device"], str):
        _fail("device", c["device"], DEVICES)
    dtype = prec.get("dtype")
    if dtype not in DTYPES:
        _fail("precision.dtype", dtype, " | ".join(DTYPES))
    if dtype == "fp16" and c["device"] == "cpu":
        resolve_dtype(dtype, "cpu")

    info = read_model_info(model["name_or_path"], model.get("revision"), model.get("vae"))
    for key, path in (("model.name_or_path", model["name_or_path"]), ("model.vae", model.get("vae"))):
        if path and Path(path).is_dir():
            check_local_weights(Path(path), bool(model.get("allow_pickle", False)), key)
    if init_image is not None and info.family != "text-to-image":
        _fail("init_image", init_image, "img2img needs a text-to-image model (with a VAE)")
    if init_image is not None and int(steps * strength) < 1:
        _fail("strength", strength, f"img2img runs int(steps * strength) steps, which must be >= 1 (steps={steps})")
    sizes = {}
    for key in ("height", "width"):
        value = c.get(key)
        if value is None:
            value = info.default_size
        _int(key, value, 1, None, f"a positive multiple of {info.size_multiple} (the model's latent scale)")
        if value % info.size_multiple:
            _fail(key, value, f"a positive multiple of {info.size_multiple} (the model's latent scale)")
        sizes[key] = value

    if info.family == "unconditional":  # no text encoder: prompts would only duplicate images and mislabel rows
        prompts, negative_prompt = [""], ""
    metric, clip_model = model.get("metric"), model.get("clip_model")
    if metric is not None and metric not in METRICS:
        _fail("model.metric", metric, " | ".join(METRICS) + " | null")
    if metric == "clip" and not clip_model:
        _fail("model.clip_model", clip_model, "a hub id or local directory of CLIP weights (model.metric=clip)")
    device = resolve_device(c["device"])
    from runner.precision import check_options

    precision_options = check_options(prec, device, info.family)
    return Spec(
        model=model["name"], name_or_path=model["name_or_path"], revision=model.get("revision"), vae=model.get("vae"),
        allow_pickle=bool(model.get("allow_pickle", False)), family=info.family, model_revision=info.revision,
        scheduler=sched["name"], scheduler_class=class_name, scheduler_kwargs=kwargs,
        precision=prec["name"], dtype=resolve_dtype(dtype, device), device=device,
        steps=steps, guidance=guidance, seeds=tuple(seeds), prompts=tuple(prompts), negative_prompt=negative_prompt,
        height=sizes["height"], width=sizes["width"], batch_size=batch_size, eta=eta,
        progress=bool(sampling.get("progress", True)), init_image=init_image, strength=strength,
        precision_options=precision_options, metric=metric, clip_model=clip_model,
    )
