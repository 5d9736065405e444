"""`dry_run=true`: what a run or sweep would make, and about how long it would take. Nothing loads or runs.

The estimate comes from earlier result rows (runner.results.load over `dry_run_results`, default `results/`)
of the same model, device and dtype: the median seconds per model evaluation (the rows' `nfe`; rows without it
count one per step) times each job's images and planned evaluations (`planned_nfe`: Heun-type samplers evaluate
about twice per step), plus the median seconds per image outside the loop (encode, decode, save), plus the median
load time once per model switch. Jobs flagged `time_includes_warmup` are left out of the rates when there are others. Jobs with no such history show "?".

A sweep's lines are printed as each job is checked (runner's sweeper hands over the configs one at a time), so a
sweep of 10,000 points starts answering at once and holds one config at a time.
"""

import sys

from omegaconf import DictConfig, OmegaConf, open_dict


def report_lines(jobs, configs, history_path, summary: dict):
    """The table's lines, one per job as its config comes, then the totals. `summary` gets "jobs" and "refused"."""
    from runner.spec import make_spec

    history = past_rows(history_path)
    yield f"dry run: {len(jobs)} job(s); nothing runs (estimates from {history_path})"
    yield f"{'#':>3}  {'images':>6}  {'steps':>5}  {'est_s':>8}  overrides"
    total_images, total_s, unknown, refused, previous_model = 0, 0.0, 0, 0, None
    model_files, known_rates = {}, {}  # what each model's files say, and its rates: the same for all its points
    for num, (overrides, cfg) in enumerate(zip(jobs, configs)):
        try:
            spec = make_spec(without_hydra(cfg), model_files)
        except Exception as err:  # as a run would refuse it: a line, and the next point
            refused += 1
            yield f"{num:>3}  {'-':>6}  {'-':>5}  {'-':>8}  {shown_overrides(overrides)}  error: {refusal(cfg, err)}"
            continue
        images = len(spec.prompts) * len(spec.seeds)
        rate_key = (spec.model, spec.device, spec.dtype)
        if rate_key not in known_rates:
            known_rates[rate_key] = rates(history, spec)
        per_eval, per_image, load = known_rates[rate_key]
        model = (spec.name_or_path, spec.dtype, spec.device)
        estimate = (None if per_eval is None else
                    images * (planned_nfe(spec) * per_eval + per_image) + (load if model != previous_model else 0))
        previous_model = model
        if "specs" in summary:  # hydra/launcher=fused: its batches are listed after the table (fused_lines)
            summary["specs"].append((num, spec, estimate))
        total_images += images
        if estimate is None:
            unknown += 1
        else:
            total_s += estimate
        shown = "?" if estimate is None else f"{estimate:.1f}"
        yield f"{num:>3}  {images:>6}  {spec.steps:>5}  {shown:>8}  {shown_overrides(overrides)}"
    summary.update(jobs=len(jobs), refused=refused)
    if len(jobs) == unknown + refused:
        yield (f"total: {total_images} image(s), time unknown (no earlier results of these models on this "
               f"device and dtype under {history_path})")
    else:
        note = f" ({unknown} job(s) with no earlier results of their model/device/dtype not counted)" if unknown else ""
        yield f"total: {total_images} image(s), about {total_s:.1f} s{note}"


def refusal(cfg: DictConfig, err: Exception) -> str:
    """What a run says when it refuses this config (runner.job)."""
    from omegaconf.errors import OmegaConfBaseException

    from runner.checks import ConfigError
    from runner.job import unresolved_message

    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, OmegaConfBaseException):
        return unresolved_message(cfg, err)
    return f"the config could not be checked ({type(err).__name__}: {err})"


def report(jobs: list[list[str]], configs: list[DictConfig], history_path) -> tuple[str, int]:
    """The whole table as text, and how many jobs the config check refused."""
    summary = {}
    text = "\n".join(report_lines(jobs, configs, history_path, summary))
    return text, summary["refused"]


def print_lines(jobs, configs, history_path, fused: bool = False) -> int:
    """Print the table line by line as the jobs are checked; returns how many the check refused (the caller then
    exits 2, after print_refused). `fused`: the sweep runs under hydra/launcher=fused: its batches follow."""
    summary = {"specs": []} if fused else {}
    for line in report_lines(jobs, configs, history_path, summary):
        print(line, flush=True)
    if fused:
        for line in fused_lines(summary["specs"], history_path):
            print(line, flush=True)
    print_refused(summary["refused"], summary["jobs"])
    return summary["refused"]


def fused_lines(specs: list, history_path):
    """The batches hydra/launcher=fused would draw (runner.fused: the points that pass the check and share a batch;
    what a resume would skip is not looked at), and the sweep's estimate with them: a batch at the rates of earlier
    fused rows of its model, device and dtype, or where there are none, as its points drawn alone."""
    from runner.fused import Point, group

    estimates = {num: estimate for num, _, estimate in specs}
    groups = group([Point(num, spec, "", "", num) for num, spec, _ in specs])
    in_batches = {p.index for batches in groups for batch in batches for p in batch}
    yield (f"fused: {sum(len(b) for b in groups)} batch(es) in {len(groups)} group(s) hold {len(in_batches)} of "
           f"{len(specs)} job(s); the others draw alone")
    history = past_rows(history_path)
    if history is not None and "fused_batch_size" in history:
        history = history[history["fused_batch_size"].notna()]
    total = sum(e for num, e in estimates.items() if num not in in_batches and e is not None)
    unknown = sum(1 for num, e in estimates.items() if num not in in_batches and e is None)
    previous_model = None
    for number, batches in enumerate(groups):
        for batch in batches:
            estimate, how = batch_estimate(batch, history, estimates)
            model = (batch[0].spec.name_or_path, batch[0].spec.dtype, batch[0].spec.device)
            if estimate is not None and how == FUSED_RATES and model != previous_model:
                estimate += rates(history, batch[0].spec)[2]  # its model's load, once per model switch
            previous_model = model
            total, unknown = (total + estimate, unknown) if estimate is not None else (total, unknown + len(batch))
            shown = "?" if estimate is None else f"{estimate:.1f}"
            yield (f"  group {number}: jobs {' '.join(str(p.index) for p in batch)}: "
                   f"{sum(p.images for p in batch)} image(s) in one batch, est_s {shown} ({how})")
    note = f" ({unknown} job(s) with no estimate not counted)" if unknown else ""
    yield f"total, fused: about {total:.1f} s{note}"


FUSED_RATES = "earlier fused rows"


def batch_estimate(batch, fused_history, estimates) -> tuple[float | None, str]:
    """(seconds, how) for one fused batch."""
    spec = batch[0].spec
    per_eval, per_image, _ = rates(fused_history if fused_history is not None and len(fused_history) else None, spec)
    if per_eval is not None:
        return sum(p.images * (planned_nfe(p.spec) * per_eval + per_image) for p in batch), FUSED_RATES
    alone = [estimates.get(p.index) for p in batch]
    return (None if None in alone else sum(alone)), "no earlier fused rows: as drawn alone"


refused_jobs: list[int] = []  # dry-run jobs refused in this process (a sweep launched job by job: its end exits 2)


def print_report(text: str, refused: int, jobs: int) -> None:
    """The table on stdout; where the check refuses points, one error line on stderr (the caller exits 2)."""
    print(text)
    print_refused(refused, jobs)
    if refused:
        refused_jobs.append(refused)


def print_refused(refused: int, jobs: int) -> None:
    if refused:
        print(f"error: {refused} of {jobs} job(s) would be refused by the config check (listed above); nothing ran",
              file=sys.stderr)


def shown_overrides(overrides: list[str]) -> str:
    from runner.context import redact_text

    return " ".join(redact_text(o) for o in overrides if not o.startswith("dry_run")) or "(defaults)"


def without_hydra(cfg: DictConfig) -> DictConfig:
    if "hydra" not in cfg:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def past_rows(path):
    """Earlier ok rows with timings, or None when there are none."""
    from runner import results

    try:
        df = results.load(path)
    except FileNotFoundError:
        return None
    needed = {"status", "time_total_s", "time_load_s", "images_per_s", "steps", "model", "device", "dtype"}
    if df.empty or not needed <= set(df.columns):
        return None
    df = df[(df["status"] == "ok") & (df["time_total_s"] > 0) & (df["images_per_s"] > 0)]
    return df if len(df) else None


def planned_nfe(spec) -> int:
    """The model evaluations per image that the job's loop will count (runner.sampling.Tally): one per timestep
    of its diffusers scheduler after set_timesteps (Heun's list holds 2 × steps - 1, PLMS's steps + 1), or for a
    k-diffusion sampler 2 × steps - 1 where it evaluates twice per step. No weights load: a scheduler is config."""
    from runner.schedulers import K_TWO_CALLS, build_scheduler

    if spec.scheduler_backend == "k-diffusion":
        return 2 * spec.steps - 1 if spec.k_sampler["sampler"] in K_TWO_CALLS else spec.steps
    try:
        from diffusers import DDPMScheduler

        from runner.sampling import img2img_start, set_schedule

        # load_config reads any scheduler's config file, whatever class it names
        config = DDPMScheduler.load_config(spec.name_or_path, subfolder="scheduler", revision=spec.revision)
        scheduler = build_scheduler(config, spec.scheduler_class, spec.scheduler_kwargs)
        set_schedule(scheduler, spec)
        start = img2img_start(spec.steps, spec.strength, scheduler.order) if spec.init_image else 0
        return len(scheduler.timesteps) - start
    except Exception:  # e.g. a flow model whose schedule needs the image size (mu): one per step
        return spec.steps


def rates(history, spec) -> tuple[float | None, float, float]:
    """(seconds per image per model evaluation, per image outside the loop, per model load) from rows like this
    spec's."""
    if history is None:
        return None, 0.0, 0.0
    same = history[(history["model"] == spec.model) & (history["device"] == spec.device) & (history["dtype"] == spec.dtype)]
    if same.empty:
        return None, 0.0, 0.0
    loads = same.loc[~same["model_cached"].astype(bool), "time_load_s"] if "model_cached" in same else same["time_load_s"]
    if "time_includes_warmup" in same and (~same["time_includes_warmup"].astype(bool)).any():
        same = same[~same["time_includes_warmup"].astype(bool)]  # first calls after a load are not typical
    images_in_job = same["images_per_s"] * same["time_total_s"]
    denoise = same["time_denoise_s"] if "time_denoise_s" in same else same["time_total_s"] - same["time_load_s"]
    evaluations = same["nfe"].fillna(same["steps"]) if "nfe" in same else same["steps"]  # older rows: per step
    per_eval = (denoise / images_in_job / evaluations).median()
    per_image = ((same["time_total_s"] - same["time_load_s"] - denoise) / images_in_job).median()  # encode, decode, save
    return float(per_eval), float(per_image), float(loads.median()) if len(loads) else 0.0


def single_run_report(cfg: DictConfig, overrides: list[str]) -> tuple[str, int]:
    """The dry run of a single (not -m) run."""
    return report([overrides], [cfg], OmegaConf.select(cfg, "dry_run_results", default="results"))
