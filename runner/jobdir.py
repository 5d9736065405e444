"""A job dir's layout, and what resume reads back from it.

    <job_dir>/images/000_seed0.png   one PNG per image (generation parameters in its text chunks)
    <job_dir>/latents/000_seed0.npy  the final latent of latent-diffusion models
    <job_dir>/rows.parquet           one row per image (runner.columns)
    <job_dir>/schedule.csv           the sigma schedule the loop used
    <job_dir>/error.txt              the traceback of a failed job
    <job_dir>/.hydra/                the composed config (what runner.reproduce re-runs)
    <job_dir>/runner.log             the job's log (JobLogFile)
"""

import errno
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

ROWS_FILE = "rows.parquet"
SCHEDULE_FILE = "schedule.csv"
ERROR_FILE = "error.txt"
IMAGES_DIR = "images"
LATENTS_DIR = "latents"


class JobLogFile(logging.FileHandler):
    """Hydra's job log file (conf/config.yaml names it). On a full disk the log stops with one line on stderr, not
    a traceback for every record logged after it; the job itself reports the full disk where it writes."""

    disk_full = False

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not (isinstance(err, OSError) and err.errno == errno.ENOSPC):
            return super().handleError(record)
        if not JobLogFile.disk_full:
            print(f"warning: the disk is full: the job log {self.baseFilename} stops here", file=sys.stderr)
        JobLogFile.disk_full = True


def image_name(index: int, seed: int) -> str:
    return f"{index:03d}_seed{seed}"


def finished(job_dir: Path, config_hash: str) -> bool:
    """Whether this job dir already holds every image of this exact config (so a re-run sweep skips it)."""
    import pandas as pd

    rows_file = job_dir / ROWS_FILE
    if not rows_file.is_file():
        return False
    try:
        rows = pd.read_parquet(rows_file, columns=["status", "config_hash", "image_path"])
    except Exception:  # truncated or foreign: not finished, so the job runs again (keeping the images it drew)
        return False
    return (len(rows) > 0 and (rows["status"] == "ok").all() and (rows["config_hash"] == config_hash).all()
            and all((job_dir / p).is_file() for p in rows["image_path"]))


def kept_images(job_dir: Path, plan: list[tuple[str, int]], config_hash: str) -> dict[int, dict]:
    """Images already in the job dir for this exact config (PNGs are written whole, so any present is complete):
    {plan index: {"image_path", "image_sha256", "latent_path"}}. A requeued or resumed job draws only the others."""
    from PIL import Image

    kept = {}
    for index, (prompt, seed) in enumerate(plan):
        path = job_dir / IMAGES_DIR / f"{image_name(index, seed)}.png"
        if not path.is_file():
            continue
        try:
            saved = json.loads(Image.open(path).text.get("runner", "{}"))
        except Exception:  # unreadable: draw it again
            continue
        if saved.get("config_hash") == config_hash and saved.get("prompt") == prompt and saved.get("seed") == seed:
            data = path.read_bytes()
            latent = job_dir / LATENTS_DIR / f"{image_name(index, seed)}.npy"
            kept[index] = {"image_path": f"{IMAGES_DIR}/{path.name}", "image_sha256": hashlib.sha256(data).hexdigest(),
                           "latent_path": f"{LATENTS_DIR}/{latent.name}" if latent.is_file() else ""}
    return kept


HYDRA_DIR = ".hydra"
# What a job dir held before Hydra wrote into it (its .hydra/ files and logs), by resolved path: set by the run's
# callback (runner.callbacks) before Hydra creates anything, read by discard_job_dir in the same process.
_before: dict[str, dict] = {}


def remember_before(job_dir: Path) -> None:
    """Note what `job_dir` holds now, before Hydra writes its .hydra/ and log there, so that discard_job_dir can
    undo exactly what this process added (and put back any .hydra/ file Hydra overwrote)."""
    job_dir = Path(job_dir)
    hydra_dir = job_dir / HYDRA_DIR
    _before[str(job_dir.resolve())] = {
        "existed": job_dir.is_dir(),
        "hydra_dir": hydra_dir.is_dir(),
        "hydra_files": {p.name: p.read_bytes() for p in hydra_dir.glob("*") if p.is_file()} if hydra_dir.is_dir() else {},
        "logs": {p.name: p.stat().st_size for p in job_dir.glob("*.log")} if job_dir.is_dir() else {},
    }


def discard_job_dir(job_dir: Path):
    """Undo what Hydra wrote for a job that was refused before it started, or only dry-ran: its .hydra/ files and
    its log. Files that were there before stay (overwritten .hydra/ files get their old bytes back, a log its old
    length); a job dir this process did not see before is only removed when it holds nothing but Hydra's files."""
    import shutil

    from runner.record import atomic_write_bytes

    job_dir = Path(job_dir)
    before = _before.pop(str(job_dir.resolve()), None)
    if before is None:  # e.g. a job in a launcher's worker process: remove only what can be nothing but Hydra's
        if {p.name for p in job_dir.iterdir()} - {HYDRA_DIR} - {p.name for p in job_dir.glob("*.log")}:
            return
        before = {"existed": False, "hydra_dir": False, "hydra_files": {}, "logs": {}}
    hydra_dir = job_dir / HYDRA_DIR
    if not before["hydra_dir"]:
        shutil.rmtree(hydra_dir, ignore_errors=True)
    else:
        for path in hydra_dir.glob("*"):
            if path.name in before["hydra_files"]:
                if path.read_bytes() != before["hydra_files"][path.name]:
                    atomic_write_bytes(path, before["hydra_files"][path.name])
            elif path.is_file():
                path.unlink()
    for log_file in job_dir.glob("*.log"):
        if log_file.name not in before["logs"]:
            log_file.unlink()
        elif log_file.stat().st_size > before["logs"][log_file.name]:
            os.truncate(log_file, before["logs"][log_file.name])
    if not before["existed"]:
        try:
            job_dir.rmdir()
        except OSError:
            pass
