"""Hydra's basic sweeper, with the jobs ordered by load cost, and a dry run.

The cartesian product varies the keys that load weights (model, VAE, precision, device) slowest, so the jobs of
one model run back to back and a sweep over models × schedulers loads each model once (the model cache holds
one model). With `dry_run=true` it lists the jobs and images and estimates the time from earlier results of the
same model and device, and launches nothing: no job runs, no sweep dir is written. Its lines are printed as each
job is checked, and each distinct set of config-group choices is composed once (job_configs).
A real sweep writes multirun.yaml without secrets, and numbers its jobs after those of the sweeps a dir already
holds when `+append=true` adds it (runner.sweepdir).
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


def parsed_values(overrides) -> dict:
    """{"key=value" as split_arguments writes a job's override: that override, parsed}, taken from the parsed
    sweeps (parsing each `seed=N` string again cost more than checking its job)."""
    from hydra.core.override_parser.types import Override, ValueType

    parsed = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            parsed[f"{key}={override.get_value_element_as_str()}"] = override
            continue
        if not override.is_discrete_sweep():
            continue  # split_arguments refuses it
        for text, value in zip(override.sweep_string_iterator(), override.sweep_iterator()):
            parsed[f"{key}={text}"] = Override(type=override.type, key_or_group=override.key_or_group,
                                               value_type=ValueType.ELEMENT, _value=value, package=override.package,
                                               input_line=f"{key}={text}")
    return parsed


def as_written(cfg, key: str):
    """cfg[key] as the config holds it: interpolations unresolved (so that putting it back restores it)."""
    from omegaconf import OmegaConf

    node = cfg._get_node(key)
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node._value()


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
        from runner.dry_run import print_lines

        fused = str(self.config.hydra.launcher.get("_target_", "")).endswith(".FusedLauncher")
        if print_lines(jobs, self.job_configs(jobs, parsed_values(overrides)), self.config.get("dry_run_results", "results"),
                       fused):
            sys.exit(2)  # a sweep that would refuse points is not ready: say so to scripts too
        return []

    def job_configs(self, jobs, parsed: dict):
        """Each job's config, as Hydra would compose it, one at a time: use each before taking the next (it is the
        same object, changed). Hydra composes every job from scratch (most of a big dry run's
        time: README, "When things go wrong"); here each distinct set of config-group choices (model, scheduler ...) is composed once, and a
        job's plain values (steps=20, seed=3) are set on it by the function Hydra's composition ends with, then
        put back as they were for the next job."""
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from omegaconf import open_dict

        loader = self.hydra_context.config_loader
        parser = OverridesParser.create(config_loader=loader)
        composed, picks = {}, {}
        for job in jobs:
            for text in job:
                if text not in parsed:
                    parsed[text] = parser.parse_override(text)
                key = parsed[text].key_or_group
                if key not in picks:
                    picks[key] = self.chooses_config(parsed[text])
            structural = tuple(t for t in job if picks[parsed[t].key_or_group])
            if structural not in composed:
                cfg = loader.load_sweep_config(self.config, list(structural))
                with open_dict(cfg):
                    cfg.pop("hydra")
                composed[structural] = cfg
            cfg = composed[structural]
            values = [parsed[t] for t in job if t not in structural]
            touched = {o.key_or_group.split(".")[0] for o in values}
            missing = {k for k in touched if k not in cfg}
            before = {k: as_written(cfg, k) for k in touched - missing}
            ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
            yield cfg
            with open_dict(cfg):
                for key in touched:
                    if key in missing:
                        cfg.pop(key, None)
                    else:
                        cfg[key] = before[key]

    def chooses_config(self, override) -> bool:
        """Whether an override picks configs (a group option, a package, a deletion) rather than setting a value."""
        key = override.key_or_group
        return (override.package is not None or override.is_delete()
                or self.hydra_context.config_loader.repository.group_exists(key))

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
