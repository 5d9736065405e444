"""Converged references: each image's content solved again at many steps by a high-order deterministic solver.

    python -m runner.reference SWEEP [SWEEP ...] [--steps 250] [--tolerance 40] [--cache results/references]

A reference drawn by one of the compared samplers favours that sampler's own discretisation (its final sigma, its
spacing). Here the same content (model, prompt, negative prompt, seed, guidance, size, precision, img2img
settings: runner.columns.CONTENT_AXES) is solved by DPM-Solver++(2M) (its flow-matching form for flow models) at
`reference_steps` steps (conf/config.yaml), from the model's largest noise level to zero: "trailing" timestep spacing, which starts at
the last training timestep whatever the step count (the models' own "leading" spacing starts lower the fewer the
steps, so its solutions move with N). The check solves it again at half the steps: a second-order solver whose
N/2-step solution is within `reference_tolerance_db` dB PSNR of its N-step one is, at N, about four times closer still
(+12 dB). Every row records the check's PSNR, the tolerance and the outcome (`ref_converged`). (Two different
multistep solvers on the same timesteps are a weak check: they make nearly the same error, see the README.)

The references are ordinary job dirs, cached under `<cache>/<content key>/<solver>-<steps>-<option hash>/<n>/` and found again
by (prompt, seed), so every later sweep of the same content reuses them. The key hashes the job's resolved config
less what a reference replaces or what cannot change an image (scheduler, steps, seeds, prompts, batch size,
metrics, logging), with the model named by its revision or local fingerprint rather than its path.

Stochastic samplers (ddpm, euler_a, *_sde, DDIM with eta > 0) draw another valid image for the same seed: their
distance to the reference says little. `stochastic` marks their rows; compare them by distribution (runner.fid).
"""

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from runner.columns import CONTENT_AXES

log = logging.getLogger("runner")

# The reference solver by kind of model (flow matching or not), and its kwargs over the option's.
SOLVERS = {False: ("dpmpp_2m", {"timestep_spacing": "trailing"}), True: ("flow_dpmpp_2m", {})}
NOT_CONTENT = ("scheduler", "steps", "seed", "prompt", "wandb", "dry_run", "dry_run_results", "optimize")
STOCHASTIC_CLASSES = ("DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler")


def defaults() -> dict:
    """reference_steps, reference_tolerance_db (the PSNR the N/2- and N-step solutions must reach) and
    reference_cache, as conf/config.yaml gives them to the sweep callback (hydra.callbacks.sweep_results)."""
    from omegaconf import OmegaConf

    from runner import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").hydra.callbacks.sweep_results)


def is_stochastic(row: dict) -> bool:
    """Whether a row's sampler draws fresh noise at its steps (so one seed has no single right image)."""
    config = json.loads(row["config"]) if isinstance(row.get("config"), str) and row["config"] else {}
    kwargs = (config.get("scheduler") or {}).get("kwargs") or {}
    eta = (config.get("sampling") or {}).get("eta") or 0
    class_name = row.get("scheduler_class") or ""
    return (class_name in STOCHASTIC_CLASSES or "sde" in str(kwargs.get("algorithm_type", ""))
            or bool(kwargs.get("stochastic_sampling")) or (class_name == "DDIMScheduler" and eta > 0)
            or str(row.get("scheduler", "")).endswith(("_a", "_sde")))


def scheduler_option(name: str) -> dict:
    """conf/scheduler/<name>.yaml as Hydra composes it (its kwargs over scheduler_kwargs/common.yaml)."""
    from omegaconf import OmegaConf

    from runner import CONF_DIR

    option = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "scheduler" / f"{name}.yaml"))
    option.pop("defaults", None)
    common = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "scheduler_kwargs" / "common.yaml"))
    return dict(option, kwargs={**common, **(option.get("kwargs") or {})})


def content_config(row: dict) -> dict:
    """The row's resolved job config less what a reference replaces or what cannot change an image."""
    config = {k: v for k, v in json.loads(row["config"]).items() if k not in NOT_CONTENT}
    config["sampling"] = {k: v for k, v in config.get("sampling", {}).items() if k not in ("progress", "batch_size")}
    config["model"] = {k: v for k, v in config["model"].items() if k not in ("metric", "clip_model")}
    return config


def content_key(config: dict, model_revision) -> str:
    """The cache key of a content: its config, with the model named by revision (not by where it lies)."""
    keyed = dict(config, model=dict(config["model"], name_or_path=model_revision or config["model"]["name_or_path"]))
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_rows(pool: Path) -> dict:
    """{(prompt, seed): row} of the ok images already drawn under `pool`."""
    from runner import results

    if not pool.is_dir() or not any(pool.rglob("rows.parquet")):
        return {}
    df = results.load(pool)
    return {(r["prompt"], int(r["seed"])): r for r in df[df["status"] == "ok"].to_dict("records")}


def draw_into(pool: Path, config: dict, scheduler: dict, steps: int, pairs: list) -> None:
    """Draw the (prompt, seed) pairs with `scheduler` (a config node) at `steps` into new job dirs under `pool`, one
    job per prompt."""
    from omegaconf import OmegaConf

    from runner.context import standalone
    from runner.draw import draw
    from runner.spec import make_spec

    prompts = sorted({p for p, _ in pairs})
    for prompt in prompts:
        seeds = sorted(s for p, s in pairs if p == prompt)
        job_dir = pool / str(len([d for d in pool.iterdir() if d.is_dir()]) if pool.is_dir() else 0)
        cfg = OmegaConf.create(dict(config, scheduler=scheduler, steps=steps, seed=seeds,
                                    prompt=[prompt], sampling=dict(config["sampling"], progress=False, batch_size=16),
                                    wandb=dict(mode="disabled"), dry_run=False))
        name = scheduler["name"]
        rows = draw(make_spec(cfg), job_dir, standalone(cfg, job_dir, f"reference {name} steps={steps}"))
        failed = [r["error"] for r in rows if r["status"] != "ok"]
        if failed:
            raise RuntimeError(f"reference {name} at {steps} steps failed: {failed[0]}")


def solved(cache: Path, key: str, config: dict, flow: bool, steps: int, pairs: set) -> dict:
    """{(prompt, seed): row} of the reference solver at `steps` for every pair, drawing the ones not cached yet."""
    name, kwargs = SOLVERS[flow]
    option = scheduler_option(name)
    scheduler = dict(option, kwargs={**option["kwargs"], **kwargs})
    tag = hashlib.sha256(json.dumps(scheduler, sort_keys=True).encode()).hexdigest()[:8]
    pool = Path(cache) / key / f"{name}-{steps}-{tag}"  # the tag: a changed solver option never reuses old images
    found = cached_rows(pool)
    missing = sorted(pairs - set(found))
    if missing:
        log.info(f"reference: drawing {len(missing)} image(s) with {name} at {steps} steps → {pool}")
        draw_into(pool, config, scheduler, steps, missing)
        found = cached_rows(pool)
    return {pair: found[pair] for pair in pairs}


def converged_references(df, cache=None, steps: int | None = None, tolerance_db: float | None = None):
    """One reference row per content of `df`'s ok rows (with the CONTENT_AXES columns), drawn or found in `cache`,
    each with `ref_check_psnr` (dB between the solutions at `steps` // 2 and `steps`), `ref_tolerance_db` and
    `ref_converged`. None: the value conf/config.yaml gives the sweep callback (`defaults()`)."""
    import pandas as pd

    cache = Path(cache or defaults()["reference_cache"])
    steps = steps or defaults()["reference_steps"]
    tolerance_db = defaults()["reference_tolerance_db"] if tolerance_db is None else tolerance_db

    from runner.convergence import distances
    from runner.families import by_name

    ok = df[(df["status"] == "ok") & df["config"].astype(bool)]
    groups = {}
    for row in ok.to_dict("records"):
        config = content_config(row)
        key = content_key(config, row.get("model_revision"))
        group = groups.setdefault(key, dict(config=config, flow=by_name(row["family"]).flow, pairs=set()))
        group["pairs"].add((row["prompt"], int(row["seed"])))
    out = []
    for key, group in groups.items():
        references = solved(cache, key, group["config"], group["flow"], steps, group["pairs"])
        checks = solved(cache, key, group["config"], group["flow"], steps // 2, group["pairs"])
        for pair, ref in references.items():
            agreement = distances(checks[pair]["image_path"], ref["image_path"]).get("psnr_to_ref")
            out.append(dict({a: ref.get(a) for a in CONTENT_AXES if a in ref}, scheduler=ref["scheduler"],
                            steps=ref["steps"], status="ok", image_path=ref["image_path"],
                            latent_path=ref.get("latent_path"), ref_check_psnr=agreement,
                            ref_tolerance_db=tolerance_db,
                            ref_converged=None if agreement is None else bool(agreement >= tolerance_db)))
    return pd.DataFrame(out)


def main(argv=None) -> int:
    from runner import results

    parser = argparse.ArgumentParser(prog="python -m runner.reference", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep dirs, job dirs or results trees")
    preset = defaults()
    parser.add_argument("--steps", type=int, default=preset["reference_steps"],
                        help="steps of the reference (the check: half)")
    parser.add_argument("--tolerance", type=float, default=preset["reference_tolerance_db"],
                        help="PSNR (dB) the two must reach")
    parser.add_argument("--cache", type=Path, default=Path(preset["reference_cache"]),
                        help="where references are kept and found")
    args = parser.parse_args(argv)
    for path in args.paths:
        if not path.exists():
            print(f"error: path={str(path)!r} is not allowed: an existing sweep dir, job dir or results tree",
                  file=sys.stderr)
            return 2
    if args.steps < 2:
        print(f"error: steps={args.steps} is not allowed: an integer >= 2", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    refs = converged_references(results.load(*args.paths), args.cache, args.steps, args.tolerance)
    if refs.empty:
        print("no ok rows: nothing to solve")
        return 0
    psnr = refs["ref_check_psnr"].astype(float)
    print(f"{len(refs)} reference image(s) at {args.steps} steps in {args.cache}: {int(refs['ref_converged'].sum())} "
          f"converged ({args.steps // 2} and {args.steps} steps within {args.tolerance} dB); check PSNR min {psnr.min():.1f}, "
          f"median {psnr.median():.1f} dB")
    return 0 if refs["ref_converged"].all() else 1


if __name__ == "__main__":
    sys.exit(main())
