"""The CUDA path: the same images as diffusers' pipelines on the GPU, and the GPU's timing and memory columns.

Skipped where there is no GPU (CI has none); run on a GPU machine with `python -m pytest tests/test_cuda.py`.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_png, run_cli, run_job_in, scheduler_for
from runner import embedded_model_path

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def pipes():
    """StableDiffusionPipeline per dtype, loaded as users (and the runner) load it: from_pretrained(torch_dtype=...)."""
    from diffusers import StableDiffusionPipeline

    loaded = {}

    def get(precision):
        if precision not in loaded:
            pipe = StableDiffusionPipeline.from_pretrained(embedded_model_path("tiny-sd"), safety_checker=None,
                                                           requires_safety_checker=False, use_safetensors=True,
                                                           torch_dtype=DTYPES[precision]).to("cuda")
            pipe.set_progress_bar_config(disable=True)
            pipe.model_scheduler_config = pipe.scheduler.config
            loaded[precision] = pipe
        return loaded[precision]

    return get


def pipeline_images(pipe, option, seeds=(3, 4)):
    pipe.scheduler = scheduler_for(pipe, option)
    images = pipe(["a red cube"] * len(seeds), num_inference_steps=8, guidance_scale=7.5, height=64, width=64,
                  generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np").images
    return (images * 255).round().astype(int)


@pytest.mark.parametrize("precision, bound", [("fp32", 1), ("fp16", 1), ("bf16", 1)])  # measured on an H100: 0 for all
@pytest.mark.parametrize("option", ["default", "euler_a", "dpmpp_2m", "ddpm"])
def test_cuda_images_match_the_pipeline(option, precision, bound, pipes, tmp_path):
    rows = run_job_in(tmp_path, "model=tiny-sd", "device=cuda", f"precision={precision}", f"scheduler={option}",
                      "steps=8", "seed=[3,4]", "prompt='a red cube'")
    assert [r["status"] for r in rows] == ["ok", "ok"], rows[0].get("error")
    assert rows[0]["dtype"] == precision
    ours = np.stack([read_png(Path(tmp_path) / row["image_path"]).astype(int) for row in rows])
    theirs = pipeline_images(pipes(precision), option)
    diff = np.abs(ours - theirs)
    print(f"\n{option} {precision}: runner vs pipeline max {diff.max()}/255, mean {diff.mean():.3f}/255")
    assert diff.max() <= bound, f"{option} {precision}: max pixel difference {diff.max()}/255"
    assert ours.std() > 0  # not a blank (NaN) image


def test_cuda_timing_and_memory_columns(tmp_path):
    row, = run_job_in(tmp_path, "device=cuda", "steps=4")
    assert row["status"] == "ok" and row["device"].startswith("cuda")
    assert row["dtype"] == "fp16"  # precision=auto on CUDA
    assert row["mem_cuda_peak_allocated_mb"] > 0 and row["mem_cuda_peak_reserved_mb"] >= row["mem_cuda_peak_allocated_mb"]
    assert row["gpu"] == torch.cuda.get_device_name() and row["cuda_version"] == torch.version.cuda
    assert row["time_denoise_s"] > 0 and row["time_unet_s"] + row["time_scheduler_s"] <= row["time_denoise_s"] * 1.05


def test_cuda_sweep_from_the_cli_loads_once(tmp_path):
    import pandas as pd

    sweep = tmp_path / "sweep"
    result = run_cli("-m", "scheduler=ddpm,unipc,lms", "guidance=3,7.5", "device=cuda", "sampling.progress=false",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    df = pd.read_parquet(sweep / "results.parquet")
    assert len(df) == 6 and (df["status"] == "ok").all()
    assert df["model_cached"].sum() == 5  # the model loaded once, for the first job
    print(df[["scheduler", "guidance", "time_total_s", "time_step_mean_s", "mem_cuda_peak_allocated_mb", "gpu"]])


def test_memory_is_freed_after_a_real_out_of_memory(tmp_path):
    """README: a point that runs out of CUDA memory fails, its memory is freed and the sweep goes on. A real OOM:
    the allocator is capped just above what the cached model holds, and a big batch draws past it. (Not on CPU: there
    an allocation that fails allocates nothing, and freed memory does not show in the RSS reliably.)"""
    warm, = run_job_in(tmp_path / "warm", "model=tiny-sd", "device=cuda", "steps=2")  # the model loads and stays
    assert warm["status"] == "ok", warm["error"]
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 256 * 2**20) / total)
    try:
        rows = run_job_in(tmp_path / "oom", "model=tiny-sd", "device=cuda", "steps=2", "height=2048", "width=2048",
                          "seed=[0,1,2,3,4,5,6,7]")
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert [r["status"] for r in rows] == ["failed"] * 8 and "OutOfMemoryError" in rows[0]["error"]
    assert (tmp_path / "oom" / "error.txt").read_text().count("OutOfMemoryError") >= 1
    assert after <= held + 16 * 2**20, f"{(after - held) / 2**20:.0f} MiB still allocated after the failed point"
    again, = run_job_in(tmp_path / "again", "model=tiny-sd", "device=cuda", "steps=2")  # the next point runs
    assert again["status"] == "ok", again["error"]
