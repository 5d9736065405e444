"""Handwritten-digit metrics for the embedded digit models (digits-ddpm, digits-sd).

A small CNN, trained on scikit-learn's bundled 8x8 digits (see runner/tools/train_digits.py), says which digit an image
shows. From its class probabilities come two per-image numbers:

- `prompt_adherence`: the probability of the digit the prompt asked for (None when the prompt names no digit);
- `class_confidence`: the largest class probability, i.e. how clearly the image is *some* digit. The classifier was
  also shown noise and blank images with a uniform target, so that non-digits score low (about 0.1).

The prompt template of digits-sd is "a handwritten digit seven" (the digit as an English word); the numeral form
"a handwritten digit 7" was also trained. `digit_from_prompt` reads either.
"""

import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

CLASSIFIER_DIR = Path(__file__).parent / "models" / "digits-classifier"
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PROMPT_TEMPLATE = "a handwritten digit {}"
HELD_OUT_FRACTION = 0.2  # of scikit-learn's 1797 digits, kept out of every model's training
SPLIT_SEED = 0


def digit_prompt(digit: int, numeral: bool = False) -> str:
    """The prompt digits-sd was trained on: "a handwritten digit seven" (or "... 7" with `numeral`)."""
    return PROMPT_TEMPLATE.format(digit if numeral else DIGIT_WORDS[digit])


def digit_from_prompt(prompt: str | None) -> int | None:
    """The digit a prompt asks for ("a handwritten digit seven" -> 7, "7" -> 7); None if it names none or several."""
    if not prompt:
        return None
    found = set()
    for token in re.findall(r"[a-z]+|\d+", prompt.lower()):
        if token in DIGIT_WORDS:
            found.add(DIGIT_WORDS.index(token))
        elif len(token) == 1 and token.isdigit():  # "7", but not "12" or "2024"
            found.add(int(token))
    return found.pop() if len(found) == 1 else None


def load_digit_split():
    """scikit-learn's digits as (train_x, train_y, test_x, test_y); x is (N, 8, 8) float32 in [0, 1], ink bright.

    The split is fixed (seeded, stratified), so the held-out digits are the same for training and tests.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)  # pixel counts 0..16 of the original 4x4 blocks
    y = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED,
                                                        stratify=y)
    return train_x, train_y, test_x, test_y


def upscale(x8, size: int):
    """(N, 8, 8) digits in [0, 1] -> (N, 1, size, size) torch tensor in [0, 1], bilinear (the models' pictures)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(x8), dtype=torch.float32)[:, None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def render_digits(x8, size: int = 32) -> np.ndarray:
    """Real digits as pictures like the models': uint8 (N, size, size, 3), grey replicated to RGB."""
    x = upscale(x8, size)[:, 0].numpy()
    return np.repeat((x * 255).round().astype(np.uint8)[..., None], 3, axis=-1)


def classifier_input(images, size: int = 8) -> np.ndarray:
    """PIL images or uint8 HWC/HW arrays of any size -> (N, 8, 8) float32 in [0, 1].

    Grey (PIL's "L"), then an area-average (BOX) resize to 8x8, the way the 8x8 digits were made from 32x32 scans.
    """
    from PIL import Image

    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        out.append(np.asarray(image.convert("L").resize((size, size), Image.BOX), dtype=np.float32) / 255.0)
    return np.stack(out) if out else np.zeros((0, size, size), np.float32)


def build_classifier(config: dict):
    """The classifier's torch module, from its config.json (the same code builds it for training)."""
    from torch import nn

    c1, c2 = config["conv_channels"]
    flat = c2 * (config["input_size"] // 2) ** 2
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, config["hidden"]), nn.ReLU(), nn.Linear(config["hidden"], config["num_classes"]),
    )


@lru_cache(maxsize=4)
def load_classifier_config(path: str | None = None) -> dict:
    """The classifier's config.json: architecture and input (size, value range, ink polarity)."""
    return json.loads((Path(path or CLASSIFIER_DIR) / "config.json").read_text())


@lru_cache(maxsize=4)
def load_classifier(path: str | None = None):
    """The digit classifier (eval mode, CPU, float32), loaded once per path from safetensors."""
    from safetensors.torch import load_file

    path = str(path or CLASSIFIER_DIR)
    model = build_classifier(load_classifier_config(path))
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return model.eval()


def classify_digits(images, path: str | None = None) -> np.ndarray:
    """Class probabilities, (N, 10), of PIL images or uint8 arrays."""
    import torch

    x = torch.from_numpy(classifier_input(images, load_classifier_config(path)["input_size"]))[:, None]
    with torch.no_grad():
        return torch.softmax(load_classifier(path)(x), dim=1).numpy()


def score_digits(images, target_digits=None, path: str | None = None) -> list[dict]:
    """Per image: `prompt_adherence` (probability of its target digit, None without one), `class_confidence`
    (largest class probability) and `predicted_digit`. `target_digits` is one int/None per image, or None."""
    images = list(images)
    targets = list(target_digits) if target_digits is not None else [None] * len(images)
    if len(targets) != len(images):
        raise ValueError(f"{len(images)} images but {len(targets)} target digits")
    probs = classify_digits(images, path)
    return [{"prompt_adherence": None if target is None else float(p[target]),
             "class_confidence": float(p.max()),
             "predicted_digit": int(p.argmax())} for p, target in zip(probs, targets)]
