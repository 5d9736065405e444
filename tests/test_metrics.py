"""Per-image metric columns (runner/metrics.py): the digit classifier on the embedded digit models, CLIP score on
text-to-image models whose CLIP weights are on this machine, and empty columns otherwise."""

import math
from pathlib import Path

import pytest

from conftest import read_png, run_job_in
from runner import embedded_model_path
from runner.digits import score_digits
from runner.checks import ConfigError

COLUMNS = ("prompt_adherence", "class_confidence", "predicted_digit", "clip_score")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIP (safetensors) with a processor, saved as hub models are: the clip_score path, offline."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(embedded_model_path("tiny-sd"), subfolder="tokenizer")
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16))
    processor = CLIPProcessor(tokenizer=tokenizer, image_processor=CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_digit_model_rows_carry_the_classifier_scores(tmp_path):
    rows = run_job_in(tmp_path, "prompt=['a handwritten digit three','a blank page']", "seed=[0,1]", "steps=10")
    assert [r["status"] for r in rows] == ["ok"] * 4
    for row in rows:
        expected, = score_digits([read_png(tmp_path / row["image_path"])], [3 if "three" in row["prompt"] else None])
        assert 0.1 <= row["class_confidence"] <= 1 and row["predicted_digit"] == expected["predicted_digit"]
        assert row["class_confidence"] == pytest.approx(expected["class_confidence"], abs=1e-6)
        assert row["clip_score"] is None
    three, blank = rows[:2], rows[2:]
    assert all(0 <= r["prompt_adherence"] <= 1 for r in three)
    assert all(r["prompt_adherence"] is None for r in blank)  # the prompt names no digit


def test_resumed_job_scores_its_kept_images_too(tmp_path):
    first = run_job_in(tmp_path, "seed=[4,5]", "steps=6")
    again = run_job_in(tmp_path, "seed=[4,5]", "steps=6")  # both images kept, read back from their PNGs
    assert [r["prompt_adherence"] for r in again] == pytest.approx([r["prompt_adherence"] for r in first])


def test_unconditional_digit_model_has_confidence_but_no_adherence(tmp_path):
    rows = run_job_in(tmp_path, "model=digits-ddpm", "scheduler=ddim", "steps=10", "seed=[0,1]")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["prompt_adherence"] is None and 0.1 <= r["class_confidence"] <= 1 for r in rows)


def test_models_without_a_metric_have_empty_columns(tmp_path):
    row, = run_job_in(tmp_path, "model=tiny-sd", "steps=2")
    assert row["status"] == "ok" and all(row[c] is None for c in COLUMNS)


def test_clip_score_with_local_clip_weights(tmp_path, tiny_clip):
    rows = run_job_in(tmp_path, "model=tiny-sd", "model.metric=clip", f"model.clip_model={tiny_clip}", "steps=2",
                      "prompt=['a red cube','a green ball']")
    scores = [r["clip_score"] for r in rows]
    assert all(isinstance(s, float) and 0 <= s <= 100 and math.isfinite(s) for s in scores)
    assert scores[0] != scores[1] and rows[0]["prompt_adherence"] is None


def test_clip_score_without_weights_says_so_once_and_runs_on(tmp_path, caplog):
    from runner.metrics import load_clip

    load_clip.cache_clear()
    with caplog.at_level("WARNING", logger="runner"):
        for job in ("a", "b"):
            rows = run_job_in(tmp_path / job, "model=tiny-sd", "model.metric=clip", "model.clip_model=nobody/no-clip",
                              "steps=2")
            assert rows[0]["status"] == "ok" and rows[0]["clip_score"] is None
    said = [r.message for r in caplog.records if "clip_score" in r.message]
    assert len(said) == 1 and "nobody/no-clip" in said[0]


def test_unknown_metric_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model.metric='fid' is not allowed: digits \| clip \| null"):
        run_job_in(tmp_path, "model.metric=fid")
