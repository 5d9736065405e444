"""FLUX.1: a CLIP text encoder (pooled) and a T5 encoder (tokens), the `FluxTransformer2DModel` over 2×2-packed
latents and a 16-channel `AutoencoderKL`, sampled by rectified flow with a resolution-dependent shift, as
`FluxPipeline` (Black Forest Labs 2024).

Guidance: a guidance-distilled transformer (`guidance_embeds`, FLUX.1-dev) takes `guidance` as an input and runs
one pass per step; without it (FLUX.1-schnell) `guidance` is unused. `flux.true_cfg_scale` > 1 with a negative
prompt runs real classifier-free guidance, two passes per step, as FluxPipeline's `true_cfg_scale`.
"""

import functools
import logging

from runner.families.base import Components, Family

log = logging.getLogger("runner")

OPTIONS = ("true_cfg_scale", "max_sequence_length")  # the `flux` config node: conf/family_options/flux.yaml


class Flux(Family):
    name = "flux"
    pipeline = "FluxPipeline"
    summary = "CLIPTextModel + T5EncoderModel + FluxTransformer2DModel + AutoencoderKL, like FluxPipeline"
    flow = True
    options_key = "flux"

    def recognise(self, classes):
        wanted = {"tokenizer": "CLIPTokenizer", "text_encoder": "CLIPTextModel", "tokenizer_2": "T5Tokenizer",
                  "text_encoder_2": "T5EncoderModel", "transformer": "FluxTransformer2DModel",
                  "vae": "AutoencoderKL"}
        optional = {"scheduler", "image_encoder", "feature_extractor"}
        # exact "CLIPTextModel": CLIPTextModelWithProjection is SD3's
        return (all(classes.get(k, "").startswith(v) for k, v in wanted.items())
                and classes["text_encoder"] == "CLIPTextModel" and set(classes) <= set(wanted) | optional)

    def facts(self, read_config):
        # FLUX.1-dev: guidance goes in as an embedding (not fused: runner.fused; the loop takes one scale)
        return {"guidance_embedded": bool(read_config("transformer").get("guidance_embeds"))}

    def size_rule(self, read_config):
        from runner.sampling import latent_scale

        vae = read_config("vae")
        multiple = latent_scale(vae) * 2  # latents are packed in 2×2 patches
        # FluxPipeline draws 128 latents a side by default; the VAE config says the same for FLUX.1 (1024 px) and
        # lets a small model say its own.
        native = vae.get("sample_size") or 128 * latent_scale(vae)
        native = native if isinstance(native, int) else native[0]
        return multiple, native - native % multiple

    def check(self, spec):
        from runner.checks import ConfigError

        if spec.init_image is not None:
            raise ConfigError(f"init_image={spec.init_image!r} is not allowed: null (img2img is not supported for "
                              f"{self.name} models)")
        # FluxPipeline passes custom sigmas unless the scheduler spaces flow sigmas itself (use_flow_sigmas)
        scheduler_class = getattr(spec, "scheduler_class", None)
        if scheduler_class and not (spec.scheduler_kwargs or {}).get("use_flow_sigmas"):
            import diffusers

            from runner.flow import accepts

            cls = getattr(diffusers, scheduler_class, None)
            if cls is not None and not accepts(cls, "sigmas"):
                raise ConfigError(f"scheduler.class_name={scheduler_class!r} is not allowed: {self.name} models need a "
                                  f"scheduler whose set_timesteps takes sigmas= (or use_flow_sigmas: true)")
        for key, value in (spec.family_options or {}).items():
            if key not in OPTIONS:
                raise ConfigError(f"{self.options_key}.{key}={value!r} is not allowed: one of "
                                  f"{', '.join(OPTIONS)}")
        true_cfg, tokens = options(spec)
        if isinstance(true_cfg, bool) or not isinstance(true_cfg, (int, float)) or true_cfg < 0:
            raise ConfigError(f"{self.options_key}.true_cfg_scale={true_cfg!r} is not allowed: a number >= 0 "
                              f"(> 1 runs real classifier-free guidance with negative_prompt)")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= 512:
            raise ConfigError(f"{self.options_key}.max_sequence_length={tokens!r} is not allowed: an integer in "
                              f"1..512 (T5 tokens)")

    def load(self, load, scheduler_config):
        import diffusers
        import transformers

        text = {"tokenizer": load(transformers.CLIPTokenizer, "tokenizer"),
                "text_encoder": load(transformers.CLIPTextModel, "text_encoder"),
                "tokenizer_2": load(transformers.T5TokenizerFast, "tokenizer_2"),
                "text_encoder_2": load(transformers.T5EncoderModel, "text_encoder_2")}
        return Components(self, load(diffusers.FluxTransformer2DModel, "transformer"),
                          scheduler_config, vae=load(diffusers.AutoencoderKL, "vae"), text=text)

    def prepare(self, components, spec, timer):
        from runner.sampling import PromptCache, warn_truncated

        text, (_, tokens) = components.text, options(spec)
        prompts = list(spec.prompts) + [spec.negative_prompt or ""]
        warn_truncated(text["tokenizer"], prompts, text["tokenizer"].model_max_length)
        warn_truncated(text["tokenizer_2"], prompts, tokens)
        return {"embeds": PromptCache(lambda p: encode(components, p, tokens, spec.device), timer)}

    def runs_cfg(self, components, spec):
        return true_cfg_on(spec)  # `guidance` is never a CFG scale here: an input of FLUX.1-dev, or unused

    def fusable(self, spec):
        return not true_cfg_on(spec)  # one pass per step: a batch's points differ only in their prompts and noise

    def fuse(self, states, prompts):
        import torch

        cond = [state["embeds"](list(p)) for state, p in zip(states, prompts)]
        cond = tuple(torch.cat(parts) for parts in zip(*cond))
        return {"embeds": lambda _: cond}

    def sample(self, components, scheduler, spec, prompts, generators, state, timer, tally):
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        from runner.flow import decode, latent_image_ids, pack_latents, unpack_latents
        from runner.sampling import denoise, latent_scale, step_kwargs, to_uint8

        transformer, vae, device = components.denoiser, components.vae, torch.device(spec.device)
        true_cfg, _ = options(spec)
        use_true_cfg = true_cfg_on(spec)
        batch = len(generators)
        with torch.no_grad():
            # 1. text: T5 tokens and CLIP's pooled vector; the text tokens all sit at position 0
            embeds, pooled = state["embeds"](prompts)
            text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=components.text["text_encoder"].dtype)
            if use_true_cfg:
                negative, negative_pooled = state["embeds"]([spec.negative_prompt] * batch)
            # 2. noise, one latent per generator, packed into 2×2 patches
            scale = latent_scale(vae.config)
            height, width = 2 * (spec.height // (scale * 2)), 2 * (spec.width // (scale * 2))
            shape = (batch, transformer.config.in_channels // 4, height, width)
            latents = pack_latents(randn_tensor(shape, generator=generators, device=device, dtype=embeds.dtype))
            image_ids = latent_image_ids(height // 2, width // 2, device, embeds.dtype)
            # 3. the schedule
            self.set_schedule(components, scheduler, spec)
            guidance = None
            if transformer.config.guidance_embeds:
                guidance = torch.full([1], spec.guidance, device=device, dtype=torch.float32).expand(batch)

            # 4. denoise: the transformer takes t / 1000 (sigma); true CFG is v_neg + s * (v - v_neg)
            def velocity(x, t, embeds, pooled):
                timestep = t.expand(x.shape[0]).to(x.dtype) / 1000
                return transformer(hidden_states=x, timestep=timestep, guidance=guidance, pooled_projections=pooled,
                                   encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids,
                                   return_dict=False)[0]

            def predict_velocity(x, t):
                v = velocity(x, t, embeds, pooled)
                if not use_true_cfg:
                    return v
                v_negative = velocity(x, t, negative, negative_pooled)
                return v_negative + true_cfg * (v - v_negative)

            latents = denoise(scheduler, latents, scheduler.timesteps, predict_velocity,
                              step_kwargs(scheduler, generators, spec.eta), spec.progress, timer, tally,
                              passes=2 if use_true_cfg else 1)
            # 5. unpack and decode
            latents = unpack_latents(latents, height, width)
            with timer("vae_decode"):
                images = decode(vae, latents)
        return to_uint8(images), latents

    def set_schedule(self, components, scheduler, spec):
        """As FluxPipeline: sigmas linspace(1, 1/N, N) (the scheduler's own where it spaces flow sigmas itself),
        shifted by `mu` from the packed token count where the config asks for dynamic shifting (elsewhere the
        pipeline's `mu` goes unused). The caller records `scheduler.runner_mu`."""
        import numpy as np

        from runner.flow import set_shifted_schedule
        from runner.sampling import latent_scale

        scale = latent_scale(components.vae.config)
        tokens = (spec.height // (scale * 2)) * (spec.width // (scale * 2))  # packed 2×2 latent patches
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / spec.steps, spec.steps)
        set_shifted_schedule(scheduler, components.scheduler_config, spec, tokens, max_shift_default=1.15,
                             sigmas=sigmas)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

    def warm_up(self, components, spec, batch_size):
        import torch

        from runner.flow import latent_image_ids
        from runner.sampling import latent_scale

        transformer = components.denoiser
        config, scale = transformer.config, latent_scale(components.vae.config)
        _, tokens = options(spec)
        rows, cols = spec.height // (scale * 2), spec.width // (scale * 2)
        # zeros: a warm-up draws no random numbers. True CFG runs two passes of this same shape.
        like = dict(device=spec.device, dtype=transformer.dtype)
        guidance = torch.ones(batch_size, device=spec.device) if config.guidance_embeds else None
        with torch.no_grad():
            transformer(hidden_states=torch.zeros(batch_size, rows * cols, config.in_channels, **like),
                        timestep=torch.ones(batch_size, **like), guidance=guidance,
                        pooled_projections=torch.zeros(batch_size, config.pooled_projection_dim, **like),
                        encoder_hidden_states=torch.zeros(batch_size, tokens, config.joint_attention_dim, **like),
                        txt_ids=torch.zeros(tokens, 3, **like), img_ids=latent_image_ids(rows, cols, **like),
                        return_dict=False)


def options(spec) -> tuple:
    """(true_cfg_scale, max_sequence_length) from the `flux` config node; its YAML's values where a spec made
    outside Hydra (a test's) leaves them unset."""
    merged = {**option_defaults(), **{k: v for k, v in (spec.family_options or {}).items() if v is not None}}
    return merged["true_cfg_scale"], merged["max_sequence_length"]


@functools.cache
def option_defaults() -> dict:
    """conf/family_options/flux.yaml, read once per process (options() is asked per point and per batch)."""
    from omegaconf import OmegaConf

    from runner import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "family_options" / "flux.yaml"))


def true_cfg_on(spec) -> bool:
    """FluxPipeline runs true CFG for any negative prompt that is not None, the empty one included."""
    return options(spec)[0] > 1 and spec.negative_prompt is not None


def encode(components, prompts: list[str], tokens: int, device):
    """(T5 token embeddings, CLIP pooled output) as FluxPipeline.encode_prompt."""
    import torch

    text = components.text
    with torch.no_grad():  # grad mode changes T5's kernels: a fused batch encodes outside the loop's no_grad
        clip_ids = text["tokenizer"](prompts, padding="max_length", max_length=text["tokenizer"].model_max_length,
                                     truncation=True, return_tensors="pt").input_ids
        pooled = text["text_encoder"](clip_ids.to(device), output_hidden_states=False).pooler_output
        pooled = pooled.to(dtype=text["text_encoder"].dtype, device=device)
        t5_ids = text["tokenizer_2"](prompts, padding="max_length", max_length=tokens, truncation=True,
                                     return_tensors="pt").input_ids
        embeds = text["text_encoder_2"](t5_ids.to(device), output_hidden_states=False)[0]
    return embeds.to(dtype=text["text_encoder_2"].dtype, device=device), pooled


FAMILY = Flux()
