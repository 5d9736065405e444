"""Read results back as one pandas DataFrame.

    import runner.results
    df = runner.results.load("results/sweeps/2026-11-24_20-15-00")
"""

import logging
import os
from pathlib import Path

from runner.columns import SWEEP_METRIC_COLUMNS
from runner.jobdir import ROWS_FILE

SWEEP_TABLE = "results.parquet"  # written by the sweep's callback (runner/callbacks.py) beside its job dirs
REPRODUCE_OVERRIDES = "reproduce "  # how runner.reproduce marks its re-runs' rows

log = logging.getLogger("runner")


def job_dirs(path) -> list[Path]:
    """Every job dir (a dir with rows) at or below `path`: a job dir, a sweep dir or a whole results tree."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    return sorted(p.parent for p in path.rglob(ROWS_FILE))


def load(*paths) -> "pandas.DataFrame":
    """One row per image from any number of job dirs, sweep dirs or results trees.

    Rows are read from each job's own `rows.parquet` (never from aggregated tables, so nothing counts twice); a
    sweep job's rows get only the sweep-level metric columns (SWEEP_METRIC_COLUMNS: convergence, FID/KID) from its sweep's results.parquet.
    `job_dir`, `sweep_dir` and `image_path` are rewritten to where the files are now, so a moved results tree
    still loads; `sweep` is the sweep dir's name; `origin` says what made the row: "run", "sweep" or "reproduce"
    (a re-run by `python -m runner.reproduce`). A rows file that cannot be read is skipped with a warning.
    """
    import pandas as pd

    frames = []
    sweep_metrics = {}
    for path in paths or ("results",):
        for job_dir in job_dirs(path):
            try:
                df = pd.read_parquet(job_dir / ROWS_FILE)
            except Exception as err:  # a truncated or foreign file: the other jobs still load
                log.warning(f"skipped {job_dir / ROWS_FILE}: not readable ({type(err).__name__}: {err})")
                continue
            is_sweep_job = df["sweep_dir"].notna() & (df["sweep_dir"] != "")
            overrides = df["overrides"] if "overrides" in df else [None] * len(df)
            df["origin"] = [origin(o, s) for o, s in zip(overrides, is_sweep_job)]
            df["job_dir"] = str(job_dir.resolve())
            df["sweep_dir"] = [str(job_dir.parent.resolve()) if s else "" for s in is_sweep_job]
            df["sweep"] = [Path(s).name if s else "" for s in df["sweep_dir"]]
            for column in ("image_path", "latent_path"):
                if column in df:
                    df[column] = [str(job_dir.resolve() / p) if isinstance(p, str) and p else p for p in df[column]]
            if is_sweep_job.any():
                sweep_dir = job_dir.parent.resolve()
                if sweep_dir not in sweep_metrics:
                    sweep_metrics[sweep_dir] = convergence_by_image(sweep_dir)
                df = add_sweep_metrics(df, sweep_dir, sweep_metrics[sweep_dir])
            add_per_unit_times(df)
            frames.append(df)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def origin(overrides, is_sweep_job: bool) -> str:
    """What made a row: "reproduce" (a re-run, wherever its --out put it), "sweep" or "run"."""
    if isinstance(overrides, str) and overrides.startswith(REPRODUCE_OVERRIDES):
        return "reproduce"
    return "sweep" if is_sweep_job else "run"


def convergence_by_image(sweep_dir: Path) -> dict:
    """{(image path relative to the sweep dir, image sha256): convergence values} from the sweep's results table.

    The table is joined, not recomputed: recomputing reads every image again, and in a tree of several sweeps would
    pick references across sweeps. The key is the image's place within the sweep dir (so a moved tree still
    matches, whether the table stores relative paths or the absolute ones of older sweeps) and its hash (so values
    of an image drawn again since are not attached to the new one)."""
    import pandas as pd

    table_path = sweep_dir / SWEEP_TABLE
    if not table_path.is_file():
        return {}
    try:
        table = pd.read_parquet(table_path)
    except Exception as err:
        log.warning(f"skipped {table_path}: not readable ({type(err).__name__}: {err})")
        return {}
    columns = [c for c in SWEEP_METRIC_COLUMNS if c in table]
    if not columns or not {"image_path", "image_sha256"} <= set(table.columns):
        return {}
    by_image = {}
    for row in table.to_dict("records"):
        image, stored_sweep_dir = row["image_path"], row.get("sweep_dir")
        if not isinstance(image, str) or not image:
            continue
        if os.path.isabs(image) and isinstance(stored_sweep_dir, str) and stored_sweep_dir:
            image = os.path.relpath(image, stored_sweep_dir)  # an older table: paths where the sweep was written
        by_image[(Path(image).as_posix(), row["image_sha256"])] = {c: row[c] for c in columns}
    return by_image


def add_sweep_metrics(job_rows, sweep_dir: Path, by_image: dict):
    """A sweep job's rows (absolute paths) with the convergence columns its sweep's table holds for them."""
    if not by_image:
        return job_rows
    found = [by_image.get((Path(os.path.relpath(p, sweep_dir)).as_posix(), h)) if isinstance(p, str) and p else None
             for p, h in zip(job_rows["image_path"], job_rows.get("image_sha256", [None] * len(job_rows)))]
    columns = list(dict.fromkeys(c for values in found if values for c in values))
    return job_rows.assign(**{c: [values.get(c) if values else None for values in found] for c in columns})


def portable(df, sweep_dir) -> "pandas.DataFrame":
    """A copy of a sweep's loaded rows with `job_dir`, `image_path` and `latent_path` relative to `sweep_dir` (and
    `sweep_dir` itself "."), for the sweep's results.parquet and results.csv: plain pandas on a moved or copied
    tree then finds the files (`sweep_dir / image_path`). `load` makes them absolute again."""
    sweep_dir = Path(sweep_dir).resolve()

    def relative(path):
        return Path(os.path.relpath(path, sweep_dir)).as_posix() if isinstance(path, str) and path else path

    columns = {c: [relative(p) for p in df[c]] for c in ("job_dir", "image_path", "latent_path") if c in df}
    return df.assign(**columns, sweep_dir=".")


def add_per_unit_times(job_rows) -> None:
    """`time_per_image_s` and `time_per_step_s` (per image): a job's times are for all of its images together."""
    if "time_total_s" not in job_rows or job_rows.empty:
        return
    n_images = len(job_rows)
    job_rows["time_per_image_s"] = job_rows["time_total_s"] / n_images
    if "time_denoise_s" in job_rows and "steps" in job_rows:
        import pandas as pd

        steps = pd.to_numeric(job_rows["steps"], errors="coerce")  # a refused point can hold steps="abc"
        job_rows["time_per_step_s"] = job_rows["time_denoise_s"] / n_images / steps


def ok_rows(df):
    return df[df["status"] == "ok"] if "status" in df else df


def pivot(df, metric: str, index: str, columns: str, aggfunc: str = "mean"):
    """`metric` of the ok rows with `index` values down and `columns` values across, e.g.
    pivot(df, "time_per_step_s", "scheduler", "steps")."""
    return ok_rows(df).pivot_table(index=index, columns=columns, values=metric, aggfunc=aggfunc)


def best(df, metric: str, by, lowest: bool = True):
    """The ok row with the lowest (or highest) `metric` in each group of `by`, one row per group."""
    rows = ok_rows(df).dropna(subset=[metric])
    by = [by] if isinstance(by, str) else list(by)
    picked = rows[metric].groupby([rows[b] for b in by]).idxmin() if lowest else \
        rows[metric].groupby([rows[b] for b in by]).idxmax()
    return rows.loc[picked.values].reset_index(drop=True)


# Quality against cost, with confidence (README "Quality against cost").
SAMPLE_AXES = ("seed", "prompt")  # what varies between the images of one cell: resampled, never grouped by


def cell_axes(df) -> list[str]:
    """The axes that tell a sweep's cells apart: every AXES column with more than one value, except the sample axes
    (seeds, prompts). A sweep over scheduler × steps gives ["scheduler", "steps"]; one cell gives ["scheduler"]."""
    from runner.columns import AXES

    varying = [a for a in AXES if a in df and a not in SAMPLE_AXES and df[a].nunique(dropna=False) > 1]
    return varying or [a for a in ("scheduler",) if a in df]


def summary(df, by=None, metrics=("prompt_adherence",), n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """Per cell (a group of `by`, default `cell_axes(df)`) and metric: mean, bootstrap `level` CI and n.

    The CI resamples the cell's images (its seeds and prompts) with replacement `n_boot` times and takes the
    percentiles of the resampled means. Each cell and metric draws from its own generator seeded with `seed`, so
    the result is deterministic and a cell's interval does not depend on which other cells are in `df`. Only ok rows
    with a finite value count (the reference image's own PSNR is inf); a cell with fewer than 2 has no interval
    (NaN), so it is never called different from another. One row per cell and metric, long format.
    """
    import numpy as np
    import pandas as pd

    by = cell_axes(df) if by is None else [by] if isinstance(by, str) else list(by)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    rows = ok_rows(df)
    tail = (1 - level) / 2 * 100
    out = []
    for key, cell in rows.groupby(by, sort=True, dropna=False) if by else [((), rows)]:
        key = key if isinstance(key, tuple) else (key,)
        for metric in metrics:
            values = pd.to_numeric(cell[metric], errors="coerce").to_numpy(dtype=float) if metric in cell else []
            values = values[np.isfinite(values)] if len(values) else np.array([])
            low = high = float("nan")
            if len(values) >= 2:
                picks = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
                low, high = np.percentile(values[picks].mean(axis=1), [tail, 100 - tail])
            mean = float(values.mean()) if len(values) else float("nan")
            out.append(dict(zip(by, key), metric=metric, mean=mean, ci_low=float(low), ci_high=float(high),
                            n=len(values)))
    return pd.DataFrame(out, columns=[*by, "metric", "mean", "ci_low", "ci_high", "n"])


def different(a, b) -> bool:
    """True only when two confidence intervals do not overlap. `a`, `b`: summary rows (with ci_low, ci_high) or
    (low, high) pairs. An interval that is missing (NaN: fewer than 2 images) is never called different."""
    import math

    def interval(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x["ci_low"], x["ci_high"])

    (a_low, a_high), (b_low, b_high) = interval(a), interval(b)
    if any(math.isnan(float(v)) for v in (a_low, a_high, b_low, b_high)):
        return False
    return a_low > b_high or b_low > a_high


def frontier(df, quality: str, cost: str = "nfe", higher_is_better: bool = True, by=None):
    """The non-dominated cells by their means: no other cell costs no more and is at least as good, and strictly
    better in one of the two. One row per frontier cell (the `by` axes, default `cell_axes(df)`, then the mean
    `cost` and `quality` and the cell's image count `n`), cheapest first. Cells without both means are left out.
    `cost`: "nfe" (model evaluations per image) or "time_per_image_s" (or any per-image column)."""
    import numpy as np
    import pandas as pd

    by = cell_axes(df) if by is None else [by] if isinstance(by, str) else list(by)
    rows = ok_rows(df)
    rows = rows.assign(**{c: pd.to_numeric(rows[c], errors="coerce") for c in (quality, cost)})
    rows = rows[np.isfinite(rows[quality]) & np.isfinite(rows[cost])]
    cells = rows.groupby(by, sort=True, dropna=False).agg(**{cost: (cost, "mean"), quality: (quality, "mean"),
                                                             "n": (quality, "size")}).reset_index()
    c = cells[cost].to_numpy()
    q = cells[quality].to_numpy() if higher_is_better else -cells[quality].to_numpy()
    dominated = [bool(((c <= c[i]) & (q >= q[i]) & ((c < c[i]) | (q > q[i]))).any()) for i in range(len(cells))]
    return cells[~np.array(dominated, dtype=bool)].sort_values([cost, quality], kind="stable").reset_index(drop=True)
