"""Drawing one job's images, as a numbered recipe (the Hydra task in runner.job stays thin):

    1. plan the images (prompts × seeds) and keep those a killed or requeued run already drew
    2. load the model (cached per process) and build this job's scheduler from the model's own config
    3. warm up the denoiser where first calls are not representative (CUDA, torch.compile)
    4. draw in batches of at most `sampling.batch_size`, one CPU generator per image, saving each PNG
    5. score the images (runner.metrics)
    6. record the sigma schedule, the timings and the rows; listeners (W&B) see the rows first

A job that fails after its config was checked still writes its rows, with status=failed and the error.
"""

import contextlib
import logging
import platform
import traceback
from pathlib import Path

from runner.context import JobContext
from runner.faults import inject_fault
from runner.fused import take, unfused_columns
from runner.jobdir import ERROR_FILE, ROWS_FILE, SCHEDULE_FILE, image_name, kept_images
from runner.record import atomic_write_bytes, save_image, save_latent, write_table

log = logging.getLogger("runner")


def draw(spec, job_dir: Path, context: JobContext, listener=None) -> list[dict]:
    """Draw every image of a checked spec into `job_dir`; returns (and writes) one row per image.

    `listener(rows, schedule)` is called with the finished rows before they are written, and may return the
    seconds it spent (e.g. logging to W&B): that becomes the `time_log_s` column, per image.
    """
    from runner.precision import row_columns
    from runner.timing import JobClock

    plan = [(prompt, seed) for prompt in spec.prompts for seed in spec.seeds]
    inject_fault(context.job_num, "import")
    base = dict(spec_columns(spec), **context.columns(), **environment(spec), **row_columns(spec.precision_options),
                model_revision=spec.model_revision)
    clock = JobClock(spec.device)  # after the one-off library imports; resets the peak-memory counters
    try:
        rows, schedule = draw_plan(spec, job_dir, context, plan, base, clock)
    except Exception as err:  # record the point as failed; the sweep goes on
        rows, schedule = failed_rows(job_dir, plan, base, err), []
    return record_rows(job_dir, rows, schedule, listener)


def draw_plan(spec, job_dir: Path, context: JobContext, plan: list, base: dict, clock) -> tuple[list, list]:
    """Steps 2 to 6 of the recipe: (rows, schedule) of a job whose every image is ok."""
    from runner.families import by_name

    family, timer = by_name(spec.family), clock.timer
    # 2. load, and 3. warm up
    components, cached, scheduler, warmed_up = load_and_warm_up(spec, plan, timer)
    state = family.prepare(components, spec, timer)
    # 4. draw what a killed or requeued run of this config did not, saving each PNG
    kept = kept_images(job_dir, plan, context.config_hash)
    if kept:
        log.info(f"  {len(kept)} of {len(plan)} image(s) already drawn for this config: kept")
    inject_fault(context.job_num, "sample")
    predrawn = take(job_dir, context.config_hash) if not kept else None  # drawn in a fused sweep's batch
    drawn, pictures = draw_images(spec, family, components, scheduler, state, job_dir, context, plan, kept, base,
                                  timer, predrawn)
    cost = next((dict(nfe=r["nfe"], unet_evals=r["unet_evals"]) for r in drawn.values()),
                dict(nfe=None, unet_evals=None))  # every image of a job runs the same loop
    rows = [drawn[i] if i in drawn else dict(base, prompt=p, seed=s, **kept[i], **cost) for i, (p, s) in enumerate(plan)]
    # 5. score
    with timer("metrics"):
        rows = add_image_metrics(spec, family, rows, [pictures.get(i) for i in range(len(plan))], job_dir)
    # 6. record the schedule the loop used, and the timings
    if not drawn or predrawn is not None:
        family.set_schedule(components, scheduler, spec)  # not walked here: set here to record it
    schedule = recorded_schedule(spec, family, scheduler)
    write_table(job_dir / SCHEDULE_FILE, schedule)
    if predrawn is not None:  # its share of the batch's time, split by images
        predrawn.charge(clock)
        cached = predrawn.cached
    times = clock.columns(len(rows), cached, warmed_up)
    fused = predrawn.columns() if predrawn is not None else unfused_columns()
    log.info(f"  {len(rows)} image(s) in {times['time_total_s']:.2f} s  → {job_dir}")
    return [dict(row, shift_mu=schedule_mu(scheduler), **times, **fused, status="ok", error="") for row in rows], schedule


def load_and_warm_up(spec, plan: list, timer):
    """The model (cached per process), this job's scheduler, and one warm-up forward per batch shape where first
    calls are not representative (CUDA init, autotuning, compiling stay out of the step times)."""
    from runner.components import load_components
    from runner.precision import needs_warm_up, set_tf32, warm_up

    set_tf32(spec.precision_options["tf32"], spec.device)
    with timer("load"):
        components, cached = load_components(spec)
    scheduler = build_job_scheduler(spec, components)
    warmed_up = needs_warm_up(spec, spec.precision_options)
    if warmed_up:
        for size in sorted({len(plan[i:i + spec.batch_size]) for i in range(0, len(plan), spec.batch_size)}):
            warm_up(components, spec, size, timer)
    return components, cached, scheduler, warmed_up


def draw_images(spec, family, components, scheduler, state, job_dir, context, plan, kept, base, timer, predrawn=None):
    """The plan's images not kept, in batches of at most `sampling.batch_size`, one CPU generator per image:
    ({plan index: row}, {plan index: uint8 image}). `predrawn`: the whole plan, already drawn in a fused batch."""
    import torch

    from runner.sampling import Tally

    todo = [(i, prompt, seed) for i, (prompt, seed) in enumerate(plan) if i not in kept]
    drawn, pictures = {}, {}
    for first in range(0, len(todo), spec.batch_size):
        batch = todo[first:first + spec.batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed) for _, _, seed in batch]
        tally = Tally()
        if predrawn is not None:
            images, latents, tally = predrawn.images, predrawn.latents, Tally(predrawn.nfe, predrawn.forward)
        else:
            with timer("sample"):
                images, latents = family.sample(components, scheduler, spec, [p for _, p, _ in batch], generators,
                                                state, timer, tally)
        with timer("save"):
            inject_fault(context.job_num, "save")
            for i, ((index, prompt, seed), image) in enumerate(zip(batch, images)):
                drawn[index] = save(job_dir, dict(base, prompt=prompt, seed=seed), image_name(index, seed), image,
                                    latents[i] if latents is not None else None, tally)
                pictures[index] = image
    return drawn, pictures


def failed_rows(job_dir: Path, plan: list, base: dict, err: Exception) -> list[dict]:
    """A failed job's rows, its traceback in error.txt. Images drawn before the failure stay on disk (a resume
    keeps them); the rows count none of them as ok. An exit is never a failure: it leaves as the exit it is."""
    from runner.exits import exit_in_disguise

    if (real_exit := exit_in_disguise(err)) is not None:
        raise real_exit from None
    with contextlib.suppress(OSError):  # a full disk: the failed rows below must still come back
        atomic_write_bytes(job_dir / ERROR_FILE, traceback.format_exc().encode())
    log.error(f"  failed: {type(err).__name__}: {err}")
    free_memory()
    return [dict(base, prompt=p, seed=s, image_path="", image_sha256="", status="failed",
                 error=f"{type(err).__name__}: {err}") for p, s in plan]


def record_rows(job_dir: Path, rows: list[dict], schedule: list[dict], listener) -> list[dict]:
    """The listeners see the rows (their time is `time_log_s`), then the rows are written, once."""
    if listener is not None:
        seconds = listener(rows, schedule) or 0.0
        rows = [dict(row, time_log_s=seconds / max(len(rows), 1)) for row in rows]
    try:
        write_table(job_dir / ROWS_FILE, rows)
    except OSError as err:  # e.g. the disk is full: say so; earlier rows and files are intact (atomic writes)
        log.error(f"  could not write {job_dir / ROWS_FILE}: {err}")
        rows = [dict(r, status="failed", error=f"{type(err).__name__}: {err}") for r in rows]
    return rows


def save(job_dir: Path, row: dict, name: str, image, latent, tally) -> dict:
    """Write one image (and its latent) and return its row with the files, their hash and its cost."""
    from runner.columns import PNG_KEYS

    row["image_path"], row["image_sha256"] = save_image(job_dir, name, image, {k: row[k] for k in PNG_KEYS})
    row["latent_path"] = save_latent(job_dir, name, latent) if latent is not None else ""
    row.update(nfe=tally.nfe, unet_evals=tally.forward)
    return row


def build_job_scheduler(spec, components):
    """The job's diffusers scheduler; for a k-diffusion sampler, runner.ksampling's stand-in, which reads the
    model's own scheduler for its alphas_cumprod and prediction type."""
    from runner.schedulers import build_scheduler

    scheduler = build_scheduler(components.scheduler_config, spec.scheduler_class, spec.scheduler_kwargs)
    if getattr(spec, "scheduler_backend", "diffusers") == "k-diffusion":
        from runner.ksampling import build

        return build(scheduler, spec)
    return scheduler


def add_image_metrics(spec, family, rows: list[dict], pictures: list, job_dir: Path) -> list[dict]:
    """The model's metric columns (runner.metrics) on each row; a kept image (resume) is read back from its PNG."""
    from runner.metrics import image_metrics
    from runner.record import read_image

    if spec.metric is not None:
        pictures = [p if p is not None else read_image(job_dir / r["image_path"]) for p, r in zip(pictures, rows)]
    metrics = image_metrics(spec.metric, pictures, [r["prompt"] for r in rows], spec.clip_model,
                            conditional=family.conditional)
    return [dict(row, **m) for row, m in zip(rows, metrics)]


def recorded_schedule(spec, family, scheduler) -> list[dict]:
    """The sigma schedule of the steps that ran (img2img skips the first ones), with the dynamic shift's `mu`."""
    from runner.sampling import img2img_start
    from runner.schedulers import sigma_schedule

    schedule = [dict(point, shift_mu=schedule_mu(scheduler)) for point in sigma_schedule(scheduler, family.flow)]
    if spec.init_image is not None:
        schedule = schedule[img2img_start(spec.steps, spec.strength, scheduler.order):]
    return schedule


def schedule_mu(scheduler) -> float | None:
    """The `mu` a flow family's dynamic shifting set the schedule with (runner.flow.set_timesteps keeps it on the
    scheduler); None where the schedule was not shifted by image size."""
    return getattr(scheduler, "runner_mu", None)


def spec_columns(spec) -> dict:
    """runner.columns.SPEC_COLUMNS: the axes as typed (option names, not class names)."""
    s = spec
    return dict(model=s.model, scheduler=s.scheduler, schedule=s.schedule, precision=s.precision, steps=s.steps, guidance=s.guidance,
                negative_prompt=s.negative_prompt, height=s.height, width=s.width, device=s.device, dtype=s.dtype,
                strength=s.strength, init_image=s.init_image or "", scheduler_class=s.scheduler_class or "",
                model_name_or_path=s.name_or_path, family=s.family, shift=s.shift)


def environment(spec) -> dict:
    """runner.columns.ENVIRONMENT_COLUMNS: versions and hardware, what reproducing a row needs to know."""
    import diffusers
    import torch
    import transformers

    from runner.timing import hardware

    return {
        **hardware(spec.device),  # torch and CUDA versions, GPU name and driver
        "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "hostname": platform.node(),
        "cpu_threads": torch.get_num_threads(),  # CPU kernels split work by thread count: pixels can differ
    }


def free_memory():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
