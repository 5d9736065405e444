"""Sweep-level work, as Hydra callbacks: it reads job dirs back from disk, so it works for any launcher."""

import logging
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from runner.job import SWEEP_SIZE_ENV

log = logging.getLogger("runner")


def sweep_size(overrides: list[str]) -> int:
    """How many jobs a multirun's command-line overrides expand to (the basic sweeper's cartesian product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    size = 1
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            size *= len(list(override.sweep_string_iterator()))
    return size


class SweepResults(Callback):
    """Counts the jobs when a multirun starts; writes results.parquet/.csv and a failure summary when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        overrides = list(config.hydra.overrides.task)
        overrides += [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
        try:
            os.environ[SWEEP_SIZE_ENV] = str(sweep_size(overrides))
        except Exception:  # a sweeper with its own syntax: the job lines just show "?" for the total
            os.environ.pop(SWEEP_SIZE_ENV, None)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from runner import results
        from runner.convergence import add_convergence
        from runner.record import write_table

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        df = results.load(sweep_dir)
        if df.empty:
            return
        try:
            df = add_convergence(df)
        except Exception as err:  # the metrics are extras: the table is still written without them
            log.warning(f"sweep: convergence metrics not computed: {type(err).__name__}: {err}")
        write_table(sweep_dir / "results.parquet", df)
        write_table(sweep_dir / "results.csv", df)
        failed = df[df["status"] != "ok"]
        log.info(f"sweep: {len(df) - len(failed)} image(s) ok, {len(failed)} failed → {sweep_dir / 'results.parquet'}")
        if len(failed):
            for job_dir, group in failed.groupby("job_dir", sort=True):
                log.error(f"  failed: {group['overrides'].iloc[0] or '(defaults)'}: {group['error'].iloc[0]}")
            sys.exit(1)
