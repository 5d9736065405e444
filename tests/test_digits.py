"""The embedded digit models make real pictures: digits that the digit classifier recognises.

Sampled through the diffusers pipelines themselves, offline, on CPU, in seconds (8x8 latents, 32x32 pixels).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runner import EMBEDDED_MODELS_DIR
from runner.digits import (digit_from_prompt, digit_prompt, load_digit_split, render_digits, score_digits)

from conftest import to_uint8

SEEDS = (0, 1, 2)
DIGITS = [d for d in range(10) for _ in SEEDS]


def generators(n_repeats, seeds=SEEDS):
    return [torch.Generator("cpu").manual_seed(s) for _ in range(n_repeats) for s in seeds]


@pytest.fixture(scope="module")
def sd_pipe():
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODELS_DIR / "digits-sd", use_safetensors=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)  # deterministic
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_scores(pipe, guidance, prompts=None):
    prompts = prompts or [digit_prompt(d) for d in DIGITS]
    images = pipe(prompts, generator=generators(10), num_inference_steps=30, guidance_scale=guidance,
                  output_type="np").images
    assert images.shape == (len(prompts), 32, 32, 3)
    return score_digits(to_uint8(images), [digit_from_prompt(p) for p in prompts])


@pytest.mark.slow
def test_text_conditioned_model_draws_the_prompted_digit(sd_pipe):
    guided, unguided = sd_scores(sd_pipe, 7.5), sd_scores(sd_pipe, 1.0)
    hits = np.mean([s["predicted_digit"] == d for s, d in zip(guided, DIGITS)])
    assert hits >= 0.8, f"only {hits:.0%} of images at guidance 7.5 show the prompted digit"
    # the same seeds: classifier-free guidance makes the prompt matter more
    adherence = [np.mean([s["prompt_adherence"] for s in scores]) for scores in (guided, unguided)]
    assert adherence[0] > adherence[1], adherence


@pytest.mark.slow
def test_text_conditioned_model_reads_numerals_too(sd_pipe):
    scores = sd_scores(sd_pipe, 7.5, [digit_prompt(d, numeral=True) for d in DIGITS])
    assert np.mean([s["predicted_digit"] == d for s, d in zip(scores, DIGITS)]) >= 0.7


@pytest.mark.slow
def test_unconditional_model_draws_digits_and_noise_is_not_one():
    from diffusers import DDIMScheduler, DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(EMBEDDED_MODELS_DIR / "digits-ddpm", use_safetensors=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    n = 16
    images = pipe(batch_size=n, generator=generators(1, range(n)), num_inference_steps=50, output_type="np").images
    assert images.shape == (n, 32, 32, 3)
    rng = np.random.default_rng(0)
    noise = np.concatenate([rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                            to_uint8(np.clip(rng.standard_normal((n, 32, 32, 3)) / 2 + 0.5, 0, 1))])

    def confident(imgs):
        return np.mean([s["class_confidence"] > 0.9 for s in score_digits(imgs)])

    samples_rate, noise_rate = confident(to_uint8(images)), confident(noise)
    assert samples_rate >= 0.6 and noise_rate <= 0.05, (samples_rate, noise_rate)


def test_classifier_recognises_held_out_digits():
    _, _, test_x, test_y = load_digit_split()  # never seen in training
    scores = score_digits(render_digits(test_x, 32), test_y.tolist())
    accuracy = np.mean([s["predicted_digit"] == y for s, y in zip(scores, test_y)])
    assert accuracy > 0.95
    assert np.mean([s["prompt_adherence"] for s in scores]) > 0.9


def test_score_digits_takes_pil_images_and_any_size():
    from PIL import Image

    _, _, test_x, test_y = load_digit_split()
    pictures = [Image.fromarray(a) for a in render_digits(test_x[:20], 64)]
    scores = score_digits(pictures, [int(test_y[0])] + [None] * 19)
    assert scores[0]["prompt_adherence"] is not None and all(s["prompt_adherence"] is None for s in scores[1:])
    assert all(0.1 <= s["class_confidence"] <= 1 for s in scores)
    assert np.mean([s["predicted_digit"] == y for s, y in zip(scores, test_y[:20])]) >= 0.9
    with pytest.raises(ValueError):
        score_digits(pictures, [1, 2])


@pytest.mark.parametrize("prompt, digit", [
    ("a handwritten digit seven", 7), ("a handwritten digit 7", 7), ("7", 7), ("Zero", 0), ("digit: nine.", 9),
    ("a handwritten digit eight, an 8", 8), ("a photo of a cat", None), ("", None), (None, None),
    ("someone wrote this", None), ("2024", None), ("a three or a five", None),
])
def test_digit_from_prompt(prompt, digit):
    assert digit_from_prompt(prompt) == digit


@pytest.mark.parametrize("name", ["digits-ddpm", "digits-sd", "digits-classifier"])
def test_digit_models_are_small_and_safetensors_only(name):
    folder = Path(EMBEDDED_MODELS_DIR) / name
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 7e6
    assert any(f.suffix == ".safetensors" for f in files)
    assert not [f for f in files if f.suffix in {".bin", ".ckpt", ".pt", ".pkl", ".joblib"}]
    if name == "digits-sd":
        index = json.loads((folder / "model_index.json").read_text())
        assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
