"""`python -m runner.tools.backend_gap`: diffusers vs k-diffusion, same model, same seed (the README's table).

For each sampler A1111 names (DPM++ 2M Karras, Euler a, Heun) and step count, draws the same prompts and seeds with
the diffusers scheduler option and with the k-diffusion one, and reports the mean PSNR between the two images of
each prompt and seed. A third run gives the k-diffusion sampler the very sigmas the diffusers scheduler walked
(`schedule.sigmas=[...]`), which separates the sigma spacing from the rest (final step, timestep rounding, noise).

    python -m runner.tools.backend_gap                      # digits-sd, 10 prompts x 2 seeds, 10/20/50 steps
    python -m runner.tools.backend_gap --steps 10 --seeds 0 --out /tmp/gap

Prints a Markdown table; writes gap.json and the job dirs under --out (default: a temp dir).
"""

import argparse
import json
import tempfile
from pathlib import Path

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# name → (diffusers overrides, k-diffusion overrides): the same sampler and spacing as far as each backend has it
PAIRS = {
    "DPM++ 2M Karras": (("scheduler=dpmpp_2m", "schedule=karras"), ("scheduler=k_dpmpp_2m", "schedule=karras")),
    "Euler a": (("scheduler=euler_a",), ("scheduler=k_euler_a", "schedule=karras")),
    "Heun (Karras)": (("scheduler=heun", "schedule=karras"), ("scheduler=k_heun", "schedule=karras")),
}


def compose(*overrides):
    """The config `python -m runner OVERRIDES` composes."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from runner import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def draw(out: Path, model: str, overrides: tuple, steps: int, prompts: list[str], seeds: list[int]) -> list:
    """The images of one job (prompt-major, then seed), drawn through the runner as a sweep point would be."""
    from runner.context import standalone
    from runner.draw import draw as draw_job
    from runner.record import read_image
    from runner.spec import make_spec

    cfg = compose(f"model={model}", f"steps={steps}", f"prompt=[{','.join(prompts)}]", f"seed={seeds}",
                  "sampling.progress=false", "wandb.mode=disabled", *overrides)
    rows = draw_job(make_spec(cfg), out, standalone(cfg, out, " ".join(overrides)))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"{' '.join(overrides)}: {failed[0]['error']}")
    return [read_image(out / r["image_path"]) for r in rows]


def walked_sigmas(model: str, overrides: tuple, steps: int) -> list[float]:
    """The sigmas a diffusers option walks at `steps` (Heun's list repeats each inner sigma: once each here)."""
    import torch
    from diffusers import DDPMScheduler

    from runner.sampling import set_schedule
    from runner.schedulers import build_scheduler
    from runner.spec import make_spec

    spec = make_spec(compose(f"model={model}", f"steps={steps}", *overrides))
    config = DDPMScheduler.load_config(spec.name_or_path, subfolder="scheduler")
    scheduler = build_scheduler(config, spec.scheduler_class, spec.scheduler_kwargs)
    set_schedule(scheduler, spec)
    return [float(s) for s in torch.unique_consecutive(scheduler.sigmas.float())]


def mean_psnr(a: list, b: list) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    return float(sum(peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b)) / len(a))


def measure(out: Path, model: str, steps_list: list[int], prompts: list[str], seeds: list[int]) -> dict:
    results = {}
    for name, (theirs, ours) in PAIRS.items():
        for steps in steps_list:
            tag = f"{name.split()[0].lower().replace('+', 'p')}-{steps}"
            diffusers_images = draw(out / f"{tag}-diffusers", model, theirs, steps, prompts, seeds)
            k_images = draw(out / f"{tag}-k", model, ours, steps, prompts, seeds)
            sigmas = ",".join(f"{s:.9g}" for s in walked_sigmas(model, theirs, steps))
            k_same_sigmas = draw(out / f"{tag}-k-same-sigmas", model, (ours[0], f"schedule.sigmas=[{sigmas}]"), steps,
                                 prompts, seeds)
            results.setdefault(name, {})[steps] = {
                "psnr_db": mean_psnr(diffusers_images, k_images),
                "psnr_db_same_sigmas": mean_psnr(diffusers_images, k_same_sigmas)}
            print(f"{name}, {steps} steps: {results[name][steps]}", flush=True)
    return results


def table(results: dict, steps_list: list[int]) -> str:
    head = "| sampler (diffusers vs k-diffusion) | " + " | ".join(f"{s} steps" for s in steps_list) + " |"
    lines = [head, "|---" * (len(steps_list) + 1) + "|"]
    for name, by_steps in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{by_steps[s]['psnr_db']:.1f}" for s in steps_list) + " |")
        lines.append(f"| {name}, k-diffusion on diffusers' sigmas | "
                     + " | ".join(f"{by_steps[s]['psnr_db_same_sigmas']:.1f}" for s in steps_list) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-sd")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    prompts = [f"a handwritten digit {d}" for d in DIGITS]
    out = args.out or Path(tempfile.mkdtemp(prefix="backend_gap_"))
    results = measure(out, args.model, args.steps, prompts, args.seeds)
    (out / "gap.json").write_text(json.dumps(results, indent=1))
    print(table(results, args.steps))


if __name__ == "__main__":
    main()
