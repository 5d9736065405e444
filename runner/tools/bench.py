"""`python -m runner.tools.bench`: the runner against the loop a user would write with plain diffusers, in one process.

    (a) runner: a Hydra-composed spec through runner.draw (PNGs, rows.parquet, schedule.csv written, as in a sweep)
    (b) bare:   a StableDiffusionPipeline loaded once, called per image, scheduler swapped by from_config,
                each image saved as a PNG

Cases, the ways interleaved (a, b, a, b ...) so that machine noise hits them alike:
    per_image  batch 1, the model already loaded: blocks of one-image jobs, median
               of the per-round seconds ratios (W&B on and off; the wait for the
               last W&B run apart, as it comes once per sweep)                       → runner_over_bare
    batched    8 seeds as one runner job vs the same 8 as 8 runner jobs              → batched_over_single
    sweep      12 points (schedulers × guidance × seeds), model load included       → sweep_over_bare
    fused      the same 12 points, one image each: fused (hydra/launcher=fused's way) vs unfused jobs, vs plain
               diffusers per image, and vs plain batched calls where images can share one
                                         → fused_sweep_over_bare, fused_sweep_over_unfused, fused_over_one_batched_call,
               and the same batches without bit identity (no SplitRows) → fused_without_split_over_bare

Writes results/bench/<timestamp>.json; the last printed line is one JSON object with the headline ratios.
`--unet sd15` builds an SD 1.5-shaped pipeline with random weights from the configs in runner/tools/bench_configs/
(no download) for GPU runs at 512×512, 30 steps, fp16, CFG, and reports images/s and model FLOP utilisation.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from runner import embedded_model_path

CONFIGS = Path(__file__).parent / "bench_configs"
UNET_TFLOP = 0.80  # one SD1.5 UNet forward at 64×64 latents, per sample
VAE_DECODE_TFLOP = 2.5  # one SD1.5 VAE decode at 512×512
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}  # dense fp16/bf16


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m runner.tools.bench", description=__doc__.split("\n")[0])
    p.add_argument("--unet", choices=("tiny", "sd15"), default="tiny", help="tiny: the embedded tiny-sd; sd15: SD1.5-shaped, random")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="auto | fp32 | fp16 | bf16 (a conf/precision option)")
    p.add_argument("--steps", type=int, default=None, help="default: 20 (tiny), 30 (sd15)")
    p.add_argument("--size", type=int, default=None, help="height = width; default: the model's native size")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=30,
                   help="per-image case: images per way (batched case: repeats/5 rounds, sweep case: repeats/10)")
    p.add_argument("--batch", type=int, default=8, help="batched case: seeds per batch")
    p.add_argument("--schedulers", default="ddim,euler,dpmpp_2m", help="sweep case: scheduler options")
    p.add_argument("--guidances", default="3,7.5")
    p.add_argument("--seeds", type=int, default=2, help="sweep case: seeds per point (points = schedulers × guidances × seeds)")
    p.add_argument("--fast", action="store_true",
                   help="both ways with torch.compile(UNet) + channels_last (GPU: also TF32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="results/bench")
    p.add_argument("--wandb", choices=("offline", "disabled"), default="offline",
                   help="per-image case: the runner logs each job to W&B (offline) through its logger process, as an "
                        "in-process sweep does")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the two ways


def runner_spec(model_dir: str, args, **overrides):
    """A spec composed by Hydra exactly as `python -m runner key=value ...` would."""
    from hydra import compose, initialize_config_dir

    from runner.spec import make_spec

    # tiny-sd's model options (no metric columns: the plain loop computes none), with the bench's weights
    items = {"model": "tiny-sd", "model.name_or_path": model_dir, "device": args.device, "precision": args.precision,
             "steps": args.steps, "guidance": args.guidance, "sampling.progress": False, **overrides}
    if args.size:
        items.update(height=args.size, width=args.size)
    if args.fast:
        items.update({"precision.compile": True, "precision.channels_last": True})
        items["precision.tf32"] = not str(args.device).startswith("cpu")
    from runner import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"{k}={format_value(v)}" for k, v in items.items()])
    return make_spec(cfg)


def format_value(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def run_runner(spec, out_dir: Path, wandb_mode: str = "disabled",
               in_background: bool = False) -> tuple[float, list[dict]]:
    """One runner job, as a sweep's job. With W&B on, its run is written in line or, `in_background`, by the W&B
    logger process (the caller waits for it: runner_jobs)."""
    import os

    from omegaconf import OmegaConf

    from runner.context import JobContext
    from runner.draw import draw
    from runner.loggers import wandb

    context = JobContext(job_dir=str(out_dir), sweep_dir=str(out_dir.parent), job_num=0, overrides="bench",
                         name=out_dir.name, config_hash="bench", worker_pid=os.getpid(),
                         cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""), config="{}")
    cfg = OmegaConf.create({"wandb": {"mode": wandb_mode, "project": "runner-bench", "init_timeout_s": 30}})
    start = clock(spec.device)
    rows = draw(spec, out_dir, context, listener=wandb.job_listener(cfg, context, spec.device, in_background))
    elapsed = clock(spec.device) - start
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"runner failed: {failed[0]['error']}")
    return elapsed, rows


def runner_jobs(lead, specs, out_dir: Path, wandb_mode: str, in_background: bool) -> tuple[float, float, list[dict]]:
    """One-image jobs back to back, as an in-process sweep runs them, after an untimed lead job: with a logger
    process, job k's W&B run is written while job k+1 draws, so the lead makes every timed job draw beside one
    run, as in a sweep's steady state. Returns the timed jobs' seconds, the seconds then spent waiting for the
    last W&B run (a sweep pays that once, at its end), and their rows."""
    from runner.loggers.wandb import wait_background

    run_runner(lead, out_dir / "lead", wandb_mode, in_background)
    job_dirs = [out_dir / f"seed{spec.seeds[0]}" for spec in specs]
    start = clock(lead.device)
    rows = [row for spec, job_dir in zip(specs, job_dirs)
            for row in run_runner(spec, job_dir, wandb_mode, in_background)[1]]
    drawn = clock(lead.device)
    wait_background()
    waited = clock(lead.device) - drawn
    return drawn - start, waited, rows


def load_bare(model_dir: str, spec, fast: bool = False):
    """What a user writes first: the pipeline, loaded once (with --fast: the same speed options as the runner)."""
    import diffusers
    import torch

    from runner.precision import torch_dtype

    diffusers.utils.logging.set_verbosity_error()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch_dtype(spec.dtype),
                                                             safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(spec.device)
    if fast:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = spec.device.startswith("cuda")
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet)
    return pipe


def run_bare_batch(pipe, spec, seeds, out_dir: Path, scheduler_class: str | None = None) -> float:
    """The user's batched call: one pipeline call, one generator per image (scheduler swapped as in run_bare)."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    start = clock(spec.device)
    swap_scheduler(pipe, scheduler_class)
    images = pipe([spec.prompts[0]] * len(seeds), negative_prompt=[spec.negative_prompt] * len(seeds),
                  num_inference_steps=spec.steps, guidance_scale=spec.guidance, height=spec.height, width=spec.width,
                  generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
    for seed, image in zip(seeds, images):
        image.save(out_dir / f"seed{seed}.png")
    return clock(spec.device) - start


def run_bare(pipe, spec, scheduler_class: str | None, seeds, out_dir: Path) -> float:
    """One pipeline call per image, scheduler swapped by from_config, each image saved."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    start = clock(spec.device)
    swap_scheduler(pipe, scheduler_class)
    for seed in seeds:
        image = pipe(spec.prompts[0], negative_prompt=spec.negative_prompt, num_inference_steps=spec.steps,
                     guidance_scale=spec.guidance, height=spec.height, width=spec.width,
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        image.save(out_dir / f"seed{seed}.png")
    return clock(spec.device) - start


def swap_scheduler(pipe, scheduler_class: str | None) -> None:
    """The pipeline's scheduler as the user swaps it: from_config of the one it has (None: keep it)."""
    if scheduler_class:
        import diffusers

        pipe.scheduler = getattr(diffusers, scheduler_class).from_config(pipe.scheduler.config)


def bare_sweep_s(model_dir, args, calls: list, seeds, out: str, batched: bool = False) -> float:
    """Plain diffusers over a sweep's (scheduler class, spec) calls, the pipeline loaded once (its load timed too):
    one call per image, or with `batched` one call per (scheduler, guidance) with the seeds batched."""
    start = clock(args.device)
    pipe = load_bare(model_dir, calls[0][1], fast=args.fast)
    for j, (class_name, spec) in enumerate(calls):
        if batched:
            run_bare_batch(pipe, spec, seeds, Path(f"{out}-{j}"), class_name)
        else:
            run_bare(pipe, spec, class_name, seeds, Path(f"{out}-{j}"))
    seconds = clock(args.device) - start
    del pipe
    return seconds


def clock(device: str) -> float:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def clear_model_cache():
    import gc

    from runner.components import clear_cache

    clear_cache()
    gc.collect()


# --------------------------------------------------------------------------- cases


BLOCK = 5  # timed one-image jobs per way and round in the per-image case


def case_per_image(model_dir, args, work: Path) -> dict:
    """Rounds of one-image jobs, the ways in rotating order each round: the runner logging to W&B as a sweep of
    this device does (by the logger process where a core is free for it, else in line), the runner logging in
    line (where that differs), the runner without W&B, and the plain pipeline. Each way's block of images starts
    after an untimed lead image (see runner_jobs); the wait for a block's last W&B run is timed apart, as the
    once-per-sweep cost it is."""
    from runner.loggers.wandb import core_free_for_logging

    block = min(BLOCK, args.repeats)
    rounds = max(1, args.repeats // block)
    spec = runner_spec(model_dir, args, seed=0)
    lead = runner_spec(model_dir, args, seed=10**6)
    pipe = load_bare(model_dir, spec, fast=args.fast)
    background = args.wandb != "disabled" and core_free_for_logging(spec.device)
    # (W&B mode, in the logger process) per runner way
    runner_ways = {"runner": (args.wandb, background), "runner_logging_in_line": (args.wandb, False),
                   "runner_without_logging": ("disabled", False)}
    if not background:
        del runner_ways["runner_logging_in_line"]  # the same as "runner"
    if args.wandb == "disabled":
        del runner_ways["runner"]
    # every way warm before timing: first calls, model loaded, W&B's logger process and service started (~2 s)
    for name, (mode, in_background) in runner_ways.items():
        runner_jobs(lead, [], work / f"warm-{name}", mode, in_background)
    run_bare(pipe, spec, None, [0], work / "warm-bare")
    specs = [runner_spec(model_dir, args, seed=i) for i in range(rounds * block)]
    seconds, final_wait, runner_rows = {name: [] for name in [*runner_ways, "bare"]}, [], []

    def runner_way(name, r):
        drawn, waited, rows = runner_jobs(lead, specs[r * block:(r + 1) * block], work / f"{name}-{r}",
                                          *runner_ways[name])
        seconds[name].append(drawn / block)
        if name == "runner":
            final_wait.append(waited)
            runner_rows.extend(rows)

    def bare_way(_, r):
        run_bare(pipe, spec, None, [lead.seeds[0]], work / f"bare-{r}-lead")
        seeds = range(r * block, (r + 1) * block)
        seconds["bare"].append(run_bare(pipe, spec, None, seeds, work / f"bare-{r}") / block)

    ways = [(name, runner_way) for name in runner_ways] + [("bare", bare_way)]
    for r in range(rounds):
        for name, way in ways[r % len(ways):] + ways[:r % len(ways)]:  # rotating order: no way always goes first
            way(name, r)
    del pipe
    runner_s, bare_s = seconds.get("runner", seconds["runner_without_logging"]), seconds["bare"]
    breakdown = ("time_encode_s", "time_denoise_s", "time_unet_s", "time_scheduler_s", "time_decode_s", "time_save_s",
                 "time_metrics_s", "time_log_s", "time_total_s")
    logged = {
        "wandb_final_wait_s": final_wait, "wandb_final_wait_median_s": statistics.median(final_wait),
        # a sweep of `images_per_block` one-image jobs, the wait for its last run counted in
        "runner_over_bare_with_final_wait": paired_ratio([s + w / block for s, w in zip(runner_s, final_wait)], bare_s),
        "runner_breakdown_median_s": {k: statistics.median(r[k] for r in runner_rows) for k in breakdown},
        "logging": logging_note(args.wandb, background),
        "wandb_empty_run_median_s": empty_wandb_run_s(work / "empty-runs"),
    } if runner_rows else {"logging": "W&B logging off (--wandb disabled): the runner is timed without it"}
    return {
        "images_per_block": block, **{f"{name}_s": seconds[name] for name in seconds},
        "runner_median_s": statistics.median(runner_s), "bare_median_s": statistics.median(bare_s),
        "runner_over_bare": paired_ratio(runner_s, bare_s),
        **{f"runner_over_bare_{name[len('runner_'):]}": paired_ratio(seconds[name], bare_s)
           for name in runner_ways if name != "runner"},
        **logged,
        **flops(spec, images=1, seconds=statistics.median(runner_s), prefix="runner_", sd15=args.unet == "sd15"),
        **flops(spec, images=1, seconds=statistics.median(bare_s), prefix="bare_", sd15=args.unet == "sd15"),
    }


def logging_note(mode: str, in_background: bool) -> str:
    where = ("written by the W&B logger process while the next job draws; runner_s is per image with a run "
             "written beside each one, wandb_final_wait_s the wait for a block's last run (once per sweep); "
             "runner_logging_in_line_s: written in line instead") if in_background else \
        "written in line (no core free for a logger process)"
    return f"W&B ({mode}): one run per job, {where}"


def empty_wandb_run_s(work: Path, runs: int = 10) -> float:
    """W&B's floor per job: an offline run that logs nothing (wandb.init + finish), median seconds."""
    from runner.loggers.wandb import init_run

    work.mkdir(parents=True, exist_ok=True)
    seconds = []
    for i in range(runs):
        start = time.perf_counter()
        init_run({"mode": "offline", "project": "runner-bench"}, dir=str(work), name=f"empty-{i}").finish()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def paired_ratio(runner_s: list[float], bare_s: list[float]) -> float:
    """The median of runner/bare over pairs that ran back to back: a slow spell of a shared machine (seconds
    long) then hits both ways of a pair instead of skewing one way's median."""
    return statistics.median(r / b for r, b in zip(runner_s, bare_s))


def case_batched(model_dir, args, work: Path) -> dict:
    seeds = list(range(100, 100 + args.batch))
    batched_spec = runner_spec(model_dir, args, seed=seeds, **{"sampling.batch_size": len(seeds)})
    single_specs = [runner_spec(model_dir, args, seed=seed) for seed in seeds]
    pipe = load_bare(model_dir, batched_spec, fast=args.fast)
    run_runner(batched_spec, work / "warm")  # first call of the batch shape (and compile) kept out of the timings
    run_bare_batch(pipe, batched_spec, seeds, work / "warm-bare")
    batched_s, single_s, bare_batched_s, max_diff = [], [], [], 0
    for i in range(max(1, args.repeats // 5)):
        elapsed, batch_rows = run_runner(batched_spec, work / f"batched-{i}")
        batched_s.append(elapsed)
        total, single_rows = 0.0, []
        for seed, spec in zip(seeds, single_specs):
            elapsed, rows = run_runner(spec, work / f"single-{i}-{seed}")
            total += elapsed
            single_rows += rows
        single_s.append(total)
        max_diff = max(max_diff, max_pixel_difference(batch_rows, single_rows))
        bare_batched_s.append(run_bare_batch(pipe, batched_spec, seeds, work / f"bare-batched-{i}"))
    del pipe
    spec = batched_spec
    return {
        "images": len(seeds), "batched_s": batched_s, "single_s": single_s, "bare_batched_s": bare_batched_s,
        "batched_over_single": statistics.median(batched_s) / statistics.median(single_s),
        "runner_batched_over_bare_batched": statistics.median(batched_s) / statistics.median(bare_batched_s),
        # per-image determinism: each seed of the batch is that seed drawn alone (batched convolutions may
        # round differently, so within 1/255, the parity tests' tolerance)
        "batched_max_pixel_diff_vs_single": max_diff,
        **flops(spec, images=len(seeds), seconds=statistics.median(batched_s), prefix="batched_", sd15=args.unet == "sd15"),
        **flops(spec, images=len(seeds), seconds=statistics.median(bare_batched_s), prefix="bare_batched_",
                sd15=args.unet == "sd15"),
    }


def max_pixel_difference(rows_a, rows_b) -> int:
    import numpy as np
    from PIL import Image

    read = lambda row: np.asarray(Image.open(Path(row["job_dir"]) / row["image_path"]), dtype=int)  # noqa: E731
    return max(int(np.abs(read(a) - read(b)).max()) for a, b in zip(rows_a, rows_b))


def case_sweep(model_dir, args, work: Path) -> dict:
    schedulers = args.schedulers.split(",")
    guidances = [float(g) for g in args.guidances.split(",")]
    seeds = list(range(args.seeds))
    points = len(schedulers) * len(guidances) * len(seeds)
    # Specs are composed before the clocks start, for both ways: the bench times the drawing, not Hydra.
    runner_specs = [runner_spec(model_dir, args, scheduler=s, guidance=g, seed=seeds) for s in schedulers for g in guidances]
    bare_points = [(runner_spec(model_dir, args, scheduler=s).scheduler_class, runner_spec(model_dir, args, guidance=g, seed=0))
                   for s in schedulers for g in guidances]
    runner_s, bare_s = [], []
    for i in range(max(1, args.repeats // 10)):
        clear_model_cache()  # model load included
        start = clock(args.device)
        for j, spec in enumerate(runner_specs):
            run_runner(spec, work / f"sweep-{i}-{j}")
        runner_s.append(clock(args.device) - start)
        bare_s.append(bare_sweep_s(model_dir, args, bare_points, seeds, str(work / f"bare-sweep-{i}")))
    return {"points": points, "runner_s": runner_s, "bare_s": bare_s,
            "sweep_over_bare": statistics.median(runner_s) / statistics.median(bare_s),
            "how": "runner: one job per (scheduler, guidance) with the seeds batched, model loaded once by its cache; "
                   "bare: pipeline loaded once, one call per image"}


def case_fused(model_dir, args, work: Path) -> dict:
    """The same 12-point sweep with one image per point (scheduler × guidance × seed), three ways, model load
    included in each: unfused (one runner job per point, as `python -m runner -m ...` runs it), fused (the points of
    each scheduler drawn as one batch by runner.fused, then each point's job records its images, as
    `hydra/launcher=fused` runs it), and plain diffusers, both per image and batched where images can share a pipeline
    call (one call per scheduler and guidance, the seeds batched)."""
    schedulers = args.schedulers.split(",")
    guidances = [float(g) for g in args.guidances.split(",")]
    seeds = list(range(args.seeds))
    grid = [(s, g, seed) for s in schedulers for g in guidances for seed in seeds]
    specs = [runner_spec(model_dir, args, scheduler=s, guidance=g, seed=seed) for s, g, seed in grid]
    classes = {s: runner_spec(model_dir, args, scheduler=s).scheduler_class for s in schedulers}
    bare_calls = [(classes[s], runner_spec(model_dir, args, guidance=g, seed=0)) for s in schedulers for g in guidances]
    unfused_s, fused_s, unsplit_s, bare_s, batched_s, fused_batches, unsplit_diff = [], [], [], [], [], 0, 0
    for i in range(max(1, args.repeats // 10)):
        clear_model_cache()
        start = clock(args.device)
        unfused_rows = [row for j, spec in enumerate(specs) for row in run_runner(spec, work / f"unfused-{i}-{j}")[1]]
        unfused_s.append(clock(args.device) - start)

        seconds, fused_rows, drawn = fused_sweep(args, specs, grid, schedulers, work / f"fused-{i}")
        fused_s.append(seconds)
        fused_batches += drawn
        if [r["image_sha256"] for r in fused_rows] != [r["image_sha256"] for r in unfused_rows]:
            raise RuntimeError("a fused point's image differs from the same point drawn alone")
        seconds, unsplit_rows, _ = fused_sweep(args, specs, grid, schedulers, work / f"unsplit-{i}", False)
        unsplit_s.append(seconds)
        unsplit_diff = max(unsplit_diff, max_pixel_difference(unsplit_rows, unfused_rows))

        bare_s.append(bare_sweep_s(model_dir, args, bare_calls, seeds, str(work / f"bare-{i}")))
        batched_s.append(bare_sweep_s(model_dir, args, bare_calls, seeds, str(work / f"bare-batched-{i}"), batched=True))
    fused = statistics.median(fused_s)
    return {"points": len(grid), "fused_s": fused_s, "unfused_s": unfused_s, "bare_s": bare_s,
            "bare_batched_calls_s": batched_s, "fused_batches_drawn": fused_batches,
            "fused_sweep_over_bare": fused / statistics.median(bare_s),
            "fused_sweep_over_unfused": fused / statistics.median(unfused_s),
            "fused_over_one_batched_call": fused / statistics.median(batched_s),
            "fused_images_identical_to_unfused": True,
            # the same batches without SplitRows: what fusing gives here before bit identity is paid for
            "fused_without_split_s": unsplit_s,
            "fused_without_split_over_bare": statistics.median(unsplit_s) / statistics.median(bare_s),
            "fused_over_fused_without_split": fused / statistics.median(unsplit_s),
            "fused_without_split_max_pixel_diff_vs_unfused": unsplit_diff,
            "how": "one image per point; fused: one batch per scheduler (its guidances and seeds), then each point's "
                   "job; unfused: one runner job per point; bare: a pipeline call per image; batched calls: one "
                   "pipeline call per scheduler and guidance, the seeds batched; fused without split: the fused batches "
                   "without SplitRows (images not identical to unfused: their largest pixel difference is given); "
                   "model load included in every way"}


def fused_sweep(args, specs, grid, schedulers, out: Path, bit_identical: bool = True) -> tuple[float, list, int]:
    """The sweep as `hydra/launcher=fused` runs it, model load included: one batch per scheduler (runner.fused), each
    point's job right after its batch. (seconds, rows, batches drawn)."""
    from runner.fused import Point, draw_batch

    clear_model_cache()
    start = clock(args.device)
    points = [Point(j, spec, str(out / str(j)), "bench", 0) for j, spec in enumerate(specs)]
    rows, drawn = [], 0
    for s in schedulers:
        batch = [p for p, (scheduler, _, _) in zip(points, grid) if scheduler == s]
        drawn += draw_batch(batch, schedulers.index(s), bit_identical)
        rows += [row for p in batch for row in run_runner(p.spec, Path(p.job_dir))[1]]
    return clock(args.device) - start, rows, drawn


def flops(spec, images: int, seconds: float, prefix: str, sd15: bool) -> dict:
    """Images/s and, for the SD1.5-shaped UNet on a known GPU, model FLOP utilisation."""
    out = {f"{prefix}images_per_s": images / seconds}
    if sd15:
        from runner.sampling import latent_scale

        cfg = 2 if spec.guidance > 1 else 1
        vae_scale = latent_scale(json.loads((CONFIGS / "sd15_vae.json").read_text()))
        scale = (spec.height // vae_scale) * (spec.width // vae_scale) / (64 * 64)  # UNET_TFLOP is at 64×64 latents
        tflop = images * (spec.steps * cfg * UNET_TFLOP * scale + VAE_DECODE_TFLOP * scale)
        out[f"{prefix}tflops"] = tflop / seconds
        peak = peak_tflops(spec.device)
        if peak:
            out[f"{prefix}mfu"] = tflop / seconds / peak
    return out


def peak_tflops(device: str) -> float | None:
    if not str(device).startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# --------------------------------------------------------------------------- SD1.5-shaped model


def build_sd15(out_dir: Path, dtype: str) -> str:
    """An SD 1.5-shaped pipeline with random weights from the real configs (runner/tools/bench_configs/), saved as
    safetensors in diffusers layout. The tokenizer is tiny-sd's character tokenizer (shapes are what matter)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from runner.precision import torch_dtype

    read = lambda name: json.loads((CONFIGS / name).read_text())  # noqa: E731
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(embedded_model_path("tiny-sd"), subfolder="tokenizer")
    text_config = CLIPTextConfig(**read("sd15_text_encoder.json"), vocab_size=len(tokenizer),
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(read("sd15_vae.json")), text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer, unet=UNet2DConditionModel.from_config(read("sd15_unet.json")),
        scheduler=PNDMScheduler.from_config(read("sd15_scheduler.json")), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch_dtype(dtype)).save_pretrained(out_dir, safe_serialization=True)
    return str(out_dir)


# --------------------------------------------------------------------------- main


def environment(spec) -> dict:
    import platform

    import diffusers

    from runner.timing import hardware

    return {**hardware(spec.device), "diffusers_version": diffusers.__version__, "device": spec.device,
            "dtype": spec.dtype, "cpu": platform.processor() or platform.machine(), "threads": torch_threads()}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv=None) -> dict:
    from runner.loggers.wandb import finish_background

    args = parse_args(argv)
    args.steps = args.steps or (30 if args.unet == "sd15" else 20)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.device = runner_spec(embedded_model_path("tiny-sd"), args).device  # auto → cpu | cuda, once
    with tempfile.TemporaryDirectory(prefix="runner-bench-") as tmp:
        work = Path(tmp)
        model_dir = embedded_model_path("tiny-sd")
        if args.unet == "sd15":
            probe = runner_spec(model_dir, args)
            print(f"building an SD1.5-shaped random-weight model ({probe.dtype}) for {probe.device} ...", flush=True)
            model_dir = build_sd15(work / "sd15", probe.dtype)
        spec = runner_spec(model_dir, args)
        result = {"args": vars(args), "environment": environment(spec), "height": spec.height, "width": spec.width}
        for name, case in (("per_image", case_per_image), ("batched", case_batched), ("sweep", case_sweep),
                           ("fused", case_fused)):
            print(f"case {name} ...", flush=True)
            result[name] = case(model_dir, args, work / name)
            print(json.dumps(result[name], default=str), flush=True)
        clear_model_cache()
        finish_background()
    headline = {"runner_over_bare": result["per_image"]["runner_over_bare"],
                "batched_over_single": result["batched"]["batched_over_single"],
                "sweep_over_bare": result["sweep"]["sweep_over_bare"],
                **{k: result["fused"][k] for k in ("fused_sweep_over_bare", "fused_sweep_over_unfused",
                                                   "fused_over_one_batched_call", "fused_without_split_over_bare")}}
    result["headline"] = headline
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{args.unet}_{spec.device.replace(':', '')}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"written: {path}")
    print(json.dumps(headline))
    return result


if __name__ == "__main__":
    main()
