"""One Hydra job, top to bottom: config → spec → components → sample → record.

    1. check the config (nothing loads or is written when a value is bad)
    2. load the model (once per process) and build this job's scheduler from the model's config
    3. draw the images, prompts × seeds, in batches of at most `sampling.batch_size`
    4. write the PNGs, the sigma schedule and the job's rows
A job that fails after its config was checked still writes its rows, with status=failed and the error.
"""

import contextlib
import hashlib
import json
import logging
import os
import platform
import sys
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from runner.launch import pin_worker_gpu
from runner.record import IMAGES_DIR, LATENTS_DIR, ROWS_FILE, SCHEDULE_FILE, save_image, save_latent, write_table
from runner.spec import ConfigError, Spec, make_spec

log = logging.getLogger("runner")
SWEEP_SIZE_ENV = "RUNNER_SWEEP_SIZE"
SWEPT_KEYS_ENV = "RUNNER_SWEPT_KEYS"
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"  # jobs run one by one in this process


def run(cfg: DictConfig) -> str:
    """The Hydra task: returns "ok" or "failed". A single run exits non-zero when it fails."""
    hydra_cfg = HydraConfig.get()
    pin_worker_gpu(hydra_cfg.launcher.get("_target_", ""))  # before anything initialises CUDA in this process
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    job_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    context = {
        "job_dir": str(job_dir.resolve()),
        "sweep_dir": str(Path(hydra_cfg.sweep.dir).resolve()) if multirun else "",
        "job_num": hydra_cfg.job.num if multirun else 0,
        "overrides": " ".join(overrides),
        "name": short_name(overrides, os.environ.get(SWEPT_KEYS_ENV) if multirun else None),
        "config_hash": config_hash(cfg),
        "worker_pid": os.getpid(),  # which process drew the row (parallel launchers run several)
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "config": resolved_config(cfg),
    }
    keep_hydra_settings(job_dir / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None)
    total = os.environ.get(SWEEP_SIZE_ENV, "?") if multirun else "1"
    log.info(f"[{context['job_num'] + 1}/{total}] {context['overrides'] or '(defaults)'}")

    if cfg.get("dry_run", False):
        from runner.dry_run import single_run_report

        print(single_run_report(cfg, overrides))
        discard_job_dir(job_dir)
        return "ok"
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
        write_table(job_dir / ROWS_FILE, [dict(axis_values(cfg), **context, image_path="", image_sha256="",
                                               status="failed", error=str(err))])
        return "failed"

    rows = run_spec(spec, job_dir, context)
    in_process_sweep = multirun and hydra_cfg.launcher.get("_target_") == BASIC_LAUNCHER
    log_to_wandb(cfg, rows, context, in_background=in_process_sweep and core_free_for_logging(spec))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed and not multirun:
        print(f"error: {failed[0]['error']} (details in {job_dir})", file=sys.stderr)
        sys.exit(1)
    return "failed" if failed else "ok"


def short_name(overrides: list[str], swept_keys: str | None) -> str:
    """The job's name: its swept overrides only (`scheduler=unipc guidance=7.5`), or all of them outside a sweep."""
    keys = set(swept_keys.split(",")) if swept_keys else None
    chosen = [o for o in overrides if keys is None or o.split("=", 1)[0].lstrip("+~") in keys]
    return " ".join(chosen) or "defaults"


def log_to_wandb(cfg: DictConfig, rows: list[dict], context: dict, in_background: bool) -> None:
    """One W&B run for the job (unless wandb.mode=disabled); its cost per image becomes the `time_log_s` column.
    `in_background`: jobs that share this process (an in-process sweep) hand it to the W&B logger process."""
    options = OmegaConf.to_container(cfg.wandb, resolve=True) if "wandb" in cfg else {"mode": "disabled"}
    from runner import wandb_logger

    if wandb_logger.resolve_mode(options.get("mode", "auto")) == "disabled":
        return
    from runner.launch import job_run_id

    wandb_logger.call("log_job_dir", options, OmegaConf.to_container(cfg, resolve=True), rows,
                      dict(context, wandb_run_id=job_run_id(context)), in_background=in_background)


def core_free_for_logging(spec: Spec) -> bool:
    """Whether sampling leaves a CPU core idle for the W&B logger process: on a GPU, or when torch's CPU threads
    are fewer than this process's cores. Where torch's threads take every core, a logger process beside them
    stalls them (2 cores, 2 threads, one-image jobs: 1.19-1.32x the plain loop, against 1.17-1.30x in line)."""
    import torch

    return spec.device.startswith("cuda") or torch.get_num_threads() < len(os.sched_getaffinity(0))


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
    from runner.precision import needs_warm_up, row_columns, set_tf32, warm_up
    from runner.timing import JobClock

    plan = [(prompt, seed) for prompt in spec.prompts for seed in spec.seeds]
    inject_fault(context["job_num"], "import")
    base = dict(axis_values(spec), **context, **environment(spec), **row_columns(spec.precision_options),
                model_revision=spec.model_revision)
    clock = JobClock(spec.device)  # after the one-off library imports; resets the peak-memory counters
    timer = clock.timer
    rows, schedule = [], []
    try:
        set_tf32(spec.precision_options.get("tf32", False), spec.device)
        with timer("load"):
            components, cached = load_components(spec)
        scheduler = build_job_scheduler(spec, components)
        warmed_up = needs_warm_up(spec, spec.precision_options)
        if warmed_up:  # first calls (CUDA init, autotuning, compiling) stay out of the step times
            for size in sorted({len(plan[i:i + spec.batch_size]) for i in range(0, len(plan), spec.batch_size)}):
                warm_up(components, spec, size, timer)
        embeds = TextEmbeddings(components, spec, timer)
        init_image = load_init_image(spec)
        kept = kept_images(job_dir, plan, context["config_hash"])  # a requeued or killed job's finished images
        if kept:
            log.info(f"  {len(kept)} of {len(plan)} image(s) already drawn for this config: kept")
        todo = [(i, prompt, seed) for i, (prompt, seed) in enumerate(plan) if i not in kept]
        drawn, pictures = {}, {}
        inject_fault(context["job_num"], "sample")
        for first in range(0, len(todo), spec.batch_size):
            batch = todo[first:first + spec.batch_size]
            generators = [torch.Generator("cpu").manual_seed(seed) for _, _, seed in batch]
            with timer("sample"):
                images, latents = sample_batch(spec, components, scheduler, [(p, s) for _, p, s in batch], generators,
                                               embeds, init_image, timer)
            with timer("save"):
                inject_fault(context["job_num"], "save")
                for i, ((index, prompt, seed), image) in enumerate(zip(batch, images)):
                    row = dict(base, prompt=prompt, seed=seed)
                    name = image_name(index, seed)
                    row["image_path"], row["image_sha256"] = save_image(job_dir, name, image,
                                                                        {k: row[k] for k in PNG_KEYS})
                    row["latent_path"] = save_latent(job_dir, name, latents[i]) if latents is not None else ""
                    drawn[index] = row
                    pictures[index] = image
        rows = [drawn[i] if i in drawn else dict(base, prompt=p, seed=s, **kept[i]) for i, (p, s) in enumerate(plan)]
        with timer("metrics"):
            rows = add_image_metrics(spec, rows, [pictures.get(i) for i in range(len(plan))], job_dir)
        if not drawn:
            scheduler.set_timesteps(spec.steps)  # nothing was drawn, so the schedule is set here to record it
        schedule = recorded_schedule(spec, scheduler)
        write_table(job_dir / SCHEDULE_FILE, schedule)
        times = clock.columns(len(rows), cached, warmed_up)
        rows = [dict(row, **times, status="ok", error="") for row in rows]
        log.info(f"  {len(rows)} image(s) in {times['time_total_s']:.2f} s  → {job_dir}")
    except Exception as err:  # record the point as failed; the sweep goes on
        if (real_exit := exit_in_disguise(err)) is not None:
            raise real_exit from None
        (job_dir / "error.txt").parent.mkdir(parents=True, exist_ok=True)
        (job_dir / "error.txt").write_text(traceback.format_exc())
        log.error(f"  failed: {type(err).__name__}: {err}")
        # Images drawn before the failure stay on disk (a resume keeps them); the rows count none of them as ok.
        rows = [dict(base, prompt=p, seed=s, image_path="", image_sha256="", status="failed",
                     error=f"{type(err).__name__}: {err}") for p, s in plan]
        free_memory()
    try:
        write_table(job_dir / ROWS_FILE, rows)
    except OSError as err:  # e.g. the disk is full: say so; earlier rows and files are intact (atomic writes)
        log.error(f"  could not write {job_dir / ROWS_FILE}: {err}")
        rows = [dict(r, status="failed", error=f"{type(err).__name__}: {err}") for r in rows]
    return rows


def add_image_metrics(spec: Spec, rows: list[dict], pictures: list, job_dir: Path) -> list[dict]:
    """The model's metric columns (runner.metrics) on each row; a kept image (resume) is read back from its PNG."""
    from runner.metrics import image_metrics
    from runner.record import read_image

    if spec.metric is not None:
        pictures = [p if p is not None else read_image(job_dir / r["image_path"]) for p, r in zip(pictures, rows)]
    metrics = image_metrics(spec.metric, pictures, [r["prompt"] for r in rows], spec.clip_model,
                            conditional=spec.family == "text-to-image")
    return [dict(row, **m) for row, m in zip(rows, metrics)]


def exit_in_disguise(err: BaseException) -> BaseException | None:
    """The SystemExit or KeyboardInterrupt inside `err`, if that is what it is. A signal handler's exit (submitit's
    on SLURM preemption: requeue, then sys.exit) that lands while a library import is creating a class comes out
    of Python 3.11 as `RuntimeError: Error calling __set_name__`. It must still end the job as an exit, so that
    the requeued job draws the point, instead of becoming a failed point."""
    cause = err.__cause__
    return cause if isinstance(cause, (SystemExit, KeyboardInterrupt)) else None


@contextlib.contextmanager
def exits_unwrapped():
    """Around a whole job: an exit in disguise (see exit_in_disguise) leaves as the exit it is."""
    try:
        yield
    except Exception as err:
        if (real_exit := exit_in_disguise(err)) is None:
            raise
        raise real_exit from None


FAULT_ENV = "RUNNER_FAULT"


def inject_fault(job_num: int, stage: str) -> None:
    """Tests make point k fail through the real code paths:
    RUNNER_FAULT="<k>:error|oom|enospc|exit-in-import|exit-in-load".

    `error` and `oom` (torch.cuda.OutOfMemoryError) raise before sampling; `enospc` raises "No space left on device"
    where the job writes its first image. `exit-in-import` and `exit-in-load` create a class whose creation calls
    sys.exit(-1), as a preemption signal does when it lands during a library import: where the job imports its
    libraries (before its error handling), and after the model loaded (inside it; diffusers imports lazily).
    """
    fault = os.environ.get(FAULT_ENV, "")
    if not fault or fault.split(":")[0] != str(job_num):
        return
    kind = fault.split(":", 1)[1] if ":" in fault else "error"
    if stage == "sample" and kind == "oom":
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by RUNNER_FAULT)")
    if stage == "sample" and kind == "error":
        raise RuntimeError("fault injected by RUNNER_FAULT")
    if (stage, kind) in (("import", "exit-in-import"), ("sample", "exit-in-load")):
        class ExitsWhenNamed:
            def __set_name__(self, owner, name):
                sys.exit(-1)

        type("LibraryClass", (), {"handle": ExitsWhenNamed()})
    if stage == "save" and kind == "enospc":
        import errno

        raise OSError(errno.ENOSPC, "No space left on device (injected by RUNNER_FAULT)")


PNG_KEYS = ("model", "scheduler", "steps", "guidance", "seed", "prompt", "negative_prompt", "height", "width",
            "strength", "init_image", "precision", "config_hash")


def image_name(index: int, seed: int) -> str:
    return f"{index:03d}_seed{seed}"


def kept_images(job_dir: Path, plan: list[tuple[str, int]], config_hash: str) -> dict[int, dict]:
    """Images already in the job dir for this exact config (PNGs are written whole, so any present is complete):
    {plan index: {"image_path", "image_sha256"}}. A requeued or resumed job draws only the others."""
    from PIL import Image

    kept = {}
    for index, (prompt, seed) in enumerate(plan):
        path = job_dir / IMAGES_DIR / f"{image_name(index, seed)}.png"
        if not path.is_file():
            continue
        try:
            saved = json.loads(Image.open(path).text.get("runner", "{}"))
        except Exception:  # unreadable: draw it again
            continue
        if saved.get("config_hash") == config_hash and saved.get("prompt") == prompt and saved.get("seed") == seed:
            data = path.read_bytes()
            latent = job_dir / LATENTS_DIR / f"{image_name(index, seed)}.npy"
            kept[index] = {"image_path": f"{IMAGES_DIR}/{path.name}", "image_sha256": hashlib.sha256(data).hexdigest(),
                           "latent_path": f"{LATENTS_DIR}/{latent.name}" if latent.is_file() else ""}
    return kept


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
    import transformers

    from runner.timing import hardware

    return {
        **hardware(spec.device),  # torch and CUDA versions, GPU name and driver
        "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "hostname": platform.node(),
    }


NOT_HASHED = ("wandb", "dry_run", "dry_run_results")  # settings that never change an image


def resolved_config(cfg: DictConfig) -> str:
    """The job's config with every interpolation resolved, as JSON (recorded in each row)."""
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str)


def config_hash(cfg: DictConfig) -> str:
    """Identifies a sweep point: the sha256 of its resolved config (less what cannot change an image)."""
    plain = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NOT_HASHED}
    plain.get("sampling", {}).pop("progress", None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
