"""Precision group options: composed by Hydra, checked, applied to the modules, recorded in the rows (CPU)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from runner import components as components_module
from runner.components import load_components
from runner.checks import ConfigError
from runner.spec import make_spec
from tests.conftest import compose_config, read_png, run_cli, run_job_in


def image(row):
    return read_png(Path(row["job_dir"]) / row["image_path"]).astype(int)


def spec_of(*overrides):
    return make_spec(compose_config(*overrides, "device=cpu", "sampling.progress=false"))


def test_defaults_are_off_and_recorded(tmp_path):
    spec = spec_of()
    assert spec.precision_options == {"tf32": False, "channels_last": False, "compile": False, "vae_slicing": False,
                                      "vae_tiling": False, "cpu_offload": False, "compile_mode": "default",
                                      "attention": "sdpa"}
    row = run_job_in(tmp_path, "steps=2")[0]
    assert row["precision_channels_last"] is False and row["precision_attention"] == "sdpa"


def test_channels_last_sets_the_memory_format_and_keeps_the_image(tmp_path):
    plain = run_job_in(tmp_path / "plain", "steps=3", "seed=1")[0]
    fast = run_job_in(tmp_path / "cl", "steps=3", "seed=1", "precision.channels_last=true")[0]
    assert fast["precision_channels_last"] is True
    c, cached = load_components(spec_of("precision.channels_last=true"))
    assert cached  # the job above loaded it with the same options
    for module in (c.denoiser, c.vae):
        weights = [p for p in module.parameters() if p.dim() == 4]
        assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert np.abs(image(plain) - image(fast)).max() <= 1


def test_module_options_are_part_of_the_cache_key_and_tf32_is_not():
    components_module._CACHE.clear()
    base, _ = load_components(spec_of())
    assert load_components(spec_of("precision.tf32=true"))[0] is base  # a global switch, no reload
    sliced, cached = load_components(spec_of("precision.vae_slicing=true", "precision.vae_tiling=true"))
    assert not cached and sliced is not base
    assert sliced.vae.use_slicing and sliced.vae.use_tiling and not base.vae.use_slicing


def test_tf32_is_set_per_job_and_does_not_leak(tmp_path):
    run_job_in(tmp_path / "on", "steps=2", "precision.tf32=true")  # steps=1 is refused with leading spacing
    assert torch.backends.cuda.matmul.allow_tf32 is True
    row = run_job_in(tmp_path / "off", "steps=2")[0]
    assert torch.backends.cuda.matmul.allow_tf32 is False and row["precision_tf32"] is False


def test_eager_attention_replaces_every_processor_and_keeps_the_image(tmp_path):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    sdpa = run_job_in(tmp_path / "sdpa", "steps=3")[0]
    eager = run_job_in(tmp_path / "eager", "steps=3", "precision.attention=eager")[0]
    c, _ = load_components(spec_of("precision.attention=eager"))
    layers = [m for module in (c.denoiser, c.vae) for m in module.modules() if isinstance(m, Attention)]
    assert layers and all(isinstance(m.processor, AttnProcessor) for m in layers)
    assert np.abs(image(sdpa) - image(eager)).max() <= 1


def test_compile_composes_and_wraps_the_unet():
    # torch.compile is lazy: wrapping is instant; the first forward (compiling) is what takes minutes on CPU,
    # so CI does not run one. runner.precision.warm_up times that first call as time_compile_s.
    spec = spec_of("precision.compile=true", "precision.compile_mode=reduce-overhead")
    assert spec.precision_options["compile"] and spec.precision_options["compile_mode"] == "reduce-overhead"
    c, _ = load_components(spec)
    assert isinstance(c.denoiser, torch._dynamo.eval_frame.OptimizedModule)
    from runner.precision import needs_warm_up

    assert needs_warm_up(spec, spec.precision_options)  # the compile call never lands in the step times


@pytest.mark.parametrize("overrides, message", [
    (["precision.cpu_offload=true"], "precision.cpu_offload=True is not allowed: false on CPU"),
    (["precision.compile_mode=fastest"], "precision.compile_mode='fastest' is not allowed: default | reduce-overhead"),
    (["precision.attention=flash"], "precision.attention='flash' is not allowed: sdpa | eager"),
    (["precision.channels_last=maybe"], "precision.channels_last='maybe' is not allowed: true or false"),
    (["model=tiny-ddpm", "precision.vae_tiling=true"], "precision.vae_tiling=True is not allowed: false for this model"),
])
def test_bad_options_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        spec_of(*overrides)
    assert str(err.value).startswith(message)


@pytest.mark.slow
def test_cli_refuses_cpu_offload_on_cpu(tmp_path):
    result = run_cli("device=cpu", "precision.cpu_offload=true", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: precision.cpu_offload=True is not allowed: false on CPU: model CPU offload moves weights to a CUDA "
        "device per call"]
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.png"))


@pytest.mark.skipif(os.environ.get("RUNNER_TEST_COMPILE") != "1",
                    reason="torch.compile's first call takes ~45 s on 2 CPU cores; RUNNER_TEST_COMPILE=1 runs it")
def test_compiled_job_times_compile_apart_and_keeps_the_image(tmp_path):
    plain = run_job_in(tmp_path / "plain", "steps=3", "seed=2", "scheduler=ddim")[0]
    compiled = run_job_in(tmp_path / "compiled", "steps=3", "seed=2", "scheduler=ddim", "precision.compile=true")[0]
    assert compiled["time_compile_s"] > 0 and not compiled["time_includes_warmup"]
    assert compiled["time_first_step_s"] < compiled["time_compile_s"]  # the compiling call is not a step
    assert np.abs(image(plain) - image(compiled)).max() <= 1
