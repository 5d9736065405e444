"""A declarative, Hydra-driven experiment runner for diffusion samplers."""

import os
from pathlib import Path

from omegaconf import OmegaConf

EMBEDDED_MODELS_DIR = Path(__file__).parent / "models"
CONF_DIR = Path(__file__).parent / "conf"  # conf/, shipped inside the package (a link in a source checkout)


def embedded_model_path(name: str) -> str:
    """The directory of a model that ships inside this package (diffusers layout)."""
    return str(EMBEDDED_MODELS_DIR / name)


# Registered on import so that `${embedded_model:tiny-sd}` resolves in the CLI and the compose API alike.
OmegaConf.register_new_resolver("embedded_model", embedded_model_path, replace=True)


def default_launcher_workers() -> int:
    from runner.launch import default_workers  # imports torch only when a launcher preset asks

    return default_workers()


# `n_jobs: ${runner_workers:}` in conf/hydra/launcher/gpus.yaml
OmegaConf.register_new_resolver("runner_workers", default_launcher_workers, replace=True)


# `${pid:}` in the default run/sweep dirs: two runs started in the same second never share a directory. Cached, so
# every job of a sweep (Hydra copies the master config's resolver cache, also to launcher workers) sees one value.
OmegaConf.register_new_resolver("pid", os.getpid, replace=True, use_cache=True)
