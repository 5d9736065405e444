"""What a sweep needs from Hydra's launchers beyond their own settings (conf/hydra/launcher/*.yaml).

- `gpus`: the joblib launcher runs jobs in reusable worker processes. Each worker pins itself to one visible GPU
  for its whole life (CUDA_VISIBLE_DEVICES, set before torch initialises CUDA in it), so the model it loaded stays
  cached for its next jobs. A worker claims the first free GPU by holding an exclusive lock on that GPU's lock
  file; the OS drops the lock when the worker exits, so a replaced worker takes the freed GPU. A worker exits when
  the sweep's process is gone (killed with SIGKILL, its workers lived on, drawing, each holding its GPU).
"""

import hashlib
import os
import tempfile
from pathlib import Path

WORKER_LAUNCHERS = ("gpus", "joblib")  # hydra/launcher options whose jobs run in reusable joblib worker processes
CPU_WORKERS = 2  # `hydra/launcher=gpus` on a machine without GPU: this many processes

_pinned: dict = {}  # this process's claim: {"gpu": id, "lock": open file}, kept for the process's life


def visible_gpus() -> list[str]:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else every GPU the driver shows."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]  # counted through NVML: CUDA stays uninitialised


def default_workers() -> int:
    """`n_jobs` of `hydra/launcher=gpus`: one worker per visible GPU, or CPU_WORKERS processes without GPU."""
    return len(visible_gpus()) or CPU_WORKERS


def pin_worker_gpu(launcher_option: str | None) -> str | None:
    """In a joblib worker (`launcher_option`: the hydra/launcher choice), claim one GPU for this process (once) and
    return its id; None elsewhere or on CPU. The worker also starts watching for its parent's death
    (exit_with_parent)."""
    if launcher_option not in WORKER_LAUNCHERS:
        return None
    exit_with_parent()
    progress_bars_without_semaphores()
    if "gpu" not in _pinned:
        gpus = visible_gpus()
        if not gpus:
            return None
        _pinned.update(claim_gpu(gpus, lock_dir(gpus)))
        os.environ["CUDA_VISIBLE_DEVICES"] = _pinned["gpu"]
    return _pinned["gpu"]


def lock_dir(gpus: list[str]) -> Path:
    """Shared by the workers of one launcher (one parent process) and the same GPU list."""
    tag = hashlib.sha256(",".join(gpus).encode()).hexdigest()[:8]
    path = Path(tempfile.gettempdir()) / f"runner-gpu-locks-{os.getppid()}-{tag}"
    path.mkdir(exist_ok=True)
    return path


def claim_gpu(gpus: list[str], locks: Path) -> dict:
    """The first GPU no other live worker holds; more workers than GPUs share them (picked by pid)."""
    import fcntl

    for gpu in gpus:
        handle = open(locks / f"gpu-{gpu}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return {"gpu": gpu, "lock": handle}
        except BlockingIOError:
            handle.close()
    return {"gpu": gpus[os.getpid() % len(gpus)], "lock": None}


PARENT_CHECK_S = 1.0
SWEEP_PID_ENV = "RUNNER_SWEEP_PID"  # set by runner.callbacks when a multirun starts, inherited by its workers
_watching: list = []  # this worker's watchdog thread, once started


def exit_with_parent() -> None:
    """Exit this worker process when the process that started it is gone: loky workers otherwise outlive a sweep
    killed with SIGKILL. A daemon thread notices the worker was handed to another parent (init or a subreaper).
    (Not prctl's PR_SET_PDEATHSIG: it fires when the *thread* that started the worker ends, and loky starts
    replacement workers from its own manager thread.)"""
    import threading
    import time

    if _watching:
        return
    # the sweep's pid as it set it before starting workers: a parent killed before this worker's first job counts
    parent = int(os.environ.get(SWEEP_PID_ENV) or os.getppid())

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)  # nothing to save: every file a job writes is renamed into place whole

    _watching.append(threading.Thread(target=watch, name="runner-exit-with-parent", daemon=True))
    _watching[0].start()


def progress_bars_without_semaphores() -> None:
    """tqdm guards its bars with a multiprocessing lock, a named semaphore; a worker that is killed (Ctrl-C, its
    parent gone) leaves it behind, and multiprocessing's resource tracker warns about it. A worker's bars are its
    own: a thread lock is enough."""
    import threading

    from tqdm.auto import tqdm

    tqdm.set_lock(threading.RLock())
