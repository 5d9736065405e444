"""A job dir's layout, and what resume reads back from it.

    <job_dir>/images/000_seed0.png   one PNG per image (generation parameters in its text chunks)
    <job_dir>/latents/000_seed0.npy  the final latent of latent-diffusion models
    <job_dir>/rows.parquet           one row per image (runner.columns)
    <job_dir>/schedule.csv           the sigma schedule the loop used
    <job_dir>/error.txt              the traceback of a failed job
    <job_dir>/.hydra/                the composed config (what runner.reproduce re-runs)
"""

import hashlib
import json
from pathlib import Path

ROWS_FILE = "rows.parquet"
SCHEDULE_FILE = "schedule.csv"
ERROR_FILE = "error.txt"
IMAGES_DIR = "images"
LATENTS_DIR = "latents"


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


def discard_job_dir(job_dir: Path):
    """Remove what Hydra wrote for a job that was refused before it started (nothing else is touched)."""
    import shutil

    shutil.rmtree(job_dir / ".hydra", ignore_errors=True)
    for log_file in job_dir.glob("*.log"):
        log_file.unlink()
    try:
        job_dir.rmdir()
    except OSError:
        pass
