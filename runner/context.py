"""Who drew a row: one typed job context, built from Hydra's runtime or for a standalone run (bench, reproduce,
tests), so that a row has the same columns whoever drew it."""

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

SWEEP_SIZE_ENV = "RUNNER_SWEEP_SIZE"  # set by runner.callbacks when a multirun starts
SWEPT_KEYS_ENV = "RUNNER_SWEPT_KEYS"
NOT_HASHED = ("wandb", "dry_run", "dry_run_results", "optimize")  # settings that never change an image


@dataclass(frozen=True)
class JobContext:
    """The columns runner.columns.CONTEXT_COLUMNS of every row a job writes."""

    job_dir: str
    sweep_dir: str
    job_num: int
    overrides: str
    name: str
    config_hash: str
    worker_pid: int
    cuda_visible_devices: str
    config: str  # the resolved config, as JSON

    def columns(self) -> dict:
        return asdict(self)

    @property
    def in_sweep(self) -> bool:
        return bool(self.sweep_dir)


def standalone(cfg, job_dir: Path, overrides: str = "") -> JobContext:
    """A job run outside Hydra's launcher (bench, reproduce, tests): its own dir, no sweep."""
    return JobContext(job_dir=str(Path(job_dir).resolve()), sweep_dir="", job_num=0, overrides=overrides,
                      name=overrides or "defaults", config_hash=config_hash(cfg), worker_pid=os.getpid(),
                      cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""), config=resolved_config(cfg))


def from_hydra(cfg, hydra_cfg, multirun: bool) -> JobContext:
    """The context of the job Hydra is running now."""
    overrides = list(hydra_cfg.overrides.task)
    return JobContext(
        job_dir=str(Path(hydra_cfg.runtime.output_dir).resolve()),
        sweep_dir=str(Path(hydra_cfg.sweep.dir).resolve()) if multirun else "",
        job_num=hydra_cfg.job.num if multirun else 0,
        overrides=" ".join(overrides),
        name=short_name(overrides, os.environ.get(SWEPT_KEYS_ENV) if multirun else None),
        config_hash=config_hash(cfg),
        worker_pid=os.getpid(),  # which process drew the row (parallel launchers run several)
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        config=resolved_config(cfg),
    )


def short_name(overrides: list[str], swept_keys: str | None) -> str:
    """The job's name: its swept overrides only (`scheduler=unipc guidance=7.5`), or all of them outside a sweep."""
    keys = set(swept_keys.split(",")) if swept_keys else None
    chosen = [o for o in overrides if keys is None or o.split("=", 1)[0].lstrip("+~") in keys]
    return " ".join(chosen) or "defaults"


def resolved_config(cfg) -> str:
    """The job's config with every interpolation resolved, as JSON (recorded in each row)."""
    from omegaconf import OmegaConf

    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str)


def config_hash(cfg) -> str:
    """Identifies a sweep point: the sha256 of its resolved config (less what cannot change an image)."""
    from omegaconf import OmegaConf

    plain = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NOT_HASHED}
    plain.get("sampling", {}).pop("progress", None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]
