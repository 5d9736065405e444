"""Stable Diffusion 3 / 3.5: two CLIP text encoders with projection, an optional T5 encoder, the MMDiT
`SD3Transformer2DModel` and a 16-channel `AutoencoderKL`, sampled by rectified flow as `StableDiffusion3Pipeline`
(Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis")."""

import logging

from runner.families.base import Components, Family

log = logging.getLogger("runner")

T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length default


class SD3(Family):
    name = "sd3"
    pipeline = "StableDiffusion3Pipeline"
    summary = ("2 CLIPTextModelWithProjection (+ optional T5EncoderModel) + SD3Transformer2DModel + AutoencoderKL, "
               "like StableDiffusion3Pipeline")
    flow = True

    def recognise(self, classes):
        wanted = {"tokenizer": "CLIPTokenizer", "text_encoder": "CLIPTextModelWithProjection",
                  "tokenizer_2": "CLIPTokenizer", "text_encoder_2": "CLIPTextModelWithProjection",
                  "transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL"}
        # T5 may be left out (text_encoder_3=None): the pipeline then conditions on zeros in its place.
        optional = {"tokenizer_3": "T5Tokenizer", "text_encoder_3": "T5EncoderModel", "scheduler": "",
                    "image_encoder": "", "feature_extractor": ""}
        return (all(classes.get(k, "").startswith(v) for k, v in wanted.items())
                and all(k in wanted or (k in optional and v.startswith(optional[k])) for k, v in classes.items()))

    def size_rule(self, read_config):
        from runner.sampling import latent_scale

        transformer, scale = read_config("transformer"), latent_scale(read_config("vae"))
        # The pipeline's rule: latents are cut into patch_size² patches.
        return scale * transformer["patch_size"], transformer["sample_size"] * scale

    def check(self, spec):
        from runner.checks import ConfigError

        if spec.init_image is not None:
            raise ConfigError(f"init_image={spec.init_image!r} is not allowed: null (img2img is not supported for "
                              f"{self.name} models)")

    def load(self, load, scheduler_config):
        import diffusers
        import transformers

        clip, t5 = transformers.CLIPTextModelWithProjection, transformers.T5EncoderModel
        text = {"tokenizer": load(transformers.CLIPTokenizer, "tokenizer"), "text_encoder": load(clip, "text_encoder"),
                "tokenizer_2": load(transformers.CLIPTokenizer, "tokenizer_2"),
                "text_encoder_2": load(clip, "text_encoder_2"),
                "tokenizer_3": load(transformers.T5TokenizerFast, "tokenizer_3", optional=True),
                "text_encoder_3": load(t5, "text_encoder_3", optional=True)}
        return Components(self, load(diffusers.SD3Transformer2DModel, "transformer"), scheduler_config,
                          vae=load(diffusers.AutoencoderKL, "vae"), text=text)

    def prepare(self, components, spec, timer):
        from runner.sampling import PromptCache, warn_truncated

        text = components.text
        prompts = list(spec.prompts) + [spec.negative_prompt or ""]
        warn_truncated(text["tokenizer"], prompts, text["tokenizer"].model_max_length)
        if text["text_encoder_3"] is not None:
            warn_truncated(text["tokenizer_3"], prompts, T5_TOKENS)
        cache = PromptCache(lambda p: encode(components, p, spec.device), timer)
        return {"embeds": cache, "negative": lambda n: cache([spec.negative_prompt or ""] * n)}

    def fuse(self, states, prompts):
        import torch

        cond = [state["embeds"](list(p)) for state, p in zip(states, prompts)]
        negative = [state["negative"](len(p)) for state, p in zip(states, prompts)]
        cond, negative = (tuple(torch.cat(parts) for parts in zip(*side)) for side in (cond, negative))
        return {"embeds": lambda _: cond, "negative": lambda _: negative}

    def sample(self, components, scheduler, spec, prompts, generators, state, timer, tally):
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        from runner.flow import decode
        from runner.sampling import combine_cfg, denoise, latent_scale, step_kwargs, to_uint8, uses_cfg

        transformer, vae, device = components.denoiser, components.vae, torch.device(spec.device)
        use_cfg = uses_cfg(transformer, spec.guidance)  # one scale per image in a fused batch (runner.fused)
        with torch.no_grad():
            # 1. text: the negative prompt's rows first, as the pipeline batches them
            embeds, pooled = state["embeds"](prompts)
            if use_cfg:
                negative, negative_pooled = state["negative"](len(prompts))
                embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
            # 2. noise, one latent per generator
            scale = latent_scale(vae.config)
            shape = (len(generators), transformer.config.in_channels, spec.height // scale, spec.width // scale)
            latents = randn_tensor(shape, generator=generators, device=device, dtype=embeds.dtype)
            # 3. the schedule
            self.set_schedule(components, scheduler, spec)

            # 4. denoise: v_u + w * (v_c - v_u)
            def predict_velocity(x, t):
                model_input = torch.cat([x, x]) if use_cfg else x
                velocity = transformer(hidden_states=model_input, timestep=t.expand(model_input.shape[0]),
                                       encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
                return combine_cfg(velocity, spec.guidance) if use_cfg else velocity

            latents = denoise(scheduler, latents, scheduler.timesteps, predict_velocity,
                              step_kwargs(scheduler, generators, spec.eta), spec.progress, timer, tally,
                              passes=2 if use_cfg else 1)
            # 5. decode
            with timer("vae_decode"):
                images = decode(vae, latents)
        return to_uint8(images), latents

    def set_schedule(self, components, scheduler, spec):
        """The scheduler's static `shift`, or `mu` from the image's token count where its config asks for dynamic
        shifting. The caller records `scheduler.runner_mu` beside the sigmas."""
        from runner.flow import set_shifted_schedule
        from runner.sampling import latent_scale

        scale, patch = latent_scale(components.vae.config), components.denoiser.config.patch_size
        tokens = (spec.height // scale // patch) * (spec.width // scale // patch)
        set_shifted_schedule(scheduler, components.scheduler_config, spec, tokens, max_shift_default=1.16)

    def warm_up(self, components, spec, batch_size):
        import torch

        from runner.sampling import latent_scale, uses_cfg

        transformer = components.denoiser
        config, scale = transformer.config, latent_scale(components.vae.config)
        rows = batch_size * (2 if uses_cfg(transformer, spec.guidance) else 1)
        tokens = components.text["tokenizer"].model_max_length + T5_TOKENS
        pooled = sum(components.text[k].config.projection_dim for k in ("text_encoder", "text_encoder_2"))
        # zeros: a warm-up draws no random numbers
        like = dict(device=spec.device, dtype=transformer.dtype)
        with torch.no_grad():
            transformer(hidden_states=torch.zeros(rows, config.in_channels, spec.height // scale, spec.width // scale,
                                                  **like),
                        timestep=torch.ones(rows, **like),
                        encoder_hidden_states=torch.zeros(rows, tokens, config.joint_attention_dim, **like),
                        pooled_projections=torch.zeros(rows, pooled, **like), return_dict=False)


def clip_embeds(tokenizer, text_encoder, prompts, max_length, device, dtype):
    """CLIP's penultimate hidden states (in `dtype`) and its projected pooled output, as
    StableDiffusion3Pipeline._get_clip_prompt_embeds (no clip_skip)."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    out = text_encoder(ids.to(device), output_hidden_states=True)
    return out.hidden_states[-2].to(dtype=dtype, device=device), out[0]


def encode(components, prompts: list[str], device):
    """(embeds, pooled) as StableDiffusion3Pipeline.encode_prompt: CLIP-L and CLIP-G hidden states side by side,
    zero-padded to T5's width, then T5's tokens (zeros without T5); pooled is both CLIP projections."""
    import torch

    with torch.no_grad():  # grad mode changes T5's kernels: a fused batch encodes outside the loop's no_grad
        text = components.text
        dtype = text["text_encoder"].dtype  # the pipeline casts both CLIP outputs to the first encoder's dtype
        max_length = text["tokenizer"].model_max_length  # the first tokenizer's limit serves both
        embeds_1, pooled_1 = clip_embeds(text["tokenizer"], text["text_encoder"], prompts, max_length, device, dtype)
        embeds_2, pooled_2 = clip_embeds(text["tokenizer_2"], text["text_encoder_2"], prompts, max_length, device, dtype)
        if text["text_encoder_3"] is None:
            t5 = torch.zeros(len(prompts), T5_TOKENS, components.denoiser.config.joint_attention_dim, device=device,
                             dtype=dtype)
        else:
            ids = text["tokenizer_3"](prompts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                                      add_special_tokens=True, return_tensors="pt").input_ids
            t5 = text["text_encoder_3"](ids.to(device))[0].to(dtype=text["text_encoder_3"].dtype, device=device)
        clip = torch.cat([embeds_1, embeds_2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([pooled_1, pooled_2], dim=-1)


FAMILY = SD3()
