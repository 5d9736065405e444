"""Stable Diffusion XL (Podell et al. 2023), as StableDiffusionXLPipeline draws text-to-image.

What SDXL adds to the SD 1.x loop: two CLIP text encoders whose penultimate hidden states are concatenated, the
second encoder's pooled projection as an extra conditioning vector, and "micro-conditioning" on the image sizes
(`add_time_ids`); an empty negative prompt is a zero embedding, not the encoded "" (`force_zeros_for_empty_prompt`).

Family options (a top-level `sdxl:` config node, as `spec.family_options`):
  original_size, crops_coords_top_left, target_size: null or [height, width]; null takes the pipeline's
      defaults, (height, width), (0, 0) and (height, width)
  guidance_rescale: in [0, 1], default 0 (Lin et al. 2023, section 3.4: fixes over-exposure at high guidance)
The pipeline config (`spec.pipeline_config`, model_index.json's non-component keys) gives
`force_zeros_for_empty_prompt` (the pipeline's default, true, where it is missing).

torch and runner.sampling are imported inside the methods: recognising a model and checking a config must not
load torch.
"""

from runner.checks import fail
from runner.families.base import Components, Family
from runner.families.stable_diffusion import check_guidance_embedded

SIZE_OPTIONS = {"original_size": "null or [height, width] of positive integers",
                "crops_coords_top_left": "null or [top, left] of non-negative integers",
                "target_size": "null or [height, width] of positive integers"}
OPTIONS = (*SIZE_OPTIONS, "guidance_rescale")
TEXT = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _options(spec) -> dict:
    return dict(getattr(spec, "family_options", None) or {})


def micro_conditioning(spec) -> list[int]:
    """The six numbers SDXL was trained to condition on: original size, crop corner, target size."""
    options, size = _options(spec), [spec.height, spec.width]
    defaults = {"original_size": size, "crops_coords_top_left": [0, 0], "target_size": size}
    return [int(v) for key in SIZE_OPTIONS for v in (options.get(key) or defaults[key])]


def rescale_noise_cfg(noise_cfg, noise_cond, guidance_rescale: float):
    """Lin et al. 2023, section 3.4: match the guided prediction's std to the conditional one's, then blend back
    by `guidance_rescale` (as diffusers' rescale_noise_cfg)."""
    dims = list(range(1, noise_cond.ndim))
    rescaled = noise_cfg * (noise_cond.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


class PromptEmbeddings:
    """(hidden states, pooled) per distinct prompt, encoded once per job; the prepare() state."""

    def __init__(self, components: Components, spec, timer):
        from runner.precision import torch_dtype
        from runner.sampling import PromptCache, warn_truncated

        self.text, self.cache = components.text, PromptCache(self._encode, timer)
        self.negative_prompt = spec.negative_prompt
        self.device, self.dtype = spec.device, torch_dtype(spec.dtype)
        # The pipeline zeros the negative side only when no negative prompt is given; the runner's "no negative
        # prompt" is "" (spec.py turns null into ""), so "" takes the zeros here.
        config = getattr(spec, "pipeline_config", None) or {}
        self.zero_negative = not spec.negative_prompt and config.get("force_zeros_for_empty_prompt", True)
        warn_truncated(self.text["tokenizer"], (*spec.prompts, spec.negative_prompt))  # both have CLIP's limit

    def _encode(self, prompts: list[str]):
        """Both encoders' penultimate hidden states side by side, and text_encoder_2's pooled projection."""
        import torch

        hidden = []
        with torch.no_grad():
            for tokenizer_name, encoder_name in TEXT:
                tokenizer, encoder = self.text[tokenizer_name], self.text[encoder_name]
                ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                                return_tensors="pt").input_ids
                out = encoder(ids.to(self.device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder is CLIPTextModelWithProjection: out[0] is `text_embeds`
        return torch.cat(hidden, dim=-1).to(self.device, self.dtype), pooled.to(self.device, self.dtype)

    def __call__(self, prompts: list[str]):
        """(hidden states, pooled) stacked for `prompts`, one row each."""
        return self.cache(prompts)

    def negative(self, like):
        """The unconditional side, shaped as `like` (the (hidden, pooled) of a batch): zeros, or the encoded
        negative prompt."""
        import torch

        if self.zero_negative:
            return torch.zeros_like(like[0]), torch.zeros_like(like[1])
        return self([self.negative_prompt] * len(like[0]))


class FusedEmbeddings:
    """A fused batch's (hidden states, pooled), each point's computed by its own PromptEmbeddings (runner.fused)."""

    def __init__(self, cond: tuple, negative: tuple, dtype):
        self.cond, self.negatives, self.dtype = cond, negative, dtype

    def __call__(self, prompts):
        return self.cond

    def negative(self, like):
        return self.negatives


class SDXL(Family):
    name = "sdxl"
    pipeline = "StableDiffusionXLPipeline"
    summary = ("CLIPTextModel + CLIPTextModelWithProjection + UNet2DConditionModel + AutoencoderKL, "
               "like StableDiffusionXLPipeline")
    options_key = "sdxl"

    def recognise(self, classes: dict[str, str]) -> bool:
        tokenizers = {"CLIPTokenizer", "CLIPTokenizerFast"}
        required = {"unet": {"UNet2DConditionModel"}, "vae": {"AutoencoderKL"}, "text_encoder": {"CLIPTextModel"},
                    "text_encoder_2": {"CLIPTextModelWithProjection"}, "tokenizer": tokenizers,
                    "tokenizer_2": tokenizers}
        optional = {"scheduler", "image_encoder", "feature_extractor"}
        return (all(classes.get(k) in allowed for k, allowed in required.items())
                and set(classes) <= set(required) | optional)

    def size_rule(self, read_config) -> tuple[int, int]:
        from runner.sampling import latent_scale

        scale = latent_scale(read_config("vae"))
        return scale, read_config("unet")["sample_size"] * scale

    def facts(self, read_config) -> dict:
        return {"guidance_embedded": read_config("unet").get("time_cond_proj_dim") is not None}

    def check(self, spec) -> None:
        check_guidance_embedded(spec)
        if getattr(spec, "init_image", None) is not None:
            fail("init_image", spec.init_image, "null: SDXL models draw text-to-image only (img2img, as "
                                                 "StableDiffusionXLImg2ImgPipeline, is not supported yet)")
        options = _options(spec)
        for key, value in options.items():
            if key not in OPTIONS:
                fail(f"sdxl.{key}", value, "not an SDXL option; the options are " + ", ".join(OPTIONS))
        for key, allowed in SIZE_OPTIONS.items():
            value, low = options.get(key), 0 if key == "crops_coords_top_left" else 1
            if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 2
                                          and all(_is_int(v) and v >= low for v in value)):
                fail(f"sdxl.{key}", value, allowed)
        rescale = options.get("guidance_rescale", 0.0)
        if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0 <= rescale <= 1:
            fail("sdxl.guidance_rescale", rescale, "a number in [0, 1]")

    def load(self, load, scheduler_config: dict) -> Components:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        text = {"tokenizer": load(CLIPTokenizer, "tokenizer"), "text_encoder": load(CLIPTextModel, "text_encoder"),
                "tokenizer_2": load(CLIPTokenizer, "tokenizer_2"),
                "text_encoder_2": load(CLIPTextModelWithProjection, "text_encoder_2")}
        return Components(family=self, denoiser=load(UNet2DConditionModel, "unet"), scheduler_config=scheduler_config,
                          vae=load(AutoencoderKL, "vae"), text=text)

    def prepare(self, components: Components, spec, timer):
        return PromptEmbeddings(components, spec, timer)

    def fuse(self, states, prompts):
        import torch

        cond = [state(list(p)) for state, p in zip(states, prompts)]
        negative = [state.negative(c) for state, c in zip(states, cond)]
        return FusedEmbeddings(*(tuple(torch.cat(parts) for parts in zip(*side)) for side in (cond, negative)),
                               dtype=states[0].dtype)

    def sample(self, components: Components, scheduler, spec, prompts, generators, state, timer, tally):
        import torch

        with torch.no_grad():
            return self._sample(components, scheduler, spec, prompts, generators, state, timer, tally)

    def _sample(self, components, scheduler, spec, prompts, generators, state, timer, tally):
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        from runner.ksampling import is_k
        from runner.ksampling import sample as k_sample
        from runner.sampling import (combine_cfg, denoise, guidance_condition, latent_scale, set_schedule, step_kwargs,
                                     to_uint8, uses_cfg)

        unet, vae = components.denoiser, components.vae
        embeds = state if state is not None else self.prepare(components, spec, timer)
        device, dtype, n = spec.device, embeds.dtype, len(generators)
        use_cfg = uses_cfg(unet, spec.guidance)
        rescale = float(_options(spec).get("guidance_rescale") or 0.0)

        # 1. conditioning: [uncond; cond] rows under CFG, as the pipeline orders them
        hidden, pooled = embeds(list(prompts))
        if use_cfg:
            neg_hidden, neg_pooled = embeds.negative((hidden, pooled))
            hidden, pooled = torch.cat([neg_hidden, hidden]), torch.cat([neg_pooled, pooled])
        time_ids = torch.tensor([micro_conditioning(spec)], dtype=dtype, device=device).repeat(len(hidden), 1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        timestep_cond = guidance_condition(unet, spec.guidance, n, device, dtype)

        # 2. the guided prediction for (already scaled) model input: eps_u + w * (eps_c - eps_u), optionally
        # rescaled; t is one timestep (diffusers) or one per row (k-diffusion)
        def guided(model_input, t):
            rows = torch.cat([model_input, model_input]) if use_cfg else model_input
            noise_pred = unet(rows, torch.cat([t, t]) if use_cfg and t.ndim else t, encoder_hidden_states=hidden,
                              timestep_cond=timestep_cond, added_cond_kwargs=added, return_dict=False)[0]
            if not use_cfg:
                return noise_pred
            return combine_cfg(noise_pred, spec.guidance,
                               (lambda pred, cond: rescale_noise_cfg(pred, cond, rescale)) if rescale > 0 else None)

        scale = latent_scale(vae.config)
        shape = (n, unet.config.in_channels, spec.height // scale, spec.width // scale)
        passes = 2 if use_cfg else 1
        if is_k(scheduler):  # k-diffusion's sampler, schedule and noise (runner.ksampling)
            latents = k_sample(scheduler, spec, guided, shape, generators, device, dtype, timer, tally, passes)
        else:
            # 3. the schedule, then the noise (init_noise_sigma depends on the schedule)
            set_schedule(scheduler, spec, device)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)  # as the pipeline: the step index starts at 0 whatever the timesteps
            latents = randn_tensor(shape, generator=generators, device=torch.device(device), dtype=dtype)
            latents = latents * scheduler.init_noise_sigma

            # 4. denoise
            def predict_noise(x, t):
                return guided(scheduler.scale_model_input(x, t), t)

            latents = denoise(scheduler, latents, scheduler.timesteps, predict_noise,
                              step_kwargs(scheduler, generators, spec.eta), spec.progress, timer, tally, passes)

        # 5. decode; SDXL's own VAE overflows in fp16, so the pipeline decodes in fp32 where the config says so
        with timer("vae_decode"):
            upcast = vae.dtype == torch.float16 and vae.config.force_upcast
            if upcast:
                vae.to(dtype=torch.float32)
            z = latents.to(vae.dtype)
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, -1, 1, 1).to(z.device, z.dtype)
                std = torch.tensor(std).view(1, -1, 1, 1).to(z.device, z.dtype)
                z = z * std / vae.config.scaling_factor + mean
            else:
                z = z / vae.config.scaling_factor
            images = vae.decode(z, return_dict=False)[0]
            if upcast:
                vae.to(dtype=torch.float16)
        return to_uint8(images), latents

    def warm_up(self, components: Components, spec, batch_size: int) -> None:
        import torch

        from runner.precision import torch_dtype
        from runner.sampling import latent_scale, uses_cfg

        unet, c = components.denoiser, components

        rows = batch_size * (2 if uses_cfg(unet, spec.guidance) else 1)
        scale, dtype = latent_scale(c.vae.config), torch_dtype(spec.dtype)
        # A private generator: the warm-up must not move the global RNG (nor, of course, the images' generators).
        g = torch.Generator("cpu").manual_seed(0)

        def rand(*shape):
            return torch.randn(shape, generator=g).to(spec.device, dtype)

        added = {"text_embeds": rand(rows, c.text["text_encoder_2"].config.projection_dim),
                 "time_ids": torch.tensor([micro_conditioning(spec)], device=spec.device, dtype=dtype).repeat(rows, 1)}
        dim = unet.config.time_cond_proj_dim
        cond = rand(rows, dim) if dim is not None else None  # such UNets run without CFG: rows == batch_size
        latents = rand(rows, unet.config.in_channels, spec.height // scale, spec.width // scale)
        hidden = rand(rows, c.text["tokenizer"].model_max_length, unet.config.cross_attention_dim)
        with torch.no_grad():
            unet(latents, torch.tensor(1, device=spec.device), encoder_hidden_states=hidden, timestep_cond=cond,
                 added_cond_kwargs=added, return_dict=False)


FAMILY = SDXL()
