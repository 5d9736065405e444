"""Per-image quality metrics of a job, picked by `model.metric` and computed once its images are drawn.

- `digits` (the embedded digit models): the shipped digit classifier (runner/digits.py) gives
  `prompt_adherence` (probability of the prompted digit), `class_confidence` (how clearly it is any digit)
  and `predicted_digit`.
- `clip` (hub text-to-image models): `clip_score`, the CLIP score of Hessel et al. 2021 ("CLIPScore: A
  Reference-free Evaluation Metric for Image Captioning") as torchmetrics defines it, 100 * max(cos(E_image,
  E_prompt), 0), with `model.clip_model`, when its weights (safetensors) are on this machine: a local directory or
  the HF cache. Nothing is downloaded for it; without the weights it says so once and the column stays empty.
  (torchmetrics 1.9's clip_score itself fails with transformers 5, whose get_image_features returns a ModelOutput;
  CLIPModel's forward gives the same normalised embeddings in every version.)
- null: no metric columns are filled.

Every row gets all columns, empty where not computed, so tables of different models concatenate.
"""

import logging
from functools import lru_cache
from pathlib import Path

from runner.columns import IMAGE_METRIC_COLUMNS

log = logging.getLogger("runner")

METRICS = ("digits", "clip")


def image_metrics(metric: str | None, images, prompts, clip_model: str | None = None,
                  conditional: bool = True) -> list[dict]:
    """One dict of IMAGE_METRIC_COLUMNS per image (uint8 HWC arrays); `prompts[i]` is image i's prompt."""
    empty = [dict.fromkeys(IMAGE_METRIC_COLUMNS) for _ in images]
    if metric == "digits":
        from runner.digits import digit_from_prompt, score_digits

        targets = [digit_from_prompt(p) if conditional else None for p in prompts]
        return [dict(row, **score) for row, score in zip(empty, score_digits(images, targets))]
    if metric == "clip":
        scores = clip_scores(clip_model, images, prompts)
        return [dict(row, clip_score=score) for row, score in zip(empty, scores)]
    return empty


def clip_scores(clip_model: str, images, prompts) -> list[float | None]:
    import torch

    loaded = load_clip(clip_model)
    if loaded is None:
        return [None] * len(images)
    model, processor = loaded
    inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        out = model(**inputs)  # image_embeds and text_embeds are L2-normalised
    return (100 * (out.image_embeds * out.text_embeds).sum(dim=-1).clamp(min=0)).tolist()


@lru_cache(maxsize=2)
def load_clip(name_or_path: str):
    """(CLIPModel, CLIPProcessor) from a local directory or the HF cache, safetensors only; None (said once) if
    the weights are not here."""
    path = local_snapshot(name_or_path)
    try:
        if path is None:
            raise FileNotFoundError("not in the local HF cache and not a directory")
        from transformers import CLIPModel, CLIPProcessor

        return CLIPModel.from_pretrained(path, use_safetensors=True).eval(), CLIPProcessor.from_pretrained(path)
    except Exception as err:
        log.warning(f"clip_score: no CLIP weights for model.clip_model={name_or_path!r} here ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200]}); the clip_score column stays empty. "
                    f"`huggingface-cli download {name_or_path}` once makes them available offline.")
        return None


def local_snapshot(name_or_path: str) -> str | None:
    if Path(name_or_path).is_dir():
        return str(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:
        return None
