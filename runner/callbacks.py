"""Sweep-level work, as Hydra callbacks: it reads job dirs back from disk, so it works for any launcher."""

import logging
import math
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from runner.context import SWEEP_SIZE_ENV, SWEPT_KEYS_ENV, as_typed

log = logging.getLogger("runner")


def sweep_axes(overrides: list[str]) -> dict[str, int]:
    """The swept keys of a multirun's overrides and how many values each takes (their product is the job count)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.get_key_element(): len(list(o.sweep_string_iterator()))
            for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()}


def refuse_empty_axes(overrides: list[str], axes: dict[str, int]) -> None:
    """A swept key with no values (`seed=range(0,0)`) makes a sweep of no jobs: one line and exit 2, not a silent
    success."""
    for key, count in axes.items():
        if count == 0:
            typed = next((o for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), key)
            print(f"error: {typed} is not allowed: a sweep over no values runs no job; give at least one value",
                  file=sys.stderr)
            sys.exit(2)


class SweepResults(Callback):
    """Counts the jobs when a multirun starts; writes results.parquet/.csv and a failure summary when it ends.

    `distribution_min_images`: FID/KID per cell (runner.fid) for cells of at least this many images (None: off).
    `reference`: None (the sweep's own most-steps image), "auto" (converged references, runner.reference: drawn at
    `reference_steps`, checked at half, held to `reference_tolerance_db`, kept in `reference_cache`) or a reference
    run's path. Their values live in conf/config.yaml (hydra.callbacks.sweep_results)."""

    def __init__(self, distribution_min_images: int | None = None, reference: str | None = None,
                 reference_steps: int | None = None, reference_tolerance_db: float | None = None,
                 reference_cache: str | None = None):
        self.distribution_min_images = distribution_min_images
        self.reference = reference
        self.auto_reference = dict(steps=reference_steps, tolerance_db=reference_tolerance_db, cache=reference_cache)
        self.multirun_yaml_redacted = False  # once per process: the sweeper wrote it before the first job

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from runner.jobdir import remember_before
        from runner.sweepdir import note_run

        remember_before(Path(config.hydra.run.dir))  # before Hydra writes there: a refusal undoes only its own
        note_run(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        overrides = as_typed(config.hydra.overrides.task)
        overrides += [f"{k}={v}" for k, v in (as_typed(config.hydra.sweeper.get("params")) or {}).items()]
        search = config.hydra.sweeper.get("search")
        if search:  # a search (experiments/nfe_search.yaml): its trials, and the keys it varies
            axes, jobs = None, search.get("n_trials")
            os.environ[SWEEP_SIZE_ENV] = str(jobs or "?")
            os.environ[SWEPT_KEYS_ENV] = ",".join(search.get("params") or {})
        else:
            try:
                axes = sweep_axes(overrides)
            except Exception:  # a sweeper with its own syntax: the job lines show "?" and W&B names every override
                axes = None
                os.environ.pop(SWEEP_SIZE_ENV, None)
                os.environ.pop(SWEPT_KEYS_ENV, None)
            jobs = math.prod(axes.values()) if axes is not None else None
        if axes is not None:
            refuse_empty_axes(overrides, axes)
            os.environ[SWEEP_SIZE_ENV] = str(jobs)
            os.environ[SWEPT_KEYS_ENV] = ",".join(axes)
        if config.get("dry_run"):  # a sweeper that launches dry-run jobs (hydra/sweeper=basic): leave no trace
            self.remember_sweep_dir(Path(config.hydra.sweep.dir))
            return
        from runner import sweepdir
        from runner.launch import SWEEP_PID_ENV

        os.environ[SWEEP_PID_ENV] = str(os.getpid())  # launcher workers exit when this process is gone
        # +append numbers new jobs after the old ones: the runner's sweeper does, a search's own numbering does not
        numbers_after_old_jobs = config.hydra.runtime.choices.get("hydra/sweeper") == "ordered" and not search
        first_job = sweepdir.start(Path(config.hydra.sweep.dir), overrides, jobs,
                                   bool(config.get(sweepdir.APPEND_KEY)), numbers_after_old_jobs)
        os.environ[sweepdir.FIRST_JOB_ENV] = str(first_job)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        """Hydra's own sweepers (hydra/sweeper=basic, optuna) save multirun.yaml as typed, secrets included (the
        runner's sweeper saves it redacted): redact it before the first job draws."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from runner.context import redact_yaml_file

        hydra_cfg = HydraConfig.get()
        path = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
        if self.multirun_yaml_redacted or hydra_cfg.mode != RunMode.MULTIRUN or not path.is_file():
            return
        redact_yaml_file(path)
        self.multirun_yaml_redacted = True

    def remember_sweep_dir(self, sweep_dir: Path) -> None:
        """Before a dry run's jobs: what the sweep dir and its job dirs hold, so that each job and the end of the
        sweep undo only what Hydra wrote (runner.jobdir.discard_job_dir)."""
        from runner.jobdir import remember_before

        multirun = sweep_dir / "multirun.yaml"
        self.dry_run_before = {"existed": sweep_dir.is_dir(),
                               "multirun": multirun.read_bytes() if multirun.is_file() else None}
        for job_dir in (p for p in sweep_dir.iterdir() if p.is_dir()) if sweep_dir.is_dir() else ():
            remember_before(job_dir)

    def undo_dry_run(self, sweep_dir: Path) -> None:
        from runner.record import atomic_write_bytes

        before = getattr(self, "dry_run_before", {"existed": True, "multirun": None})
        multirun = sweep_dir / "multirun.yaml"
        if before["multirun"] is not None:
            atomic_write_bytes(multirun, before["multirun"])
        elif multirun.is_file():
            multirun.unlink()
        if not before["existed"]:
            try:
                sweep_dir.rmdir()
            except OSError:
                pass

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from runner import sweepdir
        from runner.loggers import wandb

        if config.get("dry_run"):  # nothing ran: no table, and the sweep dir as it was
            from runner.dry_run import refused_jobs

            self.undo_dry_run(Path(config.hydra.sweep.dir))
            if refused_jobs:  # hydra/sweeper=basic: each job printed its own refusal; the sweep is not ready
                sys.exit(2)
            return
        # Hydra turns a callback's exception into a warning: a sweep whose table could not be written must still fail.
        try:
            wandb.wait_background()  # the jobs' W&B runs, written beside the sampling
            self.write_sweep_results(config)
        except Exception as err:
            log.error(f"could not write the sweep's results table: {type(err).__name__}: {err}")
            sys.exit(1)
        finally:
            wandb.finish_background()
            sweepdir.unlock()

    def write_sweep_results(self, config: DictConfig) -> None:
        from runner import results, sweepdir
        from runner.columns import CONVERGENCE_COLUMNS
        from runner.convergence import add_convergence
        from runner.record import write_table

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        # only the jobs of the sweeps this dir records: not a parent dir's other results, nor stray job dirs
        job_dirs = sweepdir.job_dirs(sweep_dir)
        df = results.load(*job_dirs) if job_dirs else None
        if df is None or df.empty:
            return
        sweeps = sweepdir.recorded_sweeps(sweep_dir)
        df = df[[sweepdir.owns_job(sweeps, n) for n in df["job_num"]]].reset_index(drop=True)
        if df.empty:
            return
        try:
            auto = self.auto_reference if self.reference == "auto" else {}
            df = add_convergence(df, reference=self.reference, **auto)
        except Exception as err:  # the metrics are extras: the table is still written without them
            log.warning(f"sweep: convergence metrics not computed: {type(err).__name__}: {err}")
            df = df.drop(columns=[c for c in CONVERGENCE_COLUMNS if c in df])  # none from an earlier table
        if self.distribution_min_images:
            try:
                from runner.fid import add_distribution

                df = add_distribution(df, self.distribution_min_images)
            except ImportError as err:
                log.warning(f"sweep: FID/KID not computed: {err} (pip install -e '.[quality]')")
            except Exception as err:
                log.warning(f"sweep: FID/KID not computed: {type(err).__name__}: {err}")
        write_table(sweep_dir / "results.parquet", results.portable(df, sweep_dir))
        write_table(sweep_dir / "results.csv", results.portable(df, sweep_dir))
        write_grid_and_log(config, sweep_dir, df)
        failed = df[df["status"] != "ok"]
        log.info(f"sweep: {len(df) - len(failed)} image(s) ok, {len(failed)} failed → {sweep_dir / 'results.parquet'}")
        if len(failed):
            for job_dir, group in failed.groupby("job_dir", sort=True):
                log.error(f"  failed: {group['overrides'].iloc[0] or '(defaults)'}: {group['error'].iloc[0]}")
            sys.exit(1)


def write_grid_and_log(config: DictConfig, sweep_dir: Path, df) -> None:
    """The labelled grid (grid.png in the sweep dir) and the sweep's summary for the loggers."""
    from runner.grid import default_grid_axes, grid_image
    from runner.loggers import wandb

    grid_path = sweep_dir / "grid.png"
    try:
        grid_image(df, *default_grid_axes(df)).save(grid_path)
    except Exception as err:  # a grid is a convenience: never fail the sweep for it
        log.warning(f"could not draw the sweep grid: {type(err).__name__}: {err}")
        grid_path = None
    wandb.sweep_finished(config, sweep_dir, df, grid_path)
