"""What a job leaves on disk: PNGs, its result rows and its sigma schedule.

Every file is written under a temporary name in the same directory and then renamed, so a reader (or a
killed process) never sees a torn file.
"""

import hashlib
import io
import json
import os
import re
import secrets
from pathlib import Path

from runner.jobdir import IMAGES_DIR, LATENTS_DIR


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, with the permissions a plain open() gives (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: it makes files 0600, unreadable by colleagues on a shared filesystem. os.open with mode
    # 0666 lets the kernel apply the umask, with no process-wide umask read; O_EXCL keeps the name ours alone.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def png_bytes(image, parameters: dict) -> bytes:
    """A PNG with the generation parameters in text chunks: `parameters` (A1111's format) and `runner` (JSON)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(parameters))
    info.add_text("runner", json.dumps(parameters, sort_keys=True, default=str))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def a1111_parameters(p: dict) -> str:
    """The one-line summary that A1111 and most image viewers read from PNGs."""
    lines = [p.get("prompt", "")]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    schedule = f"Schedule type: {p['schedule']}, " if p.get("schedule", "default") != "default" else ""
    lines.append(f"Steps: {p['steps']}, Sampler: {p['scheduler']}, {schedule}CFG scale: {p['guidance']}, Seed: {p['seed']}, "
                 f"Size: {p['width']}x{p['height']}, Model: {p['model']}")
    return "\n".join(lines)


def save_image(job_dir: Path, name: str, image, parameters: dict) -> tuple[str, str]:
    """Write one image; returns its path relative to the job dir and the sha256 of the file's bytes."""
    data = png_bytes(image, parameters)
    relative = f"{IMAGES_DIR}/{name}.png"
    atomic_write_bytes(Path(job_dir) / relative, data)
    return relative, hashlib.sha256(data).hexdigest()


def read_image(path):
    """A saved image as a uint8 HWC RGB array."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def save_latent(job_dir: Path, name: str, latent) -> str:
    """Keep an image's final latent as a small float32 .npy (4×H/8×W/8: 64 KiB for 512×512), for latent-space
    distances; returns its path relative to the job dir."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, latent.detach().float().cpu().numpy())
    relative = f"{LATENTS_DIR}/{name}.npy"
    atomic_write_bytes(Path(job_dir) / relative, buffer.getvalue())
    return relative


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def csv_cell(value):
    """A text cell that a spreadsheet would run as a formula, quoted with a leading ' (shown as text, never run).
    Numbers stay as they are, also as text: a column that mixes numbers and words is stored as text."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not NUMBER.fullmatch(value):
        return "'" + value
    return value


def dataframe_bytes(df, fmt: str) -> bytes:
    import pandas as pd

    buffer = io.BytesIO()
    if fmt == "parquet":
        df.to_parquet(buffer, index=False)  # parquet is read by programs, not spreadsheets: the text stays raw
    else:
        text_columns = [c for c in df.columns if df[c].dtype == object or isinstance(df[c].dtype, pd.StringDtype)]
        df = df.assign(**{c: [csv_cell(v) for v in df[c]] for c in text_columns})
        df.to_csv(buffer, index=False)
    return buffer.getvalue()


def arrow_parquet_bytes(rows: list[dict]) -> bytes | None:
    """Parquet of rows whose columns each hold one type; None when a column mixes types (pandas handles those)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(same_keys(rows))  # from_pylist alone takes its columns from the first row
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # OverflowError: an int beyond 64 bits
        return None
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def same_keys(rows: list[dict]) -> list[dict]:
    """Every row with every column of any row (None where it has none), in first-seen order."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k) for k in keys} for row in rows]


def csv_bytes(rows: list[dict]) -> bytes | None:
    """CSV as pandas writes it, for plain values; None when a value needs pandas (NaN, containers)."""
    import csv

    rows = same_keys(rows)
    if any(not isinstance(v, (str, int, float, type(None))) or v != v for row in rows for v in row.values()):
        return None
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    return buffer.getvalue().encode()


def fits_int64(value: int) -> bool:
    return -2**63 <= value < 2**63


def write_table(path: Path, rows) -> None:
    """Rows (a list of dicts or a DataFrame) to parquet or CSV, by the file's suffix."""
    import pandas as pd

    if Path(path).suffix == ".parquet" and isinstance(rows, list):
        data = arrow_parquet_bytes(rows)  # a job's rows: pyarrow directly, without a pandas round trip
        if data is not None:
            return atomic_write_bytes(Path(path), data)
    if Path(path).suffix == ".csv" and isinstance(rows, list) and rows:
        data = csv_bytes(rows)  # a job's schedule: no pandas round trip
        if data is not None:
            return atomic_write_bytes(Path(path), data)
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    for column in df.columns[df.dtypes == object]:
        # A refused point can hold what the user typed (steps=abc, seed=2**64) beside numbers: store such a column
        # as text (parquet has no integers beyond 64 bits).
        kinds = {type(v) for v in df[column] if v is not None and v == v}
        if len(kinds) > 1 or (int in kinds and not all(fits_int64(v) for v in df[column] if isinstance(v, int))):
            df[column] = [None if v is None or v != v else str(v) for v in df[column]]
    atomic_write_bytes(Path(path), dataframe_bytes(df, Path(path).suffix.lstrip(".")))
