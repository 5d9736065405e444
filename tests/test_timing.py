"""Timing and memory columns: consistent with each other, per job, and documented (the README lists them)."""

import math

import numpy as np
import pytest

from runner import timing
from tests.conftest import REPO, run_job_in

TIME_COLUMNS = ["time_load_s", "time_warmup_s", "time_compile_s", "time_encode_s", "time_denoise_s", "time_step_mean_s",
                "time_step_p50_s", "time_step_p90_s", "time_first_step_s", "time_unet_s", "time_scheduler_s",
                "time_decode_s", "time_save_s", "time_log_s", "time_total_s"]
MEM_COLUMNS = ["mem_peak_rss_mb", "mem_cuda_peak_allocated_mb", "mem_cuda_peak_reserved_mb"]


@pytest.mark.parametrize("values", [[0.3], [0.5, 0.1], [3.0, 1.0, 2.0, 10.0, 4.0], list(np.linspace(0, 1, 31) ** 2)])
def test_percentile_is_numpys(values):
    for q in (50, 90):
        assert timing.percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_timer_spans_add_up():
    timer = timing.Timer("cpu")
    for _ in range(3):
        with timer("step"):
            with timer("unet"):
                sum(range(20000))
    assert len(timer.laps["step"]) == 3
    assert timer.totals["unet"] <= timer.totals["step"]


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory):
    from runner import components

    components._CACHE.clear()  # the first job loads, the second reuses
    first = run_job_in(tmp_path_factory.mktemp("first"), "steps=4", "seed=[0,1]", "scheduler=ddim")
    second = run_job_in(tmp_path_factory.mktemp("second"), "steps=3", "seed=5", "scheduler=euler")
    return first, second


def test_timing_columns_are_consistent(two_jobs):
    first, second = two_jobs
    for rows, steps, n in ((first, 4, 2), (second, 3, 1)):
        row = rows[0]
        assert all(r[c] == row[c] for r in rows for c in TIME_COLUMNS)  # one job, one set of timings
        assert all(row[c] >= 0 for c in TIME_COLUMNS + MEM_COLUMNS[:1])
        assert row["time_step_mean_s"] == pytest.approx(row["time_denoise_s"] / steps)
        assert row["time_step_p50_s"] <= row["time_step_p90_s"] <= row["time_denoise_s"]
        assert row["time_unet_s"] + row["time_scheduler_s"] <= row["time_denoise_s"] + 1e-9
        parts = sum(row[c] for c in ("time_load_s", "time_encode_s", "time_denoise_s", "time_decode_s", "time_save_s"))
        assert parts <= row["time_total_s"]
        assert row["images_per_s"] == pytest.approx(n / row["time_total_s"])
        assert row["time_unet_s"] > 0 and row["time_decode_s"] > 0 and row["time_encode_s"] > 0
        assert row["mem_peak_rss_mb"] > 50  # torch alone is more than that
        assert math.isnan(row["mem_cuda_peak_allocated_mb"])  # CPU run: not measured
        assert row["torch_version"] and "gpu_driver" in row and "cuda_version" in row


def test_load_counted_once_and_warmup_flagged(two_jobs):
    first, second = two_jobs
    assert not first[0]["model_cached"] and first[0]["time_load_s"] > 0
    assert second[0]["model_cached"] and second[0]["time_load_s"] == 0.0
    # CPU without compile runs no warm-up forward: the first job after a load is flagged, the next is not
    assert first[0]["time_includes_warmup"] and not second[0]["time_includes_warmup"]
    assert first[0]["time_warmup_s"] == 0.0 and first[0]["time_compile_s"] == 0.0


def test_peak_rss_is_reset_per_job():
    before = timing.PeakMemory("cpu")
    if before.rss_scope != "job":
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    peak_with = before.columns()["mem_peak_rss_mb"]
    del big
    after = timing.PeakMemory("cpu").columns()["mem_peak_rss_mb"]
    assert peak_with - after > 300


def test_readme_documents_every_column(two_jobs):
    readme = (REPO / "README.md").read_text()
    columns = [c for c in two_jobs[0][0] if c.startswith(("time_", "mem_", "precision_"))] + ["images_per_s", "gpu_driver"]
    missing = [c for c in columns if f"`{c}`" not in readme]
    assert not missing, f"README does not document {missing}"


def test_text_embeddings_computed_once_per_prompt():
    from runner.components import load_components
    from runner.families.stable_diffusion import FAMILY
    from runner.spec import make_spec
    from tests.conftest import compose_config

    spec = make_spec(compose_config("prompt=[a cat,a dog]", "negative_prompt=blurry"))
    timer = timing.Timer("cpu")
    embeds = FAMILY.prepare(load_components(spec)[0], spec, timer)["embeds"]
    first = embeds(["a cat", "a cat", "a dog"])
    embeds(["a dog", "a cat"])
    embeds(["blurry"] * 3)
    embeds(["blurry"])
    assert len(timer.laps["encode"]) == 2  # one encoder call for both prompts, one for the negative prompt
    assert (first[0] == first[1]).all() and not (first[0] == first[2]).all()
