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
from runner.faults import inject_fault
from runner.jobdir import ROWS_FILE, discard_job_dir, finished
from runner.record import write_table
from runner.sweepdir import FIRST_JOB_ENV

log = logging.getLogger("runner")


def run(cfg: DictConfig) -> str | tuple[float, ...]:
    """Returns "ok" or "failed"; a single run exits non-zero when it fails. Whatever goes wrong inside a sweep's
    point becomes that point's failed row, so the sweep's table, grid and summary are still written. With
    `optimize: [column, ...]` (a search, experiments/nfe_search.yaml) it returns the job's objectives instead, for
    the sweeper: one number per column (runner.objectives), NaN where the job failed."""
    status = run_or_refuse(cfg)
    goals = cfg.get("optimize")
    if goals:
        from runner.objectives import objectives, read_rows

        return objectives(read_rows(Path(HydraConfig.get().runtime.output_dir)), goals)
    return status


def run_or_refuse(cfg: DictConfig) -> str:
    from runner.exits import exit_in_disguise
    from runner.launch import pin_worker_gpu

    hydra_cfg = HydraConfig.get()
    pin_worker_gpu(hydra_cfg.runtime.choices.get("hydra/launcher"))  # before anything initialises CUDA here
    job_context.redact_log_records()  # also in launcher workers, which never ran runner.__main__
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    job_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        return run_point(cfg, hydra_cfg, job_dir, multirun)
    except Exception as err:
        if exit_in_disguise(err) is not None:
            raise
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(err, OmegaConfBaseException):  # e.g. an interpolation that does not resolve: bad input
            return refuse(cfg, hydra_cfg, job_dir, multirun, unresolved_message(cfg, err))
        return point_failed(cfg, hydra_cfg, job_dir, multirun, err)


def run_point(cfg: DictConfig, hydra_cfg, job_dir: Path, multirun: bool) -> str:
    # 1. who
    context = job_context.from_hydra(cfg, hydra_cfg, multirun)
    keep_hydra_settings(job_dir / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None)
    total = os.environ.get(job_context.SWEEP_SIZE_ENV, "?") if multirun else "1"
    first = int(os.environ.get(FIRST_JOB_ENV, "0")) if multirun else 0  # after the jobs of sweeps appended to
    log.info(f"[{context.job_num - first + 1}/{total}] {context.overrides or '(defaults)'}")
    # 2. dry run
    if cfg.dry_run:
        from runner.dry_run import print_report, single_run_report

        text, refused = single_run_report(cfg, job_context.as_typed(hydra_cfg.overrides.task))
        print_report(text, refused, 1)
        discard_job_dir(job_dir)
        if refused and not multirun:
            sys.exit(2)
        return "failed" if refused else "ok"
    # 3. resume
    inject_fault(context.job_num, "job")
    if finished(job_dir, context.config_hash):
        log.info("  already done (same config, every image ok): skipped")
        from runner.loggers import wandb

        wandb.write_missing_run(cfg, context, job_dir)  # e.g. the killed sweep's logger never wrote it
        return "ok"
    # 4. check
    from runner.spec import make_spec

    try:
        spec = make_spec(cfg)
        if cfg.get("optimize"):
            from runner.objectives import check_objectives

            check_objectives(cfg.optimize)
    except ConfigError as err:
        return refuse(cfg, hydra_cfg, job_dir, multirun, str(err))
    except Exception as err:  # a file the check reads in a way nobody foresaw: still a refusal, not a crash
        return refuse(cfg, hydra_cfg, job_dir, multirun,
                      f"the config could not be checked ({type(err).__name__}: {err})")
    # 5. draw and record
    from runner.draw import draw
    from runner.loggers import wandb

    rows = draw(spec, job_dir, context, listener=wandb.job_listener(cfg, context, spec.device))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed and not multirun:
        print(f"error: {failed[0]['error']} (details in {job_dir})", file=sys.stderr)
        sys.exit(1)
    return "failed" if failed else "ok"


def refuse(cfg: DictConfig, hydra_cfg, job_dir: Path, multirun: bool, message: str) -> str:
    """A point whose config is refused: a single run prints one line and exits 2, leaving nothing behind; in a
    sweep the point gets one failed row, and the other points run."""
    if not multirun:
        discard_job_dir(job_dir)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    log.error(f"error: {message}")
    write_failed_row(cfg, hydra_cfg, job_dir, message)
    return "failed"


def write_failed_row(cfg: DictConfig, hydra_cfg, job_dir: Path, message: str) -> None:
    try:
        write_table(job_dir / ROWS_FILE, [dict(failure_columns(cfg, hydra_cfg, True), image_path="",
                                               image_sha256="", status="failed", error=message)])
    except OSError as err:  # e.g. a full disk: the point is missing from the table, and a resume runs it
        log.error(f"  could not write {job_dir / ROWS_FILE}: {err}")


def point_failed(cfg: DictConfig, hydra_cfg, job_dir: Path, multirun: bool, err: Exception) -> str:
    """An exception outside the drawing's own error handling: the traceback in error.txt, one line, a failed row."""
    import traceback

    from runner.jobdir import ERROR_FILE
    from runner.record import atomic_write_bytes

    message = f"{type(err).__name__}: {err}"
    try:
        atomic_write_bytes(job_dir / ERROR_FILE, traceback.format_exc().encode())
    except OSError:
        pass  # e.g. a full disk: the line below still says what happened
    if not multirun:
        print(f"error: {message} (details in {job_dir / ERROR_FILE})", file=sys.stderr)
        sys.exit(1)
    log.error(f"  failed: {message}")
    write_failed_row(cfg, hydra_cfg, job_dir, message)
    return "failed"


def failure_columns(cfg: DictConfig, hydra_cfg, multirun: bool) -> dict:
    """The axis and context columns of a point that never became a spec, as far as its config still resolves."""
    try:
        context = job_context.from_hydra(cfg, hydra_cfg, multirun).columns()
    except Exception:  # the config does not resolve: say where and as what the point ran, without its config
        context = job_context.unresolved(hydra_cfg, multirun).columns()
    try:
        return dict(config_columns(cfg), **context)
    except Exception:
        return context


def unresolved_message(cfg: DictConfig, err: Exception) -> str:
    """The refusal of a config that does not resolve: which key, as written, and why."""
    key, typed = unresolvable(cfg)
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{key}={typed!r} is not allowed: it does not resolve ({reason})"


def unresolvable(cfg: DictConfig, path: str = "") -> tuple[str, object]:
    """The first key of `cfg` whose value does not resolve, and its value as written (e.g. '${oc.env:NAME}')."""
    raw = OmegaConf.to_container(OmegaConf.select(cfg, path) if path else cfg, resolve=False)
    for key in raw if isinstance(raw, dict) else range(len(raw)):
        full = f"{path}.{key}" if path else str(key)
        try:
            value = OmegaConf.select(cfg, full, throw_on_resolution_failure=True)
        except Exception:
            return full, raw[key]
        if OmegaConf.is_config(value):
            found = unresolvable(cfg, full)
            if found[0] != "config":
                return found
    return "config", ""


def config_columns(cfg: DictConfig) -> dict:
    """The axis columns of a point refused before it became a spec, as the user typed them."""
    c = OmegaConf.to_container(cfg, resolve=True)
    seed, prompt = c.get("seed"), c.get("prompt")
    columns = dict(model=c["model"].get("name"), scheduler=c["scheduler"].get("name"),
                   schedule=(c.get("schedule") or {}).get("name"), precision=c["precision"].get("name"),
                   steps=c.get("steps"), guidance=c.get("guidance"),
                   seed=seed if not isinstance(seed, list) else None,
                   prompt=prompt if isinstance(prompt, str) else json.dumps(prompt),
                   negative_prompt=c.get("negative_prompt"), height=c.get("height"), width=c.get("width"),
                   device=c.get("device"), model_name_or_path=c["model"].get("name_or_path"))
    return {k: cell(v) for k, v in columns.items()}


def cell(value):
    """A value as the user typed it, in a form parquet can store: text where it is no plain value (a list, or an
    integer beyond 64 bits such as seed=2**64)."""
    if value is None or isinstance(value, (bool, float, str)):
        return value
    if isinstance(value, int):
        return value if -2**63 <= value < 2**63 else str(value)
    return json.dumps(value, default=str)


def keep_hydra_settings(saved_dir: Path | None) -> None:
    """Hydra saves the job's composed config without the `hydra` node, so `python -m runner --config-path
    <job>/.hydra --config-name config` would run with Hydra's own defaults (outputs/ dirs, no sweep callback).
    Add our settings back; Hydra strips the node from the job's config again, so the config hash is unchanged.
    Secret-looking values typed on the command line (+db_password=...) are *** in every file Hydra saved there:
    the runner reads no such key, and the hash counts them as ***."""
    from runner.context import redact_yaml_file
    from runner.record import atomic_write_bytes

    path = saved_dir / "config.yaml" if saved_dir else None
    if path is None or not path.is_file():
        return
    saved = OmegaConf.load(path)
    if "hydra" not in saved:
        saved.hydra = OmegaConf.load(CONF_DIR / "config.yaml").hydra
        atomic_write_bytes(path, OmegaConf.to_yaml(saved).encode())
    for saved_file in saved_dir.glob("*.yaml"):
        redact_yaml_file(saved_file)
