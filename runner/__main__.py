"""`python -m runner`: the Hydra app. Heavy libraries load only once a job really runs."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> str:
    from runner.job import run

    return run(cfg)


if __name__ == "__main__":
    main()
