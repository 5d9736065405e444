"""Stable Diffusion 1.x/2.x: CLIP text encoder + `UNet2DConditionModel` + `AutoencoderKL`, as
`StableDiffusionPipeline` (Rombach et al. 2022), and img2img as `StableDiffusionImg2ImgPipeline`."""

from runner.checks import fail
from runner.families.base import Components, Family


class StableDiffusion(Family):
    name = "stable-diffusion"
    pipeline = "StableDiffusionPipeline"
    summary = "CLIPTokenizer + CLIPTextModel + UNet2DConditionModel + AutoencoderKL, like StableDiffusionPipeline"
    img2img_pipeline = "StableDiffusionImg2ImgPipeline"

    def recognise(self, classes):
        wanted = {"tokenizer": "CLIPTokenizer", "text_encoder": "CLIPTextModel", "unet": "UNet2DConditionModel",
                  "vae": "AutoencoderKL"}
        optional = {"safety_checker", "feature_extractor", "image_encoder", "scheduler"}
        # CLIPTokenizerFast counts as CLIPTokenizer
        return all(classes.get(k, "").startswith(v) for k, v in wanted.items()) and set(classes) <= set(wanted) | optional

    def size_rule(self, read_config):
        from runner.sampling import latent_scale

        size = read_config("unet")["sample_size"]
        scale = latent_scale(read_config("vae"))
        return scale, (size if isinstance(size, int) else size[0]) * scale

    def facts(self, read_config):
        return {"guidance_embedded": read_config("unet").get("time_cond_proj_dim") is not None}

    def check(self, spec):
        check_guidance_embedded(spec)
        if spec.init_image is not None and spec.scheduler_backend != "diffusers":
            fail("init_image", spec.init_image, "null with a k-diffusion sampler (img2img runs on the diffusers "
                 "scheduler options)")
        if spec.init_image is not None and int(spec.steps * spec.strength) < 1:
            fail("strength", spec.strength,
                 f"img2img runs int(steps * strength) steps, which must be >= 1 (steps={spec.steps})")

    def load(self, load, scheduler_config):
        import diffusers
        import transformers

        return Components(self, load(diffusers.UNet2DConditionModel, "unet"), scheduler_config,
                          vae=load(diffusers.AutoencoderKL, "vae"),
                          text={"tokenizer": load(transformers.CLIPTokenizer, "tokenizer"),
                                "text_encoder": load(transformers.CLIPTextModel, "text_encoder")})

    def prepare(self, components, spec, timer):
        """Prompt embeddings, computed once per distinct prompt within the job, and the img2img start image."""
        from runner.sampling import PromptCache, encode_prompts, warn_truncated

        tokenizer, text_encoder = components.text["tokenizer"], components.text["text_encoder"]
        warn_truncated(tokenizer, spec.prompts + (spec.negative_prompt,))
        cache = PromptCache(lambda prompts: (encode_prompts(tokenizer, text_encoder, prompts),), timer)
        return {"embeds": lambda prompts: cache(prompts)[0],
                "negative": lambda n: cache([spec.negative_prompt] * n)[0], "init_image": load_init_image(spec)}

    def fuse(self, states, prompts):
        import torch

        cond = torch.cat([state["embeds"](p) for state, p in zip(states, prompts)])
        uncond = torch.cat([state["negative"](len(p)) for state, p in zip(states, prompts)])
        return {"embeds": lambda _: cond, "negative": lambda _: uncond, "init_image": states[0]["init_image"]}

    def sample(self, components, scheduler, spec, prompts, generators, state, timer, tally):
        return sample_text_to_image(components.denoiser, components.vae, scheduler, spec, state["embeds"](prompts),
                                    state["negative"](len(prompts)), generators, timer=timer,
                                    init_image=state["init_image"], tally=tally)

    def warm_up(self, components, spec, batch_size):
        import torch

        from runner.precision import torch_dtype
        from runner.sampling import guidance_condition, latent_scale, uses_cfg

        unet, dtype, device = components.denoiser, torch_dtype(spec.dtype), spec.device

        rows = batch_size * (2 if uses_cfg(unet, spec.guidance) else 1)
        scale = latent_scale(components.vae.config)
        x = torch.randn(rows, unet.config.in_channels, spec.height // scale, spec.width // scale, device=device,
                        dtype=dtype)
        embeds = torch.randn(rows, components.text["tokenizer"].model_max_length,
                             components.text["text_encoder"].config.hidden_size, device=device, dtype=dtype)
        with torch.no_grad():
            unet(x, torch.tensor(1, device=device), encoder_hidden_states=embeds,
                 timestep_cond=guidance_condition(unet, spec.guidance, rows, device, dtype), return_dict=False)


def check_guidance_embedded(spec) -> None:
    """A guidance-embedded UNet runs no unconditional pass, so the pipelines drop a negative prompt without a word
    (LatentConsistencyModelPipeline takes none at all): refuse it rather than record it as used."""
    if (getattr(spec, "model_facts", None) or {}).get("guidance_embedded") and spec.negative_prompt:
        fail("negative_prompt", spec.negative_prompt, "'' for this model: its UNet takes guidance as an embedding "
             "(time_cond_proj_dim, LCM-style) and runs no unconditional pass, so a negative prompt would be ignored")


def load_init_image(spec):
    """The img2img start image as a (1, 3, H, W) tensor in [-1, 1], resized to the run's size."""
    if spec.init_image is None:
        return None
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    return VaeImageProcessor().preprocess(Image.open(spec.init_image).convert("RGB"), height=spec.height,
                                          width=spec.width)


def sample_text_to_image(unet, vae, scheduler, spec, cond_embeds, uncond_embeds, generators, timer=None,
                         init_image=None, tally=None):
    """Latent diffusion with classifier-free guidance, as StableDiffusionPipeline.

    `spec` gives the size, steps (or custom schedule), guidance, eta, strength and progress bar; `cond_embeds` /
    `uncond_embeds` hold one row per image. With `init_image` (a [-1, 1] tensor of shape
    (1, 3, H, W)) it is img2img, as StableDiffusionImg2ImgPipeline: the image is encoded, noised to the
    timestep that `strength` picks, and only the remaining steps run.
    """
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    from runner.ksampling import is_k
    from runner.ksampling import sample as k_sample
    from runner.sampling import (combine_cfg, denoise, guidance_condition, img2img_start, latent_scale, set_schedule,
                                 step_kwargs, timed, to_uint8, uses_cfg)

    with torch.no_grad():
        # The embeddings sit on the execution device, also under model CPU offload (where unet.device says "cpu").
        device, dtype = cond_embeds.device, cond_embeds.dtype
        use_cfg = uses_cfg(unet, spec.guidance)
        embeds = torch.cat([uncond_embeds, cond_embeds]) if use_cfg else cond_embeds
        timestep_cond = guidance_condition(unet, spec.guidance, len(generators), device, dtype)

        # the guided prediction for (already scaled) model input: eps_u + w * (eps_c - eps_u), or one pass with w
        # embedded; t is one timestep (diffusers) or one per row (k-diffusion)
        def guided(model_input, t):
            rows = torch.cat([model_input, model_input]) if use_cfg else model_input
            noise_pred = unet(rows, torch.cat([t, t]) if use_cfg and t.ndim else t, encoder_hidden_states=embeds,
                              timestep_cond=timestep_cond, return_dict=False)[0]
            return combine_cfg(noise_pred, spec.guidance) if use_cfg else noise_pred

        scale = latent_scale(vae.config)
        shape = (len(generators), unet.config.in_channels, spec.height // scale, spec.width // scale)
        passes = 2 if use_cfg else 1
        if is_k(scheduler):  # k-diffusion's sampler, schedule and noise (runner.ksampling)
            latents = k_sample(scheduler, spec, guided, shape, generators, device, dtype, timer, tally, passes)
        else:
            # 1. the schedule first: init_noise_sigma and img2img's start depend on it
            set_schedule(scheduler, spec, device)
            timesteps = scheduler.timesteps
            # 2. latents: pure noise, or the init image encoded and noised
            if init_image is None:
                latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
                latents = latents * scheduler.init_noise_sigma
            else:
                start = img2img_start(spec.steps, spec.strength, scheduler.order)
                timesteps = timesteps[start:]
                if hasattr(scheduler, "set_begin_index"):
                    scheduler.set_begin_index(start)
                with timed(timer, "vae_encode"):
                    posterior = vae.encode(init_image.to(device=device, dtype=dtype)).latent_dist
                clean = torch.cat([posterior.sample(generator=g) for g in generators]) * vae.config.scaling_factor
                noise = randn_tensor(clean.shape, generator=generators, device=device, dtype=dtype)
                latents = scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(generators)))

            # 3. denoise
            def predict_noise(x, t):
                return guided(scheduler.scale_model_input(x, t), t)

            latents = denoise(scheduler, latents, timesteps, predict_noise,
                              step_kwargs(scheduler, generators, spec.eta), spec.progress, timer, tally, passes)
        # 4. decode
        with timed(timer, "vae_decode"):
            images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return to_uint8(images), latents


FAMILY = StableDiffusion()
