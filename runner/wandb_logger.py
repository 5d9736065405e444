"""Weights & Biases: one run per Hydra job, grouped by sweep, plus one sweep-summary run. The only module that
imports wandb (lazily). Logging never fails a job: a W&B error is one warning line and the sweep goes on.

Dashboards group and filter on the flattened config (`scheduler.name`, `guidance`, ...); the sigma schedule is
logged against its own step metric (`schedule/step`) so that one line panel overlays every run of a group.
"""

import logging
import netrc
import os
import re
import sys
from pathlib import Path

log = logging.getLogger("runner")

# Config keys and environment names that may hold credentials: never logged.
SECRET_PATTERN = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential|auth)", re.IGNORECASE)
SUMMARY_PREFIXES = ("time_", "mem_", "images_per_s", "model_cached", "compile_")  # the same on every row of a job


ENV_COLUMNS = ("torch_version", "diffusers_version", "transformers_version", "python_version", "cuda_version", "gpu",
               "gpu_driver", "model_revision", "device", "dtype")


def environment_config(rows: list[dict]) -> dict:
    """What the job ran on, as env.* config keys: dashboards can filter and group on versions and GPUs."""
    first = rows[0] if rows else {}
    return {f"env.{k}": first[k] for k in ENV_COLUMNS if k in first}


def mean_image_metrics(rows: list[dict]) -> dict:
    """The job's mean of each per-image score that was computed (None: not computed for this model)."""
    from runner.metrics import SCORE_COLUMNS

    means = {}
    for name in SCORE_COLUMNS:
        values = [r[name] for r in rows if r.get(name) is not None]
        if values:
            means[name] = sum(values) / len(values)
    return means


def resolve_mode(mode: str) -> str:
    """`auto`: WANDB_MODE if set; else online when credentials are configured (env or netrc), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return {"dryrun": "offline", "run": "online"}.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
    return "online" if has_credentials() else "offline"


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested plain config → {"scheduler.name": "unipc", ...}, with secret-looking keys left out."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if SECRET_PATTERN.search(str(key)):
            continue
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def scrub(text: str) -> str:
    """Command-line arguments as W&B would record them, without any secret-looking `key=value`."""
    return re.sub(r"([^\s=]*" + SECRET_PATTERN.pattern + r"[^\s=]*=)\S+", r"\1***", text)


def _settings(wandb, timeout_s: float):
    # No system metrics sampler, git/code capture or console mirroring: light, and nothing private leaves the job.
    # No pip freeze either: reading every installed package's metadata was 90% of an init (0.1 s a job on CPU);
    # the versions that matter go into the run's config as env.* (ENV_COLUMNS).
    return wandb.Settings(init_timeout=timeout_s, x_disable_meta=True, x_disable_stats=True, disable_git=True,
                          disable_code=True, save_code=False, console="off", silent=True, x_save_requirements=False)


def _init(options: dict, **kwargs):
    """wandb.init that never prompts and never hangs: online failures fall back to offline with one warning."""
    import wandb

    mode = resolve_mode(options.get("mode", "auto"))
    if mode == "disabled":
        return None
    sys.argv[:] = [scrub(a) for a in sys.argv]  # W&B copies sys.argv into its metadata
    if os.environ.get("WANDB_MODE") == "":
        del os.environ["WANDB_MODE"]  # wandb refuses an empty mode
    # Tables' media are staged in W&B's data dir: keep them with the offline runs, so syncing the dir loses nothing
    os.environ.setdefault("WANDB_DATA_DIR", str(Path(kwargs["dir"]) / "wandb" / "data"))
    common = dict(project=options.get("project"), entity=options.get("entity"), reinit="finish_previous",
                  settings=_settings(wandb, float(options.get("init_timeout_s", 30))), **kwargs)
    try:
        return wandb.init(mode=mode, **common)
    except Exception as err:
        if mode != "online":
            raise
        log.warning(f"W&B: online init failed ({type(err).__name__}); logging offline instead (upload with `wandb sync`)")
        wandb.teardown()  # the failed attempt still holds the run id in W&B's service process
        return wandb.init(mode="offline", **common)


def log_job(options: dict, config: dict, spec, rows: list[dict], schedule: list[dict], context: dict) -> float:
    """One W&B run for one job: config, images, the sigma schedule, timings and the rows. Returns seconds spent."""
    from time import perf_counter

    start = perf_counter()
    try:
        import wandb

        job_dir = Path(context["job_dir"])
        run = _init(options, dir=str(wandb_dir(context)), group=group_name(context), name=context["name"],
                    job_type="job", tags=list(options.get("tags") or []) + [spec.model, spec.scheduler],
                    config=dict(flatten(config), **environment_config(rows)), id=context.get("wandb_run_id"),
                    resume="allow" if context.get("wandb_run_id") else None)
        if run is None:
            return 0.0
        run.define_metric("schedule/step")
        run.define_metric("schedule/*", step_metric="schedule/step")
        for point in schedule:
            run.log({"schedule/step": point["step"], "schedule/sigma": point["sigma"], "schedule/timestep": point["timestep"]})
        ok = [r for r in rows if r["status"] == "ok"]
        # wandb.Image from the PNG we already wrote: no second encode on the hot path
        images = [wandb.Image(str(job_dir / r["image_path"]), caption=caption(r)) for r in ok]
        payload = {"schedule_table": wandb.Table(columns=["step", "timestep", "sigma"],
                                                 data=[[p["step"], p["timestep"], p["sigma"]] for p in schedule]),
                   "rows": rows_table(wandb, rows)}
        if images:
            payload["images"] = images
        run.log(payload)
        first = rows[0] if rows else {}
        run.summary.update({k: v for k, v in first.items()  # NaN: not measured here (CUDA memory on CPU)
                            if k.startswith(SUMMARY_PREFIXES) and v == v})
        run.summary.update({"status": "ok" if len(ok) == len(rows) else "failed", "images": len(ok)})
        run.summary.update(mean_image_metrics(ok))
        run.finish()
    except Exception as err:
        log.warning(f"W&B: could not log this job ({type(err).__name__}: {err}); its rows and images are on disk")
    return perf_counter() - start


def log_sweep(options: dict, sweep_dir: Path, df, grid_path: Path | None) -> None:
    """The sweep-summary run: the whole results table with an image column, and the labelled grid."""
    try:
        import wandb

        context = {"sweep_dir": str(sweep_dir), "job_dir": str(sweep_dir)}
        run = _init(options, dir=str(wandb_dir(context)), group=group_name(context), name="sweep-summary",
                    job_type="sweep-summary", tags=list(options.get("tags") or []))
        if run is None:
            return
        table = rows_table(wandb, df.to_dict("records"), with_images=True)
        payload = {"results": table}
        if grid_path is not None:
            payload["grid"] = wandb.Image(str(grid_path), caption=grid_path.stem)
        run.log(payload)
        run.summary.update({"images_ok": int((df["status"] == "ok").sum()), "images_failed": int((df["status"] != "ok").sum())})
        run.finish()
    except Exception as err:
        log.warning(f"W&B: could not log the sweep summary ({type(err).__name__}: {err})")


def wandb_dir(context: dict) -> Path:
    """Offline runs live inside the sweep dir (or the single run's dir): `wandb sync <that>/wandb/offline-run-*`."""
    return Path(context["sweep_dir"] or context["job_dir"])


def group_name(context: dict) -> str:
    return Path(context["sweep_dir"] or context["job_dir"]).name


def caption(row: dict) -> str:
    return (f"seed={row['seed']} scheduler={row['scheduler']} steps={row['steps']} guidance={row['guidance']} "
            f"prompt={row['prompt']!r}")


TABLE_COLUMNS = ("model", "scheduler", "steps", "guidance", "seed", "prompt", "negative_prompt", "height", "width",
                 "precision", "device", "status", "error", "time_total_s", "image_sha256", "image_path")


def rows_table(wandb, rows: list[dict], with_images: bool = False):
    columns = [c for c in TABLE_COLUMNS if rows and c in rows[0]]
    data = []
    for row in rows:
        values = [row.get(c) for c in columns]
        if with_images:
            path = row.get("image_path")
            values.append(wandb.Image(path) if row.get("status") == "ok" and path and Path(path).is_file() else None)
        data.append(values)
    return wandb.Table(columns=columns + (["image"] if with_images else []), data=data)
