"""A declarative, Hydra-driven experiment runner for diffusion samplers."""

from pathlib import Path

from omegaconf import OmegaConf

EMBEDDED_MODELS_DIR = Path(__file__).parent / "models"


def embedded_model_path(name: str) -> str:
    """The directory of a model that ships inside this package (diffusers layout)."""
    return str(EMBEDDED_MODELS_DIR / name)


# Registered on import so that `${embedded_model:tiny-sd}` resolves in the CLI and the compose API alike.
OmegaConf.register_new_resolver("embedded_model", embedded_model_path, replace=True)
