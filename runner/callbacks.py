"""Sweep-level work, as Hydra callbacks: it reads job dirs back from disk, so it works for any launcher."""

import logging
import math
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from runner.context import SWEEP_SIZE_ENV, SWEPT_KEYS_ENV

log = logging.getLogger("runner")


def sweep_axes(overrides: list[str]) -> dict[str, int]:
    """The swept keys of a multirun's overrides and how many values each takes (their product is the job count)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.get_key_element(): len(list(o.sweep_string_iterator()))
            for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()}


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

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        overrides = list(config.hydra.overrides.task)
        overrides += [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
        search = config.hydra.sweeper.get("search")
        if search:  # a search (experiments/nfe_search.yaml): its trials, and the keys it varies
            os.environ[SWEEP_SIZE_ENV] = str(search.get("n_trials", "?"))
            os.environ[SWEPT_KEYS_ENV] = ",".join(search.get("params") or {})
            return
        try:
            axes = sweep_axes(overrides)
            os.environ[SWEEP_SIZE_ENV] = str(math.prod(axes.values()))
            os.environ[SWEPT_KEYS_ENV] = ",".join(axes)
        except Exception:  # a sweeper with its own syntax: the job lines show "?" and W&B names every override
            os.environ.pop(SWEEP_SIZE_ENV, None)
            os.environ.pop(SWEPT_KEYS_ENV, None)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from runner.loggers import wandb

        # Hydra turns a callback's exception into a warning: a sweep whose table could not be written must still fail.
        try:
            wandb.wait_background()  # the jobs' W&B runs, written beside the sampling
            self.write_sweep_results(config)
        except Exception as err:
            log.error(f"could not write the sweep's results table: {type(err).__name__}: {err}")
            sys.exit(1)
        finally:
            wandb.finish_background()

    def write_sweep_results(self, config: DictConfig) -> None:
        from runner import results
        from runner.columns import CONVERGENCE_COLUMNS
        from runner.convergence import add_convergence
        from runner.record import write_table

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        df = results.load(sweep_dir)
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
