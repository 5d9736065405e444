"""Weights & Biases: one run per Hydra job, grouped by sweep, plus one sweep-summary run. The only module that
imports wandb (lazily), reads `cfg.wandb`, builds run ids and decides where runs are written. Logging never fails
a job: a W&B error is one warning line and the sweep goes on.

Dashboards group and filter on the flattened config (`scheduler.name`, `guidance`, ...); the sigma schedule is
logged against its own step metric (`schedule/step`) so that one line panel overlays every run of a group.

In a sweep whose jobs share a process (Hydra's basic launcher), a child process writes the W&B runs while the
next job draws, where sampling leaves a CPU core free for it; the sweep's end waits for it (`finish_background`).
"""

import contextlib
import errno
import hashlib
import logging
import netrc
import os
import queue
import sys
from pathlib import Path
from time import perf_counter

from runner.columns import ENVIRONMENT_COLUMNS, JOB_SUMMARY_PREFIXES, SCORE_COLUMNS, SUMMARY_COLUMNS
from runner.context import is_secret, redact_text

log = logging.getLogger("runner")

# As env.* run config keys (not the hostname: a run's page may be shared beyond the machine's users).
ENV_CONFIG_COLUMNS = (*(c for c in ENVIRONMENT_COLUMNS if c != "hostname"), "model_revision", "device", "dtype")
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"  # jobs run one by one in this process


def options_of(cfg) -> dict:
    """The `wandb` node of a composed config as plain values (disabled where a config has none)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.wandb, resolve=True) if "wandb" in cfg else {"mode": "disabled"}


def job_listener(cfg, context, device: str, in_background: bool | None = None):
    """The job's W&B run as a listener on its rows (runner.draw.draw), or None when W&B is disabled.

    `in_background` None: decided here. Jobs that share this process (an in-process sweep) hand their run to the
    logger process where sampling leaves a core free for it; elsewhere runs are written in line.
    """
    from omegaconf import OmegaConf

    options = options_of(cfg)
    if resolve_mode(options["mode"]) == "disabled":
        return None
    if in_background is None:
        in_background = in_process_sweep() and core_free_for_logging(device)
    config = OmegaConf.to_container(cfg, resolve=True)
    run_context = dict(context.columns(), wandb_run_id=run_id(context.job_dir, context.config_hash))

    def listener(rows: list[dict], schedule: list[dict]) -> float:
        start = perf_counter()
        call("log_job", options, config, rows, schedule, run_context, in_background=in_background)
        return perf_counter() - start

    return listener


def in_process_sweep() -> bool:
    """Whether this job is one of a multirun whose jobs run one after another in this process."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.launcher.get("_target_") == BASIC_LAUNCHER


def core_free_for_logging(device: str) -> bool:
    """Whether sampling leaves a CPU core idle for the logger process: on a GPU, or when torch's CPU threads are
    fewer than this process's cores. Where torch's threads take every core, a logger process beside them stalls
    them, and writing in line is no slower (README, Performance)."""
    import torch

    return device.startswith("cuda") or torch.get_num_threads() < len(os.sched_getaffinity(0))


def run_id(job_dir: str, config_hash: str) -> str:
    """A W&B run id fixed by the job's identity (its job dir and config hash): used with resume="allow".

    A job that SLURM requeues after preemption or timeout, or a sweep re-run into the same sweep dir, runs in the
    same job dir with the same config, so it gets the same id and its W&B run resumes instead of starting a twin.
    """
    return hashlib.sha256(f"{job_dir}\n{config_hash}".encode()).hexdigest()[:32]


def environment_config(rows: list[dict]) -> dict:
    """What the job ran on, as env.* config keys: dashboards can filter and group on versions and GPUs."""
    first = rows[0] if rows else {}
    return {f"env.{k}": first[k] for k in ENV_CONFIG_COLUMNS if k in first}


def mean_image_metrics(rows: list[dict]) -> dict:
    """The job's mean of each per-image score that was computed (None: not computed for this model)."""
    means = {}
    for name in SCORE_COLUMNS:
        values = [r[name] for r in rows if r.get(name) is not None]
        if values:
            means[name] = sum(values) / len(values)
    return means


def resolve_mode(mode: str) -> str:
    """`auto`: WANDB_MODE if set; else online when credentials are configured (env or netrc), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return {"dryrun": "offline", "run": "online"}.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
    return "online" if has_credentials() else "offline"


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested plain config → {"scheduler.name": "unipc", ...}, with secret-looking keys left out."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if is_secret(key):  # left out, not even as ***
            continue
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def scrub(text: str) -> str:
    """Command-line arguments as W&B would record them, without any secret-looking `key=value`."""
    return redact_text(text)


def _settings(wandb, timeout_s: float):
    # No system metrics sampler, git/code capture or console mirroring: light, and nothing private leaves the job.
    # No pip freeze either: reading every installed package's metadata was most of an init (README, W&B);
    # the versions that matter go into the run's config as env.* (ENV_CONFIG_COLUMNS).
    return wandb.Settings(init_timeout=timeout_s, x_disable_meta=True, x_disable_stats=True, disable_git=True,
                          disable_code=True, save_code=False, console="off", silent=True, x_save_requirements=False)


def no_usage_analytics() -> None:
    """W&B's SDK sends its own usage analytics (OpenTelemetry) to the server from threads that a process waits for
    at exit: where the server accepts connections and never answers, that was a probe and a flush of 10 s each
    after an online init had already fallen back to offline. Like the system metrics above, off: the runs carry
    what the runner logs. The switch is in a W&B module that is not public API; without it, only the wait comes
    back. (W&B's service process posts once more on its own, and gives up after 2 s.)"""
    try:
        from wandb.analytics.opentelemetry.opentelemetry_proxy import disable
    except ImportError:
        return
    disable()


def init_run(options: dict, **kwargs):
    """wandb.init that never prompts and never hangs: online failures fall back to offline with one warning."""
    import wandb

    mode = resolve_mode(options.get("mode", "auto"))
    if mode == "disabled":
        return None
    sys.argv[:] = [scrub(a) for a in sys.argv]  # W&B copies sys.argv into its metadata
    if os.environ.get("WANDB_MODE") == "":
        del os.environ["WANDB_MODE"]  # wandb refuses an empty mode
    # Tables' media are staged in W&B's data dir: keep them with the offline runs, so syncing the dir loses nothing
    os.environ.setdefault("WANDB_DATA_DIR", str(Path(kwargs["dir"]) / "wandb" / "data"))
    no_usage_analytics()
    common = dict(project=options.get("project"), entity=options.get("entity"), reinit="finish_previous",
                  settings=_settings(wandb, float(options.get("init_timeout_s", 30))), **kwargs)
    try:
        return wandb.init(mode=mode, **common)
    except Exception as err:
        if mode != "online":
            raise
        log.warning(f"W&B: online init failed ({type(err).__name__}); logging offline instead (upload with `wandb sync`)")
        wandb.teardown()  # the failed attempt still holds the run id in W&B's service process
        return wandb.init(mode="offline", **common)


def log_job(options: dict, config: dict, rows: list[dict], schedule: list[dict], context: dict) -> float:
    """One W&B run for one job: config, images, the sigma schedule, timings and the rows. Returns seconds spent.
    Once the run is finished, the job dir gets a marker (RUN_MARKER) with its id; a run that failed half-way is
    removed, so that nothing half-written is ever synced, and a resume writes it again (write_missing_run)."""
    start = perf_counter()
    if _stopped:
        return 0.0
    runs_before = offline_runs(context)
    try:
        with logging_errors_quiet():
            if write_job_run(options, config, rows, schedule, context, start):
                from runner.record import atomic_write_bytes

                atomic_write_bytes(Path(context["job_dir"]) / RUN_MARKER, context.get("wandb_run_id", "").encode())
    except Exception as err:
        remove_new_runs(context, runs_before)
        failed(err, "could not log this job", "its rows and images are on disk")
    return perf_counter() - start


def write_job_run(options: dict, config: dict, rows: list[dict], schedule: list[dict], context: dict, start) -> bool:
    import wandb

    job_dir = Path(context["job_dir"])
    first = rows[0] if rows else {}
    run = init_run(options, dir=str(wandb_dir(context)), group=group_name(context), name=context["name"],
                   job_type="job", tags=[*(options.get("tags") or []), first.get("model"), first.get("scheduler")],
                   config=dict(flatten(config), **environment_config(rows)), id=context.get("wandb_run_id"),
                   resume="allow" if context.get("wandb_run_id") else None)
    if run is None:
        return False
    run.define_metric("schedule/step")
    run.define_metric("schedule/*", step_metric="schedule/step")
    for point in schedule:
        record = {"schedule/step": point["step"], "schedule/sigma": point["sigma"], "schedule/timestep": point["timestep"]}
        if point.get("log_snr") is not None:  # VP and flow schedules on one axis (-inf: pure noise)
            record["schedule/log_snr"] = point["log_snr"]
        run.log(record)
    ok = [r for r in rows if r["status"] == "ok"]
    # wandb.Image from the PNG we already wrote: no second encode on the hot path
    images = [wandb.Image(str(job_dir / r["image_path"]), caption=caption(r)) for r in ok]
    payload = {"schedule_table": wandb.Table(columns=["step", "timestep", "sigma", "log_snr"],
                                             data=[[p["step"], p["timestep"], p["sigma"], p.get("log_snr")]
                                                   for p in schedule]),
               "rows": rows_table(wandb, rows)}
    if images:
        payload["images"] = images
    run.log(payload)
    run.summary.update({k: v for k, v in first.items()  # NaN: not measured here (CUDA memory on CPU)
                        if k.startswith(JOB_SUMMARY_PREFIXES) and v == v})
    failed_rows = [r for r in rows if r["status"] != "ok"]
    run.summary.update({"status": "failed" if failed_rows else "ok", "images": len(ok)})
    if failed_rows:
        run.summary["error"] = failed_rows[0]["error"]
    run.summary.update(mean_image_metrics(ok))
    run.summary["time_log_s"] = (perf_counter() - start) / max(len(rows), 1)  # this run's own cost, per image
    run.finish()
    return True


RUN_MARKER = ".wandb_run"  # in a job dir: the id of its finished W&B run
_stopped = False  # set when the disk is full: no more runs from this process (one warning, not one per job)


def failed(err: Exception, what: str, still: str) -> None:
    """One warning line; on a full disk, also stop W&B for the rest of this process."""
    global _stopped
    if disk_full(err):
        _stopped = True
        drop_wandb_log_files()
        log.warning(f"W&B: the disk is full ({err}); no more W&B runs from this sweep, {still}; resume the sweep "
                    "once there is space, and it writes the missing runs")
    else:
        log.warning(f"W&B: {what} ({type(err).__name__}: {err}); {still}")


def disk_full(err: BaseException | None) -> bool:
    while err is not None:
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def drop_wandb_log_files() -> None:
    """W&B's own debug-log handlers write beside the runs, and its background threads go on logging after a run
    failed: on a full disk each record was another 'Logging error' traceback. They are closed."""
    for name in ("wandb", ""):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)
                        and "wandb" in Path(h.baseFilename).parts]:
            logger.removeHandler(handler)
            try:
                handler.close()
            except OSError:
                pass


@contextlib.contextmanager
def logging_errors_quiet():
    """W&B writes its own debug logs beside the runs; on a full disk each of its log records printed a 'Logging
    error' traceback. Its failure is reported once, by us."""
    previous = logging.raiseExceptions
    logging.raiseExceptions = False
    try:
        yield
    finally:
        logging.raiseExceptions = previous


def offline_runs(context: dict) -> set[Path]:
    """This job's offline run dirs (W&B names them offline-run-<time>-<run id>)."""
    return set((wandb_dir(context) / "wandb").glob(f"offline-run-*-{context.get('wandb_run_id') or '*'}"))


def remove_new_runs(context: dict, before: set[Path]) -> None:
    """The offline run dirs a failed attempt left half-written: gone, so that `wandb sync` never uploads them."""
    import shutil

    try:
        import wandb

        if wandb.run is not None:
            wandb.run.finish(exit_code=1, quiet=True)
    except Exception:
        pass  # the disk that failed the run may fail its finish too
    for run_dir in offline_runs(context) - before:
        shutil.rmtree(run_dir, ignore_errors=True)


def write_missing_run(cfg, context, job_dir: Path) -> None:
    """A finished job that a resumed sweep skips, whose W&B run was never written (the sweep was killed before its
    logger wrote it, W&B was off, or the disk was full): write it now, from the rows and schedule on disk."""
    import pandas as pd

    from runner.jobdir import ROWS_FILE, SCHEDULE_FILE

    if resolve_mode(options_of(cfg)["mode"]) == "disabled":
        return
    marker = Path(job_dir) / RUN_MARKER
    if marker.is_file() and marker.read_text().strip() == run_id(context.job_dir, context.config_hash):
        return
    rows = pd.read_parquet(Path(job_dir) / ROWS_FILE).to_dict("records")
    schedule_file = Path(job_dir) / SCHEDULE_FILE
    schedule = pd.read_csv(schedule_file).to_dict("records") if schedule_file.is_file() else []
    log.info("  W&B: writing this job's run, which an earlier run of the sweep never wrote")
    job_listener(cfg, context, str(rows[0].get("device") or "cpu"))(rows, schedule)


def log_sweep(options: dict, sweep_dir: Path, df, grid_path: Path | None) -> None:
    """The sweep-summary run: the whole results table with an image column, and the labelled grid."""
    if _stopped:
        return
    with logging_errors_quiet():
        write_sweep_run(options, sweep_dir, df, grid_path)


def write_sweep_run(options: dict, sweep_dir: Path, df, grid_path: Path | None) -> None:
    try:
        import wandb

        context = {"sweep_dir": str(sweep_dir), "job_dir": str(sweep_dir)}
        run = init_run(options, dir=str(wandb_dir(context)), group=group_name(context), name="sweep-summary",
                       job_type="sweep-summary", tags=list(options.get("tags") or []))
        if run is None:
            return
        table = rows_table(wandb, df.to_dict("records"), with_images=True)
        payload = {"results": table}
        if grid_path is not None:
            payload["grid"] = wandb.Image(str(grid_path), caption=grid_path.stem)
        run.log(payload)
        run.summary.update({"images_ok": int((df["status"] == "ok").sum()), "images_failed": int((df["status"] != "ok").sum())})
        run.finish()
    except Exception as err:
        failed(err, "could not log the sweep summary", "the sweep's table is on disk")


def wandb_dir(context: dict) -> Path:
    """Offline runs live inside the sweep dir (or the single run's dir): `wandb sync <that>/wandb/offline-run-*`."""
    return Path(context["sweep_dir"] or context["job_dir"])


def group_name(context: dict) -> str:
    return Path(context["sweep_dir"] or context["job_dir"]).name


def caption(row: dict) -> str:
    return (f"seed={row['seed']} scheduler={row['scheduler']} steps={row['steps']} guidance={row['guidance']} "
            f"prompt={row['prompt']!r}")


def rows_table(wandb, rows: list[dict], with_images: bool = False):
    columns = [c for c in SUMMARY_COLUMNS if rows and c in rows[0]]
    data = []
    for row in rows:
        values = [row.get(c) for c in columns]
        if with_images:
            path = row.get("image_path")
            values.append(wandb.Image(path) if row.get("status") == "ok" and path and Path(path).is_file() else None)
        data.append(values)
    return wandb.Table(columns=columns + (["image"] if with_images else []), data=data)


# --------------------------------------------------------------------------- in a process of its own

CALLS = {"log_job": log_job, "log_sweep": log_sweep}
READY = "ready"  # the logger process's first message: it holds the queues
_background = None  # this process's LoggerProcess, started by the first call(..., in_background=True)


class LoggerProcess:
    """A child process that makes the W&B calls it is sent, one after another.

    A job's W&B run is tens of milliseconds of Python (init, about 20 records, finish). In line, the next job waits
    for it; in a thread it competes with the sampling loop for the GIL. In a process of its own it runs on a core
    that sampling leaves idle: on a GPU machine always, on CPU when torch has fewer threads than there are cores. Where torch's threads take every core it
    is no better than in line, so it is not used there (core_free_for_logging).
    """

    def __init__(self):
        import atexit
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
        self.calls, self.done = context.Queue(), context.Queue()
        self.process = context.Process(target=serve, args=(self.calls, self.done), name="runner-wandb", daemon=True)
        with sigint_ignored():  # Ctrl-C is the sweep's to handle: the child starts ignoring it (while it imports)
            self.process.start()
        self.pending, self.left, self.ready = 0, False, False
        atexit.register(self.close)  # a sweep that ends without its callback still gets its runs finished

    def submit(self, name: str, *args) -> None:
        self.calls.put((name, args))
        self.pending += 1

    def wait(self) -> None:
        """Until every call sent so far has been made."""
        while self.pending:
            try:
                self.count(self.done.get(timeout=1.0))
            except queue.Empty:
                if not self.process.is_alive():
                    log.warning(f"W&B: the logger process died; {self.pending} call(s) not made (rows are on disk)")
                    self.pending = 0

    def count(self, message: str) -> None:
        if message == READY:
            self.ready = True
        else:
            self.pending -= 1

    def started(self) -> bool:
        """Whether the child has opened the queues (it says so first thing)."""
        while not self.ready:
            try:
                self.count(self.done.get_nowait())
            except queue.Empty:
                return False
        return True

    def close(self) -> None:
        """Wait for every call sent so far, then stop the process (unless left to finish on its own)."""
        if self.left:
            return
        self.wait()
        if self.process.is_alive():
            self.calls.put(None)
            self.process.join(timeout=30)


@contextlib.contextmanager
def sigint_ignored():
    """SIGINT ignored in this process meanwhile, so that a child started now inherits the ignoring (a terminal's
    Ctrl-C reaches the whole process group; Python keeps an inherited SIG_IGN)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def serve(calls, done) -> None:
    """The child's loop: one W&B call at a time, until None, or until the sweep's process is gone (killed, so no
    None will come). Ctrl-C is the sweep's to handle, not ours."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.raiseExceptions = False  # this process only writes W&B runs: a log it cannot write is not news
    done.put(READY)
    logging.basicConfig(format="[%(asctime)s][runner][%(levelname)s] - %(message)s", level=logging.INFO)
    parent = os.getppid()
    while True:
        try:
            call = calls.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if call is None:
            return
        name, args = call
        try:
            CALLS[name](*args)
        except Exception as err:  # each call already turns W&B errors into warnings; this is the last net
            log.warning(f"W&B: {name} failed ({type(err).__name__}: {err})")
        finally:
            done.put(name)


def call(name: str, *args, in_background: bool) -> None:
    """Make a W&B call (log_job or log_sweep), in line or in this process's logger process (started on first
    use; in line if it cannot start)."""
    global _background
    if not in_background:
        CALLS[name](*args)
        return
    if _background is None:
        try:
            _background = LoggerProcess()
        except Exception as err:
            log.warning(f"W&B: no logger process ({type(err).__name__}: {err}); logging in line")
            CALLS[name](*args)
            return
        log.info(f"  W&B: runs are written by a logger process (pid {_background.process.pid}) beside the sampling")
    _background.submit(name, *args)


def leave_background() -> None:
    """On Ctrl-C, before the sweep's process exits at once: the logger process writes the runs already handed to
    it, then stops on its own (a run it never got is written when the sweep is resumed). The queues' named
    semaphores are unlinked now (the child keeps its open handles), or multiprocessing's resource tracker would
    warn about them when this process is gone."""
    if _background is None:
        return
    from multiprocessing import resource_tracker

    import _multiprocessing

    _background.left = True
    if _background.started():
        # Runs handed over are in the pipe before this process exits (the child then writes them, and stops once
        # it finds its parent gone). This runs in a signal handler: if Ctrl-C interrupted this very thread inside
        # the queue's lock, taking it again would never return, and those runs wait for the resume instead.
        lock = _background.calls._notempty
        if lock.acquire(blocking=False):
            lock.release()
            _background.calls.close()
            _background.calls.join_thread()
    else:  # still starting: it holds no run yet, and would not find the queues once unlinked
        _background.process.kill()
        _background.process.join()
    for channel in (_background.calls, _background.done):
        for lock in (channel._rlock, channel._wlock, channel._sem):
            name = getattr(getattr(lock, "_semlock", None), "name", None)
            if name:
                resource_tracker.unregister(name, "semaphore")
                _multiprocessing.sem_unlink(name)


def background_running() -> bool:
    return _background is not None


def sweep_finished(config, sweep_dir: Path, df, grid_path: Path | None) -> None:
    """The sweep-summary run, unless W&B is disabled; where a logger process wrote the jobs' runs, it writes this
    one too (W&B's service is already up there)."""
    options = options_of(config)
    if resolve_mode(options["mode"]) != "disabled":
        call("log_sweep", options, sweep_dir, df, grid_path, in_background=background_running())


def wait_background() -> None:
    """Until the logger process has made every call sent to it."""
    if _background is not None:
        _background.wait()


def finish_background() -> None:
    """Wait for the logger process's calls, then stop it."""
    global _background
    if _background is not None:
        _background.close()
        _background = None
