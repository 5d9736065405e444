"""Hydra plugin of diffusion-runner: the model-ordered sweeper (Hydra loads plugins only from hydra_plugins)."""
