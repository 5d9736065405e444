"""`python -m runner`: the Hydra app. Heavy libraries load only once a job really runs."""

import errno
import os
import sys

import hydra
from hydra._internal import utils as hydra_utils
from hydra._internal.callbacks import Callbacks
from omegaconf import DictConfig, OmegaConf

from runner import CONF_DIR


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


def composition_error_line(err: Exception) -> str | None:
    """Hydra's multi-line composition errors as the runner's one line (key, value, what is allowed); None for
    any other error."""
    import difflib
    import re

    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, value = err.missing_cfg_file.rsplit("/", 1)
        options = list(err.options or [])
        close = difflib.get_close_matches(value, options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{group}={value} is not allowed: one of {', '.join(options) or '(no options found)'}{hint}"
    if isinstance(err, OverrideParseException):
        return f"{err.override} is not allowed: not a valid override ({str(err).splitlines()[0]})"
    if isinstance(err, ConfigCompositionException):
        message = str(err)
        key = re.search(r"Could not override '([^']+)'", message)
        typed = re.search(r"use \+(\S+)", message)
        parent = getattr(err.__cause__, "parent_node", None)
        if key and parent is not None:
            name, known = key.group(1), [str(k) for k in parent.keys() if k != "hydra"]
            close = difflib.get_close_matches(name.rsplit(".", 1)[-1], known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            where = f"keys of {name.rsplit('.', 1)[0]}" if "." in name else "top-level keys"
            shown = typed.group(1) if typed else name
            return (f"{shown} is not allowed: {name} is not a config key ({hint}{where}: {', '.join(known)}; "
                    f"+{shown} adds a new key)")
        taken = re.search(r"An item is already at '([^']+)'.\nEither remove \+ prefix: '([^']+)'", message)
        if taken:
            return f"+{taken.group(2)} is not allowed: {taken.group(1)} already exists; set it with {taken.group(2)}"
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        return "; ".join(lines[:3]) if lines else None
    return None


def _one_line_errors(run_and_report):
    """Hydra reports a bad override as 7-20 lines and exit 1; the runner promises one line and exit 2."""

    def reported(func):
        from hydra.errors import ConfigCompositionException, OverrideParseException

        def with_one_line():
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as err:
                line = composition_error_line(err)
                if line is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"error: {line}", file=sys.stderr)
                sys.exit(2)
            except OSError as err:  # e.g. Hydra cannot save a job's .hydra/ on a full disk: no point can go on
                if err.errno != errno.ENOSPC or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                where = f" (writing {err.filename})" if err.filename else ""
                print(f"error: the disk is full{where}: the sweep stops here; free space, then run the same command "
                      "again (finished points are kept)", file=sys.stderr)
                sys.exit(1)

        return run_and_report(with_one_line)

    return reported


hydra_utils.run_and_report = _one_line_errors(hydra_utils.run_and_report)


def warn_unknown_top_level_keys(argv: list[str]) -> None:
    """`+guidence=3` adds a key the runner never reads (a typo would go unnoticed): say so, once per command."""
    import difflib

    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])
    except Exception:  # Hydra reports a bad override itself
        return
    from runner.sweepdir import APPEND_KEY

    # the config groups, and the keys a run may add: +append=true (runner.sweepdir), +optimize=[...] (a search,
    # runner.objectives), and the family options some model configs bring (sdxl, flux, shift)
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    known = set(OmegaConf.load(CONF_DIR / "config.yaml").keys()) | groups | {APPEND_KEY, "optimize", "sdxl", "flux",
                                                                               "shift"}
    for override in overrides:
        key = override.key_or_group
        if override.is_add() and "." not in key and "/" not in key and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            print(f"warning: +{key} is not a key the runner reads; it is only recorded in the config{hint}",
                  file=sys.stderr)


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


def exit_interrupted() -> None:
    """Ctrl-C: every file is whole (atomic writes); say how far the run got and how to go on, not a traceback."""
    import logging

    from runner.loggers.wandb import leave_background
    from runner.sweepdir import interrupted_line

    print("\n" + interrupted_line(sys.argv[1:]), file=sys.stderr)  # on a line of its own, after a progress bar
    leave_background()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if "joblib" in sys.modules:  # hydra/launcher=gpus: loky's exit handlers end its workers and semaphores
        sys.exit(130)
    # Not sys.exit: tearing down torch, diffusers and transformers takes seconds, and there is nothing left to
    # save (the lock goes with the process, a W&B logger process finishes the runs it holds on its own)
    os._exit(130)


def on_sigint(signum, frame) -> None:
    """Exit here rather than raise KeyboardInterrupt wherever the program is: raised inside Hydra composing the
    next job's config, it left OmegaConf half-updated, and Hydra reported the error that followed (exit 1)."""
    if "joblib" in sys.modules:
        raise KeyboardInterrupt  # joblib's Parallel stops its workers on it, then exit_interrupted
    exit_interrupted()


if __name__ == "__main__":
    import signal

    sys.argv[1:] = absolute_config_path(sys.argv[1:])
    warn_unknown_top_level_keys(sys.argv[1:])
    from runner.context import redact_log_records

    redact_log_records()  # Hydra logs each job's overrides: +db_password=... must not reach a log
    signal.signal(signal.SIGINT, on_sigint)
    try:
        main()
    except KeyboardInterrupt:
        exit_interrupted()
