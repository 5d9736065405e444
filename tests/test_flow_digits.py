"""digits-flow, the embedded rectified-flow model, and the flow families through every part of the runner:
rows, schedules with log-SNR, W&B, dry run, reproduce, resume and the report."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_cli, run_job_in
from runner import EMBEDDED_MODELS_DIR
from runner.digits import digit_prompt
from wandb_records import read_run

DIGIT_PROMPTS = "prompt=[" + ",".join(digit_prompt(d) for d in range(10)) + "]"


def test_training_attention_stands_for_the_pipelines_zero_tokens():
    """digits-flow is trained with one zero context token in place of the 256 that StableDiffusion3Pipeline
    appends without T5 (runner.tools.train_digits.RepeatedTokenAttention): the two must be the same function."""
    from diffusers import SD3Transformer2DModel

    from runner.families.sd3 import T5_TOKENS
    from runner.tools.train_digits import RepeatedTokenAttention

    transformer = SD3Transformer2DModel.from_pretrained(EMBEDDED_MODELS_DIR / "digits-flow", subfolder="transformer",
                                                        use_safetensors=True)
    gen = torch.Generator().manual_seed(0)
    width = transformer.config.joint_attention_dim
    clip = torch.randn(2, 16, width, generator=gen)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen), timestep=torch.tensor([200.0, 800.0]),
                  pooled_projections=torch.randn(2, transformer.config.pooled_projection_dim, generator=gen))
    with torch.no_grad():
        full = transformer(encoder_hidden_states=torch.cat([clip, torch.zeros(2, T5_TOKENS, width)], 1), **inputs)
        transformer.set_attn_processor(RepeatedTokenAttention(T5_TOKENS))
        short = transformer(encoder_hidden_states=torch.cat([clip, torch.zeros(2, 1, width)], 1), **inputs)
    assert full.sample.abs().mean() > 0.1  # a real output, not zeros that agree trivially
    torch.testing.assert_close(short.sample, full.sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model, seeds", [("digits-flow", [0, 1]), ("tiny-sd3", [0])])
def test_the_runner_draws_the_pipelines_images(model, seeds, tmp_path):
    """Through the whole job (components loaded with the precision options, as the CLI does), not only the loop:
    the SD3 pipeline's images, with CFG, for a batch of seeds."""
    from diffusers import StableDiffusion3Pipeline

    from conftest import read_png
    from runner import embedded_model_path

    rows = run_job_in(tmp_path, f"model={model}", "scheduler=flow_euler", "steps=6", "guidance=5",
                      f"seed=[{','.join(map(str, seeds))}]", "prompt=a handwritten digit three")
    left_out = {"text_encoder_3": None, "tokenizer_3": None} if model == "digits-flow" else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(embedded_model_path(model), use_safetensors=True, **left_out)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a handwritten digit three", generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                  num_inference_steps=6, guidance_scale=5.0, num_images_per_prompt=len(seeds), output_type="np").images
    for row, image in zip(rows, theirs):
        ours = read_png(tmp_path / row["image_path"]).astype(int)
        assert np.abs(ours - (image * 255).round().astype(int)).max() <= 1


@pytest.mark.slow
def test_digits_flow_draws_the_prompted_digit_and_guidance_helps(tmp_path):
    """Through the runner itself (SD3 family, flow_euler, 20 steps), ten digits x three seeds."""
    common = ("model=digits-flow", "scheduler=flow_euler", "steps=20", DIGIT_PROMPTS, "seed=[0,1,2]")
    guided = run_job_in(tmp_path / "guided", *common, "guidance=7.5")
    unguided = run_job_in(tmp_path / "unguided", *common, "guidance=1")
    assert [r["status"] for r in guided] == ["ok"] * 30 and guided[0]["family"] == "sd3"
    adherence = np.mean([r["prompt_adherence"] for r in guided])
    assert adherence >= 0.8, f"mean prompt_adherence {adherence:.2f} at guidance 7.5"
    assert adherence > np.mean([r["prompt_adherence"] for r in unguided])
    assert guided[0]["nfe"] == 20 and unguided[0]["nfe"] == 20  # a CFG pair counts as one evaluation


@pytest.mark.slow
def test_digits_flow_sweeps_schedulers_steps_and_shift(tmp_path):
    """The README's flow command, smaller: 2 schedulers x 2 step counts x 2 shifts, offline on CPU."""
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "model=digits-flow", "scheduler=flow_euler,flow_heun", "steps=2,4", "shift=1,3",
                     "sampling.progress=false", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(sweep / "results.parquet")
    assert len(df) == 8 and (df.status == "ok").all()
    assert sorted(zip(df.scheduler, df.steps, df["shift"])) == sorted(
        (s, n, h) for s in ("flow_euler", "flow_heun") for n in (2, 4) for h in (1.0, 3.0))
    assert set(df.nfe[df.scheduler == "flow_heun"]) == {3, 7}  # Heun: 2 calls per step but the last

    def schedule(scheduler, shift):
        row = df[(df.scheduler == scheduler) & (df.steps == 4) & (df["shift"] == shift)].iloc[0]
        return pd.read_csv(sweep / row.job_dir / "schedule.csv")

    from diffusers import FlowMatchEulerDiscreteScheduler

    plain, shifted = schedule("flow_euler", 1.0), schedule("flow_euler", 3.0)
    for shift, recorded in ((1.0, plain), (3.0, shifted)):  # what diffusers itself makes of the model's config
        reference = FlowMatchEulerDiscreteScheduler.from_pretrained(EMBEDDED_MODELS_DIR / "digits-flow",
                                                                    subfolder="scheduler", shift=shift)
        reference.set_timesteps(4)
        np.testing.assert_allclose(recorded.sigma, reference.sigmas[:-1].numpy(), rtol=1e-6)
    assert (shifted.sigma[1:] > plain.sigma[1:]).all()  # SD3's shift 3 spends more steps at high noise
    np.testing.assert_allclose(plain.log_snr[1:], 2 * np.log((1 - plain.sigma[1:]) / plain.sigma[1:]))
    assert plain.log_snr[0] == -np.inf  # pure noise


@pytest.mark.slow
def test_tiny_sd3_sweep_logs_dry_runs_reproduces_resumes_and_reports(tmp_path, capsys):
    """The parts around the loop work for a flow family unchanged: W&B (with log-SNR), dry run, reproduce, resume
    and the report (with its log-SNR chart). Reproduce and the report run in this process, through their main():
    the same code as `python -m runner.reproduce|report`, without two more processes' imports."""
    import runner.report
    import runner.reproduce

    sweep = tmp_path / "sweep"
    args = ("-m", "model=tiny-sd3", "scheduler=flow_euler,flow_unipc", "steps=3", "sampling.progress=false",
            f"hydra.sweep.dir={sweep}")
    first = run_cli(*args, "wandb.mode=offline", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    df = pd.read_parquet(sweep / "results.parquet")
    assert len(df) == 2 and (df.status == "ok").all() and set(df.family) == {"sd3"}

    # W&B: one run per job, the schedule with log-SNR beside sigma
    runs = {r["run"].display_name: r for r in map(read_run, sorted((sweep / "wandb").glob("offline-run-*")))}
    assert set(runs) == {"scheduler=flow_euler", "scheduler=flow_unipc", "sweep-summary"}
    job = df[df.scheduler == "flow_euler"].iloc[0].job_dir
    schedule = pd.read_csv(sweep / job / "schedule.csv")
    logged = [h["schedule/log_snr"] for h in runs["scheduler=flow_euler"]["history"] if "schedule/log_snr" in h]
    assert logged == pytest.approx(list(schedule.log_snr)) and logged[0] == -np.inf

    # dry run: estimated from these rows, nothing written
    dry = run_cli(*args[:-1], "dry_run=true", f"dry_run_results={sweep}", "hydra.sweep.dir=dry", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "total: 2 image(s), about " in dry.stdout and not (tmp_path / "dry").exists()

    # reproduce: every image again, identical (on the thread count each job recorded)
    capsys.readouterr()
    assert runner.reproduce.main([str(sweep), "--out", str(tmp_path / "again")]) == 0
    assert "2/2 job(s) reproduced identically" in capsys.readouterr().out

    # resume: the same command into the same sweep dir skips both jobs and redraws nothing
    images = sorted(sweep.glob("*/images/*.png"))
    stamps = [p.stat().st_mtime_ns for p in images]
    resumed = run_cli(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert (resumed.stdout + resumed.stderr).count("already done (same config, every image ok): skipped") == 2
    assert [p.stat().st_mtime_ns for p in images] == stamps
    assert len(pd.read_parquet(sweep / "results.parquet")) == 2

    # the report, with log-SNR against the fraction of steps done
    assert runner.report.main([str(sweep)]) == 0
    page = (sweep / "report" / "report.html").read_text()
    assert "log-SNR vs fraction of steps" in page and '"log_snr"' in page  # the schedule chart's switch, its data


def test_digits_flow_is_small_and_safetensors_only():
    folder = EMBEDDED_MODELS_DIR / "digits-flow"
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 7e6
    assert not [f for f in files if f.suffix in {".bin", ".ckpt", ".pt", ".pkl", ".joblib"}]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
