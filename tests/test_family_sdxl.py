"""The SDXL family's contract: FAMILY.sample gives StableDiffusionXLPipeline's images, for every scheduler option.

Bound: max pixel difference <= 1/255 on CPU fp32, on the embedded tiny-sdxl. The family is driven directly (a spec
namespace, a loader, a no-op timer), not through runner.job, so that these tests stand before the runner is wired.
"""

import json
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import VP_SCHEDULERS, assert_same_image, unet_rows
from runner import embedded_model_path
from runner.families.sdxl import FAMILY
from runner.sampling import Tally

MODEL = embedded_model_path("tiny-sdxl")
STEPS = 5
PROMPT, NEGATIVE = "a red cube on a table", "blurry"

# Each option's class and kwargs as written by hand in conftest (not read from conf/scheduler: the test must not share
# the runner's mapping to check it). `default` is the model's own class, covered by the options it names.
SCHEDULERS = {option: mapping for option, mapping in VP_SCHEDULERS.items() if option != "default"}
# Model evaluations per image: one per step, except Heun (a second-order correction on all but the last step) and
# PLMS without Runge-Kutta warm-up (its first step is evaluated twice).
NFE = {"heun": 2 * STEPS - 1, "pndm": STEPS + 1}


@contextmanager
def _span(name):
    yield


def timer(name):
    return _span(name)


def load(cls, subfolder, optional=False):
    """The runner's loader contract, on CPU fp32 (tokenizers take no dtype)."""
    if "Tokenizer" in cls.__name__:
        return cls.from_pretrained(MODEL, subfolder=subfolder)
    return cls.from_pretrained(MODEL, subfolder=subfolder, use_safetensors=True, torch_dtype=torch.float32)


def pipeline_config() -> dict:
    """model_index.json's non-component keys, as the spec will carry them."""
    index = json.loads((Path(MODEL) / "model_index.json").read_text())
    return {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}


def make_spec(**overrides):
    values = dict(height=64, width=64, steps=STEPS, guidance=5.0, negative_prompt=NEGATIVE, eta=0.0, progress=False,
                  dtype="fp32", device="cpu", family_options={}, pipeline_config=pipeline_config(), init_image=None,
                  strength=1.0, prompts=(PROMPT,))
    return types.SimpleNamespace(**{**values, **overrides})


def scheduler(config, option):
    import diffusers

    name, kwargs = SCHEDULERS[option]
    return getattr(diffusers, name).from_config(config, **kwargs)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, use_safetensors=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.model_scheduler_config = pipe.scheduler.config  # the tests swap schedulers; each starts from this one
    return pipe


@pytest.fixture(scope="module")
def components(pipe):
    return FAMILY.load(load, dict(pipe.model_scheduler_config))


def ours(components, spec, seeds, option="euler", prompts=None):
    """Our images (uint8 NHWC) and evaluation tally for one batch, one generator per seed."""
    tally = Tally()
    state = FAMILY.prepare(components, spec, timer)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    images, _ = FAMILY.sample(components, scheduler(components.scheduler_config, option), spec,
                              prompts or [PROMPT] * len(seeds), generators, state, timer, tally)
    return images, tally


def theirs(pipe, spec, seed, option="euler", prompt=PROMPT, **kwargs):
    """The pipeline's image for one seed; the runner's empty negative prompt is the pipeline's none."""
    pipe.scheduler = scheduler(pipe.model_scheduler_config, option)
    kwargs.setdefault("negative_prompt", spec.negative_prompt or None)
    image = pipe(prompt, num_inference_steps=spec.steps,
                 guidance_scale=spec.guidance, height=spec.height, width=spec.width,
                 generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images[0]
    return (image * 255).round().astype("uint8")


@pytest.mark.parametrize("option", SCHEDULERS)
def test_matches_pipeline_and_counts_evaluations(option, pipe, components):
    spec = make_spec()
    (image,), tally = ours(components, spec, [11], option)
    assert_same_image(image, theirs(pipe, spec, 11, option))
    assert tally.nfe == NFE.get(option, STEPS)
    assert tally.forward == 2 * tally.nfe  # classifier-free guidance: two rows per evaluation


def test_guidance_one_has_no_unconditional_pass(pipe, components):
    spec = make_spec(guidance=1.0)
    with unet_rows(components.denoiser) as rows:
        (image,), tally = ours(components, spec, [2])
    assert rows == [1] * STEPS
    assert tally.nfe == tally.forward == STEPS
    assert_same_image(image, theirs(pipe, spec, 2))


def test_guidance_rescale(pipe, components):
    spec = make_spec(guidance=9.0, family_options={"guidance_rescale": 0.7})
    (image,), _ = ours(components, spec, [5])
    assert_same_image(image, theirs(pipe, spec, 5, guidance_rescale=0.7))


def test_empty_negative_prompt_is_zeros_where_the_model_says_so(pipe, components):
    zeros = make_spec(negative_prompt="")
    assert zeros.pipeline_config["force_zeros_for_empty_prompt"] is True  # tiny-sdxl ships SDXL's setting
    (image,), _ = ours(components, zeros, [7])
    assert_same_image(image, theirs(pipe, zeros, 7))  # the pipeline's negative_prompt=None: zero embeddings
    encoded = make_spec(negative_prompt="", pipeline_config={"force_zeros_for_empty_prompt": False})
    (image_encoded,), _ = ours(components, encoded, [7])
    assert_same_image(image_encoded, theirs(pipe, encoded, 7, negative_prompt=""))  # "" encoded
    assert np.abs(image.astype(int) - image_encoded.astype(int)).max() > 1  # the two do differ


def test_micro_conditioning(pipe, components):
    sizes = {"original_size": [128, 96], "crops_coords_top_left": [8, 4], "target_size": [48, 64]}
    spec = make_spec(family_options=sizes)
    (image,), _ = ours(components, spec, [3])
    assert_same_image(image, theirs(pipe, spec, 3, **{k: tuple(v) for k, v in sizes.items()}))
    (default,), _ = ours(components, make_spec(), [3])
    assert np.abs(image.astype(int) - default.astype(int)).max() > 1  # the sizes reach the UNet


def test_batch_equals_each_image_alone(pipe, components):
    prompts, seeds = [PROMPT, "a blue ball"], [3, 4]
    spec = make_spec(prompts=tuple(prompts))
    images, tally = ours(components, spec, seeds, "euler_a", prompts)  # ancestral: per-image noise in every step
    assert tally.nfe == STEPS
    for image, prompt, seed in zip(images, prompts, seeds):
        assert_same_image(image, theirs(pipe, spec, seed, "euler_a", prompt=prompt))


def test_guidance_distilled_unet_takes_guidance_as_input(pipe):
    """A UNet with `time_cond_proj_dim` (LCM-style) gets w as an embedding and no CFG pass."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "time_cond_proj_dim": 16})
    distilled = StableDiffusionXLPipeline(**{**pipe.components, "unet": unet}, add_watermarker=False)
    distilled.set_progress_bar_config(disable=True)
    distilled.model_scheduler_config = pipe.model_scheduler_config
    components = FAMILY.load(lambda cls, sub: unet if sub == "unet" else load(cls, sub),
                             dict(pipe.model_scheduler_config))
    spec = make_spec(guidance=6.0)
    with unet_rows(unet) as rows:
        (image,), tally = ours(components, spec, [9])
    assert rows == [1] * STEPS and tally.forward == STEPS
    assert_same_image(image, theirs(distilled, spec, 9))


def test_warm_up_runs_the_job_shapes_without_touching_rngs(components):
    state = torch.get_rng_state()
    with unet_rows(components.denoiser) as rows:
        FAMILY.warm_up(components, make_spec(), batch_size=3)
    assert rows == [6]
    assert torch.equal(torch.get_rng_state(), state)


def test_recognises_its_model_and_reads_its_sizes():
    def classes(name):
        index = json.loads((Path(embedded_model_path(name)) / "model_index.json").read_text())
        return {k: v[1] for k, v in index.items() if isinstance(v, list) and v[1] is not None}

    def read_config(subfolder):
        return json.loads((Path(MODEL) / subfolder / "config.json").read_text())

    assert FAMILY.recognise(classes("tiny-sdxl"))
    assert not FAMILY.recognise(classes("tiny-sd"))
    assert not FAMILY.recognise(classes("tiny-ddpm"))
    assert FAMILY.size_rule(read_config) == (8, 64)


@pytest.mark.parametrize("changes, message", [
    ({"family_options": {"original_size": [1, 2, 3]}},
     "sdxl.original_size=[1, 2, 3] is not allowed: null or [height, width] of positive integers"),
    ({"family_options": {"target_size": [64, True]}}, "sdxl.target_size=[64, True] is not allowed"),
    ({"family_options": {"crops_coords_top_left": [0, -1]}},
     "sdxl.crops_coords_top_left=[0, -1] is not allowed: null or [top, left] of non-negative integers"),
    ({"family_options": {"guidance_rescale": 1.5}}, "sdxl.guidance_rescale=1.5 is not allowed: a number in [0, 1]"),
    ({"family_options": {"guidance_rescal": 0.5}}, "sdxl.guidance_rescal=0.5 is not allowed: not an SDXL option"),
    ({"init_image": "start.png"}, "init_image='start.png' is not allowed"),
])
def test_check_refuses_bad_options(changes, message):
    from runner.checks import ConfigError

    with pytest.raises(ConfigError) as error:
        FAMILY.check(make_spec(**changes))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_check_accepts_good_options():
    FAMILY.check(make_spec(family_options={"original_size": [1024, 1024], "crops_coords_top_left": [0, 0],
                                           "target_size": None, "guidance_rescale": 0}))
    FAMILY.check(make_spec())


def test_tiny_sdxl_is_small_and_safetensors_only():
    files = [f for f in Path(MODEL).rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 8e6
    assert not [f for f in files if f.suffix in {".bin", ".ckpt", ".pt", ".pkl", ".joblib"}]
    assert pipeline_config() == {"force_zeros_for_empty_prompt": True}


def test_prepare_warns_once_of_a_truncated_prompt(components, caplog):
    long = "a very long prompt " * 10  # past 77 tokens of the character vocabulary
    with caplog.at_level("WARNING", logger="runner"):
        FAMILY.prepare(components, make_spec(prompts=(long, PROMPT)), timer)
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
