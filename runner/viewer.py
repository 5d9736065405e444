"""The sweep viewer's data: everything the report page's script draws from, as one JSON document.

Images: each ok image gets a thumbnail embedded in the page (a data: URI; small images as their own PNG, so
their pixels are exact) and its full PNG placed under the report folder, `images/<sweep>/<job>/<file>.png`, as a
hard link to the sweep's file where the filesystem allows (no space used), else a copy. The page reads nothing
outside its own folder, so the folder opens offline wherever it is copied, alone or with the sweep.
"""

import json
import math
import os
import re
import shlex
import shutil
from pathlib import Path

from runner.columns import (AXES, CONVERGENCE_COLUMNS, IMAGE_METRIC_COLUMNS, LOWER_IS_BETTER, REPORT_COLUMNS,
                            REPORT_HIDDEN_COLUMNS, VIEWER_CAPTION_COLUMNS, VIEWER_IDENTITY_COLUMNS)
from runner.grid import ordered_values, swept_axes, typed_order
from runner.jobdir import SCHEDULE_FILE

THUMB_SIZE = 160  # px, the longer side: grid cells up to this size show the thumbnail, larger ones the full PNG
IMAGES_DIR = "images"  # under the report folder
JOB_LEVEL_COLUMNS = ("config",)  # the same on every row of a job: sent once per job


# --------------------------------------------------------------------------- axes

def job_overrides(job_dir) -> list[str]:
    """A job's overrides as typed (`.hydra/overrides.yaml`), [] where it has none."""
    import yaml

    path = Path(job_dir) / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text()) or []) if path.is_file() else []


def parsed(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception:  # not Hydra's syntax: nothing to read from it
        return []


def add_override_axes(df):
    """Rows with a column for each key the sweep swept that the rows do not hold as a column (say
    `scheduler.kwargs.use_karras_sigmas` or `sampling.eta`), read from each job's overrides as typed."""
    missing = [k for k in typed_order(df) if k not in df.columns]
    if not missing or "job_dir" not in df:
        return df
    by_job = {}
    for job_dir in df["job_dir"].unique():
        values = {o.key_or_group: o.value() for o in parsed(job_overrides(job_dir)) if not o.is_sweep_override()}
        by_job[job_dir] = {k: plain(values[k]) for k in missing if k in values}
    return df.assign(**{k: [by_job[j].get(k) for j in df["job_dir"]] for k in missing})


def plain(value):
    """An override's parsed value as JSON takes it (Hydra's QuotedString as its text)."""
    return str(getattr(value, "text", value)) if not isinstance(value, (int, float, bool, type(None))) else value


def viewer_axes(df) -> list[dict]:
    """The axes a user can put on X, Y or page, in the order typed: {"key", "values"}. With several sweeps, `sweep`
    is an axis too (the same cell of two sweeps can then be compared)."""
    keys = swept_axes(df)
    if "sweep" in df and df["sweep"].nunique() > 1:
        keys = ["sweep", *keys]
    typed = typed_order(df)
    return [{"key": k, "values": [json_value(v) for v in ordered_values(df, k, typed)]} for k in keys]


def default_order(axes: list[dict]) -> list[str]:
    """Which axes go across, down and on pages at first: as typed, seed last (a grid shows one content per seed)."""
    return sorted((a["key"] for a in axes), key=lambda k: k == "seed")


# --------------------------------------------------------------------------- values, images, commands

def json_value(value):
    """A cell as JSON can hold it: numpy scalars as Python numbers, NaN as null, infinities as "inf"/"-inf"."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def thumbnail(path: Path) -> dict:
    """An image's thumbnail: its data: URI, its size (tw, th), the image's size (w, h) and whether it is exact.
    Images no larger than THUMB_SIZE are their own thumbnail (a PNG without the text chunks: pixels exact, for crisp
    enlargement); larger ones are shrunk to WebP."""
    import base64
    import io

    from PIL import Image

    with Image.open(path) as image:
        exact = max(image.size) <= THUMB_SIZE
        picture = image.convert("RGB")
        if not exact:
            picture.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG" if exact else "WEBP", quality=82)
        size = image.size
    kind = "png" if exact else "webp"
    return {"thumb": f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode()}",
            "tw": picture.width, "th": picture.height, "w": size[0], "h": size[1], "exact": exact}


def place(source: Path, target: Path) -> None:
    """`target` holds `source`'s bytes: a hard link (no space used) where the filesystem allows, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(source, target)


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))[:80].strip(".") or "runs"


def job_folders(df) -> dict[str, str]:
    """{job dir: its folder under the report's images/}: `<sweep>/<job>`, unique when two sweeps share a name."""
    folders, taken = {}, {}
    for sweep_dir, job_dir, sweep in zip(df["sweep_dir"], df["job_dir"], df["sweep"]):
        if job_dir in folders:
            continue
        parent = sweep_dir or str(Path(job_dir).parent)
        if parent not in taken:
            name = slug(sweep or "runs")
            used = set(taken.values())
            taken[parent] = name if name not in used else next(f"{name}-{n}" for n in range(2, 10**6)
                                                               if f"{name}-{n}" not in used)
        folders[job_dir] = f"{taken[parent]}/{slug(Path(job_dir).name)}"
    return folders


def hydra_value(text, quote: bool = False) -> str:
    """A value as Hydra reads it literally: as it is when plain (ddim, 7.5, tiny-sd) and `quote` is off, else in
    double quotes, with quotes, the backslashes before them and ${ escaped (Hydra's quoted-string rules)."""
    text = str(text)
    if not quote and re.fullmatch(r"[\w.\-/]+", text):
        return text
    text = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)  # they would escape the closing quote
    return '"' + text.replace("${", "\\${") + '"'


def redrawn_overrides(overrides: list[str]) -> list[str]:
    """A job's overrides as typed, less those a redraw sets itself (seed, prompt) or does not need (hydra.*)."""
    found = parsed(overrides)  # Hydra's parser is slow (ANTLR): once per job, not per image
    keys = [o.key_or_group for o in found] if len(found) == len(overrides) else \
        [text.split("=", 1)[0].lstrip("+~") for text in overrides]
    return [text for text, key in zip(overrides, keys)
            if key not in ("seed", "prompt") and key != "hydra" and not key.startswith(("hydra.", "hydra/"))]


def redraw_command(row: dict, overrides: list[str] | None) -> str:
    """`python -m runner ...` that draws exactly this image alone: the job's overrides (redrawn_overrides) with
    this image's seed and prompt (a batch draws each image as its seed alone would). Without the job's overrides
    (an older or foreign job dir: None), the row's axes stand in for them."""
    if overrides is None:
        keys = [k for k in AXES if k not in ("seed", "prompt", "strength") and isinstance(row.get(k), (str, int, float))
                and row.get(k) == row.get(k) and row.get(k) != ""]
        overrides = [f"{k}={hydra_value(row[k])}" for k in keys]
    args = [*overrides, f"seed={row.get('seed')}", f"prompt={hydra_value(row.get('prompt') or '', quote=True)}"]
    return "python -m runner " + " ".join(shlex.quote(a) for a in args)


def schedule_of(job_dir) -> dict | None:
    """The job's sigma schedule as columns (step, sigma, log_snr where recorded), None without schedule.csv."""
    import pandas as pd

    path = Path(job_dir) / SCHEDULE_FILE
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path)
    except Exception:
        return None
    return {c: [json_value(v) for v in table[c]] for c in ("step", "timestep", "sigma", "log_snr") if c in table}


# --------------------------------------------------------------------------- the document

def detail_groups(df) -> dict[str, list[str]]:
    """Which columns a cell's detail lists under which heading."""
    present = [c for c in df.columns if df[c].notna().any()]
    return {"settings": [c for c in AXES if c in present],
            "metrics": [c for c in (*IMAGE_METRIC_COLUMNS, *CONVERGENCE_COLUMNS) if c in present],
            "timings": [c for c in present if c.startswith(("time_", "mem_")) or c == "images_per_s"],
            "identity": [c for c in VIEWER_IDENTITY_COLUMNS if c in present]}


def table_columns(df) -> tuple[list[str], list[str]]:
    """(shown, hidden) columns of the results table: REPORT_COLUMNS and peak memory shown, the heavy ones hidden."""
    peak = [c for c in df.columns if "peak" in c and "mem" in c]
    shown = [c for c in (*REPORT_COLUMNS, *peak) if c in df.columns or c in ("job", "image")]
    hidden = [c for c in REPORT_HIDDEN_COLUMNS if c in df.columns and c not in shown]
    return shown, hidden


def viewer_data(df, out: Path) -> tuple[dict, list[str]]:
    """The viewer's document for these rows, and the files it placed under `out` (relative paths)."""
    df = add_override_axes(df.reset_index(drop=True))
    df = df.assign(job=[Path(p).name for p in df["job_dir"]],
                   image=[Path(p).name if isinstance(p, str) and p else "" for p in df["image_path"]])
    folders = job_folders(df)
    jobs, job_index, redraw = [], {}, {}
    for job_dir in df["job_dir"].unique():
        job_index[job_dir] = len(jobs)
        first = df[df["job_dir"] == job_dir].iloc[0]
        typed = job_overrides(job_dir)
        redraw[job_dir] = redrawn_overrides(typed) if typed else None
        jobs.append({"schedule": schedule_of(job_dir),
                     **{c: json_value(first[c]) for c in JOB_LEVEL_COLUMNS if c in df}})
    images, placed, commands = [], [], []
    for row in df.to_dict("records"):
        path = row.get("image_path")
        commands.append(redraw_command(row, redraw[row["job_dir"]]) if row.get("status") == "ok" else None)
        if row.get("status") != "ok" or not isinstance(path, str) or not path or not Path(path).is_file():
            images.append(None)
            continue
        relative = f"{IMAGES_DIR}/{folders[row['job_dir']]}/{Path(path).name}"
        place(Path(path), out / relative)
        placed.append(relative)
        images.append({"full": relative, **thumbnail(Path(path))})
    columns = [c for c in df.columns if c not in JOB_LEVEL_COLUMNS]
    axes = viewer_axes(df)
    shown, hidden = table_columns(df)
    data = {
        "axes": axes,
        "default_axes": dict(zip(("x", "y", "page"), [*default_order(axes), None, None, None])),
        "rows": {"columns": columns, "data": [[json_value(v) for v in r] for r in df[columns].itertuples(index=False)]},
        "row_job": [job_index[j] for j in df["job_dir"]],
        "jobs": jobs,
        "images": images,
        "commands": commands,
        "table": {"shown": shown, "hidden": hidden},
        "captions": [c for c in VIEWER_CAPTION_COLUMNS if c in df and df[c].notna().any()],
        "lower_is_better": [c for c in LOWER_IS_BETTER if c in df],
        "detail": detail_groups(df),
    }
    return data, placed


def script_json(document) -> str:
    """JSON that is safe inside a <script> element (no "</script>" or "<!--" can end or comment it)."""
    return json.dumps(document, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
