"""One Hydra job, top to bottom: config → spec → components → sample → record.

    1. check the config (nothing loads or is written when a value is bad)
    2. load the model (once per process) and build this job's scheduler from the model's config
    3. draw the images, prompts × seeds, in batches of at most `sampling.batch_size`
    4. write the PNGs, the sigma schedule and the job's rows
A job that fails after its config was checked still writes its rows, with status=failed and the error.
"""

import hashlib
import json
import logging
import os
import platform
import sys
import traceback
from pathlib import Path
from time import perf_counter

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from runner.record import ROWS_FILE, SCHEDULE_FILE, save_image, save_latent, write_table
from runner.spec import ConfigError, Spec, make_spec

log = logging.getLogger("runner")
SWEEP_SIZE_ENV = "RUNNER_SWEEP_SIZE"


def run(cfg: DictConfig) -> str:
    """The Hydra task: returns "ok" or "failed". A single run exits non-zero when it fails."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    job_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    context = {
        "job_dir": str(job_dir.resolve()),
        "sweep_dir": str(Path(hydra_cfg.sweep.dir).resolve()) if multirun else "",
        "job_num": hydra_cfg.job.num if multirun else 0,
        "overrides": " ".join(overrides),
        "config_hash": config_hash(cfg),
        "config": resolved_config(cfg),
    }
    keep_hydra_settings(job_dir / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None)
    total = os.environ.get(SWEEP_SIZE_ENV, "?") if multirun else "1"
    log.info(f"[{context['job_num'] + 1}/{total}] {context['overrides'] or '(defaults)'}")

    if finished(job_dir, context["config_hash"]):
        log.info("  already done (same config, every image ok): skipped")
        return "ok"
    try:
        spec = make_spec(cfg)
    except ConfigError as err:
        if not multirun:
            discard_job_dir(job_dir)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        log.error(f"error: {err}")
        write_table(job_dir / ROWS_FILE, [dict(axis_values(cfg), **context, status="failed", error=str(err))])
        return "failed"

    rows = run_spec(spec, job_dir, context)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed and not multirun:
        print(f"error: {failed[0]['error']} (details in {job_dir})", file=sys.stderr)
        sys.exit(1)
    return "failed" if failed else "ok"


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def keep_hydra_settings(saved_dir: Path | None) -> None:
    """Hydra saves the job's composed config without the `hydra` node, so `python -m runner --config-path
    <job>/.hydra --config-name config` would run with Hydra's own defaults (outputs/ dirs, no sweep callback).
    Add our settings back; Hydra strips the node from the job's config again, so the config hash is unchanged."""
    from runner.record import atomic_write_bytes

    path = saved_dir / "config.yaml" if saved_dir else None
    if path is None or not path.is_file():
        return
    saved = OmegaConf.load(path)
    if "hydra" not in saved:
        saved.hydra = OmegaConf.load(CONF_DIR / "config.yaml").hydra
        atomic_write_bytes(path, OmegaConf.to_yaml(saved).encode())


def finished(job_dir: Path, config_hash: str) -> bool:
    """Whether this job dir already holds every image of this exact config (so a re-run sweep skips it)."""
    import pandas as pd

    rows_file = job_dir / ROWS_FILE
    if not rows_file.is_file():
        return False
    rows = pd.read_parquet(rows_file)
    return (len(rows) > 0 and (rows["status"] == "ok").all() and (rows["config_hash"] == config_hash).all()
            and all((job_dir / p).is_file() for p in rows["image_path"]))


def run_spec(spec: Spec, job_dir: Path, context: dict) -> list[dict]:
    """Draw every image of a checked spec into `job_dir`; returns (and writes) one row per image."""
    import torch

    from runner.components import load_components
    from runner.timing import Timer

    start = perf_counter()
    timer = Timer(spec.device)
    plan = [(prompt, seed) for prompt in spec.prompts for seed in spec.seeds]
    base = dict(axis_values(spec), **context, **environment(spec), model_revision=spec.model_revision)
    rows, schedule = [], []
    try:
        with timer("load"):
            components, cached = load_components(spec)
        scheduler = build_job_scheduler(spec, components)
        embeds = TextEmbeddings(components, spec, timer)
        init_image = load_init_image(spec)
        for first in range(0, len(plan), spec.batch_size):
            batch = plan[first:first + spec.batch_size]
            generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
            with timer("sample"):
                images, latents = sample_batch(spec, components, scheduler, batch, generators, embeds, init_image,
                                               timer)
            with timer("save"):
                for i, ((prompt, seed), image) in enumerate(zip(batch, images)):
                    row = dict(base, prompt=prompt, seed=seed)
                    name = f"{len(rows):03d}_seed{seed}"
                    row["image_path"], row["image_sha256"] = save_image(job_dir, name, image,
                                                                        {k: row[k] for k in PNG_KEYS})
                    row["latent_path"] = save_latent(job_dir, name, latents[i]) if latents is not None else ""
                    rows.append(row)
        schedule = recorded_schedule(spec, scheduler)
        write_table(job_dir / SCHEDULE_FILE, schedule)
        times = timing_columns(timer, start, len(rows), cached)
        rows = [dict(row, **times, status="ok", error="") for row in rows]
        log.info(f"  {len(rows)} image(s) in {times['time_total_s']:.2f} s  → {job_dir}")
    except Exception as err:  # record the point as failed; the sweep goes on
        (job_dir / "error.txt").parent.mkdir(parents=True, exist_ok=True)
        (job_dir / "error.txt").write_text(traceback.format_exc())
        log.error(f"  failed: {type(err).__name__}: {err}")
        done = {(r["prompt"], r["seed"]) for r in rows}
        rows = [dict(r, status="failed", error=f"{type(err).__name__}: {err}") for r in rows]
        rows += [dict(base, prompt=p, seed=s, image_path="", image_sha256="", status="failed",
                      error=f"{type(err).__name__}: {err}") for p, s in plan if (p, s) not in done]
        free_memory()
    write_table(job_dir / ROWS_FILE, rows)
    return rows


PNG_KEYS = ("model", "scheduler", "steps", "guidance", "seed", "prompt", "negative_prompt", "height", "width",
            "strength", "init_image", "precision")


def build_job_scheduler(spec: Spec, components):
    from runner.schedulers import build_scheduler

    return build_scheduler(components.scheduler_config, spec.scheduler_class, spec.scheduler_kwargs)


class TextEmbeddings:
    """Prompt embeddings, computed once per distinct prompt within a job."""

    def __init__(self, components, spec: Spec, timer):
        self.components, self.timer, self.cache = components, timer, {}
        if components.tokenizer is not None:
            from runner.sampling import tokens_dropped

            for prompt in dict.fromkeys(spec.prompts + (spec.negative_prompt,)):
                dropped = tokens_dropped(components.tokenizer, prompt)
                if dropped:
                    log.warning(f"  prompt is {dropped} token(s) longer than the tokenizer's limit of "
                                f"{components.tokenizer.model_max_length}; they are dropped: {prompt[:60]!r}…")

    def __call__(self, prompts: list[str]):
        import torch

        from runner.sampling import encode_prompts

        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            with self.timer("encode"):
                encoded = encode_prompts(self.components.tokenizer, self.components.text_encoder, missing)
            self.cache.update(zip(missing, encoded))
        return torch.stack([self.cache[p] for p in prompts])


def load_init_image(spec: Spec):
    """The img2img start image as a (1, 3, H, W) tensor in [-1, 1], resized to the run's size."""
    if spec.init_image is None:
        return None
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    return VaeImageProcessor().preprocess(Image.open(spec.init_image).convert("RGB"), height=spec.height, width=spec.width)


def sample_batch(spec: Spec, components, scheduler, batch, generators, embeds, init_image, timer):
    from runner.sampling import sample_text_to_image, sample_unconditional

    c = components
    if c.family == "unconditional":
        images, _ = sample_unconditional(c.unet, scheduler, generators, spec.height, spec.width, spec.steps,
                                         eta=spec.eta, progress=spec.progress, timer=timer)
        return images, None  # pixel-space model: there is no latent beyond the image
    cond = embeds([prompt for prompt, _ in batch])
    uncond = embeds([spec.negative_prompt] * len(batch))
    return sample_text_to_image(c.unet, c.vae, scheduler, cond, uncond, generators, spec.height, spec.width,
                                spec.steps, spec.guidance, eta=spec.eta, progress=spec.progress, timer=timer,
                                init_image=init_image, strength=spec.strength)


def recorded_schedule(spec: Spec, scheduler) -> list[dict]:
    """The sigma schedule of the steps that ran (img2img skips the first ones)."""
    from runner.sampling import img2img_start
    from runner.schedulers import sigma_schedule

    schedule = sigma_schedule(scheduler)
    if spec.init_image is not None:
        schedule = schedule[img2img_start(spec.steps, spec.strength, scheduler.order):]
    return schedule


def timing_columns(timer, start: float, n_images: int, cached: bool) -> dict:
    totals = timer.totals
    total = perf_counter() - start
    return {
        "model_cached": cached,
        "time_load_s": 0.0 if cached else totals.get("load", 0.0),
        "time_encode_s": totals.get("encode", 0.0),
        "time_denoise_s": totals.get("step", 0.0),
        "time_unet_s": totals.get("unet", 0.0),
        "time_scheduler_s": totals.get("scheduler", 0.0),
        "time_decode_s": totals.get("vae_decode", 0.0),
        "time_save_s": totals.get("save", 0.0),
        "time_total_s": total,
        "images_per_s": n_images / total if total else 0.0,
    }


def axis_values(source) -> dict:
    """The columns a user sweeps, as typed (option names, not class names), from a spec or a raw config."""
    if isinstance(source, Spec):
        s = source
        return dict(model=s.model, scheduler=s.scheduler, precision=s.precision, steps=s.steps, guidance=s.guidance,
                    negative_prompt=s.negative_prompt, height=s.height, width=s.width, device=s.device, dtype=s.dtype,
                    strength=s.strength, init_image=s.init_image or "", scheduler_class=s.scheduler_class or "",
                    model_name_or_path=s.name_or_path)
    c = OmegaConf.to_container(source, resolve=True)
    seed, prompt = c.get("seed"), c.get("prompt")
    return dict(model=c["model"].get("name"), scheduler=c["scheduler"].get("name"),
                precision=c["precision"].get("name"), steps=c.get("steps"), guidance=c.get("guidance"),
                seed=seed if isinstance(seed, int) else None, prompt=prompt if isinstance(prompt, str) else json.dumps(prompt),
                negative_prompt=c.get("negative_prompt"), height=c.get("height"), width=c.get("width"),
                device=c.get("device"), model_name_or_path=c["model"].get("name_or_path"))


def environment(spec: Spec) -> dict:
    """Versions and hardware: what reproducing a row needs to know."""
    import diffusers
    import torch
    import transformers

    cuda = spec.device.startswith("cuda")
    return {
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "cuda_version": torch.version.cuda or "",
        "gpu": torch.cuda.get_device_name(spec.device) if cuda else "",
        "hostname": platform.node(),
    }


def resolved_config(cfg: DictConfig) -> str:
    """The job's config with every interpolation resolved, as JSON (recorded in each row)."""
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str)


def config_hash(cfg: DictConfig) -> str:
    """Identifies a sweep point: the sha256 of its resolved config."""
    return hashlib.sha256(resolved_config(cfg).encode()).hexdigest()[:16]


def free_memory():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def discard_job_dir(job_dir: Path):
    """Remove what Hydra wrote for a job that was refused before it started (nothing else is touched)."""
    import shutil

    shutil.rmtree(job_dir / ".hydra", ignore_errors=True)
    for log_file in job_dir.glob("*.log"):
        log_file.unlink()
    try:
        job_dir.rmdir()
    except OSError:
        pass
