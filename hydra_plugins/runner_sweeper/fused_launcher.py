"""`hydra/launcher=fused`: Hydra's basic launcher (every job in this process, in order, through Hydra's `run_job`),
with the sweep points that can share a UNet batch drawn together first (runner.fused).

Each job still runs exactly as under the basic launcher: its own job dir, `.hydra/`, log, rows, PNGs, schedule and
W&B run; it finds its images already drawn and records them, with its share of the batch's time. A point whose
config is refused, already finished or partly drawn is not fused (its job refuses it, skips it or draws the rest), and
a batch that raises leaves its points to draw alone.
Registered as the `hydra/launcher` option `fused` (conf/hydra/launcher/fused.yaml).
"""

import logging
from pathlib import Path

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import configure_log, filter_overrides, run_job, setup_globals
from omegaconf import open_dict

log = logging.getLogger(__name__)


class FusedLauncher(BasicLauncher):
    def launch(self, job_overrides, initial_job_idx):
        from runner.fused import draw_batch, plan_and_group

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs locally, fusing the points that share a batch")
        # 1. compose every job's config as the basic launcher does, and plan the fused batches
        configs = []
        for idx, overrides in enumerate(job_overrides):
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = config.hydra.job.num = initial_job_idx + idx
            configs.append(config)
        groups = plan_and_group(configs)
        batch_of = {point.index: (number, batch) for number, batches in enumerate(groups) for batch in batches
                    for point in batch}
        # 2. run every job in order; a job's fused batch is drawn when its first point comes up
        runs, drawn = [], set()
        for idx, (overrides, config) in enumerate(zip(job_overrides, configs)):
            if idx in batch_of and id(batch_of[idx][1]) not in drawn:
                number, batch = batch_of[idx]
                drawn.add(id(batch))
                draw_batch(batch, number)
            log.info(f"\t#{initial_job_idx + idx} : {' '.join(filter_overrides(overrides))}")
            runs.append(run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                                job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs
