"""Read results back as one pandas DataFrame.

    import runner.results
    df = runner.results.load("results/sweeps/2026-11-24_20-15-00")
"""

import logging
import os
from pathlib import Path

from runner.columns import CONVERGENCE_COLUMNS
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
    sweep job's rows get only the convergence columns (CONVERGENCE_COLUMNS) from its sweep's results.parquet.
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
    columns = [c for c in CONVERGENCE_COLUMNS if c in table]
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
