"""Who drew a row: one typed job context, built from Hydra's runtime or for a standalone run (bench, reproduce,
tests), so that a row has the same columns whoever drew it."""

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SWEEP_SIZE_ENV = "RUNNER_SWEEP_SIZE"  # set by runner.callbacks when a multirun starts
SWEPT_KEYS_ENV = "RUNNER_SWEPT_KEYS"
NOT_HASHED = ("wandb", "dry_run", "dry_run_results", "append", "optimize")  # settings that never change an image

# Config keys (and `key=value` overrides) that may hold credentials: their values are written nowhere, neither in
# rows, tables, logs, .hydra/ files nor W&B. The runner itself reads no such key.
SECRET_PATTERN = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential|auth)", re.IGNORECASE)
REDACTED = "***"
# `key=value` with a secret-looking key; the value ends at a space, or at a comma that starts the next `key=`
# (Hydra's override_dirname), but not at a sweep's commas (`+token=a,b`).
SECRET_OVERRIDE = re.compile(r"(?P<key>[^\s=]*" + SECRET_PATTERN.pattern + r"[^\s=]*=)(?P<value>'[^']*'|\"[^\"]*\"|(?:[^\s,]|,(?![\w.+~/@-]+=))+)",
                             re.IGNORECASE)
SECRET_YAML_LINE = re.compile(r"^(?P<key>\s*-?\s*[\w.-]*" + SECRET_PATTERN.pattern + r"[\w.-]*:)[ \t]+\S.*$",
                              re.IGNORECASE | re.MULTILINE)


def as_typed(node) -> list | dict:
    """Overrides (hydra.overrides.task) or sweeper params as typed: a `${oc.env:X}` inside one is text here, not
    something to resolve (reading them through OmegaConf would resolve it, and fail for an unset X)."""
    from omegaconf import OmegaConf

    if node is None:
        return []
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


def is_secret(key) -> bool:
    return bool(SECRET_PATTERN.search(str(key)))


def redact(value):
    """A plain config (dicts, lists) with the values of secret-looking keys replaced by ***."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret(k) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def redact_text(text: str) -> str:
    """Free text (overrides, a command line, a log line) with the value of every secret-looking `key=value` ***."""
    return SECRET_OVERRIDE.sub(lambda m: m.group("key") + REDACTED, text)


def redact_yaml(text: str) -> str:
    """A YAML file as Hydra saves it (.hydra/*.yaml, multirun.yaml), with secret-looking values ***."""
    return redact_text(SECRET_YAML_LINE.sub(lambda m: f"{m.group('key')} '{REDACTED}'", text))


def redact_yaml_file(path) -> None:
    """Rewrite a YAML file Hydra saved with its secret-looking values *** (left as it is when it has none)."""
    from runner.record import atomic_write_bytes

    text = path.read_text()
    redacted = redact_yaml(text)
    if redacted != text:
        atomic_write_bytes(path, redacted.encode())


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
    overrides = redact_text(overrides)
    return JobContext(job_dir=str(Path(job_dir).resolve()), sweep_dir="", job_num=0, overrides=overrides,
                      name=overrides or "defaults", config_hash=config_hash(cfg), worker_pid=os.getpid(),
                      cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""), config=resolved_config(cfg))


def from_hydra(cfg, hydra_cfg, multirun: bool) -> JobContext:
    """The context of the job Hydra is running now."""
    overrides = [redact_text(o) for o in as_typed(hydra_cfg.overrides.task)]
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


def unresolved(hydra_cfg, multirun: bool) -> JobContext:
    """The context of a job whose config does not resolve: where it ran and as what, without config or hash."""
    overrides = [redact_text(o) for o in as_typed(hydra_cfg.overrides.task)]
    return JobContext(job_dir=str(Path(hydra_cfg.runtime.output_dir).resolve()),
                      sweep_dir=str(Path(hydra_cfg.sweep.dir).resolve()) if multirun else "",
                      job_num=hydra_cfg.job.num if multirun else 0, overrides=" ".join(overrides),
                      name=short_name(overrides, os.environ.get(SWEPT_KEYS_ENV) if multirun else None),
                      config_hash="", worker_pid=os.getpid(),
                      cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""), config="")


def short_name(overrides: list[str], swept_keys: str | None) -> str:
    """The job's name: its swept overrides only (`scheduler=unipc guidance=7.5`), or all of them outside a sweep."""
    keys = {k.lstrip("+~") for k in swept_keys.split(",")} if swept_keys else None  # `+key=a,b` sweeps `key`
    chosen = [o for o in overrides if keys is None or o.split("=", 1)[0].lstrip("+~") in keys]
    return " ".join(chosen) or "defaults"


def resolved_config(cfg) -> str:
    """The job's config with every interpolation resolved, as JSON (recorded in each row); secrets ***."""
    from omegaconf import OmegaConf

    return json.dumps(redact(OmegaConf.to_container(cfg, resolve=True)), sort_keys=True, default=str)


def redact_log_records() -> None:
    """Every log record of this process with secret-looking `key=value` values *** (Hydra's launchers log each
    job's overrides, and a job's log file receives them)."""
    import logging

    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "redacts", False):
        return

    def redacted_record(*args, **kwargs):
        record = make_record(*args, **kwargs)
        if record.args or (isinstance(record.msg, str) and "=" in record.msg):
            message = record.getMessage()
            if SECRET_PATTERN.search(message):
                record.msg, record.args = redact_text(message), None
        return record

    redacted_record.redacts = True
    logging.setLogRecordFactory(redacted_record)


def config_hash(cfg) -> str:
    """Identifies a sweep point: the sha256 of its resolved config (less what cannot change an image)."""
    from omegaconf import OmegaConf

    # secrets never change an image: hashed as ***, so a rotated token leaves the sweep the same sweep
    plain = {k: v for k, v in redact(OmegaConf.to_container(cfg, resolve=True)).items() if k not in NOT_HASHED}
    plain.get("sampling", {}).pop("progress", None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]
