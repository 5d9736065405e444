"""`python -m runner.reproduce JOB_DIR|SWEEP_DIR [--out DIR]`: re-run saved jobs and compare the images.

Each job is rebuilt from its own `.hydra/config.yaml` (nothing from the current directory or the current conf/),
run into a new directory, and every new image is compared with the saved file: by sha256, then pixel by pixel.
The saved files are also checked against the hashes recorded in the rows. Every image is drawn again, into a
fresh directory outside the run it checks (an `--out` that exists and is not empty is refused), on the CPU thread
count the job recorded. A job that cannot be re-run (its config fails the check, or does not load) is one line,
and the next job goes on. Exit 0 when every image is identical, 1 when any differs or a job could not be re-run,
2 when there is nothing to reproduce or `--out` is refused.
"""

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def saved_config(job_dir: Path, recorded: dict | None = None):
    """The job's composed config, without the `hydra` node (our settings, kept for plain-Hydra re-runs), and with
    every `${oc.env:NAME}` replaced by the value the job recorded (`recorded`: its row's resolved config)."""
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "config.yaml"), resolve=False)
    saved.pop("hydra", None)
    return OmegaConf.create(without_environment(saved, recorded or {}))


def without_environment(config, recorded, path: str = ""):
    """A saved config never reads this machine's environment into new files: a results tree from elsewhere could
    name `${oc.env:AWS_SECRET_ACCESS_KEY}` as its prompt, and the new PNG's text would carry the secret. Each such
    value is the one the job recorded when it ran; a job that recorded none (or ***) is refused."""
    from runner.checks import fail
    from runner.context import REDACTED

    if isinstance(config, dict):
        return {k: without_environment(v, (recorded or {}).get(k) if isinstance(recorded, dict) else None,
                                       f"{path}.{k}" if path else str(k)) for k, v in config.items()}
    if isinstance(config, list):
        return [without_environment(v, recorded[i] if isinstance(recorded, list) and i < len(recorded) else None,
                                    f"{path}[{i}]") for i, v in enumerate(config)]
    if isinstance(config, str) and "oc.env" in config:
        if recorded is None or recorded == REDACTED or (isinstance(recorded, str) and "oc.env" in recorded):
            fail(path, config, "a value written out: reproduce never reads this machine's environment into its "
                 "outputs, and the job recorded no value for it")
        return recorded
    return config


def rerun(job_dir: Path, new_dir: Path, cpu_threads: int | None = None, recorded_config: dict | None = None) -> list[dict]:
    """Run the saved job again into `new_dir` (on `cpu_threads` torch threads where given, `${oc.env:...}` as
    `recorded_config` holds them); returns the new rows."""
    from runner.context import standalone
    from runner.draw import draw
    from runner.spec import make_spec

    cfg = saved_config(job_dir, recorded_config)
    spec = make_spec(cfg)
    with torch_threads(cpu_threads if spec.device == "cpu" else None):
        return draw(spec, new_dir, standalone(cfg, new_dir, overrides=f"reproduce {job_dir}"))


@contextlib.contextmanager
def torch_threads(count: int | None):
    """CPU kernels split their sums by thread count, so pixels can differ by 1/255 between thread counts: redraw on
    the count the job recorded (cpu_threads), and restore this process's own afterwards."""
    import torch

    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def recorded_threads(saved_rows: list[dict]) -> int | None:
    counts = {int(r["cpu_threads"]) for r in saved_rows if r.get("cpu_threads") is not None and r["cpu_threads"] == r["cpu_threads"]}
    return counts.pop() if len(counts) == 1 else None


def pixel_difference(a_path: Path, b_path: Path) -> tuple[int, float]:
    """Max absolute pixel difference (0-255) and PSNR in dB (inf when identical)."""
    import numpy as np
    from skimage.metrics import peak_signal_noise_ratio

    from runner.record import read_image

    a, b = read_image(a_path), read_image(b_path)
    if a.shape != b.shape:
        return 255, 0.0
    diff = int(np.abs(a.astype(int) - b.astype(int)).max())
    return diff, float("inf") if diff == 0 else float(peak_signal_noise_ratio(a, b, data_range=255))


def verdict(saved: dict, new: dict, job_dir: Path, new_dir: Path) -> tuple[bool, str]:
    """(identical, one line) for one image: the saved file against its recorded hash and against the new image."""
    name = saved["image_path"]
    if saved.get("status") != "ok" or not name:
        return True, f"skipped {name or '(no image)'}: the saved row is {saved.get('status')} ({saved.get('error')})"
    saved_file = job_dir / name
    if not saved_file.is_file():
        return False, f"MISSING {saved_file}: the saved image file is gone"
    notes = []
    if sha256(saved_file) != saved["image_sha256"]:
        notes.append("the saved file no longer matches the sha256 recorded in rows.parquet")
    if new is None or new.get("status") != "ok":
        return False, f"FAILED  {name}: the re-run did not produce it ({(new or {}).get('error', 'no row')})"
    new_file = new_dir / new["image_path"]
    if sha256(new_file) == sha256(saved_file) and not notes:
        return True, f"identical {name} (sha256 {saved['image_sha256'][:12]})"
    diff, psnr = pixel_difference(saved_file, new_file)
    if diff == 0 and not notes:
        return True, f"identical {name} (pixels equal; file bytes differ)"
    notes.insert(0, f"max pixel difference {diff}, PSNR {psnr:.2f} dB")
    return False, f"DIFFERS {name}: " + "; ".join(notes)


def environment_warnings(saved_rows, new_rows) -> list[str]:
    warnings = []
    from runner.columns import PIXEL_ENVIRONMENT_COLUMNS

    for key in PIXEL_ENVIRONMENT_COLUMNS:
        old = {str(r.get(key)) for r in saved_rows if r.get(key) is not None} - {"nan"}
        new = {str(r.get(key)) for r in new_rows if r.get(key) is not None} - {"nan"}
        if old and new and old != new:
            warnings.append(f"warning: {key} was {', '.join(sorted(old))}, now {', '.join(sorted(new))}")
    return warnings


def reproduce_job(job_dir: Path, new_dir: Path) -> bool:
    """Re-run one job and print a verdict per image; True when every image is identical. A job that cannot be
    re-run is one line (False), never an exception: the next job still runs."""
    import pandas as pd

    from runner.jobdir import ROWS_FILE

    try:
        saved_rows = pd.read_parquet(job_dir / ROWS_FILE).to_dict("records")
        recorded = json.loads(saved_rows[0]["config"]) if saved_rows and saved_rows[0].get("config") else {}
        saved_config(job_dir, recorded)  # invalid YAML or an unrecorded oc.env is refused before anything is written
    except Exception as err:
        print(f"{job_dir}: could not be re-run: {one_line(err)}")
        return False
    print(f"{job_dir} → {new_dir}")
    try:
        new_rows = rerun(job_dir, new_dir, recorded_threads(saved_rows), recorded)
    except Exception as err:  # ConfigError: the saved config fails today's check
        print(f"  could not be re-run: {one_line(err)}")
        return False
    for warning in environment_warnings(saved_rows, new_rows):
        print(f"  {warning}")
    new_by_key = {(r["prompt"], r["seed"]): r for r in new_rows}
    results = [verdict(r, new_by_key.get((r["prompt"], r["seed"])), job_dir, new_dir) for r in saved_rows]
    for _, line in results:
        print(f"  {line}")
    return all(same for same, _ in results)


def one_line(err: Exception) -> str:
    from runner.checks import ConfigError

    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if isinstance(err, ConfigError) else f"{type(err).__name__}: {text}"


def refuse_out(out: Path, checked: Path) -> str | None:
    """Why `out` cannot take the re-runs, or None: it must be fresh (so every image is drawn again, none kept from
    an earlier run) and outside the run being checked (whose files must stay as they are)."""
    out, checked = out.resolve(), checked.resolve()
    if out == checked or checked in out.parents:
        return "it is inside the run being checked; give a directory outside it"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return "it exists and is not empty; reproduce draws every image again into a fresh directory"
    return None


def reproducible_jobs(path: Path) -> list[Path]:
    from runner.results import job_dirs

    return [d for d in job_dirs(path) if (d / ".hydra" / "config.yaml").is_file()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a job dir or a sweep dir")
    parser.add_argument("--out", type=Path, default=None,
                        help="a new or empty dir for the re-runs (default: results/reproduce/<time>_<pid>/ under the current "
                             "directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.path.is_dir():
        print(f"error: path={str(args.path)!r} is not allowed: a job dir or a sweep dir", file=sys.stderr)
        return 2
    jobs = reproducible_jobs(args.path)
    if not jobs:
        print(f"error: path={str(args.path)!r} holds no job (no rows.parquet beside a .hydra/config.yaml)",
              file=sys.stderr)
        return 2
    out = args.out or Path("results") / "reproduce" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{os.getpid()}"
    problem = refuse_out(out, args.path)
    if problem:
        print(f"error: --out={str(out)!r} is not allowed: {problem}", file=sys.stderr)
        return 2
    root = args.path.resolve()
    identical = [reproduce_job(job, out / (job.resolve().relative_to(root) if job.resolve() != root else ""))
                 for job in jobs]
    print(f"{sum(identical)}/{len(identical)} job(s) reproduced identically")
    return 0 if all(identical) else 1


if __name__ == "__main__":
    sys.exit(main())
