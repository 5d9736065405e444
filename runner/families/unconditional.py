"""Unconditional pixel-space diffusion: a `UNet2DModel` and a scheduler, as `DDPMPipeline` (Ho et al. 2020)."""

from runner.checks import fail
from runner.families.base import Components, Family


class Unconditional(Family):
    name = "unconditional"
    pipeline = "DDPMPipeline"
    summary = "UNet2DModel + a scheduler, like DDPMPipeline"
    conditional = False
    has_vae = False

    def recognise(self, classes):
        return classes.get("unet") == "UNet2DModel" and set(classes) == {"unet", "scheduler"}

    def size_rule(self, read_config):
        unet = read_config("unet")
        size = unet["sample_size"]
        return 2 ** (len(unet["block_out_channels"]) - 1), size if isinstance(size, int) else size[0]

    def check(self, spec):
        if spec.init_image is not None:
            fail("init_image", spec.init_image, "img2img needs a text-to-image model (with a VAE)")

    def load(self, load, scheduler_config):
        import diffusers

        return Components(self, load(diffusers.UNet2DModel, "unet"), scheduler_config)

    def sample(self, components, scheduler, spec, prompts, generators, state, timer, tally):
        """As DDPMPipeline, for a batch with one generator per image; no latent beyond the image itself."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        from runner.sampling import denoise, set_schedule, step_kwargs, to_uint8

        unet = components.denoiser
        with torch.no_grad():
            # 1. noise, one image per generator
            shape = (len(generators), unet.config.in_channels, spec.height, spec.width)
            images = randn_tensor(shape, generator=generators, device=unet.device, dtype=unet.dtype)
            # 2. the schedule; sigma-based schedulers start from a wider noise and scale the model input
            set_schedule(scheduler, spec)
            images = images * scheduler.init_noise_sigma

            # 3. denoise
            def predict_noise(x, t):
                return unet(scheduler.scale_model_input(x, t), t).sample

            images = denoise(scheduler, images, scheduler.timesteps, predict_noise,
                             step_kwargs(scheduler, generators, spec.eta), spec.progress, timer, tally)
            # 4. to pixels
            return to_uint8(images), None

    def warm_up(self, components, spec, batch_size):
        import torch

        from runner.precision import torch_dtype

        unet = components.denoiser
        x = torch.randn(batch_size, unet.config.in_channels, spec.height, spec.width, device=spec.device,
                        dtype=torch_dtype(spec.dtype))
        with torch.no_grad():
            unet(x, torch.tensor(1, device=spec.device))


FAMILY = Unconditional()
