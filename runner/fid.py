"""Distribution metrics per cell: FID and KID between a cell's images and real images, through torchmetrics.

A sampler that draws one image per seed is judged against one reference image (runner.convergence); a stochastic
sampler (ddpm, euler_a, *_sde) draws a different but equally valid image, so it is judged by whether its images,
together, look like the real ones. FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) compare the two sets in
a feature space:

- `digits` (the embedded digit models): the shipped digit classifier's penultimate layer (64 features), on the
  classifier's own input (grey, 8×8). The real set is scikit-learn's held-out digit split
  (`runner.digits.load_digit_split`, never used to train any model), rendered at the images' size and put through
  the same preprocessing; when every prompt of a cell names a digit, only real digits of those classes count.
- `clip`: CLIP image embeddings of `clip_model` (local weights only), against a directory of real images.
- `inception`: torchmetrics' standard Inception FID needs torch-fidelity, which needs torchvision (that breaks a
  CPU-only torch here): refused with one line unless both import.

torchmetrics computes both distances (`FrechetInceptionDistance` and `KernelInceptionDistance` with a custom
feature `nn.Module`); the feature network runs once per image, and the metrics are given its vectors.
FID is biased at small n (here: fewer images than 64 features), so cells of fewer than `min_images` images are
skipped, and comparisons should use KID (unbiased) and its spread: `kid_digits_std` is the standard deviation of KID
over 100 random subsets of half the cell's images (torchmetrics' estimate; wider than the whole cell's).
"""

import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runner.checks import ConfigError, fail
from runner.columns import AXES, DISTRIBUTION_COLUMNS
from runner.results import SAMPLE_AXES

log = logging.getLogger("runner")

FEATURES = ("digits", "clip", "inception")
KID_SUBSETS = 100


class Vectors(nn.Module):
    """The identity on feature vectors already computed, as torchmetrics' `feature` module: the feature network
    then runs once per image, not once per metric."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


class DigitFeatures(nn.Module):
    """The digit classifier up to its penultimate layer (ReLU of the hidden layer): (N, 1, 8, 8) -> (N, 64)."""

    def __init__(self, path: str | None = None):
        from runner.digits import load_classifier

        super().__init__()
        self.layers = load_classifier(path)[:-1]  # all but the class logits
        self.num_features = self.layers[-2].out_features

    @torch.no_grad()
    def forward(self, x):
        return self.layers(x)


def digit_features(images) -> torch.Tensor:
    """Features of PIL images or uint8 arrays, through the classifier's own preprocessing."""
    from runner.digits import classifier_input

    x = torch.from_numpy(classifier_input(images))[:, None]
    return DigitFeatures()(x).double()


def real_digits(size: int, digits=None) -> np.ndarray:
    """The held-out real digits as uint8 (N, size, size, 3) pictures, only of `digits` when given."""
    from runner.digits import load_digit_split, render_digits

    _, _, test_x, test_y = load_digit_split()
    if digits is not None:
        test_x = test_x[np.isin(test_y, sorted(digits))]
    return render_digits(test_x, size)


def clip_features(images, clip_model: str) -> torch.Tensor:
    """CLIP image embeddings (L2-normalised) from local weights; refused with one line where they are missing."""
    from runner.metrics import load_clip

    loaded = load_clip(clip_model) if clip_model else None
    if loaded is None:
        fail("clip_model", clip_model, "a hub id in the local HF cache or a local directory of CLIP weights")
    model, processor = loaded
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    return (embeds / embeds.norm(dim=-1, keepdim=True)).double()


def features(images, feature: str = "digits", clip_model: str | None = None) -> torch.Tensor:
    if feature == "digits":
        return digit_features(images)
    if feature == "clip":
        return clip_features(images, clip_model)
    if feature == "inception":
        try:
            import torch_fidelity  # noqa: F401  (torchmetrics' Inception weights and code)
            import torchvision  # noqa: F401
        except Exception:
            fail("feature", feature, "digits | clip: Inception FID needs torch-fidelity and torchvision with its "
                                     "weights, not installed here (torchvision breaks the CPU-only torch)")
        return inception_features(images)
    fail("feature", feature, " | ".join(FEATURES))


def inception_features(images) -> torch.Tensor:
    """torchmetrics' FID Inception v3 pool features (2048) of uint8 images; needs torch-fidelity's weights."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    x = torch.from_numpy(np.stack([np.asarray(i, dtype=np.uint8) for i in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        return net(x).double()


def fid_kid(fake: torch.Tensor, real: torch.Tensor, seed: int = 0) -> dict:
    """FID, KID and the KID's std over random half-size subsets, between two sets of feature vectors."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=Vectors(fake.shape[1]))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    with warnings.catch_warnings():  # "will save all extracted features": a few hundred vectors here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=Vectors(fake.shape[1]), subsets=KID_SUBSETS,
                                      subset_size=max(2, min(len(fake), len(real)) // 2))
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng():  # KID draws its subsets from torch's global generator: seeded here, restored after
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return dict(fid=float(fid.compute()), kid=float(kid_mean), kid_std=float(kid_std))


def cells(df):
    """(key, rows) per cell: images that differ only by seed and prompt, among the ok rows with an image."""
    rows = df[(df["status"] == "ok") & df["image_path"].astype(bool)] if "status" in df else df
    by = [a for a in AXES if a in rows and a not in SAMPLE_AXES]
    return list(rows.groupby(by, sort=True, dropna=False)) if by else [((), rows)]


def prompted_digits(prompts) -> set | None:
    """The digits a cell's prompts ask for; None (all digits) when any prompt names none."""
    from runner.digits import digit_from_prompt

    digits = {digit_from_prompt(p) if isinstance(p, str) else None for p in prompts}
    return None if None in digits else digits


def add_distribution(df, min_images: int):
    """`df` with DISTRIBUTION_COLUMNS per cell (the same values on every row of a cell) for the cells of images
    the digit classifier scored (column `class_confidence`) with at least `min_images` images; others stay empty."""
    from runner.record import read_image

    df = df.drop(columns=[c for c in DISTRIBUTION_COLUMNS if c in df.columns])
    values = {c: [None] * len(df) for c in DISTRIBUTION_COLUMNS}
    skipped = []
    if "class_confidence" in df and "image_path" in df:
        scored = df[df["class_confidence"].notna()]
        for key, rows in cells(scored):
            if len(rows) < min_images:
                skipped.append(len(rows))
                continue
            images = [read_image(p) for p in rows["image_path"]]
            real = real_digits(images[0].shape[0], prompted_digits(rows["prompt"]) if "prompt" in rows else None)
            result = fid_kid(digit_features(images), digit_features(real))
            for column, value in zip(DISTRIBUTION_COLUMNS, (result["fid"], result["kid"], result["kid_std"])):
                for position in df.index.get_indexer(rows.index):
                    values[column][position] = value
    if skipped:
        log.info(f"sweep: FID/KID skipped for {len(skipped)} cell(s) of fewer than {min_images} images "
                 f"({min(skipped)}–{max(skipped)} images)")
    return df.assign(**values)


def reference_scale(size: int = 32, seed: int = 0) -> dict:
    """The digit FID/KID scale: real vs real (the held-out split, two random halves; and the training split vs the
    held-out one) and uniform noise vs the held-out real digits."""
    from runner.digits import load_digit_split, render_digits

    train_x, _, test_x, _ = load_digit_split()
    real = render_digits(test_x, size)
    order = np.random.default_rng(seed).permutation(len(real))
    half = len(real) // 2
    noise = np.random.default_rng(seed).integers(0, 256, (len(real), size, size, 3), dtype=np.uint8)
    test = digit_features(real)
    return {"real vs real (held-out halves)": fid_kid(digit_features(real[order[:half]]),
                                                      digit_features(real[order[half:]])),
            "real vs real (train vs held-out)": fid_kid(digit_features(render_digits(train_x, size)), test),
            "noise vs real": fid_kid(digit_features(noise), test)}


def main(argv=None) -> int:
    """`python -m runner.fid PATH [--feature digits|clip --real DIR --clip-model ID]`: FID/KID per cell."""
    import argparse

    from runner import results
    from runner.record import read_image

    parser = argparse.ArgumentParser(prog="python -m runner.fid", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("paths", nargs="*", type=Path, help="sweep dirs, job dirs or results trees")
    parser.add_argument("--feature", default="digits", help=" | ".join(FEATURES))
    parser.add_argument("--real", type=Path, help="a directory of real images (PNG/JPEG; digits: the held-out split)")
    parser.add_argument("--clip-model", help="CLIP weights for --feature clip (local dir or HF cache)")
    parser.add_argument("--scale", action="store_true", help="print the digit scale: real vs real, noise vs real")
    args = parser.parse_args(argv)
    try:
        if args.scale:
            for name, value in reference_scale().items():
                print(f"{name}: FID {value['fid']:.3f}  KID {value['kid']:.5f} ± {value['kid_std']:.5f}")
            return 0
        if args.feature not in FEATURES:
            fail("feature", args.feature, " | ".join(FEATURES))
        if args.feature != "digits" and (args.real is None or not args.real.is_dir()):
            fail("real", str(args.real), f"a directory of real images (--feature {args.feature} has no built-in set)")
        df = results.load(*args.paths)
        real_set = None
        if args.real is not None:
            real_set = features([read_image(p) for p in sorted(args.real.iterdir())
                                 if p.suffix.lower() in (".png", ".jpg", ".jpeg")], args.feature, args.clip_model)
        for key, rows in cells(df):
            images = [read_image(p) for p in rows["image_path"]]
            if len(images) < 2:
                continue
            real = real_set if real_set is not None else \
                digit_features(real_digits(images[0].shape[0], prompted_digits(rows.get("prompt", []))))
            value = fid_kid(features(images, args.feature, args.clip_model), real)
            print(f"{key}: n={len(images)}  FID {value['fid']:.3f}  KID {value['kid']:.5f} ± {value['kid_std']:.5f}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
