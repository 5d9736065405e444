"""A sweep dir holds one sweep (or, on request, several appended): resume is the same sweep again.

    <sweep_dir>/sweep.json     the sweeps this dir holds: their overrides, first job number and job count
    <sweep_dir>/.sweep.lock    held (flock) by the live sweep's process: a second sweep into the dir is refused
    <sweep_dir>/<k>/           job k (hydra.sweep.subdir)

When a multirun starts (runner.callbacks.SweepResults.on_multirun_start), the dir is checked before anything is
written: a new or empty dir starts a new sweep; the same overrides again resume it; other overrides are refused with
one line, unless `+append=true` asks to add them as a further sweep, whose jobs are numbered after the ones there.
The sweep's table gathers only the jobs these sweeps made (runner.callbacks), not whatever else lies below the dir.
"""

import json
import os
import sys
from pathlib import Path

SWEEP_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
APPEND_KEY = "append"  # `+append=true`: add a different sweep to a dir that holds one
FIRST_JOB_ENV = "RUNNER_FIRST_JOB"  # the number of this sweep's first job, read by the ordered sweeper
# Overrides that never change which jobs a sweep has or what they draw: a resume may add or change them.
NOT_IDENTITY = ("wandb", "dry_run", "dry_run_results", APPEND_KEY, "sampling.progress", "hydra")

_lock = None  # this process's open, locked lock file while its sweep runs
_current: dict = {}  # what this process runs: {"dir", "multirun", "first_job", "jobs"} (for the interrupt line)


def note_run(run_dir: Path) -> None:
    _current.update(dir=Path(run_dir), multirun=False, first_job=0, jobs=1)


def identity(overrides: list[str]) -> list[str]:
    """The overrides that make a sweep's jobs, in their order (the order numbers the jobs), secrets as ***."""
    from runner.context import redact_text

    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    return [redact_text(o) for o in overrides
            if not any(key(o) == k or key(o).startswith(k + ".") or key(o).startswith(k + "/") for k in NOT_IDENTITY)]


def recorded_sweeps(sweep_dir: Path) -> list[dict] | None:
    """The sweeps the dir holds ({"overrides", "first_job", "jobs"}), or None where it holds none we know of. A
    sweep made before sweep.json existed is read from its multirun.yaml."""
    from omegaconf import OmegaConf

    record = sweep_dir / SWEEP_FILE
    if record.is_file():
        return json.loads(record.read_text())["sweeps"]
    multirun = sweep_dir / "multirun.yaml"
    if not multirun.is_file():
        return None
    saved = OmegaConf.load(multirun)
    from runner.context import as_typed

    overrides = list(as_typed(OmegaConf.select(saved, "hydra.overrides.task", default=None)) or [])
    params = as_typed(OmegaConf.select(saved, "hydra.sweeper.params", default=None)) or {}
    overrides += [f"{k}={v}" for k, v in params.items()]
    try:
        jobs = job_count(overrides)
    except Exception:
        jobs = None
    return [{"overrides": identity(overrides), "first_job": 0, "jobs": jobs}]


def job_count(overrides: list[str]) -> int:
    import math

    from runner.callbacks import sweep_axes

    return math.prod(sweep_axes(overrides).values())


def in_use(sweep_dir: Path) -> bool:
    return sweep_dir.is_dir() and any(p.name != LOCK_FILE for p in sweep_dir.iterdir())


def refuse(sweep_dir: Path, why: str) -> None:
    print(f"error: hydra.sweep.dir={str(sweep_dir)!r} is not allowed: {why}", file=sys.stderr)
    sys.exit(2)


def check(sweep_dir: Path, this: list[str], append: bool, own_sweeper: bool, locked: bool = False) -> None:
    """Refuse (one line, exit 2) a sweep that would mix with another in `sweep_dir`; reads, writes nothing.
    `locked`: this process holds the dir's lock."""
    holder = None if locked else held_by(sweep_dir)
    if holder is not None:  # first: while a sweep starts, its dir is half-recorded
        refuse(sweep_dir, f"another sweep (pid {holder}) is running in it; wait for it to end, or use another dir")
    if not in_use(sweep_dir):
        return
    sweeps = recorded_sweeps(sweep_dir)
    if sweeps is not None and any(s["overrides"] == this for s in sweeps):
        return  # the same sweep again: resume
    if not append:
        held = "files that are not a sweep" if sweeps is None else \
            "another sweep (" + (" ".join(sweeps[-1]["overrides"]) or "defaults") + ")"
        refuse(sweep_dir, f"it holds {held}; resume with the same overrides, use a new dir, or add +{APPEND_KEY}=true "
                          "to add this sweep to it")
    if not own_sweeper:
        refuse(sweep_dir, f"+{APPEND_KEY}=true numbers the new jobs after the ones there, which only the runner's "
                          "sweeper does (hydra/sweeper=ordered, the default, without a search); use a new dir")


def held_by(sweep_dir: Path) -> str | None:
    """The pid written in the dir's lock file while a live process holds it; None when none does."""
    import fcntl

    try:
        handle = open(sweep_dir / LOCK_FILE)
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "?"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def lock(sweep_dir: Path) -> None:
    """Hold the dir's lock for this process's life (or until unlock): a second live sweep is refused."""
    import fcntl

    global _lock
    sweep_dir.mkdir(parents=True, exist_ok=True)
    handle = open(sweep_dir / LOCK_FILE, "a+")  # not inherited by launcher workers (PEP 446)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        refuse(sweep_dir, f"another sweep (pid {holder}) is running in it; wait for it to end, or use another dir")
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    _lock = handle


def unlock() -> None:
    global _lock
    if _lock is not None:
        _lock.close()  # closing drops the flock
        _lock = None


def start(sweep_dir: Path, overrides: list[str], jobs: int | None, append: bool, own_sweeper: bool) -> int:
    """Check, lock and record the sweep starting in `sweep_dir`; returns the number of its first job."""
    from runner.record import atomic_write_bytes

    this = identity(overrides)
    check(sweep_dir, this, append, own_sweeper)  # before anything is written
    lock(sweep_dir)
    check(sweep_dir, this, append, own_sweeper, locked=True)  # again under the lock: another may have started
    sweeps = recorded_sweeps(sweep_dir) or []
    same = next((s for s in sweeps if s["overrides"] == this), None)
    if same is None:
        same = {"overrides": this, "first_job": next_job(sweep_dir, sweeps), "jobs": jobs}
        sweeps.append(same)
    elif same["jobs"] is None:
        same["jobs"] = jobs
    atomic_write_bytes(sweep_dir / SWEEP_FILE, json.dumps({"sweeps": sweeps}, indent=1).encode())
    _current.update(dir=sweep_dir, multirun=True, first_job=same["first_job"], jobs=jobs)
    return same["first_job"]


def next_job(sweep_dir: Path, sweeps: list[dict]) -> int:
    """The first free job number: after every recorded sweep's jobs and every numbered job dir."""
    numbers = [int(p.name) for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    ends = [s["first_job"] + s["jobs"] for s in sweeps if s.get("jobs") is not None]
    return max([0, *(n + 1 for n in numbers), *ends])


def owns_job(sweeps: list[dict] | None, job_num) -> bool:
    """Whether job number `job_num` belongs to one of the dir's recorded sweeps (all do where none is recorded)."""
    if sweeps is None:
        return True
    try:
        job_num = int(job_num)
    except (TypeError, ValueError):
        return False
    return any(s["first_job"] <= job_num and (s["jobs"] is None or job_num < s["first_job"] + s["jobs"])
               for s in sweeps)


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The dirs directly in `sweep_dir` that hold a job's rows (not deeper: a parent dir's other results)."""
    from runner.jobdir import ROWS_FILE

    return sorted(p for p in sweep_dir.iterdir() if (p / ROWS_FILE).is_file()) if sweep_dir.is_dir() else []


def points_done(run: dict) -> int:
    """Points of the current run or sweep whose rows are written (ok or failed)."""
    from runner.jobdir import ROWS_FILE

    if not run["multirun"]:
        return int((run["dir"] / ROWS_FILE).is_file())
    last = run["first_job"] + run["jobs"] if run["jobs"] is not None else None
    return sum(1 for d in job_dirs(run["dir"])
               if d.name.isdigit() and run["first_job"] <= int(d.name) and (last is None or int(d.name) < last))


def interrupted_line(argv: list[str]) -> str:
    """What Ctrl-C leaves: how far the run got, and the command that resumes it (same dir, same overrides)."""
    import shlex

    from runner.context import redact_text

    if not _current:
        return "interrupted before any point started; nothing was written"
    key = "hydra.sweep.dir" if _current["multirun"] else "hydra.run.dir"
    args = [redact_text(a) for a in argv]
    if not any(a.startswith(key + "=") for a in args):
        args.append(f"{key}={_current['dir'].resolve()}")
    total = _current["jobs"] if _current["jobs"] is not None else "?"
    return (f"interrupted: {points_done(_current)} of {total} point(s) done; resume with: python -m runner "
            + " ".join(shlex.quote(a) for a in args))
