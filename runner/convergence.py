"""How close each image is to a converged reference: PSNR and SSIM in pixel space, MSE in latent space.

Images are compared only with a reference of the same content: the same model, prompt(s), seed, guidance, size,
negative prompt, precision and img2img settings (every axis except scheduler and steps). By default the reference
is the image with the most steps of the reference scheduler in the rows themselves; `reference=` names a separate
run (a job dir, sweep dir or tree), e.g. ddim at 200 steps, whose most-steps image per content is then used;
`reference="auto"` uses converged references (runner.reference: DPM++ 2M at many steps, checked against its own
solution at half the steps, cached), and fills `ref_converged`, `ref_check_psnr` and `ref_tolerance_db`.
Every row gets `stochastic`: its sampler draws fresh noise, so compare it by distribution (runner.fid) instead.
"""

from pathlib import Path

from runner.columns import CONTENT_AXES, CONVERGENCE_COLUMNS

PREFERRED_REFERENCE = "ddim"  # deterministic and stable at high step counts


def content_axes(df) -> list[str]:
    return [a for a in CONTENT_AXES if a in df.columns]


def reference_scheduler(df) -> str | None:
    """The scheduler that reaches the most steps in these rows (ddim among equals, else the first by name)."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return None
    steps = ok.groupby("scheduler")["steps"].max()
    candidates = sorted(steps[steps == steps.max()].index)
    return PREFERRED_REFERENCE if PREFERRED_REFERENCE in candidates else candidates[0]


def reference_rows(df, scheduler: str | None):
    """One reference row per content key: the ok row of `scheduler` (any when None) with the most steps."""
    ok = df[df["status"] == "ok"]
    if scheduler is not None:
        ok = ok[ok["scheduler"] == scheduler]
    ok = ok.sort_values("steps", ascending=False, kind="stable")
    return ok.drop_duplicates(subset=content_axes(df))


def _key(row, axes) -> tuple:
    return tuple(str(row[a]) for a in axes)  # str: NaN and None compare equal, numbers and text never clash


def distances(image_path, ref_path, latent_path=None, ref_latent_path=None) -> dict:
    """PSNR (dB, inf when equal) and SSIM of two images; MSE of their latents when both were kept."""
    import numpy as np
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from runner.record import read_image

    a, b = read_image(image_path), read_image(ref_path)
    if a.shape != b.shape:
        return {}
    equal = np.array_equal(a, b)
    result = {"psnr_to_ref": float("inf") if equal else float(peak_signal_noise_ratio(b, a, data_range=255))}
    if min(a.shape[:2]) >= 7:  # SSIM's 7×7 window needs images of at least 7 pixels a side
        result["ssim_to_ref"] = float(structural_similarity(b, a, channel_axis=2, data_range=255))
    if _is_file(latent_path) and _is_file(ref_latent_path):
        la, lb = np.load(latent_path), np.load(ref_latent_path)
        if la.shape == lb.shape:
            result["latent_mse_to_ref"] = float(np.mean((la.astype(np.float64) - lb) ** 2))
    return result


def _is_file(path) -> bool:
    return isinstance(path, str) and bool(path) and Path(path).is_file()


def add_convergence(df, reference=None, scheduler: str | None = None, **auto):
    """`df` with the CONVERGENCE_COLUMNS filled for every ok row that has a reference (the reference itself gets
    PSNR inf, SSIM 1). `reference`: "auto" (converged references; `auto` are runner.reference.converged_references'
    cache, steps and tolerance_db) or a path to a separate reference run; `scheduler`: the reference scheduler."""
    from runner import results
    from runner.reference import is_stochastic

    df = df.drop(columns=[c for c in CONVERGENCE_COLUMNS if c in df.columns])
    if df.empty or "image_path" not in df:
        return df
    if str(reference) == "auto":
        from runner.reference import converged_references

        refs = converged_references(df, **auto)
    elif reference is not None:
        pool = results.load(reference)
        refs = reference_rows(pool, scheduler)
    else:
        refs = reference_rows(df, scheduler or reference_scheduler(df))
    axes = [a for a in content_axes(df) if a in refs.columns]
    by_key = {_key(r, axes): r for r in refs.to_dict("records")}
    filled = []
    for row in df.to_dict("records"):
        ref = by_key.get(_key(row, axes))
        values = {}
        if ref is not None and row.get("status") == "ok" and _is_file(row["image_path"]) and _is_file(ref["image_path"]):
            values = distances(row["image_path"], ref["image_path"], row.get("latent_path"), ref.get("latent_path"))
            if values:
                values.update(ref_scheduler=ref["scheduler"], ref_steps=ref["steps"],
                              **{c: ref.get(c) for c in ("ref_converged", "ref_check_psnr", "ref_tolerance_db")})
        filled.append(dict(values, stochastic=is_stochastic(row)))
    for column in CONVERGENCE_COLUMNS:
        df[column] = [values.get(column) for values in filled]
    return df
