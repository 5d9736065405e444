"""`python -m runner`: the Hydra app. Heavy libraries load only once a job really runs."""

import os
import sys

import hydra
from hydra._internal.callbacks import Callbacks
from omegaconf import DictConfig, OmegaConf


def _checked_callbacks(init):
    """Hydra instantiates hydra.callbacks before any task runs: refuse classes outside the allow-list first."""

    def checked_init(self, config=None):
        from runner.checks import ConfigError
        from runner.spec import refuse_unknown_targets

        callbacks = OmegaConf.select(config, "hydra.callbacks") if config is not None else None
        if callbacks:
            try:
                refuse_unknown_targets(OmegaConf.to_container(callbacks, resolve=False), "hydra.callbacks")
            except ConfigError as err:
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
        init(self, config)

    return checked_init


Callbacks.__init__ = _checked_callbacks(Callbacks.__init__)


def absolute_config_path(argv: list[str]) -> list[str]:
    """`--config-path`/`-cp` as the user means it: relative to the current directory. (Hydra resolves a relative
    one against this module's folder, so `--config-path results/runs/<job>/.hydra` would not be found.)"""
    out, it = [], iter(argv)
    for arg in it:
        for flag in ("--config-path", "-cp"):
            if arg == flag:
                value = next(it, "")
                arg = f"{flag}={value}"
            if arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
                if value and "://" not in value and not os.path.isabs(value):
                    arg = f"{flag}={os.path.abspath(value)}"
        out.append(arg)
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> str:
    from runner.exits import exits_unwrapped
    from runner.job import run

    with exits_unwrapped():
        return run(cfg)


if __name__ == "__main__":
    sys.argv[1:] = absolute_config_path(sys.argv[1:])
    main()
