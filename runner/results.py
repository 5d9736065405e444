"""Read results back as one pandas DataFrame.

    import runner.results
    df = runner.results.load("results/sweeps/2026-11-24_20-15-00")
"""

from pathlib import Path

from runner.jobdir import ROWS_FILE


def job_dirs(path) -> list[Path]:
    """Every job dir (a dir with rows) at or below `path`: a job dir, a sweep dir or a whole results tree."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    return sorted(p.parent for p in path.rglob(ROWS_FILE))


def load(*paths) -> "pandas.DataFrame":
    """One row per image from any number of job dirs, sweep dirs or results trees.

    Rows are read from each job's own `rows.parquet` (never from aggregated tables, so nothing counts twice).
    `job_dir`, `sweep_dir` and `image_path` are rewritten to where the files are now, so a moved results tree
    still loads; `sweep` is the sweep dir's name.
    """
    import pandas as pd

    frames = []
    for path in paths or ("results",):
        for job_dir in job_dirs(path):
            df = pd.read_parquet(job_dir / ROWS_FILE)
            is_sweep_job = df["sweep_dir"].notna() & (df["sweep_dir"] != "")
            df["job_dir"] = str(job_dir.resolve())
            df["sweep_dir"] = [str(job_dir.parent.resolve()) if s else "" for s in is_sweep_job]
            df["sweep"] = [Path(s).name if s else "" for s in df["sweep_dir"]]
            for column in ("image_path", "latent_path"):
                if column in df:
                    df[column] = [str(job_dir.resolve() / p) if isinstance(p, str) and p else p for p in df[column]]
            add_per_unit_times(df)
            frames.append(df)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


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
