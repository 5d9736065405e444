"""The flow-matching families (SD3, Flux) against their diffusers pipelines, on the embedded tiny models.

Bound: max pixel difference <= 1/255 on CPU fp32 between a family's `sample` and the pipeline's `output_type="np"`
images. Scheduler classes and kwargs are written here by hand, independently of conf/.
"""

import contextlib
import dataclasses
import inspect
import json
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FLOW_SCHEDULERS  # option → (class, kwargs), written by hand (conf/scheduler/flow_*.yaml)
from runner import embedded_model_path
from runner.families import flux, sd3
from runner.sampling import Tally
from runner.checks import ConfigError

from conftest import assert_same_image

STEPS = 5
PROMPT, NEGATIVE, SEED = "a red cube on a table", "blurry", 11


@contextlib.contextmanager
def no_timer(name):
    yield


def loader(path):
    def load(cls, subfolder, optional=False):
        if optional and not (Path(path) / subfolder).is_dir():
            return None
        return cls.from_pretrained(path, subfolder=subfolder, use_safetensors=True)

    return load


def make_spec(**overrides):
    values = dict(height=64, width=64, steps=STEPS, guidance=5.0, negative_prompt=NEGATIVE, eta=0.0, progress=False,
                  dtype="fp32", device="cpu", family_options={}, pipeline_config={}, init_image=None,
                  prompts=(PROMPT,), scheduler_class=None, scheduler_kwargs={})
    return types.SimpleNamespace(**{**values, **overrides})


def scheduler(option, config, **extra):
    import diffusers

    class_name, kwargs = FLOW_SCHEDULERS[option]
    return getattr(diffusers, class_name).from_config(config, **kwargs, **extra)


def ours(family, components, option, spec, seeds, prompts=None):
    """Images, the scheduler after sampling, and the tally, from the family's own loop."""
    sched = scheduler(option, components.scheduler_config, **spec.scheduler_kwargs)
    tally = Tally()
    state = family.prepare(components, spec, no_timer)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    images, _ = family.sample(components, sched, spec, prompts or [PROMPT] * len(seeds), generators, state, no_timer,
                              tally)
    return images, sched, tally


def stochastic_step(pipe):
    """The pipelines call step() without a generator; give the stochastic scheduler the pipeline's own, which is
    what the runner does per image."""
    step = pipe.scheduler.step

    def with_generator(*args, **kwargs):
        return step(*args, generator=pipe.test_generator, **kwargs)

    pipe.scheduler.step = with_generator


def theirs(pipe, option, seed, **call):
    if option == "flow_euler_sde":
        stochastic_step(pipe)
    generator = pipe.test_generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        images = pipe(PROMPT, height=64, width=64, num_inference_steps=STEPS, generator=generator, output_type="np",
                      **call).images
    return (images * 255).round().astype("uint8")


def without_t5(src: Path, dst: Path) -> Path:
    """A copy of tiny-sd3 whose model_index.json leaves T5 out, as SD3 checkpoints may."""
    shutil.copytree(src, dst)
    for name in ("text_encoder_3", "tokenizer_3"):
        shutil.rmtree(dst / name)
    index = json.loads((dst / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


@pytest.fixture(scope="module")
def sd3_models(tmp_path_factory):
    """{with_t5: (path, pipeline, components)}"""
    from diffusers import StableDiffusion3Pipeline

    shipped = Path(embedded_model_path("tiny-sd3"))
    paths = {True: shipped, False: without_t5(shipped, tmp_path_factory.mktemp("sd3") / "no-t5")}
    models = {}
    for with_t5, path in paths.items():
        # diffusers wants null components named in the call too
        left_out = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = StableDiffusion3Pipeline.from_pretrained(path, use_safetensors=True, **left_out)
        pipe.set_progress_bar_config(disable=True)
        pipe.model_scheduler_config = pipe.scheduler.config  # the tests swap schedulers; each starts from this
        models[with_t5] = (path, pipe, sd3.FAMILY.load(loader(path), dict(pipe.model_scheduler_config)))
    return models


@pytest.fixture(scope="module")
def flux_models(tmp_path_factory):
    """{guidance_embeds: (pipeline, components)}: the shipped model, and one with a guidance input built here."""
    from diffusers import FluxPipeline

    from runner.tools.tiny_flow import build_tiny_flux

    guided = tmp_path_factory.mktemp("flux") / "guided"
    build_tiny_flux(guided, guidance_embeds=True)
    models = {}
    for embeds, path in ((False, Path(embedded_model_path("tiny-flux"))), (True, guided)):
        pipe = FluxPipeline.from_pretrained(path, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.model_scheduler_config = pipe.scheduler.config  # the tests swap schedulers; each starts from this
        models[embeds] = (pipe, flux.FAMILY.load(loader(path), dict(pipe.model_scheduler_config)))
    return models


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no-t5"])
@pytest.mark.parametrize("option", list(FLOW_SCHEDULERS))
def test_sd3_matches_its_pipeline(option, with_t5, shift, sd3_models):
    path, pipe, components = sd3_models[with_t5]
    assert (components.text["text_encoder_3"] is None) is (not with_t5)
    # the model's static shift: ours through the family (flow_shift from `shift`), theirs set by hand
    components = dataclasses.replace(components, scheduler_config={**pipe.model_scheduler_config, "shift": shift})
    images, sched, tally = ours(sd3.FAMILY, components, option, make_spec(), [SEED])
    by_hand = {"flow_shift": shift} if option in ("flow_dpmpp_2m", "flow_unipc") else {"shift": shift}
    pipe.scheduler = scheduler(option, pipe.model_scheduler_config, **by_hand)
    assert_same_image(images[0], theirs(pipe, option, SEED, guidance_scale=5.0, negative_prompt=NEGATIVE)[0])
    assert torch.equal(sched.sigmas, pipe.scheduler.sigmas) and sched.runner_mu is None
    evaluations = 2 * STEPS - 1 if option == "flow_heun" else STEPS  # Heun: two calls per step but the last
    assert (tally.nfe, tally.forward) == (evaluations, 2 * evaluations)  # CFG: two passes per evaluation


def test_sd3_without_guidance_runs_one_pass(sd3_models):
    path, pipe, components = sd3_models[True]
    images, _, tally = ours(sd3.FAMILY, components, "flow_euler", make_spec(guidance=1.0), [SEED])
    pipe.scheduler = scheduler("flow_euler", pipe.model_scheduler_config)
    assert_same_image(images[0], theirs(pipe, "flow_euler", SEED, guidance_scale=1.0, negative_prompt=NEGATIVE)[0])
    assert (tally.nfe, tally.forward) == (STEPS, STEPS)


def test_sd3_with_dynamic_shift_matches_its_pipeline(sd3_models):
    _, pipe, components = sd3_models[True]
    dynamic = {**pipe.model_scheduler_config, "use_dynamic_shifting": True}
    components = dataclasses.replace(components, scheduler_config=dynamic)
    images, sched, _ = ours(sd3.FAMILY, components, "flow_euler", make_spec(), [SEED])
    pipe.scheduler = scheduler("flow_euler", dynamic)
    assert_same_image(images[0], theirs(pipe, "flow_euler", SEED, guidance_scale=5.0, negative_prompt=NEGATIVE)[0])
    # mu from the patch count (64 px / 8 / patch 2 = 4 a side) and the config's shift settings
    tokens, get = (64 // 16) ** 2, dynamic.get
    slope = (get("max_shift") - get("base_shift")) / (get("max_image_seq_len") - get("base_image_seq_len"))
    assert math.isclose(sched.runner_mu, get("base_shift") + slope * (tokens - get("base_image_seq_len")))
    assert torch.equal(sched.sigmas, pipe.scheduler.sigmas)


@pytest.mark.parametrize("option", ["flow_euler", "flow_dpmpp_2m", "flow_unipc"])
def test_flux_matches_its_pipeline_with_dynamic_shift(option, flux_models):
    pipe, components = flux_models[False]
    images, sched, tally = ours(flux.FAMILY, components, option, make_spec(), [SEED])
    pipe.scheduler = scheduler(option, pipe.model_scheduler_config)
    assert_same_image(images[0], theirs(pipe, option, SEED)[0])
    # mu from the packed token count (64 px / 8 / 2 = 4 a side), FLUX.1-dev's shift settings
    tokens = (64 // 16) ** 2
    assert math.isclose(sched.runner_mu, 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256))
    assert torch.equal(sched.sigmas, pipe.scheduler.sigmas)
    assert (tally.nfe, tally.forward) == (STEPS, STEPS)  # no guidance input, no CFG: one pass


def test_flux_with_guidance_input_matches_its_pipeline(flux_models):
    pipe, components = flux_models[True]
    assert components.denoiser.config.guidance_embeds
    images, _, tally = ours(flux.FAMILY, components, "flow_euler", make_spec(guidance=3.5), [SEED])
    pipe.scheduler = scheduler("flow_euler", pipe.model_scheduler_config)
    assert_same_image(images[0], theirs(pipe, "flow_euler", SEED, guidance_scale=3.5)[0])
    assert (tally.nfe, tally.forward) == (STEPS, STEPS)  # the guidance is an input, not a second pass
    other, _, _ = ours(flux.FAMILY, components, "flow_euler", make_spec(guidance=1.0), [SEED])
    assert np.abs(other[0].astype(int) - images[0].astype(int)).max() > 0


def test_flux_true_cfg_matches_its_pipeline(flux_models):
    pipe, components = flux_models[False]
    spec = make_spec(family_options={"true_cfg_scale": 2.0})
    images, _, tally = ours(flux.FAMILY, components, "flow_euler", spec, [SEED])
    pipe.scheduler = scheduler("flow_euler", pipe.model_scheduler_config)
    assert_same_image(images[0], theirs(pipe, "flow_euler", SEED, true_cfg_scale=2.0, negative_prompt=NEGATIVE)[0])
    assert (tally.nfe, tally.forward) == (STEPS, 2 * STEPS)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_seed_in_a_batch_equals_that_seed_alone(family, sd3_models, flux_models):
    # flow_euler_sde draws noise at every step: each image's generator must feed its own steps
    fam, components = (sd3.FAMILY, sd3_models[True][2]) if family == "sd3" else (flux.FAMILY, flux_models[False][1])
    prompts = ["a cat", "a dog"]
    batch, _, tally = ours(fam, components, "flow_euler_sde", make_spec(), [3, 4], prompts)
    alone = [ours(fam, components, "flow_euler_sde", make_spec(), [s], [p])[0][0] for s, p in zip([3, 4], prompts)]
    for b, a in zip(batch, alone):
        assert_same_image(b, a)
    assert np.abs(batch[0].astype(int) - batch[1].astype(int)).max() > 10
    assert tally.nfe == STEPS  # counted per batch, whatever its size


def test_warm_up_runs_a_batch_without_drawing_random_numbers(sd3_models, flux_models):
    state = torch.random.get_rng_state()
    sd3.FAMILY.warm_up(sd3_models[True][2], make_spec(), 2)
    for _, components in flux_models.values():
        flux.FAMILY.warm_up(components, make_spec(height=48, width=80), 2)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_flux_refuses_schedulers_that_take_no_sigmas(flux_models):
    _, components = flux_models[False]
    with pytest.raises(ConfigError, match="FlowMatchHeunDiscreteScheduler"):
        flux.FAMILY.check(make_spec(scheduler_class="FlowMatchHeunDiscreteScheduler"))
    with pytest.raises(ConfigError, match="sigmas"):
        ours(flux.FAMILY, components, "flow_heun", make_spec(), [SEED])
    flux.FAMILY.check(make_spec(scheduler_class="UniPCMultistepScheduler", scheduler_kwargs={"use_flow_sigmas": True}))


def test_checks_name_key_value_and_allowed():
    for family in (sd3.FAMILY, flux.FAMILY):
        with pytest.raises(ConfigError, match=r"init_image='x.png' is not allowed: null"):
            family.check(make_spec(init_image="x.png"))
    with pytest.raises(ConfigError, match=r"flux.cfg=2 is not allowed: one of true_cfg_scale, max_sequence_length"):
        flux.FAMILY.check(make_spec(family_options={"cfg": 2}))
    with pytest.raises(ConfigError, match=r"flux.max_sequence_length=600 is not allowed"):
        flux.FAMILY.check(make_spec(family_options={"max_sequence_length": 600}))
    flux.FAMILY.check(make_spec(family_options={"true_cfg_scale": 4, "max_sequence_length": 256}))


def test_recognise_and_size_rule():
    def classes(name):
        index = json.loads((Path(embedded_model_path(name)) / "model_index.json").read_text())
        return {k: v[1] for k, v in index.items() if isinstance(v, list) and v[1]}

    def read_config(name):
        return lambda sub: json.loads((Path(embedded_model_path(name)) / sub / "config.json").read_text())

    sd3_classes, flux_classes = classes("tiny-sd3"), classes("tiny-flux")
    assert sd3.FAMILY.recognise(sd3_classes) and not flux.FAMILY.recognise(sd3_classes)
    assert flux.FAMILY.recognise(flux_classes) and not sd3.FAMILY.recognise(flux_classes)
    no_t5 = {k: v for k, v in sd3_classes.items() if not k.endswith("_3")}
    assert sd3.FAMILY.recognise(no_t5)
    hub_sd3 = {**sd3_classes, "tokenizer_3": "T5TokenizerFast"}  # as the hub's model_index.json names it
    assert sd3.FAMILY.recognise(hub_sd3)
    assert sd3.FAMILY.size_rule(read_config("tiny-sd3")) == (16, 64)  # latent scale 8 × patch 2; sample_size 8
    assert flux.FAMILY.size_rule(read_config("tiny-flux")) == (16, 64)  # latent scale 8 × 2×2 packing


def test_flow_helpers():
    from runner.flow import latent_image_ids, log_snr_flow, log_snr_vp, pack_latents, unpack_latents

    assert log_snr_flow(0.5) == 0 and log_snr_vp(1.0) == 0
    assert math.isclose(log_snr_flow(0.2), 2 * math.log(4)) and math.isclose(log_snr_vp(0.1), 2 * math.log(10))
    x = torch.randn(2, 16, 6, 4, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert packed.shape == (2, 6, 64) and torch.equal(unpack_latents(packed, 6, 4), x)
    assert latent_image_ids(3, 2, "cpu", torch.float32).tolist()[3] == [0, 1, 1]


def test_t5_tokenizer_round_trips(tmp_path):
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(embedded_model_path("tiny-sd3"), subfolder="tokenizer_3")
    ids = tokenizer([PROMPT, "Zebra!"], padding="max_length", max_length=32, truncation=True).input_ids
    assert ids[0][len(tokenizer(PROMPT).input_ids) - 1] == tokenizer.eos_token_id == 1 and ids[0][-1] == 0
    assert tokenizer.unk_token_id not in ids[0]
    tokenizer.save_pretrained(tmp_path)
    again = T5TokenizerFast.from_pretrained(tmp_path)
    assert again([PROMPT, "Zebra!"], padding="max_length", max_length=32, truncation=True).input_ids == ids


def test_which_schedulers_take_sigmas_and_mu():
    """What the families rely on in diffusers: Flux passes sigmas= (unless use_flow_sigmas) and mu=."""
    import diffusers

    def takes(name):
        parameters = inspect.signature(getattr(diffusers, name).set_timesteps).parameters
        return "sigmas" in parameters, "mu" in parameters

    assert takes("FlowMatchEulerDiscreteScheduler") == (True, True)
    assert takes("FlowMatchHeunDiscreteScheduler") == (False, False)
    assert takes("DPMSolverMultistepScheduler") == (False, True)
    assert takes("UniPCMultistepScheduler") == (True, True)


def test_the_runner_loads_an_sd3_without_t5_and_refuses_a_broken_t5(sd3_models, tmp_path):
    """T5 is optional where model_index.json leaves it out; where it names it, a T5 that does not load is an error,
    never silently dropped (which would draw other images under the same model name)."""
    from conftest import run_job_in
    from runner.components import clear_cache

    no_t5 = sd3_models[False][0]
    rows = run_job_in(tmp_path / "no-t5", "model=tiny-sd3", f"model.name_or_path={no_t5}", "steps=2")
    assert [r["status"] for r in rows] == ["ok"]
    broken = tmp_path / "broken-t5"
    shutil.copytree(sd3_models[True][0], broken)
    weights, = (broken / "text_encoder_3").glob("*.safetensors")
    weights.unlink()  # named in model_index.json, but not there
    clear_cache()
    rows = run_job_in(tmp_path / "broken", "model=tiny-sd3", f"model.name_or_path={broken}", "steps=2")
    assert rows[0]["status"] == "failed" and "could not load text_encoder_3" in rows[0]["error"]
