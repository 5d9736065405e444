"""The Hydra task: one job, top to bottom. config → spec → components → sample → record.

    1. who is running: the job context (its dir, its sweep, its config hash)
    2. dry run: say what would run, and run nothing
    3. resume: a job dir that already holds every image of this config is done
    4. check the config (nothing loads or is written when a value is bad)
    5. draw and record (runner.draw), with the loggers listening
"""

import json
import logging
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from runner import CONF_DIR
from runner import context as job_context
from runner.checks import ConfigError
from runner.jobdir import ROWS_FILE, discard_job_dir, finished
from runner.objectives import check_objectives, objectives, read_rows
from runner.record import write_table

log = logging.getLogger("runner")


def run(cfg: DictConfig) -> str | tuple[float, ...]:
    """Returns "ok" or "failed"; a single run exits non-zero when it fails. With `optimize: [column, ...]` (a search,
    experiments/nfe_search.yaml) it returns the job's objectives instead, for the sweeper: one number per column
    (runner.objectives), NaN where the job failed."""
    from runner.launch import pin_worker_gpu

    hydra_cfg = HydraConfig.get()
    pin_worker_gpu(hydra_cfg.launcher.get("_target_", ""))  # before anything initialises CUDA in this process
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    job_dir = Path(hydra_cfg.runtime.output_dir)
    # 1. who
    context = job_context.from_hydra(cfg, hydra_cfg, multirun)
    keep_hydra_settings(job_dir / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None)
    total = os.environ.get(job_context.SWEEP_SIZE_ENV, "?") if multirun else "1"
    log.info(f"[{context.job_num + 1}/{total}] {context.overrides or '(defaults)'}")
    # 2. dry run
    if cfg.dry_run:
        from runner.dry_run import single_run_report

        print(single_run_report(cfg, list(hydra_cfg.overrides.task)))
        discard_job_dir(job_dir)
        return "ok"
    # 3. resume
    goals = cfg.get("optimize")
    if finished(job_dir, context.config_hash):
        log.info("  already done (same config, every image ok): skipped")
        return objectives(read_rows(job_dir), goals) if goals else "ok"
    # 4. check
    from runner.spec import make_spec

    try:
        spec = make_spec(cfg)
        if goals:
            check_objectives(goals)
    except ConfigError as err:
        if not multirun:
            discard_job_dir(job_dir)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        log.error(f"error: {err}")
        write_table(job_dir / ROWS_FILE, [dict(config_columns(cfg), **context.columns(), image_path="",
                                               image_sha256="", status="failed", error=str(err))])
        return objectives([], goals) if goals else "failed"
    # 5. draw and record
    from runner.draw import draw
    from runner.loggers import wandb

    rows = draw(spec, job_dir, context, listener=wandb.job_listener(cfg, context, spec.device))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed and not multirun:
        print(f"error: {failed[0]['error']} (details in {job_dir})", file=sys.stderr)
        sys.exit(1)
    if goals:
        return objectives(rows, goals)
    return "failed" if failed else "ok"


def config_columns(cfg: DictConfig) -> dict:
    """The axis columns of a point refused before it became a spec, as the user typed them."""
    c = OmegaConf.to_container(cfg, resolve=True)
    seed, prompt = c.get("seed"), c.get("prompt")
    return dict(model=c["model"].get("name"), scheduler=c["scheduler"].get("name"),
                precision=c["precision"].get("name"), steps=c.get("steps"), guidance=c.get("guidance"),
                seed=seed if isinstance(seed, int) else None,
                prompt=prompt if isinstance(prompt, str) else json.dumps(prompt),
                negative_prompt=c.get("negative_prompt"), height=c.get("height"), width=c.get("width"),
                device=c.get("device"), model_name_or_path=c["model"].get("name_or_path"))


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
