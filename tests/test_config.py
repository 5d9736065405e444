"""Config composition (Hydra compose API) and the checks that run before any model loads."""

import importlib.util

import pytest

from conftest import (CONF_DIR, FLOW_SCHEDULERS, K_SAMPLERS, SCHEDULER_OPTIONS, SPACINGS, compose_config,
                      scheduler_by_hand)
from runner.schedulers import build_scheduler
from runner.checks import ConfigError
from runner.spec import make_spec


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_its_options():
    assert options("scheduler") == sorted(SCHEDULER_OPTIONS)  # each with its diffusers mapping written by hand
    assert options("precision") == ["auto", "bf16", "fp16", "fp32"]
    assert {"tiny-sd", "tiny-ddpm", "ddpm-cat-256", "sd-v1-4", "sd-v1-5", "sd-2-1"} <= set(options("model"))
    assert options("sampling") == ["default"]


def test_defaults():
    cfg = compose_config()
    assert (cfg.model.name, cfg.scheduler.name, cfg.precision.name) == ("digits-sd", "default", "auto")
    assert (cfg.schedule.name, cfg.schedule.timesteps, cfg.schedule.sigmas) == ("default", None, None)
    assert cfg.model.metric == "digits" and cfg.prompt == "a handwritten digit seven"
    assert cfg.negative_prompt == "" and cfg.seed == 0 and cfg.device == "auto"


K_INSTALLED = importlib.util.find_spec("k_diffusion") is not None
K_NOISE = {None: None, "generator": "generators", "brownian": "brownian_tree"}  # runner.ksampling's names for them


@pytest.mark.parametrize("option", options("scheduler"))
def test_scheduler_options_build_the_readme_class_and_kwargs(option):
    """Each option builds, from the model's own scheduler config, exactly the scheduler a user builds with diffusers
    from the README's mapping (conftest.SCHEDULER_OPTIONS, written by hand), and a k_* option runs the README's
    k-diffusion function (conftest.K_SAMPLERS). VP options on digits-sd and on tiny-ddpm (whose DDPM config leaves
    PNDM's skip_prk_steps unset), flow options on tiny-sd3."""
    import diffusers

    if option in K_SAMPLERS and not K_INSTALLED:
        pytest.skip("k-diffusion is not installed")
    models = ["tiny-sd3"] if option in FLOW_SCHEDULERS else ["digits-sd"] if option in K_SAMPLERS else [
        "digits-sd", "tiny-ddpm"]
    for model in models:
        spec = make_spec(compose_config(f"model={model}", f"scheduler={option}", "device=cpu"))
        model_config = diffusers.DDPMScheduler.load_config(spec.name_or_path, subfolder="scheduler")
        scheduler = build_scheduler(model_config, spec.scheduler_class, spec.scheduler_kwargs)
        expected = scheduler_by_hand(model_config, option)
        assert type(scheduler) is type(expected)
        assert dict(scheduler.config) == dict(expected.config)  # every setting: the option's and the model's
        assert spec.scheduler == option  # the option name, as typed
        if option in K_SAMPLERS:
            function, noise, _ = K_SAMPLERS[option]
            assert (spec.scheduler_backend, spec.k_sampler) == (
                "k-diffusion", {"sampler": function, "noise_sampler": K_NOISE[noise], "quantize": False})
        else:
            assert (spec.scheduler_backend, spec.k_sampler) == ("diffusers", {})


@pytest.mark.parametrize("schedule", options("schedule"))
def test_schedule_options_give_the_readme_spacing(schedule):
    """README, Sigma spacing: the kwarg each spacing sets (conftest.SPACINGS, by hand), diffusers' own AYS sigmas,
    and polyexponential for the k_* options only."""
    from diffusers.schedulers import AysSchedules

    if schedule == "polyexponential" and not K_INSTALLED:
        pytest.skip("k-diffusion is not installed")
    scheduler = "k_euler" if schedule == "polyexponential" else "euler"
    spec = make_spec(compose_config("model=digits-sd", f"scheduler={scheduler}", f"schedule={schedule}", "steps=10",
                                    "device=cpu"))
    assert spec.schedule == schedule and spec.schedule_timesteps is None
    assert spec.scheduler_kwargs == ({SPACINGS[schedule]: True} if schedule in SPACINGS else {})
    assert spec.schedule_sigmas == (tuple(AysSchedules["StableDiffusionSigmas"]) if schedule == "ays" else None)


def test_scheduler_kwargs_override_from_the_command_line():
    spec = make_spec(compose_config("scheduler=euler", "scheduler.kwargs.timestep_spacing=trailing",
                                    "scheduler.kwargs.use_karras_sigmas=true", "+scheduler.kwargs.sigma_min=0.1"))
    assert spec.scheduler_kwargs == {"timestep_spacing": "trailing", "use_karras_sigmas": True, "sigma_min": 0.1}
    karras = spec.scheduler_kwargs
    import diffusers

    model_config = diffusers.DDPMScheduler.load_config(spec.name_or_path, subfolder="scheduler")
    assert build_scheduler(model_config, spec.scheduler_class, karras).config.use_karras_sigmas is True


@pytest.mark.parametrize("option,dtype", [("auto", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")])
def test_precision_options_on_cpu(option, dtype):
    assert make_spec(compose_config(f"precision={option}", "device=cpu")).dtype == dtype


@pytest.mark.parametrize("model,family,size", [("tiny-sd", "stable-diffusion", 64), ("tiny-ddpm", "unconditional", 32)])
def test_embedded_models_family_and_native_size(model, family, size):
    spec = make_spec(compose_config(f"model={model}", "prompt=[a cat,a dog]"))
    assert (spec.family, spec.height, spec.width) == (family, size, size)
    assert spec.prompts == (("a cat", "a dog") if family == "stable-diffusion" else ("",))
    assert spec.model_revision.startswith("local-")


@pytest.mark.parametrize("model", ["ddpm-cat-256", "sd-v1-4", "sd-v1-5", "sd-2-1"])
def test_hub_models_compose_and_fail_clearly_offline(model):
    cfg = compose_config(f"model={model}")
    assert "/" in cfg.model.name_or_path
    with pytest.raises(ConfigError, match="model.name_or_path=.*hub"):
        make_spec(cfg)


@pytest.mark.parametrize("experiment,axes", [("scheduler_shootout", {"scheduler", "steps"}),
                                             ("guidance_ladder", {"guidance"}), ("steps_ladder", {"scheduler", "steps"})])
def test_experiments_compose_as_sweeps(experiment, axes):
    cfg = compose_config(f"experiment={experiment}", hydra_config=True)
    assert set(cfg.hydra.sweeper.params) == axes
    assert list(cfg.seed) == [0, 1]
    if experiment == "guidance_ladder":
        assert cfg.scheduler.name == "dpmpp_2m"


def test_seed_and_prompt_lists():
    spec = make_spec(compose_config("seed=[3,4,5]", "prompt=[a cat,a dog]"))
    assert spec.seeds == (3, 4, 5) and spec.prompts == ("a cat", "a dog")
    assert make_spec(compose_config("seed=0")).seeds == (0,)  # seed 0 is a seed


@pytest.mark.parametrize("override,key,allowed", [
    ("guidance=-1", "guidance", ">= 0"),
    ("guidance=abc", "guidance", ">= 0"),
    ("steps=0", "steps", ">= 1"),
    ("height=62", "height", "multiple of 4"),  # digits-sd: 32x32 pixels from 8x8 latents
    ("width=-64", "width", "multiple of 4"),
    ("seed=-1", "seed", "0..2^63-1"),
    (f"seed={2**63}", "seed", "0..2^63-1"),
    ("seed=[]", "seed", "non-empty"),
    ("prompt=[]", "prompt", "non-empty"),
    ("precision=fp16", "precision", "precision=fp32"),
    ("device=tpu", "device", "auto | cpu | cuda"),
    ("strength=1.5", "strength", "(0, 1]"),
    ("init_image=/no/such.png", "init_image", "existing image"),
    ("model.name_or_path=/no/such/dir", "model.name_or_path", "does not exist"),
    ("scheduler.class_name=os.system", "scheduler.class_name", "DDIMScheduler"),
])
def test_bad_values_are_refused_with_key_value_and_what_is_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        make_spec(compose_config(override, "device=cpu") if not override.startswith("device") else compose_config(override))
    message = str(err.value)
    assert message.startswith(f"{key}=") and allowed in message and "\n" not in message


def test_directory_without_model_index_and_unsupported_family(tmp_path):
    with pytest.raises(ConfigError, match="no model_index.json"):
        make_spec(compose_config(f"model.name_or_path={tmp_path}"))
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline", '
                                               '"unet": ["diffusers", "UNet2DConditionModel"], '
                                               '"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}')
    with pytest.raises(ConfigError, match="not a supported family; supported: unconditional .* stable-diffusion .* sdxl .* sd3 .* flux"):
        make_spec(compose_config(f"model.name_or_path={tmp_path}"))


def test_img2img_needs_a_latent_model(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    with pytest.raises(ConfigError, match="init_image=.*text-to-image"):
        make_spec(compose_config("model=tiny-ddpm", f"init_image={tmp_path / 'init.png'}"))


def test_img2img_strength_must_leave_a_step(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    with pytest.raises(ConfigError, match=r"strength=0.05 .* >= 1 \(steps=10\)"):
        make_spec(compose_config(f"init_image={tmp_path / 'init.png'}", "steps=10", "strength=0.05"))


def test_vae_swap_loads_another_autoencoder(tmp_path):
    """model.vae takes any AutoencoderKL dir or hub id; here the embedded model's own VAE, saved elsewhere."""
    import shutil

    from conftest import run_job_in
    from runner import embedded_model_path

    shutil.copytree(embedded_model_path("tiny-sd") + "/vae", tmp_path / "other-vae")
    rows = run_job_in(tmp_path / "run", f"model.vae={tmp_path / 'other-vae'}", "steps=3")
    assert rows[0]["status"] == "ok", rows[0]["error"]
