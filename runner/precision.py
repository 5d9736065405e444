"""The precision group's speed options on top of the dtype: checked from the config, applied to loaded components.

Each is off or on by config (conf/precision_options/common.yaml) and recorded in every row (`precision_*`).
Options that change the modules (channels_last, compile, attention, VAE slicing/tiling, CPU offload) are part of
the model cache key; TF32 is a process-wide torch switch, set at the start of every job so it never leaks.
"""

from runner.checks import fail

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # precision.dtype → torch's name

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION = ("sdpa", "eager")
FLAGS = ("tf32", "channels_last", "compile", "vae_slicing", "vae_tiling", "cpu_offload")
# Changing these changes the module objects, so cached components built with other values cannot be reused.
MODULE_OPTIONS = ("channels_last", "compile", "compile_mode", "attention", "vae_slicing", "vae_tiling", "cpu_offload")


def torch_dtype(name: str):
    """The torch dtype of a resolved `precision.dtype` (fp32 | fp16 | bf16)."""
    import torch

    return getattr(torch, DTYPES[name])


def check_options(precision: dict, device: str, family) -> dict:
    """The options of a composed `precision` config, checked against the device and the model family."""
    options = {}
    for flag in FLAGS:
        value = precision[flag]
        if not isinstance(value, bool):
            fail(f"precision.{flag}", value, "true or false")
        options[flag] = value
    options["compile_mode"] = precision["compile_mode"]
    if options["compile_mode"] not in COMPILE_MODES:
        fail("precision.compile_mode", options["compile_mode"], " | ".join(COMPILE_MODES))
    options["attention"] = precision["attention"]
    if options["attention"] not in ATTENTION:
        fail("precision.attention", options["attention"], " | ".join(ATTENTION) + " (sdpa: torch's scaled_dot_product_attention)")
    if options["cpu_offload"] and not device.startswith("cuda"):
        fail("precision.cpu_offload", True, "false on CPU: model CPU offload moves weights to a CUDA device per call")
    if options["cpu_offload"] and options["compile"]:
        fail("precision.cpu_offload", True, "false when precision.compile=true (offload hooks and compiled modules do not mix)")
    for flag in ("vae_slicing", "vae_tiling", "cpu_offload"):
        if options[flag] and not family.has_vae:
            fail(f"precision.{flag}", True, "false for this model: it applies to text-to-image models (with a VAE)")
    return options


def cache_key(options: dict) -> tuple:
    return tuple((name, options.get(name)) for name in MODULE_OPTIONS)


def row_columns(options: dict) -> dict:
    """The options as flat result columns."""
    return {f"precision_{name}": value for name, value in options.items()}


def set_tf32(enabled: bool, device: str):
    """TF32 matmul/convolution on Ampere+ GPUs; a recorded no-op on CPU (torch ignores it there)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def apply_options(components, options: dict, device: str):
    """Apply the module options to freshly loaded components (in place; returns them)."""
    import torch

    c = components
    for module in (c.denoiser, c.vae):
        if module is not None:
            set_attention(module, options["attention"])
    if options["channels_last"]:
        c.denoiser.to(memory_format=torch.channels_last)
        if c.vae is not None:
            c.vae.to(memory_format=torch.channels_last)
    if options["vae_slicing"]:
        c.vae.enable_slicing()
    if options["vae_tiling"]:
        c.vae.enable_tiling()
    if options["cpu_offload"]:
        offload(c, device)
    if options["compile"]:
        c.denoiser = torch.compile(c.denoiser, mode=None if options["compile_mode"] == "default" else options["compile_mode"])
    return c


def set_attention(module, attention: str):
    """Every plain attention layer of a model (UNet2DModel has no set_attn_processor) on SDPA or the eager processor.
    Layers with a processor of their own keep it: SD3's joint attention under a plain processor would lose its
    context stream (and fail, or mix up the batch)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    for layer in module.modules():
        if isinstance(layer, Attention) and isinstance(layer.processor, (AttnProcessor, AttnProcessor2_0)):
            layer.set_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())


def offload(components, device: str):
    """Model CPU offload, as diffusers' enable_model_cpu_offload: each model moves to the GPU when it is called
    and back to CPU when the next one runs (text encoder → UNet → VAE), through accelerate's hooks."""
    from accelerate import cpu_offload_with_hook

    hook = None
    for module in components.modules().values():
        _, hook = cpu_offload_with_hook(module.to("cpu"), device, prev_module_hook=hook)
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def needs_warm_up(spec, options: dict) -> bool:
    """CUDA's first calls (cuDNN autotuning, lazy init) and torch.compile's first call are not representative."""
    return spec.device.startswith("cuda") or options["compile"]


def warm_up(components, spec, batch_size: int, timer) -> bool:
    """One denoiser forward with the job's shapes, outside the denoising loop, once per shape per loaded model.

    Timed as `compile` when the denoiser is compiled (the first call compiles), else as `warmup`. A forward
    draws no random numbers from the images' generators, so the images are the same with or without it.
    """
    import torch

    shape_key = (batch_size, spec.guidance > 1, spec.height, spec.width)  # guidance > 1 doubles the rows (CFG)
    if shape_key in components.warmed:
        return False
    with timer("compile" if spec.precision_options["compile"] else "warmup"), torch.no_grad():
        components.family.warm_up(components, spec, batch_size)
    components.warmed.add(shape_key)
    return True
