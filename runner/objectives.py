"""What a search optimises: a job's objectives, one number per column named in `optimize`, returned by the task
(runner.job.run) to a multi-objective sweeper (Optuna, experiments/nfe_search.yaml).

- a per-image column (prompt_adherence, class_confidence, clip_score, nfe, unet_evals): its mean over the job's
  ok images;
- `time_per_image_s`: the job's time divided by its images (as runner.results.load computes it);
- `kid_digits`, `fid_digits`: the job's images against held-out real digits (runner.fid), a job being one cell.
A failed job gives NaN for each: the sweeper records the trial as failed and goes on.
"""

import math

from runner.checks import fail
from runner.columns import COST_COLUMNS, SCORE_COLUMNS

OBJECTIVES = (*SCORE_COLUMNS, *COST_COLUMNS, "time_per_image_s", "kid_digits", "fid_digits")


def names(goals) -> list[str]:
    return [goals] if isinstance(goals, str) else list(goals)


def check_objectives(goals) -> None:
    for name in names(goals):
        if name not in OBJECTIVES:
            fail("optimize", name, "a list of: " + ", ".join(OBJECTIVES))


def objectives(rows: list[dict], goals) -> tuple[float, ...]:
    """One number per goal (checked by check_objectives first); all NaN when no row is ok."""
    ok = [r for r in rows if r.get("status") == "ok"]
    return tuple(objective(ok, len(rows), name) if ok else math.nan for name in names(goals))


def objective(ok: list[dict], n_rows: int, name: str) -> float:
    if name == "time_per_image_s":
        return float(ok[0]["time_total_s"]) / n_rows
    if name in ("kid_digits", "fid_digits"):
        from pathlib import Path

        import pandas as pd

        from runner.fid import add_distribution

        images = [str(Path(r["job_dir"]) / r["image_path"]) for r in ok]  # rows hold paths relative to their job
        scored = add_distribution(pd.DataFrame(ok).assign(image_path=images), min_images=2)
        return float(scored[name].iloc[0]) if scored[name].notna().any() else math.nan
    values = [float(r[name]) for r in ok if r.get(name) is not None and not math.isnan(float(r[name]))]
    return sum(values) / len(values) if values else math.nan


def read_rows(job_dir) -> list[dict]:
    """The rows a finished job wrote: a resumed search point returns its objectives again."""
    from pathlib import Path

    import pandas as pd

    from runner.jobdir import ROWS_FILE

    return pd.read_parquet(Path(job_dir) / ROWS_FILE).to_dict("records")
