"""Hydra's basic sweeper, with the jobs ordered by load cost, and a dry run.

The cartesian product varies the keys that load weights (model, VAE, precision, device) slowest, so the jobs of
one model run back to back and a sweep over models × schedulers loads each model once (the model cache holds
one model). With `dry_run=true` it lists the jobs and images and estimates the time from earlier results of the
same model and device, and launches nothing: no job runs, no sweep dir is written.
Registered as the `hydra/sweeper` option `ordered` (conf/hydra/sweeper/ordered.yaml), the default in
conf/config.yaml; `hydra/sweeper=basic` gives Hydra's own order back. Hydra accepts plugins only from the
hydra_plugins namespace package, hence this location.
"""

import logging
import os
import sys
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

log = logging.getLogger("runner")

# Override keys in the order they should vary, slowest first: reloading weights costs the most.
LOAD_KEYS = ("model", "precision", "device")


def load_rank(override) -> int:
    key = override.get_key_element().lstrip("+~")
    group = key.split(".")[0].split("/")[0]
    return LOAD_KEYS.index(group) if group in LOAD_KEYS else len(LOAD_KEYS)


class ModelOrderedSweeper(BasicSweeper):
    """With `search` (a sweeper's config node, e.g. experiments/nfe_search.yaml; Hydra instantiates it with this
    sweeper), it hands the whole sweep to that sweeper. (An experiment cannot pick `hydra/sweeper` itself: Hydra keeps
    the first override of a group, and conf/config.yaml's `override hydra/sweeper: ordered` comes first.)"""

    def __init__(self, max_batch_size=None, params=None, search=None):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.search = search

    def setup(self, *, hydra_context, task_function, config):
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if self.search is not None:
            self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    @staticmethod
    def split_arguments(overrides, max_batch_size):
        # itertools.product varies its first list slowest; sorted() is stable, so other keys keep their order.
        return BasicSweeper.split_arguments(sorted(overrides, key=load_rank), max_batch_size)

    def sweep(self, arguments):
        dry_run = self.config.get("dry_run", False)
        if self.search is not None and not dry_run:
            return self.search.sweep(arguments)
        if self.search is not None:
            trials = self.config.hydra.sweeper.search.get("n_trials")
            print(f"dry run: a search of {trials} trial(s); it picks each trial's values as it runs, so none are listed")
            return []
        if not dry_run:
            return self.launch_all(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        jobs = [job for batch in self.split_arguments(overrides, None) for job in batch]
        configs = [self.hydra_context.config_loader.load_sweep_config(self.config, list(job)) for job in jobs]
        from runner.dry_run import print_report, report

        text, refused = report(jobs, configs, self.config.get("dry_run_results", "results"))
        print_report(text, refused, len(jobs))
        if refused:
            sys.exit(2)  # a sweep that would refuse points is not ready: say so to scripts too
        return []

    def launch_all(self, arguments):
        """BasicSweeper.sweep, with multirun.yaml written without secrets."""
        from omegaconf import OmegaConf

        from runner.context import redact_yaml
        from runner.record import atomic_write_bytes

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(parser.parse_overrides(self._parse_config() + list(arguments)),
                                              self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        atomic_write_bytes(sweep_dir / "multirun.yaml", redact_yaml(OmegaConf.to_yaml(self.config)).encode())
        from runner.sweepdir import FIRST_JOB_ENV

        returns, first_job = [], int(os.environ.get(FIRST_JOB_ENV, "0"))  # after the jobs of sweeps appended to
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)  # every job composes, before any runs
            results = self.launcher.launch(batch, initial_job_idx=first_job)
            for result in results:
                _ = result.return_value  # raises what a job raised
            first_job += len(batch)
            returns.append(results)
        return returns
