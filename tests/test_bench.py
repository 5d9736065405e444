"""`python -m runner.tools.bench` in a tiny configuration: the JSON it writes and prints (never wall-clock limits)."""

import json

import pytest

from conftest import CORES


@pytest.mark.slow
def test_bench_writes_and_prints_the_ratios(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "runner.tools.bench", "--steps", "2", "--repeats", "2", "--batch", "3", "--schedulers",
         "ddim,euler", "--guidances", "7.5", "--seeds", "2", "--threads", "1", "--device", "cpu", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    headline = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(headline) == {"runner_over_bare", "batched_over_single", "sweep_over_bare", "fused_sweep_over_bare",
                             "fused_sweep_over_unfused", "fused_over_one_batched_call",
                             "fused_without_split_over_bare"}
    assert all(isinstance(v, float) and v > 0 for v in headline.values())

    files = list(out.glob("*.json"))
    assert len(files) == 1
    report = json.loads(files[0].read_text())
    assert report["headline"] == headline
    per_image, batched, sweep = report["per_image"], report["batched"], report["sweep"]
    # --repeats 2: one round of a 2-image block per way; --threads 1 leaves a core free (if there is a second one),
    # so the runner's W&B runs go to the logger process, and the bench times them in line as well
    ways = [w for w in ("runner", "runner_logging_in_line", "runner_without_logging")
            if CORES > 1 or w != "runner_logging_in_line"]
    assert per_image["images_per_block"] == 2 and ("logger process while" in per_image["logging"]) == (CORES > 1)
    for way in ways:
        assert len(per_image[f"{way}_s"]) == len(per_image["bare_s"]) == 1
        ratio_key = "runner_over_bare" + way[len("runner"):]
        assert per_image[ratio_key] == per_image[f"{way}_s"][0] / per_image["bare_s"][0]
    assert ("runner_logging_in_line_s" in per_image) == (CORES > 1)
    # the wait for the block's last W&B run is timed apart (a logger process's; in line there is none)
    [final_wait] = per_image["wandb_final_wait_s"]
    assert (final_wait > 0) == (CORES > 1)
    assert per_image["runner_over_bare_with_final_wait"] == pytest.approx(
        (per_image["runner_s"][0] + final_wait / 2) / per_image["bare_s"][0])
    assert per_image["runner_breakdown_median_s"]["time_log_s"] > 0  # read back: written by the W&B logger process
    assert per_image["runner_breakdown_median_s"]["time_unet_s"] > 0
    assert per_image["runner_breakdown_median_s"]["time_metrics_s"] < 1e-3  # no metric, like the plain loop
    assert "logging" in per_image and 0 < per_image["wandb_empty_run_median_s"] < per_image["runner_median_s"]
    assert batched["images"] == 3 and batched["batched_max_pixel_diff_vs_single"] <= 1
    assert sweep["points"] == 4 and len(sweep["runner_s"]) == len(sweep["bare_s"]) == 1
    fused = report["fused"]  # 2 schedulers x 1 guidance x 2 seeds: one batch of 2 points per scheduler, drawn fused
    assert fused["points"] == 4 and fused["fused_batches_drawn"] == 2 and fused["fused_images_identical_to_unfused"]
    assert len(fused["fused_without_split_s"]) == 1  # the same batches without SplitRows, beside them
    assert 0 <= fused["fused_without_split_max_pixel_diff_vs_unfused"] <= 255
    assert report["environment"]["torch_version"] and report["environment"]["device"] == "cpu"
    assert "runner_mfu" not in per_image  # FLOP utilisation only for the SD1.5-shaped UNet on a known GPU


def test_flop_utilisation_formula():
    from types import SimpleNamespace

    from runner.tools.bench import flops

    spec = SimpleNamespace(guidance=7.5, steps=30, height=512, width=512, device="cpu")
    out = flops(spec, images=8, seconds=2.0, prefix="x_", sd15=True)
    assert out["x_images_per_s"] == 4.0
    assert out["x_tflops"] == 8 * (30 * 2 * 0.80 + 2.5) / 2.0  # CFG doubles the UNet batch
    assert "x_mfu" not in out  # no known peak on CPU
    no_cfg = flops(SimpleNamespace(**{**vars(spec), "guidance": 1.0}), images=1, seconds=1.0, prefix="", sd15=True)
    assert no_cfg["tflops"] == 30 * 0.80 + 2.5
    assert set(flops(spec, images=1, seconds=1.0, prefix="", sd15=False)) == {"images_per_s"}
