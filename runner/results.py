"""Read results back as one pandas DataFrame.

    import runner.results
    df = runner.results.load("results/sweeps/2026-11-24_20-15-00")
"""

from pathlib import Path

from runner.record import ROWS_FILE


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
            if "image_path" in df:
                df["image_path"] = [str(job_dir.resolve() / p) if isinstance(p, str) and p else p for p in df["image_path"]]
            frames.append(df)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)
